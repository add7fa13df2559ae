"""Diffusion in a VAE's latent space: config, latent data (a posterior sample per use, deterministic
per (seed, step)), the auto scale factor, the run's copy of the VAE, exact resume, pre-encoded
latents, and decoding in sample / eval / trajectory."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from elucidate.config import dump_config, parse_config
from elucidate.data import build_dataset
from elucidate.errors import ConfigError, UserError
from elucidate.latent.data import LatentDataset, scale_for
from elucidate.latent.encode import encode_posteriors, read_encoded
from elucidate.run import RunDir, load_vae
from elucidate.run.checkpoint import load_checkpoint
from elucidate.run.model import load_run
from elucidate.training import Trainer, derived_generator, train_vae
from elucidate.training.latent import encode_dataset
from elucidate.viz import TrajectoryRecorder

pytestmark = pytest.mark.usefixtures("one_thread")


def vae_config(tiny_vae_config, seed: int = 5) -> dict:
    """The tiny autoencoder (``tiny_vae_config``: 8x8 digits -> 4x4x4 latents) for 6 steps, without GAN and
    perceptual terms (a few steps are enough to get distinct latents)."""
    raw = tiny_vae_config(training={"steps": 6, "checkpoint_every": 6, "seed": seed})
    raw["loss"] = {"disc_weight": 0.0}
    return raw


def latent_config(tiny_config, vae: Path, **latent) -> dict:
    """The tiny run (``tiny_config``) in the latent space of the autoencoder ``vae``: 120 digits, a 2-level
    16-channel U-Net, 4 steps with a checkpoint every 2."""
    return tiny_config(data={"max_size": 120}, latent={"vae": str(vae), **latent},
                       network={"model_channels": 16, "channel_mult": [1, 2]},
                       training={"log_every": 1, "seed": 3}, sampling={"steps": 3})


@pytest.fixture(scope="module")
def vae_run(tiny_vae_config, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("latent") / "vae"
    train_vae(vae_config(tiny_vae_config), run, progress=False)
    return run


def train(config: dict, run: Path, steps: int | None = None) -> dict:
    if steps is not None:
        config = json.loads(json.dumps(config))
        config["training"]["steps"] = steps
    return Trainer(parse_config(config), run, progress=False, log=lambda *a: None).train()


# --- config ----------------------------------------------------------------------------------------
def test_latent_section_is_validated_and_absent_from_pixel_configs():
    assert "latent" not in parse_config({}).to_dict()
    assert "latent" not in yaml.safe_load(dump_config(parse_config({})))
    cfg = parse_config({"latent": {"vae": "runs/vae", "scale_factor": 0.18}})
    assert cfg.latent.scale_factor == 0.18 and cfg.latent.sample_posterior
    assert cfg.to_dict()["latent"]["vae"] == "runs/vae"
    for bad, match in [({"vae": "v", "scale_facter": 1}, "unknown key latent.scale_facter .*'scale_factor'"),
                       ({"vae": "v", "scale_factor": 0}, "latent.scale_factor = 0: expected 'auto' or a number > 0"),
                       ({"vae": "v", "scale_factor": "big"}, "latent.scale_factor = 'big'"),
                       ({"scale_factor": 1.0}, "latent.vae is required"),
                       ({"vae": "v", "sample_posterior": "yes"}, "latent.sample_posterior = 'yes': expected true"),
                       ("runs/vae", "section 'latent' must be a mapping")]:
        with pytest.raises(ConfigError, match=match):
            parse_config({"latent": bad})
    with pytest.raises(ConfigError, match="training.augment is not supported with latent diffusion"):
        parse_config({"latent": {"vae": "v"}, "training": {"augment": {"p": 0.1}}})


# --- latent data -----------------------------------------------------------------------------------
def test_latent_dataset_draws_scaled_posterior_samples():
    pixels = build_dataset({"dataset": "digits", "max_size": 10})
    mean, std = torch.randn(10, 4, 2, 2), torch.rand(10, 4, 2, 2) + 0.1
    data = LatentDataset(pixels, mean, std, 0.5)
    assert (data.channels, data.resolution, data.num_classes, len(data)) == (4, (2, 2), 10, 10)
    idx = torch.tensor([3, 1, 3])
    z, labels = data.get_batch(idx)
    assert torch.equal(z, mean[idx] * 0.5) and torch.equal(labels, pixels.get_batch(idx)[1])
    a = data.draw_batch(idx, derived_generator(0, "latent", 7))
    b = data.draw_batch(idx, derived_generator(0, "latent", 7))
    c = data.draw_batch(idx, derived_generator(0, "latent", 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(mean[idx].shape, generator=derived_generator(0, "latent", 7))
    torch.testing.assert_close(a, (mean[idx] + std[idx] * noise) * 0.5)
    assert not torch.equal(a[0], a[2])  # the same image drawn twice in a batch: two posterior samples
    fixed = LatentDataset(pixels, mean, std, 0.5, sample_posterior=False)
    assert torch.equal(fixed.draw_batch(idx, derived_generator(0, "latent", 7)), mean[idx] * 0.5)
    with pytest.raises(ConfigError, match="hold 9 items but the data section gives 10 images"):
        LatentDataset(pixels, mean[:9], std[:9], 1.0)


def test_scale_factor_gives_the_formulation_sigma_data():
    mean = torch.randn(500, 4, 4, 4) * 3.7 + 1.0
    assert float(mean.double().std()) * scale_for(mean, 0.5) == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(UserError, match="constant"):
        scale_for(torch.ones(3, 4, 2, 2), 0.5)


# --- runs ------------------------------------------------------------------------------------------
def test_latent_run_copies_the_vae_fixes_the_scale_and_resumes_bit_exactly(tiny_config, vae_run, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    config = latent_config(tiny_config, vae_run)
    train(config, full)
    record = json.loads(RunDir(full).latent.read_text())
    pixels = build_dataset({"dataset": "digits", "max_size": 120})
    mean, _ = encode_posteriors(load_vae(vae_run), pixels)
    assert record["scale_factor"] == pytest.approx(0.5 / float(mean.double().std()), rel=1e-6)
    assert record["latent_shape"] == [4, 4, 4] and record["pixel_shape"] == [1, 8, 8]
    assert record["vae"]["source"] == str(RunDir(vae_run).latest_checkpoint().resolve())
    tensors, meta = load_checkpoint(RunDir(full).latest_checkpoint())
    assert meta["latent"] == record and meta["data"]["channels"] == 4 and meta["data"]["resolution"] == [4, 4]
    copy = load_vae(RunDir(full).vae)  # the run's own copy equals the VAE it was trained from
    for (name, a), (_, b) in zip(copy.state_dict().items(), load_vae(vae_run).state_dict().items()):
        assert torch.equal(a, b), name

    train(config, resumed, steps=2)
    train(config, resumed)  # resumes from step 2 with the stored scale, the copied VAE and the same draws
    again = load_checkpoint(RunDir(resumed).latest_checkpoint())[0]
    for key in tensors:
        assert torch.equal(tensors[key], again[key]), key
    with pytest.raises(UserError, match="latent.sample_posterior = True .* but the config says False"):
        train(latent_config(tiny_config, vae_run, sample_posterior=False), resumed, steps=6)


def test_pre_encoded_latents_train_exactly_as_encoding_at_start(tiny_config, tiny_vae_config, vae_run, tmp_path):
    encoded = tmp_path / "latents.npz"
    meta = encode_dataset({"dataset": "digits", "max_size": 120}, vae_run, encoded, progress=False)
    assert meta["count"] == 120 and meta["latent_shape"] == [4, 4, 4]
    mean, std, file_meta = read_encoded(encoded)
    assert file_meta["vae_crc32"] == meta["vae_crc32"] and mean.shape == std.shape == (120, 4, 4, 4)
    train(latent_config(tiny_config, vae_run), tmp_path / "a")
    train(latent_config(tiny_config, vae_run, encoded=str(encoded)), tmp_path / "b")
    a = load_checkpoint(RunDir(tmp_path / "a").latest_checkpoint())[0]
    b = load_checkpoint(RunDir(tmp_path / "b").latest_checkpoint())[0]
    assert all(torch.equal(a[k], b[k]) for k in a)

    other = tmp_path / "vae2"
    train_vae(vae_config(tiny_vae_config, seed=6), other, progress=False)
    with pytest.raises(ConfigError, match="was encoded with another autoencoder"):
        train(latent_config(tiny_config, other, encoded=str(encoded)), tmp_path / "c")
    with pytest.raises(ConfigError, match="the data are 1x32x32 but the VAE .* takes 1x8x8"):
        bad = latent_config(tiny_config, vae_run)
        bad["data"]["resolution"] = 32
        train(bad, tmp_path / "d")
    with pytest.raises(ConfigError, match="latent.vae = .*is not an autoencoder checkpoint"):
        train(latent_config(tiny_config, tmp_path / "a"), tmp_path / "e")  # a diffusion run is not a VAE
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="is not an encoded-latents file"):
        read_encoded(tmp_path / "junk.npz")


def test_sampling_a_latent_run_gives_decoded_images(tiny_config, vae_run, tmp_path):
    run = tmp_path / "run"
    train(latent_config(tiny_config, vae_run), run)
    loaded = load_run(run)
    assert loaded.shape == (4, 4, 4) and loaded.decode is not None
    z = torch.randn(3, 4, 4, 4)
    scale = json.loads(RunDir(run).latent.read_text())["scale_factor"]
    torch.testing.assert_close(loaded.images(z), load_vae(RunDir(run).vae).decode(z / scale))
    assert loaded.images(z).shape == (3, 1, 8, 8)
    from elucidate.viz import save_image_grid  # the training loop's grid shows 4 decoded 1x8x8 images
    grid = RunDir(run).sample_grid(4)  # the last one, at the end of training
    assert Image.open(grid).size == Image.open(save_image_grid(torch.zeros(4, 1, 8, 8), tmp_path / "ref.png")).size

    recorder = TrajectoryRecorder(max_images=2, decode=loaded.decode)
    final = loaded.sample(range(2), callback=recorder)
    recorder.finish(final)
    xs, denoised = recorder.stacked()
    assert xs.shape[1:] == denoised.shape[1:] == (2, 1, 8, 8)
    torch.testing.assert_close(denoised[-1], loaded.images(final))

    RunDir(run).vae.rename(run / "moved.safetensors")  # falls back to the VAE it came from
    assert load_run(run).images(z).shape == (3, 1, 8, 8)


def test_cli_chain_train_vae_encode_train_sample_eval(tiny_config, tiny_vae_config, write_config, cli_main, capsys,
                                                     monkeypatch, tmp_path):
    """The documented commands on tiny settings (in this process, in the test's folder): train-vae, encode, train
    with latent.vae, sample a decoded grid, an npz, a trajectory, and eval on decoded images."""
    from elucidate.cli import main

    def cli(*args) -> str:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert code == 0, err[-2000:]
        return out

    monkeypatch.chdir(tmp_path)
    write_config(vae_config(tiny_vae_config), tmp_path / "vae.yaml")
    cli("train-vae", "vae.yaml", "--out", "vae", "--no-progress")
    out = cli("encode", "digits", "--vae", "vae", "--out", "latents.npz")
    assert "wrote latents.npz: 1797 posteriors of shape [4, 4, 4]" in out  # the whole dataset at the VAE's size
    config = latent_config(tiny_config, Path("vae"))
    config["data"].pop("max_size")
    write_config(config, tmp_path / "latent.yaml")
    cli("train", "latent.yaml", "--out", "L", "--set", "latent.encoded=latents.npz", "--no-progress")
    cli("sample", "L", "--seeds", "0-7", "--out", "s.npz", "--steps", "4", "--trajectory", "traj.png")
    with np.load(tmp_path / "s.npz") as data:
        assert data["samples"].shape == (8, 8, 8, 1) and data["samples"].dtype == np.uint8
    assert Image.open(tmp_path / "traj.png").size[0] > 100
    cli("eval", "L", "--num", "50", "--steps", "3")
    record = json.loads(next(RunDir(tmp_path / "L").eval.glob("fd_digits-*.json")).read_text())
    assert record["num"] == 50 and record["value"] > 0
    code, err = cli_main(["encode", "digits", "--vae", "L", "--out", "x.npz"])
    assert code == 2 and len(err) == 1 and "is not an autoencoder checkpoint" in err[0], err


def test_encode_data_spec_reads_a_config_like_train(tmp_path):
    """`elucidate encode DATA`: a config's data section (read and validated as `train` reads configs), a
    dataset name, or one line naming what is wrong."""
    from elucidate.training.latent import resolve_data_spec

    good = tmp_path / "good.yaml"
    good.write_text("data:\n  dataset: digits\ntraining:\n  steps: 5\n")
    assert resolve_data_spec(str(good))["dataset"] == "digits"
    assert resolve_data_spec("digits")["dataset"] == "digits"
    cases = {"missing.yaml": (None, "does not exist"), "empty.yaml": ("", "is empty"),
             "bad.yaml": ("data: [unclosed\n", "not valid YAML"), "nodata.yaml": ("training: {}\n", "no data section"),
             "wrongkey.yaml": ("data:\n  dataset: digits\n  colour: red\n", "colour")}
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=message):
            resolve_data_spec(str(tmp_path / name))
    with pytest.raises(UserError, match="expected digits"):
        resolve_data_spec(str(tmp_path / "nothing-here"))
