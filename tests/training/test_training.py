"""Training loop: exact resume after SIGKILL, 2-process gloo DDP == 1 process, NaN guard, EMA, checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from elucidate.config import parse_config
from elucidate.run.checkpoint import save_checkpoint
from elucidate.training import EMA, Trainer, batch_indices, latest_checkpoint, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(**training) -> dict:
    base = {"steps": 12, "batch_size": 16, "lr": 1e-3, "lr_rampup": 64, "ema_halflife": 200, "checkpoint_every": 4,
            "sample_every": 0, "log_every": 2, "seed": 3, "num_sample_images": 4, "keep_checkpoints": 0}
    base.update(training)
    return {"data": {"dataset": "digits", "max_size": 200},
            "network": {"arch": "unet", "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                        "attn_resolutions": []},
            "diffusion": {"type": "EDM"},
            "training": base,
            "sampling": {"steps": 4}}


def write_config(tmp_path: Path, raw: dict, name="cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("WORLD_SIZE", None)
    return e


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "elucidate", *map(str, args)], capture_output=True, text=True,
                          env=env(), cwd=ROOT, **kw)


def final_tensors(run: Path) -> dict:
    tensors, _ = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    return tensors


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


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    raw = tiny_config(steps=150, checkpoint_every=10, log_every=10)
    cfg = write_config(tmp_path, raw)
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = cli("train", cfg, "--out", full, "--no-progress")
    assert r.returncode == 0, r.stderr

    command = [sys.executable, "-m", "elucidate", "train", str(cfg), "--out", str(killed), "--no-progress"]
    proc = subprocess.Popen(command,
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(killed / "checkpoints"):
        time.sleep(0.005)
    time.sleep(0.05)  # let it get well into the next interval
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = list_checkpoints(killed / "checkpoints")
    assert at_kill and at_kill[-1].name != "ckpt-00000150.safetensors", "the run finished before it could be killed"

    r = cli("train", cfg, "--out", killed, "--no-progress")
    assert r.returncode == 0, r.stderr
    a, b = final_tensors(full), final_tensors(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == sorted(steps) and steps[-1] == 150 and any(r.get("event") == "resume" for r in lines)


def test_nan_guard_skips_the_step_and_keeps_the_ema_clean(tmp_path):
    trainer = Trainer(parse_config(tiny_config(steps=4, checkpoint_every=100)), tmp_path / "run", progress=False,
                      log=lambda *a: None)
    original = trainer.net.forward

    def poisoned(x, c_noise, **kw):
        out = original(x, c_noise, **kw)
        return out * float("nan") if trainer.step == 2 else out

    trainer.net.forward = poisoned
    for _ in range(2):
        trainer.train_step(trainer.step)
        trainer.step += 1
    params = [p.clone() for p in trainer.net.parameters()]
    ema = [p.clone() for p in trainer.ema.module.parameters()]
    (losses, _), applied = trainer.train_step(2)
    assert not applied and torch.isnan(losses).all()
    assert all(torch.equal(a, b) for a, b in zip(params, trainer.net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema, trainer.ema.module.parameters()))
    trainer.step = 3
    _, applied = trainer.train_step(3)
    assert applied and all(torch.isfinite(p).all() for p in trainer.ema.module.parameters())
    summary = trainer.train()
    assert summary["step"] == 4


def test_resume_refuses_a_different_config(tmp_path):
    cfg = write_config(tmp_path, tiny_config(steps=4))
    run = tmp_path / "run"
    assert cli("train", cfg, "--out", run, "--no-progress").returncode == 0
    r = cli("train", cfg, "--out", run, "--no-progress", "--set", "training.lr=0.5")
    assert r.returncode == 2 and "training.lr" in r.stderr and "Traceback" not in r.stderr
    # extending the number of steps is a resume, not a conflict
    r = cli("train", cfg, "--out", run, "--no-progress", "--set", "training.steps=6")
    assert r.returncode == 0, r.stderr
    assert latest_checkpoint(run / "checkpoints").name == "ckpt-00000006.safetensors"


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    trainer = Trainer(parse_config(tiny_config(steps=3, keep_checkpoints=2, checkpoint_every=100)), tmp_path / "run",
                      progress=False, log=lambda *a: None)
    for step in (1, 2, 3):
        trainer.step = step
        trainer.save()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "ckpt-00000002.safetensors", "ckpt-00000003.safetensors"]


def test_tensorboard_mirrors_metrics_and_grids_and_a_resume_replaces_what_followed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    config = tiny_config(steps=6, log_every=1, checkpoint_every=3, sample_every=3, tensorboard=True)
    Trainer(parse_config(config), run, progress=False, log=lambda *a: None).train()
    # a run killed after step 6 but resumed from the step-3 checkpoint redoes steps 4..6
    (run / "checkpoints" / "ckpt-00000006.safetensors").unlink()
    config["training"]["steps"] = 8
    Trainer(parse_config(config), run, progress=False, log=lambda *a: None).train()
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    losses = events.Scalars("train/loss")
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["step"], r["loss"]) for r in jsonl if "loss" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in losses] == expected  # steps 1..8, once each
    assert [e.step for e in events.Images("samples")] == [3, 6, 8]
    assert any(tag.startswith("loss_by_sigma/") for tag in events.Tags()["scalars"])


def test_tensorboard_without_the_package_is_a_one_line_config_error(monkeypatch):
    import importlib.util

    from elucidate.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"training.tensorboard = true needs the tensorboard package: pip install"):
        parse_config(tiny_config(tensorboard=True))
