"""The command line end to end: train -> sample (grid, folder, npz) -> eval/sweep/plot/report, and
user errors as one line without a traceback."""
import json

import numpy as np
import pytest
from PIL import Image

from elucidate.cli import main
from elucidate.run import RunDir
from elucidate.runtime import precision


def test_train_writes_a_complete_run_directory(tiny_config, write_config, tmp_path):
    # its own run (about a second): metrics every 2 steps, so a record's counts are those of its 2 steps
    cfg = write_config(tiny_config(training={"steps": 4, "log_every": 2, "checkpoint_every": 2, "sample_every": 2}),
                       tmp_path / "tiny.yaml")
    run = RunDir(tmp_path / "run")
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert run.config.is_file()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["ckpt-00000002.safetensors",
                                                                 "ckpt-00000004.safetensors"]
    assert sorted(p.name for p in run.samples.iterdir()) == ["step-00000002.png", "step-00000004.png"]
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    r = records[-1]
    assert {"loss", "lr", "images_per_sec", "seconds", "loss_by_sigma", "sigma_edges", "count_by_sigma"} <= set(r)
    assert sum(r["count_by_sigma"]) == 2 * 8 and len(r["loss_by_sigma"]) == len(r["sigma_edges"]) - 1


def test_sample_outputs(trained_run, tmp_path, monkeypatch):
    run = str(trained_run)
    assert main(["sample", run, "--seeds", "0-8", "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 8 * 3
    assert main(["sample", run, "--seeds", "3,5", "--out", str(tmp_path / "each") + "/"]) == 0
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["000003.png", "000005.png"]
    assert main(["sample", run, "--seeds", "0-5", "--out", str(tmp_path / "s.npz"), "--batch", "4"]) == 0
    with np.load(tmp_path / "s.npz") as data:
        assert data["samples"].shape == (6, 8, 8, 1) and data["samples"].dtype == np.uint8
        assert data["seeds"].tolist() == list(range(6))
        values = data["values"]  # in the data's own units: digits are 0..16
        assert values.shape == (6, 8, 8, 1) and values.dtype == np.float32
        assert np.abs(np.clip(np.round(values * 255 / 16), 0, 255) - data["samples"]).max() <= 1
        batched = data["samples"]
    assert main(["sample", run, "--seeds", "2-3", "--out", str(tmp_path / "t.npz"), "--batch", "1"]) == 0
    with np.load(tmp_path / "t.npz") as data:
        assert np.array_equal(data["samples"], batched[2:4])  # image i depends on its seed only
    monkeypatch.setattr(precision, "_cpu_features", dict)  # no bf16 hardware: --precision auto samples in fp32
    assert main(["sample", run, "--seeds", "0-5", "--out", str(tmp_path / "a.npz"), "--precision", "auto"]) == 0
    with np.load(tmp_path / "a.npz") as data:
        assert np.array_equal(data["samples"], batched)
    image = np.asarray(Image.open(tmp_path / "each" / "000003.png"))
    assert np.array_equal(image, batched[3][..., 0])
    for sampler in ("euler", "dpmpp_2m", "dpmpp_3m_sde", "euler_ancestral", "lms"):
        assert main(["sample", run, "--seeds", "0-1", "--out", str(tmp_path / f"{sampler}.png"),
                     "--sampler", sampler, "--steps", "4"]) == 0
    assert main(["sample", str(RunDir(trained_run).checkpoint(3)), "--seeds", "0",
                 "--out", str(tmp_path / "old.png"), "--no-ema", "--s-churn", "10"]) == 0
    assert (tmp_path / "old.png").is_file()


def test_eval_sweep_plot_report(trained_copy, tmp_path):
    run = RunDir(trained_copy)
    assert main(["eval", str(run), "--num", "64", "--steps", "3", "--repeats", "2"]) == 0
    result = json.loads(next(run.eval.glob("fd_digits-*.json")).read_text())
    assert result["metric"] == "fd_digits" and len(result["values"]) == 2 and result["value"] > 0
    assert result["min"] <= result["mean"]
    assert main(["ref", "digits", "--out", str(tmp_path / "ref.npz"), "--keep-features"]) == 0
    assert main(["eval", str(run), "--metric", "kid", "--num", "32", "--steps", "2",
                 "--ref", str(tmp_path / "ref.npz")]) == 0
    assert main(["eval", str(run), "--metric", "pr", "--num", "32", "--steps", "2"]) == 0
    assert main(["sweep", str(run), "--samplers", "heun,euler", "--nfe", "3,5", "--num", "32"]) == 0
    rows = (run.sweep / "fd_digits-vs-nfe.csv").read_text().splitlines()
    assert rows[0] == "sampler,steps,nfe,value" and len(rows) == 5
    assert main(["sweep", "--sandbox", "--samplers", "heun,euler", "--nfe", "3,5", "--schedules", "karras",
                 "--out", str(tmp_path / "sb")]) == 0
    assert (tmp_path / "sb" / "sandbox-rmse.png").stat().st_size > 1000
    assert main(["plot", str(run)]) == 0
    assert (run.plots / "loss_by_sigma.png").is_file()
    assert main(["plot", "schedules", "--out", str(tmp_path / "p")]) == 0
    assert main(["report", str(run)]) == 0
    html = run.report.read_text()
    assert "fd_digits" in html and "data:image/png;base64" in html


@pytest.mark.parametrize("args,needle", [
    (["train", "missing.yaml", "--out", "x"], "config file missing.yaml does not exist"),
    (["sample", "no/such/run", "--out", "g.png"], "no/such/run does not exist"),
    (["plot", "nowhere"], "expected a run directory"),
    (["sweep"], "needs a RUN directory"),
])
def test_user_errors_are_one_line_without_traceback(run_cli, args, needle):
    r = run_cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_config_and_bad_data_errors(run_cli, write_config, tmp_path):
    cfg = write_config({"data": {"dataset": "folder", "path": str(tmp_path / "nothing")}}, tmp_path / "c.yaml")
    run = RunDir(tmp_path / "run")
    r = run_cli("train", cfg, "--out", run)
    assert r.returncode == 2 and "nothing" in r.stderr and "Traceback" not in r.stderr
    assert not run.checkpoints.exists()
    r = run_cli("train", cfg, "--out", run, "--set", "training.stepz=3")
    assert r.returncode == 2 and "did you mean 'steps'" in r.stderr


def test_sample_argument_errors(trained_run, cli_main, tmp_path):
    code, err = cli_main(["sample", trained_run, "--out", tmp_path / "x.gif"])
    assert code == 2 and len(err) == 1 and "expected a .png grid" in err[0], err
    code, err = cli_main(["sample", trained_run, "--out", tmp_path / "x.png", "--seeds", "9-1"])
    assert code == 2 and len(err) == 1 and "--seeds" in err[0], err
    code, err = cli_main(["sample", trained_run, "--out", tmp_path / "x.png", "--sampler", "ddin"])
    assert code == 2 and len(err) == 1 and "sampling.sampler = 'ddin'" in err[0], err
    code, err = cli_main(["sample", trained_run, "--out", tmp_path / "x.png", "--class", "3"])
    assert code == 2 and len(err) == 1 and "not class-conditional" in err[0], err
    assert not list(tmp_path.iterdir())


def test_class_conditional_training_and_sampling(tiny_config, write_config, cli_main, tmp_path):
    cfg = write_config(tiny_config(network={"label_dim": "auto", "label_dropout": 0.1}), tmp_path / "cond.yaml")
    code, _ = cli_main(["train", cfg, "--out", tmp_path / "run", "--no-progress"])
    assert code == 0
    from elucidate.run.model import load_run
    run = load_run(tmp_path / "run")
    assert run.denoiser.net.label_dim == 10 and run.info.num_classes == 10
    code, _ = cli_main(["sample", tmp_path / "run", "--seeds", "0-3", "--class", "3", "--out", tmp_path / "three.npz"])
    assert code == 0
    with np.load(tmp_path / "three.npz") as data:
        assert data["samples"].shape == (4, 8, 8, 1)
    code, err = cli_main(["sample", tmp_path / "run", "--seeds", "0", "--class", "12", "--out", tmp_path / "x.png"])
    assert code == 2 and len(err) == 1 and "out of range" in err[0], err
