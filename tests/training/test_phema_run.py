"""Post-hoc EMA wired into training: config validation, snapshots in RUN/phema/, bit-exact resume."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elucidate.config import parse_config
from elucidate.errors import ConfigError
from elucidate.training import Trainer, latest_checkpoint, load_checkpoint
from elucidate.training.ema import list_snapshots, read_snapshot_info, reconstruct


def tiny(steps=8, **training) -> dict:
    base = {"steps": steps, "batch_size": 8, "lr": 1e-3, "lr_rampup": 16, "ema_halflife": 100, "checkpoint_every": 4,
            "sample_every": 0, "log_every": 4, "seed": 1, "num_sample_images": 2, "keep_checkpoints": 0,
            "ema": {"type": "power", "stds": [0.05, 0.10], "snapshot_every": 2}}
    base.update(training)
    return {"data": {"dataset": "digits", "max_size": 64},
            "network": {"arch": "unet", "model_channels": 8, "channel_mult": [1], "num_blocks": 1,
                        "attn_resolutions": []},
            "diffusion": {"type": "EDM"}, "training": base, "sampling": {"steps": 2}}


def train(raw: dict, run: Path) -> dict:
    return Trainer(parse_config(raw), run, progress=False, log=lambda *a: None).train()


def test_config_defaults_and_validation():
    from elucidate.config import training as config
    from elucidate.training import ema as phema

    assert config.MAX_SIGMA_REL == phema.MAX_SIGMA_REL
    assert parse_config(tiny(ema=None)).training.ema is None
    ema = parse_config(tiny(ema={"stds": [0.1]}, checkpoint_every=7)).training.ema
    assert ema == {"type": "power", "stds": [0.1], "snapshot_every": 7}
    for bad, word in [({"type": "karras"}, "type"), ({"stds": [0.3]}, "stds"), ({"stds": [0]}, "stds"),
                      ({"stds": []}, "stds"), ({"snapshot_every": 0}, "snapshot_every"),
                      ({"stdz": [0.1]}, "stds"), (0.1, "mapping")]:
        with pytest.raises(ConfigError, match=word):
            parse_config(tiny(ema=bad))


def test_snapshots_and_interrupted_run_equals_uninterrupted(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(tiny(), full)
    train(tiny(steps=4), resumed)  # stop at step 4 ...
    (resumed / "phema" / "phema-00000006.safetensors").write_bytes(b"stale")  # a later snapshot of a killed run
    train(tiny(), resumed)         # ... and resume to 8
    a, _ = load_checkpoint(latest_checkpoint(full / "checkpoints"))
    b, _ = load_checkpoint(latest_checkpoint(resumed / "checkpoints"))
    assert a.keys() == b.keys() and any(k.startswith("phema.avg.1.") for k in a)
    assert float(a["phema.t"]) == 8.0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    snaps = list_snapshots(full / "phema")
    assert [p.name for p in snaps] == [f"phema-{s:08d}.safetensors" for s in (2, 4, 6, 8)]
    assert [p.name for p in list_snapshots(resumed / "phema")] == [p.name for p in snaps]
    for p in snaps:
        x, y = load_file(str(p)), load_file(str(resumed / "phema" / p.name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), p.name
    info = read_snapshot_info(snaps[-1])
    assert (info.step, info.time, info.stds) == (8, 8.0, (0.05, 0.10))
    # the last snapshot's profile 1 is the checkpoint's tracker state, and reconstructing a tracked std
    # from 4 snapshots x 2 profiles reproduces it closely (weights change little in 8 steps)
    last = load_file(str(snaps[-1]))
    rec = reconstruct(full / "phema", 0.10)
    for name, value in rec.items():
        if not name.startswith("buf"):
            key = f"phema.avg.1.{name}"
            if key in a:
                assert torch.equal(last[f"1.{name}"], a[key])
                assert torch.allclose(value, a[key], atol=1e-4), name


def test_no_power_ema_leaves_checkpoints_unchanged(tmp_path):
    train(tiny(steps=2, ema=None), tmp_path / "run")
    tensors, _ = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert not any(k.startswith("phema.") for k in tensors) and not (tmp_path / "run" / "phema").exists()
