"""Fine-tuning: ``elucidate train CONFIG --out RUN --init SOURCE [--init-ema]`` starts a new run from a run
directory, a checkpoint, a diffusers UNet folder or an exported NVlabs/edm network; its step-0 checkpoint holds
SOURCE's weights, training continues from them and resumes bit-exactly; the errors are one line each."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from elucidate.config import parse_config
from elucidate.errors import UserError
from elucidate.nets import build_network
from elucidate.nets.edm_port import convert_edm_state_dict
from elucidate.run.checkpoint import load_checkpoint
from elucidate.run.rundir import RunDir
from elucidate.training import Trainer
from elucidate.training.init import init_states, resolve_source, start_from_weights

pytestmark = pytest.mark.usefixtures("one_thread")

EDM_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "edm"
TINY_UNET = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "attention_head_dim": 4}


def tensors(ckpt: Path, prefix: str) -> dict[str, torch.Tensor]:
    found = load_checkpoint(ckpt)[0]
    return {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix)}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def step0(run: Path) -> Path:
    return RunDir(run).checkpoint(0)


@pytest.fixture
def finetune_config(trained_run, write_config, tmp_path):
    """``finetune_config(**training)``: the trained run's own config (same network) for 2 more steps, as a file."""
    def make(name: str = "ft.yaml", **training) -> Path:
        raw = yaml.safe_load((trained_run / "config.yaml").read_text())
        raw["training"].update({"steps": 2, "checkpoint_every": 2, "sample_every": 0, "log_every": 1, "ema": None,
                                "keep_checkpoints": 0, **training})
        return write_config(raw, tmp_path / name)
    return make


# --- elucidate sources ------------------------------------------------------------------------------
def test_init_from_a_run_starts_from_its_ema_then_trains_and_resumes_bit_exactly(trained_run, finetune_config,
                                                                                  tmp_path, cli_main):
    cfg = finetune_config()
    source = RunDir(trained_run).latest_checkpoint()
    out = tmp_path / "ft"
    code, err = cli_main(["train", cfg, "--out", out, "--init", trained_run, "--no-progress"])
    assert code == 0, err
    ema = tensors(source, "ema.")
    assert_same(tensors(step0(out), "net."), ema)  # the network and the EMA start from the source's EMA
    assert_same(tensors(step0(out), "ema."), ema)
    assert not any(torch.equal(tensors(source, "net.")[k], ema[k]) for k in ema if ema[k].is_floating_point()
                   and ema[k].numel() > 1)  # (the raw weights differ: the test could tell them apart)
    found, meta = load_checkpoint(step0(out))
    assert meta["step"] == 0 and not [k for k in found if not k.startswith(("net.", "ema."))]  # no optimizer state
    final = RunDir(out).latest_checkpoint()
    assert load_checkpoint(final)[1]["step"] == 2
    moved = [k for k, v in tensors(final, "net.").items() if not torch.equal(v, ema[k])]
    assert moved  # training continued from the source's weights
    events = [json.loads(line) for line in RunDir(out).metrics.read_text().splitlines()]
    assert {"event": "start_from", "step": 0, "source": f"{source} (EMA)"}.items() <= events[0].items()

    # the same start, stopped before any step, then resumed by a plain `train`: the same weights, bit for bit
    again = tmp_path / "again"
    trainer = Trainer(parse_config(yaml.safe_load(cfg.read_text())), again, progress=False, log=lambda *a: None)
    start_from_weights(trainer, trained_run, log=lambda *a: None)
    trainer.close()
    assert cli_main(["train", cfg, "--out", again, "--no-progress"])[0] == 0
    assert_same(tensors(RunDir(again).latest_checkpoint(), "net."), tensors(final, "net."))

    # --init on a run that has checkpoints is resuming: refused in one line, before any work
    code, err = cli_main(["train", cfg, "--out", out, "--init", trained_run, "--no-progress"])
    assert code == 2 and len(err) == 1, err
    assert f"--init {trained_run}: {out} already has checkpoints (ckpt-00000002.safetensors): it resumes" in err[0]


