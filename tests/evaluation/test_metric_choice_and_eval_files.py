"""Metrics that fit the data (a domain metric is the default only for the data its classifier was trained on;
other data gets one line naming what works), and eval results that are never overwritten (one file per setting,
all of them in the report)."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from elucidate.errors import UserError
from elucidate.evaluation import (
    DATASET_FEATURES,
    METRICS,
    choose_metric,
    domain_metric,
    register_metric,
    render_report,
    result_path,
)
from elucidate.metrics import FID_WEIGHTS_FILENAME, FID_WEIGHTS_URL
from elucidate.run import RunDir

REFUSAL = (f"no domain metric fits it: pass --metric fid --inception FILE ({FID_WEIGHTS_FILENAME}, from "
           f"{FID_WEIGHTS_URL}; see docs/metrics.md)")


# --- which metric fits which data --------------------------------------------------------------------
def test_the_domain_metric_comes_from_its_declaration():
    assert METRICS["fd_digits"].datasets == ("digits",) and METRICS["fd_mnist"].datasets == ("mnist",)
    assert [domain_metric(d) for d in ("digits", "mnist", "faces", "folder", "zip", "npz", None)] == [
        "fd_digits", "fd_mnist", None, None, None, None, None]
    assert choose_metric(None, "digits", "x") == "fd_digits" and choose_metric(None, "mnist", "x") == "fd_mnist"
    register_metric("fd_faces", "a faces classifier's Frechet distance", features="fd_faces",
                    datasets=("faces",))(METRICS["fd_digits"].compute)
    try:  # one declaration: the default, the kid/pr features and the refusal's list all follow
        assert choose_metric(None, "faces", "x") == "fd_faces" and DATASET_FEATURES["faces"] == "fd_faces"
        with pytest.raises(UserError, match=r"--metric fd_faces \(faces classifier\) to use it anyway"):
            choose_metric(None, "folder", "x")
    finally:
        del METRICS["fd_faces"]
    assert "faces" not in DATASET_FEATURES


@pytest.mark.parametrize("dataset", ["faces", "folder", "zip", "npz", None])
def test_other_data_is_refused_in_one_line_naming_what_works(dataset):
    with pytest.raises(UserError) as info:
        choose_metric(None, dataset, f"RUN was trained on {dataset} data")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"RUN was trained on {dataset} data; " + REFUSAL)
    assert "--metric kid or pr with the same --inception FILE (or --features digits|mnist)" in message
    assert "--metric fd_digits (digits classifier) or --metric fd_mnist (mnist classifier) to use it anyway" in message


def test_an_explicit_domain_metric_on_other_data_works_with_a_warning():
    with pytest.warns(UserWarning, match="fd_digits measures in the features of a classifier trained on digits, "
                                         "but RUN was trained on faces data"):
        assert choose_metric("fd_digits", "faces", "RUN was trained on faces data") == "fd_digits"
    with warnings.catch_warnings(record=True) as seen:  # no warning for a metric of the data, or of any data
        warnings.simplefilter("always")
        assert choose_metric("fid", "faces", "x") == "fid" and choose_metric("fd_digits", "digits", "x") == "fd_digits"
    assert seen == []


@pytest.fixture(scope="module")
def folder_run(tiny_config, tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny run trained one step on a folder of 16 PNGs, the folder)."""
    from elucidate.cli import main

    root = tmp_path_factory.mktemp("folder")
    folder = root / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(16):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{k}.png")
    config = root / "folder.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data={"dataset": "folder", "path": str(folder)},
                                                 training={"steps": 1, "checkpoint_every": 1, "log_every": 1})))
    assert main(["train", str(config), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run", folder


def test_eval_sweep_and_ref_refuse_folder_data_without_metric(folder_run, cli_main, tmp_path):
    run, folder = folder_run
    for verb in ("eval", "sweep"):
        code, err = cli_main([verb, run, "--num", "8", "--steps", "2"])
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"elucidate {verb}: error: {run} was trained on folder data; {REFUSAL}"), err
        assert "--metric kid or pr" in err[0] and "--metric fd_digits (digits classifier)" in err[0]
    assert not RunDir(run).eval.exists() and not RunDir(run).sweep.exists()
    for data, subject in ((folder, f"{folder} is folder data"), ("faces", "faces is the bundled faces dataset")):
        code, err = cli_main(["ref", data, "--out", tmp_path / "stats.npz"])
        assert code == 2 and len(err) == 1 and err[0].startswith(f"elucidate ref: error: {subject}; {REFUSAL}"), err
        assert "kid" not in err[0]  # ref writes statistics of a feature network: kid/pr are not its choices
    assert not (tmp_path / "stats.npz").exists()


def test_an_explicit_metric_on_folder_data_works_and_warns(folder_run, cli_main, tmp_path):
    run, folder = folder_run
    code, err = cli_main(["ref", folder, "--metric", "fd_digits", "--out", tmp_path / "stats.npz"])
    assert code == 0 and err == [f"elucidate ref: warning: fd_digits measures in the features of a classifier "
                                 f"trained on digits, but {folder} is folder data"]
    with np.load(tmp_path / "stats.npz") as stats:
        assert stats["mu"].shape == (64,)


# --- one file per setting ----------------------------------------------------------------------------
BASE = {"metric": "fd_digits", "value": 3.5, "values": [3.5], "min": 3.5, "mean": 3.5, "num": 64, "steps": 3,
        "seconds": 1.0, "settings": {"metric": "fd_digits", "features": "fd_digits", "reference": "digits", "num": 64,
                                     "repeats": 1, "checkpoint": "checkpoints/ckpt-00000006.safetensors", "step": 6,
                                     "sampler": "heun", "steps": 3, "nfe": 5, "guidance": 1.0, "ema": True,
                                     "ema_std": None, "tuned_nfe": None, "sigmas": None, "s_max": "inf",
                                     "sampling_precision": "fp32"}}


def test_result_names_cover_every_setting(tmp_path):
    name = result_path(tmp_path, BASE).name
    assert name.startswith("fd_digits-heun-3steps-64-step6-") and name.endswith(".json")
    names = {name}
    for key, value in [("repeats", 2), ("guidance", 2.0), ("ema", False), ("sigmas", [80.0, 1.0, 0.0]),
                       ("sampling_precision", "bf16"), ("reference", "stats.npz"), ("s_max", 10.0),
                       ("features", "inception"), ("a_setting_added_later", 1)]:
        changed = copy.deepcopy(BASE)
        changed["settings"][key] = value
        names.add(result_path(tmp_path, changed).name)
    assert len(names) == 10  # every setting makes its own file
    measured = {**copy.deepcopy(BASE), "value": 9.0, "values": [9.0], "min": 9.0, "mean": 9.0, "seconds": 7.0}
    assert result_path(tmp_path, measured).name == name  # the same setting replaces its own file
    old = {"metric": "fd_digits", "value": 3.2, "num": 1000, "sampler": "heun", "steps": 18, "step": 200}
    assert result_path(tmp_path, old) == result_path(tmp_path, {**old, "value": 1.0, "seconds": 3})
    assert result_path(tmp_path, old) != result_path(tmp_path, {**old, "repeats": 3})  # old results: their keys
    assert result_path(tmp_path / "run" / "checkpoints" / "ckpt-00000006.safetensors", BASE).parent == \
        tmp_path / "run" / "eval"


def test_evals_that_differ_only_in_repeats_get_two_files_both_in_the_report(trained_copy, cli_main, tmp_path):
    run = RunDir(trained_copy)
    assert cli_main(["ref", "digits", "--out", tmp_path / "digits.npz"]) == (0, [])  # fd_digits: digits' own metric
    args = ["eval", run, "--num", "8", "--steps", "2", "--batch", "8", "--ref", tmp_path / "digits.npz"]
    assert cli_main(args)[0] == 0
    first = run.eval_results()
    assert cli_main(args + ["--repeats", "2"])[0] == 0
    assert cli_main(args + ["--no-ema"])[0] == 0
    files = run.eval_results()
    assert len(files) == 3 and set(first) < set(files)
    results = {p.name: json.loads(p.read_text()) for p in files}
    assert sorted(r["repeats"] for r in results.values()) == [1, 1, 2]
    assert sorted(r["settings"]["ema"] for r in results.values()) == [False, True, True]
    assert all(r["settings"]["sampler"] == "heun" and r["settings"]["sampling_precision"] == "fp32"
               for r in results.values())
    before = first[0].stat().st_mtime_ns
    assert cli_main(args)[0] == 0  # the same setting again: its own file is replaced, nothing added
    assert run.eval_results() == files and first[0].stat().st_mtime_ns >= before
    page = render_report(run.path)
    for path in files:
        assert path.name in page
    assert "repeats=2" in page and "ema=false" in page and page.count("<h3>fd_digits</h3>") == 1
