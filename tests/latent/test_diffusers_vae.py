"""A diffusers ``AutoencoderKL`` folder as a latent run's VAE (``latent: {vae: DIR}``, ``elucidate encode --vae DIR``):
the adapter encodes and decodes exactly as diffusers pipelines do (latents = (mean - shift) * scaling_factor,
images = decode(z / scaling_factor + shift)), a tiny latent run trains on it, keeps its own copy and samples
decoded images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from elucidate.data import build_dataset
from elucidate.errors import ConfigError, UserError
from elucidate.latent.data import LatentDecoder
from elucidate.latent.diffusers_vae import DiffusersVAE, diffusers_vae_dir, load_diffusers_vae
from elucidate.latent.encode import read_encoded
from elucidate.run import RunDir, load_vae
from elucidate.run.model import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

SCALING, SHIFT = 0.5, 0.25


def make_vae(shift_factor: float | None = SHIFT, seed: int = 0):
    """A tiny random diffusers AutoencoderKL for 1-channel images: 8x8 -> 4x4x4 latents."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=[8, 16],
                                   down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                   latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=8,
                                   scaling_factor=SCALING, shift_factor=shift_factor).eval()


@pytest.fixture
def vae_folder(tmp_path) -> Path:
    folder = tmp_path / "sd-vae"
    make_vae().save_pretrained(folder, safe_serialization=True)
    return folder


def test_adapter_encodes_and_decodes_as_diffusers_pipelines_do(vae_folder):
    reference = make_vae()  # the same weights as the saved one
    adapter = load_diffusers_vae(vae_folder)
    assert isinstance(adapter, DiffusersVAE) and not adapter.training
    assert (adapter.scaling_factor, adapter.shift_factor, adapter.latent_shape) == (SCALING, SHIFT, (4, 4, 4))
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = adapter.encode(x)
        dist = reference.encode(x).latent_dist
        torch.testing.assert_close(posterior.mean * SCALING, (dist.mean - SHIFT) * SCALING, rtol=0, atol=0)
        torch.testing.assert_close(posterior.std, dist.std, rtol=0, atol=0)
        latents = posterior.mean * SCALING  # what a latent run trains on (scale_factor = scaling_factor)
        images = LatentDecoder(adapter, SCALING)(latents)  # how a latent run decodes its samples
        torch.testing.assert_close(images, reference.decode(latents / SCALING + SHIFT).sample, rtol=0, atol=0)
    # elucidate.run.load_vae takes the folder too, and a pipeline folder through its vae/
    assert isinstance(load_vae(vae_folder), DiffusersVAE)
    pipeline = vae_folder.parent / "pipeline"
    pipeline.mkdir()
    shutil.copytree(vae_folder, pipeline / "vae")
    (pipeline / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    assert diffusers_vae_dir(pipeline) == pipeline / "vae"
    assert diffusers_vae_dir(vae_folder.parent) is None  # not a diffusers folder: a train-vae run, maybe


def test_latent_run_on_a_diffusers_vae_trains_samples_and_keeps_its_copy(vae_folder, tiny_config, write_config,
                                                                         tmp_path, cli_main, capsys):
    raw = tiny_config(data={"max_size": 48}, latent={"vae": str(vae_folder)},
                      network={"model_channels": 16, "channel_mult": [1, 2]},
                      training={"steps": 3, "checkpoint_every": 3}, sampling={"steps": 3})
    run = tmp_path / "latent"
    code, err = cli_main(["train", write_config(raw, tmp_path / "l.yaml"), "--out", run, "--no-progress"])
    assert code == 0, err
    record = json.loads(RunDir(run).latent.read_text())
    assert record["scale_factor"] == SCALING and record["latent_shape"] == [4, 4, 4]  # the VAE's scaling_factor
    assert record["vae"]["source"] == str(vae_folder.resolve()) and record["vae"]["step"] == 0
    assert RunDir(run).vae.is_file()

    shutil.rmtree(vae_folder)  # the run holds its own copy: sampling does not need the folder
    loaded = load_run(run)
    z = loaded.sample(range(4))
    assert z.shape == (4, 4, 4, 4)
    images = loaded.images(z)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    with torch.no_grad():  # decoded by the copy exactly as the original VAE decodes
        torch.testing.assert_close(images, make_vae().decode(z / SCALING + SHIFT).sample, rtol=0, atol=0)
    capsys.readouterr()
    code, err = cli_main(["sample", run, "--seeds", "0-3", "--out", tmp_path / "s.npz"])
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as data:
        assert data["samples"].shape == (4, 8, 8, 1) and data["samples"].dtype == np.uint8


def test_encode_accepts_the_folder_and_training_checks_it(vae_folder, tiny_config, write_config, tmp_path, cli_main,
                                                          capsys):
    out = tmp_path / "latents.npz"
    capsys.readouterr()
    code, err = cli_main(["encode", "digits", "--vae", vae_folder, "--out", out])
    assert code == 0, err
    mean, std, meta = read_encoded(out)
    assert mean.shape == (1797, 4, 4, 4) and meta["vae"] == str(vae_folder.resolve())
    pixels = build_dataset({"dataset": "digits", "resolution": 8})
    x, _ = pixels.get_batch(torch.arange(5))
    with torch.no_grad():
        torch.testing.assert_close(mean[:5], make_vae().encode(x).latent_dist.mean - SHIFT, rtol=1e-5, atol=1e-6)
    raw = tiny_config(data={}, latent={"vae": str(vae_folder), "encoded": str(out), "scale_factor": 0.3},
                      network={"model_channels": 8}, training={"steps": 1, "checkpoint_every": 1})
    raw["data"].pop("max_size")
    code, err = cli_main(["train", write_config(raw, tmp_path / "e.yaml"), "--out", tmp_path / "e", "--no-progress"])
    assert code == 0, err
    assert json.loads(RunDir(tmp_path / "e").latent.read_text())["scale_factor"] == 0.3  # a given one wins

    # latents of another VAE: refused in one line
    other = tmp_path / "other-vae"
    make_vae(seed=1).save_pretrained(other, safe_serialization=True)
    raw["latent"]["vae"] = str(other)
    code, err = cli_main(["train", write_config(raw, tmp_path / "o.yaml"), "--out", tmp_path / "o", "--no-progress"])
    assert code == 2 and len(err) == 1 and "was encoded with another autoencoder" in err[0], err


def test_folder_errors(vae_folder, tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(UserError, match=r"holds a diffusers UNet2DModel, not an AutoencoderKL"):
        load_vae(unet)
    (vae_folder / "diffusion_pytorch_model.safetensors").rename(vae_folder / "weights.bin")
    with pytest.raises(UserError, match=r"has no diffusion_pytorch_model.safetensors \(safetensors weights only"):
        diffusers_vae_dir(vae_folder)
    adapter = DiffusersVAE(make_vae())
    with pytest.raises(ConfigError, match=r"the data are 9x9 but the diffusers VAE down-samples by 2"):
        adapter.at_resolution(9)
    assert adapter.at_resolution((16, 8)).latent_shape == (4, 8, 4)
