"""Post-hoc EMA wired into training: config validation, snapshots in RUN/phema/, bit-exact resume."""
import pytest
import torch
from safetensors.torch import load_file

from elucidate.config import parse_config
from elucidate.errors import ConfigError
from elucidate.run import RunDir, load_checkpoint
from elucidate.training import Trainer
from elucidate.training.ema import list_snapshots, read_snapshot_info, reconstruct, snapshot_name

#: Power EMA of two profiles, a snapshot every 2 steps.
POWER = {"type": "power", "stds": [0.05, 0.10], "snapshot_every": 2}


def phema_config(tiny_config, steps=8, ema=POWER, **training) -> dict:
    """The tiny run (``tiny_config``) with ``ema``, ``steps`` steps and a checkpoint every 4 steps."""
    return tiny_config(training={"steps": steps, "checkpoint_every": 4, "ema": ema, **training})


def train(raw: dict, run: RunDir) -> dict:
    return Trainer(parse_config(raw), run, progress=False, log=lambda *a: None).train()


def test_config_defaults_and_validation(tiny_config):
    from elucidate.config import training as config
    from elucidate.training import ema as phema

    assert config.MAX_SIGMA_REL == phema.MAX_SIGMA_REL
    assert parse_config(phema_config(tiny_config, ema=None)).training.ema is None
    ema = parse_config(phema_config(tiny_config, ema={"stds": [0.1]}, checkpoint_every=7)).training.ema
    assert ema == {"type": "power", "stds": [0.1], "snapshot_every": 7}
    for bad, word in [({"type": "karras"}, "type"), ({"stds": [0.3]}, "stds"), ({"stds": [0]}, "stds"),
                      ({"stds": []}, "stds"), ({"snapshot_every": 0}, "snapshot_every"),
                      ({"stdz": [0.1]}, "stds"), (0.1, "mapping")]:
        with pytest.raises(ConfigError, match=word):
            parse_config(phema_config(tiny_config, ema=bad))


def test_snapshots_and_interrupted_run_equals_uninterrupted(tiny_config, tmp_path):
    full, resumed = RunDir(tmp_path / "full"), RunDir(tmp_path / "resumed")
    train(phema_config(tiny_config), full)
    train(phema_config(tiny_config, steps=4), resumed)  # stop at step 4 ...
    (resumed.phema / snapshot_name(6)).write_bytes(b"stale")  # a later snapshot of a killed run
    train(phema_config(tiny_config), resumed)           # ... and resume to 8
    a, _ = load_checkpoint(full.latest_checkpoint())
    b, _ = load_checkpoint(resumed.latest_checkpoint())
    assert a.keys() == b.keys() and any(k.startswith("phema.avg.1.") for k in a)
    assert float(a["phema.t"]) == 8.0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    snaps = list_snapshots(full.phema)
    assert [p.name for p in snaps] == [f"phema-{s:08d}.safetensors" for s in (2, 4, 6, 8)]
    assert [p.name for p in list_snapshots(resumed.phema)] == [p.name for p in snaps]
    for p in snaps:
        x, y = load_file(str(p)), load_file(str(resumed.phema / p.name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), p.name
    info = read_snapshot_info(snaps[-1])
    assert (info.step, info.time, info.stds) == (8, 8.0, (0.05, 0.10))
    # the last snapshot's profile 1 is the checkpoint's tracker state, and reconstructing a tracked std
    # from 4 snapshots x 2 profiles reproduces it closely (weights change little in 8 steps)
    last = load_file(str(snaps[-1]))
    rec = reconstruct(full.phema, 0.10)
    for name, value in rec.items():
        if not name.startswith("buf"):
            key = f"phema.avg.1.{name}"
            if key in a:
                assert torch.equal(last[f"1.{name}"], a[key])
                assert torch.allclose(value, a[key], atol=1e-4), name


def test_no_power_ema_leaves_checkpoints_unchanged(tiny_config, tmp_path):
    run = RunDir(tmp_path / "run")
    train(phema_config(tiny_config, steps=2, ema=None), run)
    tensors, _ = load_checkpoint(run.latest_checkpoint())
    assert not any(k.startswith("phema.") for k in tensors) and not run.phema.exists()
