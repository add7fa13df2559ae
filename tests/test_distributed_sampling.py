"""Sampling and evaluation under torchrun: 2 gloo processes write the same bytes and the same figure as one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from elucidate.cli import main
from elucidate.runtime.distributed import gather_batches, map_batches, shard_batches

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data": {"dataset": "digits", "max_size": 200},
        "network": {"arch": "unet", "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
                    "attn_resolutions": []},
        "diffusion": {"type": "EDM"},
        "training": {"steps": 4, "batch_size": 16, "checkpoint_every": 4, "sample_every": 0, "log_every": 2},
        "sampling": {"steps": 4}}


def test_shard_batches_cover_every_batch_once_strided_over_ranks():
    assert [list(map(list, shard_batches(10, 3, r, 2))) for r in range(2)] == [
        [[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9]]]
    for num, bs, world in [(0, 4, 3), (7, 2, 3), (5, 8, 4), (64, 16, 4)]:
        got = sorted(i for r in range(world) for b in shard_batches(num, bs, r, world) for i in b)
        assert got == list(range(num))
    with pytest.raises(ValueError):
        shard_batches(4, 0, 0, 1)


def test_one_process_is_the_identity():
    batches = map_batches(lambda b: torch.arange(b.start, b.stop, dtype=torch.float32)[:, None], 7, 3)
    assert torch.equal(torch.cat(batches)[:, 0], torch.arange(7, dtype=torch.float32))
    assert gather_batches(batches, 7, 3) == batches


def test_no_option_of_sample_eval_sweep_is_taken_by_torchrun():
    """torchrun's parser accepts abbreviations, so an option of ours that prefixes one of its own
    (``--num`` -> ``--numa-binding``) would never reach us; those have a torchrun-safe spelling."""
    from torch.distributed.run import get_args_parser

    from elucidate.cli import _build

    theirs = [s for a in get_args_parser()._actions for s in a.option_strings]
    verbs = next(a.choices for a in _build()[0]._actions if isinstance(getattr(a, "choices", None), dict))
    for verb in ("sample", "eval", "sweep"):
        for action in verbs[verb]._actions:
            ours = [s for s in action.option_strings if s.startswith("--") and s != "--help"]
            safe = [s for s in ours if not any(t.startswith(s) for t in theirs)]
            assert not ours or safe, f"{verb} {ours}: every spelling is taken by torchrun"


# The in-process runs use one thread like each torchrun rank (OMP_NUM_THREADS=1): on some CPUs oneDNN's
# results depend on the thread count in the last bits, which would compare thread counts, not processes.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "elucidate", *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_two_processes_sample_the_same_bytes_and_evaluate_the_same_figure(trained, tmp_path):
    # 10 seeds in batches of 3: rank 0 gets batches 0 and 2, rank 1 batches 1 and 3 (a short one)
    common = ["--seeds", "0-9", "--batch", "3", "--steps", "3"]
    assert main(["sample", str(trained), *common, "--out", str(tmp_path / "one.npz")]) == 0
    assert main(["sample", str(trained), *common, "--out", str(tmp_path / "one.png")]) == 0
    assert main(["sample", str(trained), *common, "--out", str(tmp_path / "one") + "/"]) == 0
    r = torchrun("sample", trained, *common, "--out", tmp_path / "two.npz")
    assert r.stdout.count("wrote 10 samples") == 1 and "on 2 processes" in r.stdout  # rank 0 only
    torchrun("sample", trained, *common, "--out", tmp_path / "two.png")
    torchrun("sample", trained, *common, "--out", str(tmp_path / "two") + "/")
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert a.files == b.files
        for k in a.files:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    ones = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(ones) == 10 and ones == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in ones)

    # eval: features gathered in seed order -> the same statistics and the same FD (we test 1e-12 relative;
    # by construction it is bit-identical on CPU)
    evaluation = ["eval", trained, "--num-samples", "10", "--batch", "3", "--steps", "3", "--metric", "fd_digits"]
    assert main(list(map(str, evaluation))) == 0
    out = next((trained / "eval").glob("fd_digits-*.json"))
    one = json.loads(out.read_text())
    out.unlink()
    r = torchrun(*evaluation)
    assert r.stdout.count("wrote ") == 1
    two = json.loads(out.read_text())
    assert two["value"] == pytest.approx(one["value"], rel=1e-12, abs=1e-12)
    assert one["value"] > 0


@pytest.mark.slow
def test_an_error_on_one_rank_ends_all_ranks(tmp_path):
    # rank 1 fails before the gather that rank 0 waits in: torchrun must end rank 0 too (no hang)
    script = tmp_path / "fail.py"
    script.write_text("import torch\nfrom elucidate.distributed_sampling import init_sampling, map_batches\n"
                      "info = init_sampling()\n"
                      "def f(b):\n    if info.rank == 1:\n        raise SystemExit(3)\n"
                      "    return torch.zeros(len(b), 2)\n"
                      "map_batches(f, 10, 3)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode != 0 and "exitcode  : 3" in r.stderr


@pytest.mark.slow
def test_two_processes_sweep_the_same_rows(trained, tmp_path):
    args = ["sweep", trained, "--samplers", "euler,heun", "--nfe", "3", "--num-samples", "7", "--batch", "3",
            "--metric", "fd_digits"]
    assert main(list(map(str, [*args, "--out", tmp_path / "one"]))) == 0
    r = torchrun(*args, "--out", tmp_path / "two")
    assert r.stdout.count("wrote ") == 1
    one = (tmp_path / "one" / "fd_digits-vs-nfe.csv").read_text()
    assert one == (tmp_path / "two" / "fd_digits-vs-nfe.csv").read_text() and len(one.splitlines()) == 3
