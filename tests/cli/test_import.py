"""`elucidate import`: NVlabs/edm and edm2 networks (safetensors exports, written here with the weight recipes of
tests/nets/test_edm_port.py and tests/nets/test_edm2_port.py, whose layouts those tests prove equal to edm's and
edm2's) become run directories that `sample` draws from exactly as the library does on the same seeds; bad inputs
are one-line errors; eval of a run without recorded data asks for --ref. And `sample --diffusers` on a FlowMatch
folder defaults to Euler on the Flow's own levels."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from elucidate import EDM, IDDPM, Denoiser, Flow, sample
from elucidate.data import Normalizer
from elucidate.nets import load_edm2_network
from elucidate.nets.edm2 import EDM2UNet
from elucidate.nets.edm_port import load_edm_network
from elucidate.run.model import load_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _test_module(name: str):
    """A module of tests/nets (its weight recipes), imported once under its own name."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "nets" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


edm_case = _test_module("test_edm_port").load_case
edm2_weights = _test_module("test_edm2_port").generated_weights

#: A small class-conditional edm2 UNet of 3-channel 8x8 images (only structural arguments: edm2's defaults otherwise).
EDM2_KW = dict(img_resolution=8, in_channels=3, label_dim=3, model_channels=16, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(4,))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Safetensors exports as users make them: edm's DDPM++ (class-conditional, with augment labels) and
    iDDPM-style ADM (twice the image channels at the output) as edm's state dicts, and a small edm2 UNet (our
    EDM2UNet's state dict, edm2's layout) with every tensor set by the recipe (so every path carries signal)."""
    root = tmp_path_factory.mktemp("exports")
    save_file(edm_case("ddpmpp")[0], root / "ddpmpp.safetensors")
    save_file({f"model.{k}": v for k, v in edm_case("adm")[0].items()}, root / "adm.safetensors")
    net = EDM2UNet(**EDM2_KW)
    state = net.state_dict()
    weights = edm2_weights({k: list(v.shape) for k, v in state.items() if k not in ("emb_fourier.freqs",
                                                                                     "emb_fourier.phases")})
    save_file({k: weights.get(k, v).contiguous() for k, v in state.items()}, root / "edm2.safetensors")
    return {"ddpmpp": root / "ddpmpp.safetensors", "adm": root / "adm.safetensors",
            "edm2": root / "edm2.safetensors"}


def _samples(path: Path) -> np.ndarray:
    with np.load(path) as f:
        return f["values"]


def _values(x: torch.Tensor, channels: int) -> np.ndarray:
    """What `sample --out X.npz` stores as ``values``: the model-range samples in 8-bit pixel units."""
    normalizer = Normalizer.fit(torch.zeros(1, channels, 1, 1, dtype=torch.uint8), "minus_one_one")
    return normalizer.from_model(x).permute(0, 2, 3, 1).numpy().astype(np.float32)


def test_edm2_import_samples_as_the_library_does(exports, tmp_path, cli_main):
    run = tmp_path / "edm2-run"
    code, err = cli_main(["import", exports["edm2"], "--out", run, "--from", "edm2"])
    assert code == 0, err
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["network"] == {"arch": "edm2", "label_dim": 3, "model_channels": 16, "channel_mult": [1, 2],
                                 "channel_mult_noise": 1, "channel_mult_emb": 2, "num_blocks": 1,
                                 "attn_resolutions": [4]}
    assert config["diffusion"]["type"] == "EDM" and config["diffusion"]["sigma_data"] == 0.5
    assert (config["sampling"]["sampler"], config["sampling"]["steps"]) == ("heun", 32)
    assert config["data"] == {"dataset": "unknown"}
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]  # nothing else left behind
    assert not list(tmp_path.glob(".*"))  # no temporary folder either
    loaded = load_run(run)
    assert loaded.step == 0 and loaded.info.num_classes == 3 and loaded.normalizer.is_uint8
    seeds, steps = [3, 4, 5, 6], 4
    for label in (0, 2):
        out = tmp_path / f"class{label}.npz"
        code, err = cli_main(["sample", run, "--out", out, "--seeds", "3-6", "--steps", steps, "--class", label,
                              "--device", "cpu", "--no-progress"])
        assert code == 0, err
        D = Denoiser(load_edm2_network(exports["edm2"]), EDM(0.5))
        x = sample(D, (4, 3, 8, 8), sampler="heun", steps=steps, seeds=seeds,
                   cond={"class_labels": torch.full((4,), label)})
        np.testing.assert_allclose(_samples(out), _values(x, 3), rtol=0, atol=1e-3)
    assert np.abs(_samples(tmp_path / "class0.npz") - _samples(tmp_path / "class2.npz")).max() > 1  # the class counts


def test_edm_imports_with_their_formulation(exports, tmp_path, cli_main):
    run = tmp_path / "ddpmpp-run"
    code, err = cli_main(["import", exports["ddpmpp"], "--out", run, "--from", "edm", "--set", "sampling.steps=3"])
    assert code == 0, err
    loaded = load_run(run)
    assert loaded.config.network["arch"] == "ddpmpp" and loaded.label_dim == 4
    assert loaded.denoiser.formulation == EDM(sigma_data=0.5)
    out = tmp_path / "s.npz"
    assert cli_main(["sample", run, "--out", out, "--seeds", "0-1", "--class", "1", "--device", "cpu",
                     "--no-progress"])[0] == 0
    D = Denoiser(load_edm_network(exports["ddpmpp"], "ddpmpp"), EDM(0.5))
    x = sample(D, (2, 3, 16, 16), sampler="heun", steps=3, seeds=[0, 1], cond={"class_labels": torch.ones(2).long()})
    np.testing.assert_allclose(_samples(out), _values(x, 3), rtol=0, atol=1e-3)
    # an iDDPM-style ADM (twice the image channels at the output) is iDDPMPrecond's: the formulation defaults to it
    adm = tmp_path / "adm-run"
    assert cli_main(["import", exports["adm"], "--out", adm, "--from", "edm"])[0] == 0
    loaded = load_run(adm)
    assert loaded.config.network["arch"] == "adm" and isinstance(loaded.denoiser.formulation, IDDPM)
    assert loaded.config.sampling.schedule == "karras"  # edm's generate.py: EDM's schedule for every Precond


def test_bad_inputs_are_one_line_errors(exports, tmp_path, cli_main, capsys):
    out = tmp_path / "run"
    cases = [
        (["import", tmp_path / "missing.safetensors", "--out", out, "--from", "edm"], "does not exist"),
        (["import", exports["edm2"], "--out", out, "--from", "edm"], "is an edm2 network .* use --from edm2"),
        (["import", exports["ddpmpp"], "--out", out, "--from", "edm2"], "is an edm network .* use --from edm$"),
        (["import", exports["ddpmpp"], "--out", out, "--from", "edm", "--precond", "VPP"], "invalid choice: 'VPP'"),
        (["import", exports["adm"], "--out", out, "--from", "edm", "--precond", "EDM"], "use --precond iDDPM"),
        (["import", exports["ddpmpp"], "--out", out, "--from", "edm", "--precond", "iDDPM"], "twice the image"),
        (["import", exports["edm2"], "--out", out, "--from", "edm2", "--precond", "VP"], "edm2's Precond is EDM"),
        (["import", exports["edm2"], "--out", out, "--from", "edm2", "--set", "network.model_channels=32"],
         "--set changes the network's structure"),
        (["import", exports["ddpmpp"], "--out", out, "--from", "edm", "--data", "digits"],
         "1-channel 8x8 images but the network generates 3-channel 16x16"),
    ]
    for argv, message in cases:
        try:
            code, err = cli_main(argv)
        except SystemExit as e:  # argparse's usage errors exit from main
            code, err = e.code, capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (argv, err)
        assert re.search(message, err[0]), (message, err)
        assert not out.exists() and not list(tmp_path.glob(".*")), argv  # nothing half-written
    out.mkdir()
    code, err = cli_main(["import", exports["edm2"], "--out", out, "--from", "edm2"])
    assert code == 2 and err == [f"elucidate import: error: {out} already exists: give a new --out directory"]


def test_eval_without_recorded_data_asks_for_ref(exports, tmp_path, cli_main):
    run = tmp_path / "run"
    assert cli_main(["import", exports["edm2"], "--out", run, "--from", "edm2"])[0] == 0
    for command in ("eval", "sweep"):
        code, err = cli_main([command, run, "--num", 4, "--device", "cpu", "--no-progress"])
        assert code == 2 and len(err) == 1 and "--ref is required" in err[0] and "'unknown'" in err[0], err


def test_latent_edm2_imports_with_a_warning(tmp_path, cli_main):
    torch.manual_seed(0)
    path = tmp_path / "latent.safetensors"
    save_file(EDM2UNet(**{**EDM2_KW, "in_channels": 4}).state_dict(), path)
    code, err = cli_main(["import", path, "--out", tmp_path / "run", "--from", "edm2"])
    assert code == 0 and len(err) == 1 and "cannot decode them without that VAE" in err[0], err
    assert load_run(tmp_path / "run").normalizer is None  # raw latents, not pixels


def test_diffusers_flow_folder_samples_euler_on_its_own_levels(tmp_path, cli_main):
    diffusers = pytest.importorskip("diffusers")
    from elucidate.interop import from_diffusers, load_diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    folder = tmp_path / "flow-unet"
    unet.save_pretrained(folder)
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(folder)
    run = load_diffusers(folder, steps=5)
    assert run.config.sampling.sampler == "euler" and run.config.sampling.schedule == "auto"
    out = tmp_path / "s.npz"
    code, err = cli_main(["sample", "--diffusers", folder, "--out", out, "--seeds", "0-2", "--steps", 5,
                          "--device", "cpu", "--no-progress"])
    assert code == 0, err
    D = from_diffusers(folder)
    assert D.formulation == Flow(shift=3.0)
    x = sample(D, (3, 1, 8, 8), sampler="euler", sigmas=Flow(shift=3.0).sampling_sigmas(5), seeds=[0, 1, 2])
    with np.load(out) as f:
        expected = np.floor(np.clip((x.permute(0, 2, 3, 1).numpy() + 1) / 2, 0, 1) * 255 + 0.5).astype(np.uint8)
        assert np.abs(f["samples"].astype(int) - expected.astype(int)).max() <= 1
