"""Run directories written before the restructure (tests/fixtures/old_runs, by commit 071d25e) still load,
sample and resume: the same samples and the same weights after resuming as the code that wrote them."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from elucidate.cli import main
from elucidate.run import RunDir, load_run, load_vae

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "old_runs"
pytestmark = pytest.mark.usefixtures("one_thread")  # as they were written (OMP_NUM_THREADS=1)


@pytest.fixture
def old(tmp_path, monkeypatch) -> Path:
    """A copy of the old runs as ``runs/`` in a fresh working directory (the latent run's config names its
    autoencoder as ``runs/vae``)."""
    shutil.copytree(OLD, tmp_path / "runs", ignore=shutil.ignore_patterns("expected", "*.md"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _samples(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["samples"]


@pytest.mark.parametrize("name,args", [("edm", []), ("edm_nfe3", ["--nfe", "3"]), ("edm_ema", ["--ema-std", "0.07"]),
                                       ("latent", [])])
def test_old_runs_sample_what_they_sampled(old, name, args, capsys):
    run = "runs/latent" if name == "latent" else "runs/edm"
    assert main(["sample", run, "--seeds", "0-7", *args, "--out", f"{name}.npz"]) == 0
    assert np.array_equal(_samples(old / f"{name}.npz"), _samples(OLD / "expected" / f"{name}.npz")), name


def test_old_runs_load_with_what_they_hold(old):
    run = load_run(old / "runs" / "edm")
    assert run.step == 4 and run.label_dim == 10 and run.config.training.augment is not None
    assert run.config.training.ema["stds"] == [0.05, 0.1] and len(list(RunDir(old / "runs" / "edm").phema.glob(
        "phema-*.safetensors"))) == 2
    latent = load_run(old / "runs" / "latent")
    assert latent.decode is not None and latent.shape == (2, 8, 8)
    assert load_vae(old / "runs" / "vae").img_resolution == (8, 8)


@pytest.mark.parametrize("name", ["edm", "vae", "latent"])
def test_old_runs_resume_to_the_same_weights(old, name):
    """Resumed from step 4 to step 6 on the one training loop: the weights the old code got, bit for bit on
    the machine that wrote them; on another CPU to float round-off."""
    verb = "train-vae" if name == "vae" else "train"
    extra = ["--set", "latent.vae=runs/vae"] if name == "latent" else []
    assert main([verb, f"runs/{name}.yaml", "--out", f"runs/{name}", "--set", "training.steps=6", *extra,
                 "--no-progress"]) == 0
    got = load_file(RunDir(old / "runs" / name).checkpoint(6))
    expected = load_file(OLD / "expected" / f"{name}_step6_net.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
