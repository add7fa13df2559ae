"""The one training loop: both trainers (diffusion, autoencoder) run TrainingLoop's loop, and each, killed with
SIGKILL part-way and resumed, ends bit-identical to an uninterrupted run."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from elucidate.run import RunDir, load_checkpoint
from elucidate.training import Trainer, TrainingLoop, VAETrainer

#: What the loop owns; a trainer provides only its data, modules, step, statistics and picture.
LOOP = ("train", "_train", "train_step", "set_lr", "save", "_prepare_run_dir", "_newest_usable_checkpoint",
        "_lock_run", "_log_interval", "_stop_agreed", "_stop_diverged", "_request_stop", "meta")


def test_both_trainers_run_the_one_loop():
    for trainer in (Trainer, VAETrainer):
        assert issubclass(trainer, TrainingLoop)
        overridden = [name for name in LOOP if name in vars(trainer) and name != "meta"]
        assert overridden == [], (trainer.__name__, overridden)
    assert Trainer.meta is not TrainingLoop.meta and "super().meta()" in __import__("inspect").getsource(Trainer.meta)


#: the uncertainty case: EDM2's learned u(sigma) head (training.loss_weighting) and an lr decay that starts mid-run
UNCERTAINTY = {"loss_weighting": "uncertainty", "lr_schedule": {"kind": "inv_sqrt", "ref_batches": 20}}


@pytest.mark.parametrize("verb, extra", [("train", {}), ("train-vae", {}), ("train", UNCERTAINTY)],
                         ids=["train", "train-vae", "train-uncertainty"])
@pytest.mark.usefixtures("one_thread")  # as the killed process (OMP_NUM_THREADS=1): the same arithmetic
def test_killed_then_resumed_through_the_one_loop_is_bit_exact(verb, extra, tiny_config, tiny_vae_config,
                                                               write_config, cli_main, env, tmp_path):
    raw = (tiny_config(training={"steps": 60, "checkpoint_every": 10, "log_every": 10, **extra}) if verb == "train"
           else tiny_vae_config(training={"steps": 24, "checkpoint_every": 4, "log_every": 4}))
    steps = raw["training"]["steps"]
    cfg = write_config(raw, tmp_path / "cfg.yaml")
    full, killed = RunDir(tmp_path / "full"), RunDir(tmp_path / "killed")
    assert cli_main([verb, cfg, "--out", full, "--no-progress"])[0] == 0

    command = [sys.executable, "-m", "elucidate", verb, str(cfg), "--out", str(killed), "--no-progress"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not killed.list_checkpoints():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = killed.list_checkpoints()
    assert at_kill and at_kill[-1] != killed.checkpoint(steps), "the run finished before it could be killed"

    assert cli_main([verb, cfg, "--out", killed, "--no-progress"])[0] == 0
    (a, meta_a), (b, meta_b) = load_checkpoint(full.latest_checkpoint()), load_checkpoint(killed.latest_checkpoint())
    assert a.keys() == b.keys() and meta_a["step"] == meta_b["step"] == steps
    for key in a:  # network, EMA and optimizer state (and the u(sigma) head)
        assert torch.equal(a[key], b[key]), key
    assert any(key.startswith("uncertainty.") for key in a) == bool(extra)
    records = [json.loads(line) for line in killed.metrics.read_text().splitlines()]
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == sorted(logged) and logged[-1] == steps and any(r.get("event") == "resume" for r in records)
