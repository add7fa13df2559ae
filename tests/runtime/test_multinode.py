"""Two nodes on one machine: two torchrun launches (``--nnodes=2``, one process each, node ranks 0 and 1, rendezvous
on 127.0.0.1), as two machines would run them, train into one run directory (what a shared filesystem gives) the
weights one process trains, resume it, and sample and evaluate as one process does (docs/scale.md#multi-node)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from elucidate.cli import main
from elucidate.run import RunDir, load_checkpoint

RUNS = Path(__file__).resolve().parent / "ddp_runs.py"

# One thread in this process like each torchrun rank (OMP_NUM_THREADS=1): see tests/runtime/test_distributed.py.
pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process has just exited
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _kill(launch: subprocess.Popen) -> None:
    """SIGKILL a torchrun launch still running: its workers (each leads its own session) and the launcher."""
    if launch.poll() is not None:
        return
    for pid in [*_children(launch.pid), launch.pid]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    launch.wait()


def two_nodes(args, env: dict, logs: Path, timeout: float = 300) -> list[tuple[int, str, str]]:
    """``torchrun --nnodes=2 --nproc-per-node=1 --node-rank=R --rdzv-endpoint=127.0.0.1:PORT ARGS`` (or ARGS(R)) for
    R = 0, 1: two
    launches as on two machines (static rendezvous: node 0 runs rank 0); (exit status, stdout, stderr) of node 0,
    then node 1. Both are killed if they have not finished within ``timeout`` seconds."""
    endpoint, launches = f"127.0.0.1:{_free_port()}", []
    logs.mkdir(parents=True, exist_ok=True)
    try:
        for node in (0, 1):
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                       f"--node-rank={node}", f"--rdzv-endpoint={endpoint}",
                       *map(str, args(node) if callable(args) else args)]
            with open(logs / f"node{node}.out", "w") as out, open(logs / f"node{node}.err", "w") as err:
                launches.append(subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=logs,
                                                 start_new_session=True))
        deadline = time.monotonic() + timeout
        for launch in launches:
            try:
                launch.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        hung = [node for node, launch in enumerate(launches) if launch.poll() is None]
    finally:
        for launch in launches:
            _kill(launch)
    results = [(launch.returncode, (logs / f"node{n}.out").read_text(), (logs / f"node{n}.err").read_text())
               for n, launch in enumerate(launches)]
    if hung:
        pytest.fail(f"node(s) {hung} still running after {timeout} s (killed); stderr tails:\n"
                    + "\n".join(err[-2000:] for _, _, err in results))
    return results


def _assert_same_weights(one: Path, two: Path, step: int) -> None:
    (a, _), (b, meta) = load_checkpoint(RunDir(one).checkpoint(step)), load_checkpoint(RunDir(two).checkpoint(step))
    assert meta["world_size"] == 2 and meta["step"] == step and a.keys() == b.keys()
    # the tolerance of test_two_processes_train_the_same_weights_as_one, for the same reason: DDP sums the two
    # half-batches' gradients in another order than one process reduces the whole batch (float rounding)
    for key in (k for k in a if k.startswith(("net.", "ema."))):
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (step, key)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, RunDir(run).metrics.read_text().splitlines()) if "loss" in r]


def test_two_nodes_train_resume_sample_and_evaluate_as_one_process(tiny_config, write_config, env, tmp_path):
    """Node 0 and node 1 (LOCAL_RANK 0 on both, RANK 0 and 1) write one run directory, rank 0 alone; the run
    resumed on the two nodes reads its checkpoint on both; sampling and evaluation shard the seeds over the
    nodes and give one process's bytes and figure."""
    config = write_config(tiny_config(training={"steps": 4, "checkpoint_every": 2}), tmp_path / "tiny.yaml")
    one, two = tmp_path / "one", tmp_path / "two"
    # one process, 6 steps: the reference for the two-node run at step 4 and, resumed, at step 6
    assert main(["train", str(config), "--out", str(one), "--no-progress", "--set", "training.steps=6"]) == 0
    sampled = ["sample", one, "--seeds", "0-9", "--batch", "3", "--steps", "2"]
    evaluated = ["eval", one, "--num-samples", "10", "--batch", "3", "--steps", "2", "--metric", "fd_digits"]
    assert main([str(a) for a in [*sampled, "--out", tmp_path / "one.npz"]]) == 0
    assert main([str(a) for a in evaluated]) == 0
    result = next(RunDir(one).eval.glob("fd_digits-*.json"))
    figure = json.loads(result.read_text())["value"]
    result.unlink()

    # the documented command line on each node, the same --out (a shared filesystem)
    nodes = two_nodes(["-m", "elucidate", "train", config, "--out", two, "--no-progress"], env, tmp_path / "train")
    assert [code for code, _, _ in nodes] == [0, 0], [err[-3000:] for _, _, err in nodes]
    assert "trained to step 4 " in nodes[0][1] and "trained to step" not in nodes[1][1]  # rank 0 reports
    _assert_same_weights(one, two, 4)

    # resumed to step 6 on both nodes, then sample and eval sharded over them (one launch: ddp_runs.py's cli)
    argv = tmp_path / "argv.json"
    argv.write_text(json.dumps([[str(a) for a in c] for c in (
        ["train", config, "--out", two, "--no-progress", "--set", "training.steps=6"],
        [*sampled, "--out", tmp_path / "two.npz"], evaluated)]))
    nodes = two_nodes([RUNS, "cli", argv], env, tmp_path / "resume")
    assert [code for code, _, _ in nodes] == [0, 0], [err[-3000:] for _, _, err in nodes]
    assert "trained to step 6 " in nodes[0][1] and "wrote 10 samples" in nodes[0][1], nodes[0][1]
    assert all("from ckpt-00000004.safetensors (step 4)" in out for _, out, _ in nodes)  # both read the checkpoint
    assert "trained to step" not in nodes[1][1] and "wrote" not in nodes[1][1], nodes[1][1]
    _assert_same_weights(one, two, 6)
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4, abs=1e-6) and len(_losses(one)) == 3

    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    assert json.loads(result.read_text())["value"] == pytest.approx(figure, rel=1e-12, abs=1e-12) and figure > 0

    # a run directory each node sees differently (node-local, not shared): node 0 would resume at step 6 and node 1
    # start afresh, pairing gradients of two different runs; both refuse in one line instead
    nodes = two_nodes(lambda node: ["-m", "elucidate", "train", config, "--out", two if node == 0 else tmp_path / "new",
                                    "--no-progress", "--set", "training.steps=8"], env, tmp_path / "split")
    assert [code for code, _, _ in nodes] == [1, 1], [err[-3000:] for _, _, err in nodes]  # torchrun's failure code
    assert all("the processes start from different steps (0 to 6); every node must see the same run directory" in err
               for _, _, err in nodes), [err[-2000:] for _, _, err in nodes]
    assert max(RunDir(two).list_checkpoints()).name == "ckpt-00000006.safetensors"  # nothing trained
