"""Training loop: batch order, EMA, checkpoints, exact resume after SIGKILL, NaN guard, resume checks, TensorBoard."""
import json
from pathlib import Path

import pytest
import torch

from elucidate.config import parse_config
from elucidate.run import RunDir
from elucidate.run.checkpoint import save_checkpoint
from elucidate.training import EMA, Trainer, batch_indices, load_checkpoint


def digits_config(tiny_config, **training) -> dict:
    """The tiny run (``tiny_config``) on 200 digits with a 2-level 16-channel U-Net, 12 steps of 16 images and a
    checkpoint every 4 steps; ``training`` updates the training section."""
    return tiny_config(data={"max_size": 200}, network={"model_channels": 16, "channel_mult": [1, 2]},
                       training={"steps": 12, "batch_size": 16, "lr_rampup": 64, "ema_halflife": 200,
                                 "checkpoint_every": 4, "seed": 3, **training},
                       sampling={"steps": 4})


def trainer(raw: dict, run: Path) -> Trainer:
    return Trainer(parse_config(raw), run, progress=False, log=lambda *a: None)


def final_tensors(run: Path | RunDir) -> dict:
    tensors, _ = load_checkpoint(RunDir(run).latest_checkpoint())
    return tensors


def metrics_lines(run: RunDir) -> list[dict]:
    """Every line of the run's metrics file, in file order (events included)."""
    return [json.loads(line) for line in run.metrics.read_text().splitlines()]


def test_batch_indices_are_a_pure_function_of_the_step():
    a = torch.cat([batch_indices(0, s, 7, 20) for s in range(6)])
    # every epoch is a permutation of the dataset
    assert sorted(a[:20].tolist()) == list(range(20)) and sorted(a[20:40].tolist()) == list(range(20))
    assert torch.equal(batch_indices(0, 3, 7, 20), a[21:28])
    assert not torch.equal(batch_indices(1, 0, 7, 20), a[:7])


def test_ema_halflife_in_images():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, halflife=100, rampup=None)
    assert ema.beta(1000, 100) == pytest.approx(0.5)  # one half-life per update
    with torch.no_grad():
        target = [p.clone() + 1 for p in net.parameters()]
        for p, t in zip(net.parameters(), target):
            p.copy_(t)
    before = [p.clone() for p in ema.module.parameters()]
    ema.update(net, 1000, 100)
    for b, t, e in zip(before, target, ema.module.parameters()):
        assert torch.allclose(e, 0.5 * b + 0.5 * t)
    assert EMA(net, 10_000, rampup=0.05).beta(1000, 100) == pytest.approx(0.5 ** (100 / 50))  # ramped half-life


def test_checkpoint_roundtrip_and_atomic_failure(tmp_path, monkeypatch):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "ckpt-00000001.safetensors", net=net, ema=net, optimizer=opt, meta={"step": 1})
    tensors, meta = load_checkpoint(path)
    assert meta["step"] == 1 and torch.equal(tensors["net.0.weight"], net[0].weight)
    fresh = torch.optim.Adam(net.parameters(), lr=1e-2)
    from elucidate.run.checkpoint import optimizer_from_flat
    fresh.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    import elucidate.run.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ckpt-00000002.safetensors", net=net, ema=None, optimizer=None, meta={"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000001.safetensors"]  # nothing half-written


def test_nan_guard_skips_the_step_and_keeps_the_ema_clean(tiny_config, tmp_path):
    t = trainer(digits_config(tiny_config, steps=4, checkpoint_every=100), tmp_path / "run")
    original = t.net.forward

    def poisoned(x, c_noise, **kw):
        out = original(x, c_noise, **kw)
        return out * float("nan") if t.step == 2 else out

    t.net.forward = poisoned
    for _ in range(2):
        t.train_step(t.step)
        t.step += 1
    params = [p.clone() for p in t.net.parameters()]
    ema = [p.clone() for p in t.ema.module.parameters()]
    (losses, _), applied = t.train_step(2)
    assert not applied and torch.isnan(losses).all()
    assert all(torch.equal(a, b) for a, b in zip(params, t.net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema, t.ema.module.parameters()))
    t.step = 3
    _, applied = t.train_step(3)
    assert applied and all(torch.isfinite(p).all() for p in t.ema.module.parameters())
    summary = t.train()
    assert summary["step"] == 4


def test_resume_refuses_a_different_config(tiny_config, write_config, cli_main, tmp_path):
    cfg = write_config(digits_config(tiny_config, steps=4), tmp_path / "cfg.yaml")
    run = RunDir(tmp_path / "run")
    assert cli_main(["train", cfg, "--out", run, "--no-progress"])[0] == 0
    code, err = cli_main(["train", cfg, "--out", run, "--no-progress", "--set", "training.lr=0.5"])
    assert code == 2 and len(err) == 1 and "training.lr" in err[0], err
    # extending the number of steps is a resume, not a conflict
    code, err = cli_main(["train", cfg, "--out", run, "--no-progress", "--set", "training.steps=6"])
    assert code == 0, err
    assert run.latest_checkpoint() == run.checkpoint(6)


def test_only_the_newest_checkpoints_are_kept(tiny_config, tmp_path):
    run = RunDir(tmp_path / "run")
    t = trainer(digits_config(tiny_config, steps=3, keep_checkpoints=2, checkpoint_every=100), run.path)
    for step in (1, 2, 3):
        t.step = step
        t.save()
    assert run.list_checkpoints() == [run.checkpoint(2), run.checkpoint(3)]


def test_tensorboard_mirrors_metrics_and_grids_and_a_resume_replaces_what_followed(tiny_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(tmp_path / "run")
    config = digits_config(tiny_config, steps=6, log_every=1, checkpoint_every=3, sample_every=3, tensorboard=True)
    trainer(config, run.path).train()
    # a run killed after step 6 but resumed from the step-3 checkpoint redoes steps 4..6
    run.checkpoint(6).unlink()
    config["training"]["steps"] = 8
    trainer(config, run.path).train()
    events = EventAccumulator(str(run.tensorboard), size_guidance={"scalars": 0, "images": 0}).Reload()
    losses = events.Scalars("train/loss")
    expected = [(r["step"], r["loss"]) for r in metrics_lines(run) if "loss" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in losses] == expected  # steps 1..8, once each
    assert [e.step for e in events.Images("samples")] == [3, 6, 8]
    assert any(tag.startswith("loss_by_sigma/") for tag in events.Tags()["scalars"])


def test_tensorboard_without_the_package_is_a_one_line_config_error(tiny_config, monkeypatch):
    import importlib.util

    from elucidate.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"training.tensorboard = true needs the tensorboard package: pip install"):
        parse_config(digits_config(tiny_config, tensorboard=True))
