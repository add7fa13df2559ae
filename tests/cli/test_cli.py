"""The command line end to end: train -> sample (grid, folder, npz) -> eval/sweep/plot/report, and
user errors as one line without a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from elucidate.cli import main
from elucidate.runtime import precision

ROOT = Path(__file__).resolve().parents[2]
TINY = {"data": {"dataset": "digits", "max_size": 300},
        "network": {"arch": "unet", "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                    "attn_resolutions": []},
        "diffusion": {"type": "EDM"},
        "training": {"steps": 20, "batch_size": 32, "checkpoint_every": 10, "sample_every": 10, "log_every": 5,
                     "num_sample_images": 16},
        "sampling": {"steps": 5}}


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "elucidate", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


@pytest.mark.slow
def test_train_writes_a_complete_run_directory(trained):
    assert (trained / "config.yaml").is_file()
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["ckpt-00000010.safetensors",
                                                                           "ckpt-00000020.safetensors"]
    assert sorted(p.name for p in (trained / "samples").iterdir()) == ["step-00000010.png", "step-00000020.png"]
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    r = records[-1]
    assert {"loss", "lr", "images_per_sec", "seconds", "loss_by_sigma", "sigma_edges", "count_by_sigma"} <= set(r)
    assert sum(r["count_by_sigma"]) == 5 * 32 and len(r["loss_by_sigma"]) == len(r["sigma_edges"]) - 1


@pytest.mark.slow
def test_sample_outputs(trained, tmp_path, monkeypatch):
    assert main(["sample", str(trained), "--seeds", "0-8", "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 8 * 3
    assert main(["sample", str(trained), "--seeds", "3,5", "--out", str(tmp_path / "each") + "/"]) == 0
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["000003.png", "000005.png"]
    assert main(["sample", str(trained), "--seeds", "0-5", "--out", str(tmp_path / "s.npz"), "--batch", "4"]) == 0
    with np.load(tmp_path / "s.npz") as data:
        assert data["samples"].shape == (6, 8, 8, 1) and data["samples"].dtype == np.uint8
        assert data["seeds"].tolist() == list(range(6))
        values = data["values"]  # in the data's own units: digits are 0..16
        assert values.shape == (6, 8, 8, 1) and values.dtype == np.float32
        assert np.abs(np.clip(np.round(values * 255 / 16), 0, 255) - data["samples"]).max() <= 1
        batched = data["samples"]
    assert main(["sample", str(trained), "--seeds", "2-3", "--out", str(tmp_path / "t.npz"), "--batch", "1"]) == 0
    with np.load(tmp_path / "t.npz") as data:
        assert np.array_equal(data["samples"], batched[2:4])  # image i depends on its seed only
    monkeypatch.setattr(precision, "_cpu_features", dict)  # no bf16 hardware: --precision auto samples in fp32
    assert main(["sample", str(trained), "--seeds", "0-5", "--out", str(tmp_path / "a.npz"),
                 "--precision", "auto"]) == 0
    with np.load(tmp_path / "a.npz") as data:
        assert np.array_equal(data["samples"], batched)
    image = np.asarray(Image.open(tmp_path / "each" / "000003.png"))
    assert np.array_equal(image, batched[3][..., 0])
    for sampler in ("euler", "dpmpp_2m", "dpmpp_3m_sde", "euler_ancestral", "lms"):
        assert main(["sample", str(trained), "--seeds", "0-1", "--out", str(tmp_path / f"{sampler}.png"),
                     "--sampler", sampler, "--steps", "4"]) == 0
    assert main(["sample", str(trained / "checkpoints" / "ckpt-00000010.safetensors"), "--seeds", "0",
                 "--out", str(tmp_path / "old.png"), "--no-ema", "--s-churn", "10"]) == 0


@pytest.mark.slow
def test_eval_sweep_plot_report(trained, tmp_path):
    assert main(["eval", str(trained), "--num", "64", "--steps", "3", "--repeats", "2"]) == 0
    result = json.loads(next((trained / "eval").glob("fd_digits-*.json")).read_text())
    assert result["metric"] == "fd_digits" and len(result["values"]) == 2 and result["value"] > 0
    assert result["min"] <= result["mean"]
    assert main(["ref", "digits", "--out", str(tmp_path / "ref.npz"), "--keep-features"]) == 0
    assert main(["eval", str(trained), "--metric", "kid", "--num", "32", "--steps", "2",
                 "--ref", str(tmp_path / "ref.npz")]) == 0
    assert main(["eval", str(trained), "--metric", "pr", "--num", "32", "--steps", "2"]) == 0
    assert main(["sweep", str(trained), "--samplers", "heun,euler", "--nfe", "3,5", "--num", "32"]) == 0
    rows = (trained / "sweep" / "fd_digits-vs-nfe.csv").read_text().splitlines()
    assert rows[0] == "sampler,steps,nfe,value" and len(rows) == 5
    assert main(["sweep", "--sandbox", "--samplers", "heun,euler", "--nfe", "3,5", "--schedules", "karras",
                 "--out", str(tmp_path / "sb")]) == 0
    assert (tmp_path / "sb" / "sandbox-rmse.png").stat().st_size > 1000
    assert main(["plot", str(trained)]) == 0
    assert (trained / "plots" / "loss_by_sigma.png").is_file()
    assert main(["plot", "schedules", "--out", str(tmp_path / "p")]) == 0
    assert main(["report", str(trained)]) == 0
    html = (trained / "report.html").read_text()
    assert "fd_digits" in html and "data:image/png;base64" in html


@pytest.mark.parametrize("args,needle", [
    (["train", "missing.yaml", "--out", "x"], "config file missing.yaml does not exist"),
    (["sample", "no/such/run", "--out", "g.png"], "no/such/run does not exist"),
    (["plot", "nowhere"], "expected a run directory"),
    (["sweep"], "needs a RUN directory"),
])
def test_user_errors_are_one_line_without_traceback(args, needle, tmp_path):
    r = run_cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_config_and_bad_data_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"dataset": "folder", "path": str(tmp_path / "nothing")}}))
    r = run_cli("train", cfg, "--out", tmp_path / "run")
    assert r.returncode == 2 and "nothing" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    r = run_cli("train", cfg, "--out", tmp_path / "run", "--set", "training.stepz=3")
    assert r.returncode == 2 and "did you mean 'steps'" in r.stderr


@pytest.mark.slow
def test_sample_argument_errors(trained, tmp_path):
    r = run_cli("sample", trained, "--out", tmp_path / "x.gif")
    assert r.returncode == 2 and "expected a .png grid" in r.stderr
    r = run_cli("sample", trained, "--out", tmp_path / "x.png", "--seeds", "9-1")
    assert r.returncode == 2 and "--seeds" in r.stderr
    r = run_cli("sample", trained, "--out", tmp_path / "x.png", "--sampler", "ddin")
    assert r.returncode == 2 and "sampling.sampler = 'ddin'" in r.stderr
    r = run_cli("sample", trained, "--out", tmp_path / "x.png", "--class", "3")
    assert r.returncode == 2 and "not class-conditional" in r.stderr


def test_class_conditional_training_and_sampling(tmp_path):
    raw = {**TINY, "network": {**TINY["network"], "label_dim": "auto", "label_dropout": 0.1},
           "training": {**TINY["training"], "steps": 4, "checkpoint_every": 4, "sample_every": 0}}
    cfg = tmp_path / "cond.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    from elucidate.run.model import load_run
    run = load_run(tmp_path / "run")
    assert run.denoiser.net.label_dim == 10 and run.info.num_classes == 10
    assert main(["sample", str(tmp_path / "run"), "--seeds", "0-3", "--class", "3",
                 "--out", str(tmp_path / "three.npz")]) == 0
    r = run_cli("sample", tmp_path / "run", "--seeds", "0", "--class", "12", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "out of range" in r.stderr