def test_init_ema_takes_the_network_and_the_ema_and_a_checkpoint_file_works(trained_run, finetune_config,
                                                                             tmp_path, cli_main):
    source = RunDir(trained_run).checkpoint(3)  # an older checkpoint, named as a file
    out = tmp_path / "ft"
    code, err = cli_main(["train", finetune_config(), "--out", out, "--init", source, "--init-ema", "--no-progress"])
    assert code == 0, err
    assert_same(tensors(step0(out), "net."), tensors(source, "net."))
    assert_same(tensors(step0(out), "ema."), tensors(source, "ema."))
    assert resolve_source(source).kind == "checkpoint" and resolve_source(trained_run).kind == "run"


# --- a diffusers UNet folder ------------------------------------------------------------------------
@pytest.fixture
def diffusers_folder(tmp_path) -> Path:
    """A tiny random UNet2DModel (1 channel, 8x8) saved with save_pretrained, with a scheduler config beside it."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), **TINY_UNET)
    folder = tmp_path / "unet"
    unet.save_pretrained(folder, safe_serialization=True)
    diffusers.DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction",
                            timestep_spacing="trailing").save_pretrained(folder)
    return folder


def test_init_from_a_diffusers_folder(diffusers_folder, tiny_config, write_config, tmp_path, cli_main):
    from safetensors.torch import load_file

    raw = tiny_config(network={"arch": "diffusers_unet2d", **TINY_UNET},
                      diffusion={"type": "DDPM", "num_timesteps": 100, "prediction": "v",
                                 "timestep_spacing": "trailing"}, training={"steps": 2, "checkpoint_every": 2})
    raw["network"] = {"arch": "diffusers_unet2d", **TINY_UNET}
    cfg = write_config(raw, tmp_path / "d.yaml")
    out = tmp_path / "ft"
    code, err = cli_main(["train", cfg, "--out", out, "--init", diffusers_folder, "--no-progress"])
    assert code == 0, err
    saved = load_file(diffusers_folder / "diffusion_pytorch_model.safetensors")
    assert_same(tensors(step0(out), "net.unet."), saved)
    assert_same(tensors(step0(out), "ema.unet."), saved)
    assert load_checkpoint(RunDir(out).latest_checkpoint())[1]["step"] == 2

    # a pipeline folder (model_index.json + unet/) is read from its unet/
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    diffusers_folder.rename(pipeline / "unet")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                           "unet": ["diffusers", "UNet2DModel"]}))
    trainer = Trainer(parse_config(raw), tmp_path / "ft2", progress=False, log=lambda *a: None)
    try:
        assert_same({k[len("unet."):]: v for k, v in init_states(pipeline, trainer)["net"].items()}, saved)
        with pytest.raises(UserError, match=r"^--init-ema: .*unet is a diffusers export, which holds one set of "
                                            r"weights"):
            init_states(pipeline, trainer, ema=True)
    finally:
        trainer.close()

    # another network: the architecture is named, in one line
    code, err = cli_main(["train", write_config(tiny_config(), tmp_path / "unet.yaml"), "--out", tmp_path / "x",
                          "--init", pipeline, "--no-progress"])
    assert code == 2 and len(err) == 1, err
    assert "a diffusers network needs network.arch diffusers_unet2d with the same configuration; this run's is " \
           "'unet'" in err[0]


# --- an exported NVlabs/edm network -----------------------------------------------------------------
def edm_export(path: Path) -> tuple[Path, dict]:
    """An edm-layout export (edm's key names, as ``net.state_dict()`` of a whole Precond: ``model.*``) of edm's
    NCSN++ fixture network (tests/fixtures/edm, tests/nets/test_edm_port.py), with fresh random weights; returns
    the file and edm's constructor arguments."""
    with safe_open(EDM_FIXTURES / "ncsnpp.safetensors", "pt") as f:
        meta = f.metadata()
        buffers = {k[len("state."):]: f.get_tensor(k) for k in f.keys() if k.startswith("state.")}
    gen = torch.Generator().manual_seed(3)
    weights = {key: (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(max(1, math.prod(shape[1:])))
               for key, shape in sorted(json.loads(meta["shapes"]).items())}
    save_file({f"model.{k}": v.contiguous() for k, v in {**weights, **buffers}.items()}, path)
    return path, json.loads(meta["edm_kwargs"])


def test_init_from_an_edm_export(tiny_config, write_config, tmp_path, cli_main):
    import numpy as np

    export, edm_kwargs = edm_export(tmp_path / "edm-ncsnpp.safetensors")
    images = np.random.default_rng(0).integers(0, 256, size=(16, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", images)
    network = {"arch": "ncsnpp", **{k: v for k, v in edm_kwargs.items()
                                    if k not in ("img_resolution", "in_channels", "out_channels")}}
    raw = tiny_config(data={"dataset": "npz", "path": str(tmp_path / "rgb.npy")},
                      training={"steps": 1, "checkpoint_every": 1, "batch_size": 4})
    raw["network"] = network
    cfg = write_config(raw, tmp_path / "ncsnpp.yaml")
    out = tmp_path / "ft"
    code, err = cli_main(["train", cfg, "--out", out, "--init", export, "--no-progress"])
    assert code == 0, err
    assert resolve_source(export).kind == "edm"
    with safe_open(export, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    ours = convert_edm_state_dict(state, "ncsnpp")
    assert_same(tensors(step0(out), "net."), ours)
    # and the converted weights are edm's function: the network built from edm's own arguments takes them
    build_network("ncsnpp", **edm_kwargs).load_state_dict(ours)
    assert load_checkpoint(RunDir(out).latest_checkpoint())[1]["step"] == 1

    # another resample filter than the export's: named, with the setting that fixes it
    raw["network"] = {**network, "resample_filter": [1, 1]}
    code, err = cli_main(["train", write_config(raw, tmp_path / "f.yaml"), "--out", tmp_path / "f", "--init",
                          export, "--no-progress"])
    assert code == 2 and len(err) == 1 and "set network.resample_filter: [1.0, 3.0, 3.0, 1.0]" in err[0], err
    # other widths: the first tensor that does not fit is named
    raw["network"] = {**network, "model_channels": 8}
    code, err = cli_main(["train", write_config(raw, tmp_path / "w.yaml"), "--out", tmp_path / "w", "--init",
                          export, "--no-progress"])
    assert code == 2 and len(err) == 1, err
    assert f"{export} (edm): tensor 'map_noise.freqs' has shape (16,) but this network's is (8,)" in err[0]


# --- errors -----------------------------------------------------------------------------------------
def test_init_errors_are_one_line(trained_run, finetune_config, tiny_config, write_config, tmp_path, cli_main):
    cfg = finetune_config()
    missing = tmp_path / "nope"
    for argv, expected in [
        (["--init", missing], f"--init {missing}: does not exist (expected a run directory, a checkpoint, a diffusers "
                              f"UNet folder or an exported edm/edm2 network .safetensors)"),
        (["--init-ema"], "--init-ema needs --init SOURCE"),
        (["--init", tmp_path], f"{tmp_path} has no checkpoints"),
    ]:
        code, err = cli_main(["train", cfg, "--out", tmp_path / "out", *argv, "--no-progress"])
        assert code == 2 and len(err) == 1 and expected in err[0], (argv, err)
    pickle = tmp_path / "net.pt"
    torch.save({"w": torch.zeros(1)}, pickle)
    code, err = cli_main(["train", cfg, "--out", tmp_path / "out", "--init", pickle, "--no-progress"])
    assert code == 2 and len(err) == 1 and "elucidate never unpickles" in err[0], err
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, other)
    code, err = cli_main(["train", cfg, "--out", tmp_path / "out", "--init", other, "--no-progress"])
    assert code == 2 and len(err) == 1 and "neither an elucidate checkpoint nor an exported edm/edm2" in err[0], err

    # another architecture: the first tensor that does not fit is named, and the new run keeps no checkpoint
    small = write_config(tiny_config(training={"steps": 2}), tmp_path / "small.yaml")
    code, err = cli_main(["train", small, "--out", tmp_path / "small", "--init", trained_run, "--no-progress"])
    assert code == 2 and len(err) == 1, err
    source = RunDir(trained_run).latest_checkpoint()
    assert err[0].startswith(f"elucidate train: error: {source} (EMA): tensor '"), err
    assert "has shape" in err[0] or "another architecture" in err[0]
    assert not RunDir(tmp_path / "small").list_checkpoints()
    # and the run is not left locked: it trains from scratch afterwards
    assert cli_main(["train", small, "--out", tmp_path / "small", "--no-progress"])[0] == 0
