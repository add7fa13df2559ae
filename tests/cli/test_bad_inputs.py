"""Every verb, every bad input: exit status 2, one error line naming the problem, no traceback, and
nothing written where the output would have gone (issue 12). A verb added to the CLI without rows
here fails ``test_every_verb_has_rows``."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from elucidate.cli import build_parser, main


@pytest.fixture(scope="module")
def paths(tiny_config, trained_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    p = {"missing": root / "missing", "empty": root / "empty.yaml", "garbage": root / "garbage.bin",
         "dir": root / "a_directory", "untrained": root / "untrained", "config": root / "tiny.yaml",
         "run": root / "run", "plain": root / "plain", "npz": root / "wrong.npz"}
    p["empty"].write_text("")
    p["garbage"].write_bytes(os.urandom(64) + b"\x00: [")
    p["dir"].mkdir()
    p["untrained"].mkdir()
    raw = tiny_config(training={"steps": 2})
    p["config"].write_text(yaml.safe_dump(raw))
    (p["untrained"] / "config.yaml").write_text(yaml.safe_dump(raw))
    import numpy as np
    np.savez(p["npz"], mu=np.zeros(3), sigma=np.zeros((2, 2)))  # statistics of the wrong shapes
    shutil.copytree(trained_run, p["run"])  # a trained run (with power EMA snapshots) that nothing may write into
    assert main(["train", str(p["config"]), "--out", str(p["plain"]), "--no-progress"]) == 0  # no power EMA
    # a run trained with a concat and a context condition (docs/conditioning.md), and --cond files for it
    cond = tiny_config(data={"max_size": 16, "condition": ["lowres", "class_tokens"]},
                       network={"attn_resolutions": [4], "conditioning": "hybrid"}, training={"steps": 2})
    (root / "cond.yaml").write_text(yaml.safe_dump(cond))
    assert main(["train", str(root / "cond.yaml"), "--out", str(root / "cond_run"), "--no-progress"]) == 0
    p["cond_run"] = root / "cond_run"
    context = np.zeros((4, 5, 31), np.float32)
    for name, arrays in {"cond_shape": dict(concat=np.zeros((4, 2, 8, 8), np.float32), context=context),
                         "cond_rows": dict(concat=np.zeros((3, 1, 8, 8), np.float32), context=context),
                         "cond_unknown": dict(concat=np.zeros((4, 1, 8, 8), np.float32), context=context, foo=context),
                         "cond_missing": dict(context=context)}.items():
        p[name] = root / f"{name}.npz"
        np.savez(p[name], **arrays)
    return p


def ref(name: str) -> str:
    return "{" + name + "}"


RUNS = ["missing", "garbage", "dir", "untrained"]  # a run that is not there / a file / empty / never trained
CONFIGS = ["missing", "empty", "garbage", "dir"]
# verb -> argument lists; {name} is replaced by the fixture path, OUT by a fresh output path
ROWS: dict[str, list[list[str]]] = {
    "train": [[ref(c), "--out", "OUT"] for c in CONFIGS] + [
        ["{config}", "--out", "{garbage}"], ["{config}", "--out", "OUT", "--set", "training.steps=-1"],
        ["{config}", "--out", "OUT", "--set", "latent.vae={missing}"], ["{config}", "--out", "OUT", "--set",
                                                                        "latent.vae={run}"],
        ["--out", "OUT"], ["{config}", "--data", "digits", "--out", "OUT"], ["--data", "{missing}", "--out", "OUT"],
        ["--data", "{dir}", "--out", "OUT"], ["--data", "digits", "--out", "OUT", "--minutes", "-1"]],
    "train-vae": [[ref(c), "--out", "OUT"] for c in CONFIGS],
    "init": [["{missing}", "--out", "OUT.yaml"], ["{garbage}", "--out", "OUT.yaml"],
             ["{empty}", "--out", "OUT.yaml"], ["digits", "--out", "OUT.yaml", "--minutes", "0"],
             ["{dir}", "--out", "OUT.yaml"]],
    "encode": [["digits", "--vae", ref(r), "--out", "OUT.npz"] for r in RUNS + ["run"]] + [
        ["{missing}", "--vae", "{run}", "--out", "OUT.npz"], ["{empty}", "--vae", "{run}", "--out", "OUT.npz"],
        ["digits", "--vae", "{run}", "--out", "OUT.npz", "--batch", "0"],
        ["digits", "--vae", "{run}", "--out", "OUT.txt"]],
    "demo": [["--out", "{garbage}"], ["--out", "OUT", "--steps", "0"]],
    "sample": [[ref(r), "--out", "OUT.png"] for r in RUNS] + [
        ["{run}", "--out", "OUT.png", "--steps", "0"], ["{run}", "--out", "OUT.png", "--seeds", "9-1"],
        ["{run}", "--out", "OUT.gif"], ["{run}", "--out", "OUT.png", "--guidance", "-1"],
        ["{run}", "--out", "OUT.png", "--sampler", "nope"], ["{run}", "--out", "OUT.png", "--schedule", "karras:r=3"],
        ["{run}", "--out", "OUT.png", "--schedule", "vp", "--sigma-min", "0.1", "--sigma-max", "5"],
        ["{cond_run}", "--out", "OUT.png"], ["{run}", "--out", "OUT.png", "--cond", "{cond_missing}"]] + [
        ["{cond_run}", "--out", "OUT.png", "--seeds", "0-3", "--cond", ref(f)]
        for f in ["cond_shape", "cond_rows", "cond_unknown", "cond_missing", "garbage", "missing", "dir"]] + [
        ["{cond_run}", "--out", "OUT.png", "--seeds", "0-3", "--cond", "{cond_missing}", "--unconditional"],
        ["{cond_run}", "--out", "OUT.png", "--seeds", "0-3", "--unconditional", "--null-cond", "{cond_missing}"],
        ["{cond_run}", "--out", "OUT.png", "--seeds", "0-3", "--unconditional", "--class", "1"]] + [
        ["{run}", "--out", "OUT.png", "--strength", "0.5"], ["{run}", "--out", "OUT.png", "--compare"],
        ["{run}", "--out", "OUT.png", "--init", "{npz}"], ["{run}", "--out", "OUT.png", "--init", "{npz}",
                                                          "--strength", "2"],
        ["{run}", "--out", "OUT.png", "--init", "{npz}", "--strength", "0.5", "--mask", "{garbage}"],
        ["{run}", "--out", "OUT.png", "--init", "{npz}", "--mask", "{garbage}", "--resample", "0"],
        ["{run}", "--out", "OUT.npz", "--init", "{npz}", "--strength", "0.5", "--compare"]] + [
        ["{run}", "--out", "OUT.png", "--init", ref(p), "--strength", "0.5"] for p in ("missing", "garbage", "dir",
                                                                                       "npz")],
    "eval": [[ref(r), "--num", "8"] for r in RUNS] + [
        ["{run}", "--num", "0"], ["{run}", "--num", "8", "--ref", "{npz}"],
        ["{cond_run}", "--num", "8", "--cond", "{cond_unknown}"], ["{cond_run}", "--num", "8", "--cond", "{garbage}"]],
    "ref": [["{missing}", "--out", "OUT.npz"], ["{garbage}", "--out", "OUT.npz"], ["{dir}", "--out", "OUT.npz"]],
    "sweep": [[ref(r), "--num", "8"] for r in RUNS] + [["{run}", "--nfe", "0", "--num", "8"],
                                                       ["{cond_run}", "--num", "8", "--cond", "{cond_shape}"]],
    "likelihood": [[ref(r), "--num", "4"] for r in RUNS] + [["{run}", "--num", "0"]],
    "tune": [[ref(r), "--nfe", "5"] for r in RUNS] + [["{run}", "--nfe", "0"]],
    "plot": [[ref(r)] for r in ["missing", "garbage", "dir"]],
    "report": [[ref(r), "--out", "OUT.html"] for r in ["missing", "garbage", "dir"]],
    "export": [[ref(r), "--diffusers", "OUT"] for r in RUNS] + [["{run}", "--diffusers", "OUT"]],
    "ema": [[ref(r), "--std", "0.05"] for r in RUNS + ["plain"]] + [["{run}", "--std", "2"]],
    "reflow": [[ref(r), "--out", "OUT", "--pairs", "4"] for r in RUNS] + [
        ["{run}", "--out", "OUT"], ["{run}", "--out", "OUT", "--pairs", "0"],
        ["{run}", "--out", "OUT", "--pairs", "4", "--ode-sampler", "euler_ancestral"],
        ["{run}", "--out", "OUT", "--pairs", "4", "--ode-steps", "0"], ["{run}", "--out", "OUT", "--pairs", "4",
                                                                         "--set", "training.steps=-1"]],
    "pack": [[ref(f), "--out", "OUT.npz"] for f in ("missing", "garbage", "dir")] + [["{dir}", "--out", "OUT.txt"]],
    "import": [[ref(f), "--from", kind, "--out", "OUT"] for f in ("missing", "garbage", "dir", "npz")
               for kind in ("edm", "edm2")],
    "distill": [[ref(r), "--method", "cd", "--out", "OUT"] for r in RUNS] + [
        ["{run}", "--method", "cd", "--out", "OUT", "--steps", "0"],
        ["{run}", "--method", "ect", "--out", "OUT", "--set", "distill.q=0"], ["{run}", "--method", "cd", "--out",
                                                                              "{plain}"]],
}
CASES = [(verb, args) for verb, rows in ROWS.items() for args in rows]


def test_every_verb_has_rows():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == set(ROWS)


@pytest.mark.parametrize("verb, args", CASES, ids=[f"{v}:{' '.join(a)}" for v, a in CASES])
def test_bad_input_is_one_line_and_writes_nothing(paths, tmp_path, capsys, verb, args):
    out = tmp_path / "out"
    argv = [verb] + [str(out) + a[3:] if a.startswith("OUT") else a.format(**{k: str(v) for k, v in paths.items()})
                     for a in args]
    runs = (paths["run"], paths["plain"])
    before = {p: p.stat().st_mtime_ns for run in runs for p in run.rglob("*") if p.is_file()}
    code = main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert code == 2, (argv, captured.err)
    assert len(errors) == 1 and errors[0].startswith(f"elucidate {verb}: error: "), captured.err
    assert "Traceback" not in captured.err
    assert not list(tmp_path.glob("out*")), "an output was written"
    after = {p: p.stat().st_mtime_ns for run in runs for p in run.rglob("*") if p.is_file()}
    assert after == before, set(after.items()) ^ set(before.items())  # the runs untouched: no temp files either
