"""torch.distributed under torchrun (2 gloo processes): training gives the weights one process gives, sampling
and evaluation the same bytes and the same figure; an error on one rank ends them all. Three torchrun launches in
all (tests/runtime/ddp_runs.py runs several trainings or commands in one)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from elucidate.cli import main
from elucidate.config import parse_config
from elucidate.run import RunDir, load_checkpoint
from elucidate.runtime.distributed import gather_batches, map_batches, shard_batches
from elucidate.training import Trainer, train_vae

RUNS = Path(__file__).resolve().parent / "ddp_runs.py"


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


def _newest(run: Path) -> tuple[dict, dict]:
    return load_checkpoint(RunDir(run).latest_checkpoint())


def _losses(run: Path, keys=("loss",)) -> list[dict]:
    records = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    return [{k: r[k] for k in keys if k in r} for r in records if "loss" in r]


def test_two_processes_train_the_same_weights_as_one(tiny_config, tiny_vae_config, torchrun, tmp_path):
    """Every trainer on the one loop: 2 processes see the same global batch as one (the same augmented batch;
    a network with augment_dim but no augmentation still has its embedding in the graph on every rank, as DDP
    needs; the autoencoder's two optimizers and the adaptive GAN weight reduced over processes)."""
    configs = {
        "diffusion": ("diffusion", tiny_config(data={"max_size": 200}, network={"model_channels": 16,
                                                                               "channel_mult": [1, 2]},
                                               training={"steps": 6, "batch_size": 16, "checkpoint_every": 6,
                                                         "log_every": 3, "lr_rampup": 64, "seed": 5})),
        "augment": ("diffusion", tiny_config(training={"steps": 4, "checkpoint_every": 4, "augment": {
            "p": 0.5, "yflip": 1, "rotate90": 1}})),
        "augment_dim": ("diffusion", tiny_config(network={"channel_mult": [1, 2], "augment_dim": 4},
                                                 training={"steps": 2})),
        "vae": ("vae", tiny_vae_config(training={"steps": 6, "checkpoint_every": 6, "log_every": 3})),
        # EDM2: forced weight normalization rewrites the weights in every training forward on every rank, and the
        # uncertainty head's gradient is all-reduced with the network's (both in the one DDP module)
        "edm2": ("diffusion", tiny_config(network={"arch": "edm2", "channel_mult": [1, 2], "attn_resolutions": [4]},
                                          training={"steps": 3, "checkpoint_every": 3, "lr": 0.01,
                                                    "loss_weighting": "uncertainty"})),
    }
    spec = tmp_path / "configs.json"
    spec.write_text(json.dumps(configs))
    r = torchrun(RUNS, "train", tmp_path / "two", spec)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, (kind, raw) in configs.items():
        one = tmp_path / "one" / name
        if kind == "vae":
            train_vae(raw, one, progress=False)
        else:
            Trainer(parse_config(raw), one, progress=False, log=lambda *a: None).train()
        (a, _), (b, meta) = _newest(one), _newest(tmp_path / "two" / name)
        assert meta["world_size"] == 2 and a.keys() == b.keys(), name
        if kind == "vae":
            # Adam's step m / sqrt(v) is ~ sign(g) when a gradient is float-rounding noise, e.g. the attention
            # key bias (softmax ignores it: its exact gradient is 0), so the order of DDP's gradient sums can
            # move such an element by up to lr per step. Everything else must agree to float precision.
            lr, steps = raw["training"]["lr"], raw["training"]["steps"]
            total = mismatched = 0
            for key in (k for k in a if k.startswith("net.")):
                close = torch.isclose(a[key], b[key], rtol=1e-4, atol=1e-5)
                total, mismatched = total + close.numel(), mismatched + int((~close).sum())
                assert (a[key] - b[key]).abs().max() <= 2 * lr * steps, key
            assert mismatched <= 1e-3 * total, f"{mismatched} of {total} parameter elements differ"
            keys = ("loss", "d_loss", "d_weight", "logvar")
        else:
            for key in (k for k in a if k.startswith(("net.", "ema."))):
                assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (name, key)
            keys = ("loss",)
        for ra, rb in zip(_losses(one, keys), _losses(tmp_path / "two" / name, keys), strict=True):
            assert ra == pytest.approx(rb, rel=1e-4, abs=1e-6), name


def test_two_processes_sample_and_evaluate_as_one(trained_copy, torchrun, tiny_config, write_config, tmp_path):
    """Seed batches sharded over ranks and gathered in seed order: the same bytes for every output kind, the same
    evaluation figure and sweep rows; rank 0 alone writes and reports (`elucidate train`'s last line too)."""
    run = trained_copy
    # 10 seeds in batches of 3: rank 0 gets batches 0 and 2, rank 1 batches 1 and 3 (a short one)
    common = ["--seeds", "0-9", "--batch", "3", "--steps", "3"]
    commands = {who: [["sample", run, *common, "--out", tmp_path / f"{who}.npz"],
                      ["sample", run, *common, "--out", tmp_path / f"{who}.png"],
                      ["sample", run, *common, "--out", f"{tmp_path / who}/"],
                      ["eval", run, "--num-samples", "10", "--batch", "3", "--steps", "3", "--metric", "fd_digits"],
                      ["sweep", run, "--samplers", "euler,heun", "--nfe", "3", "--num-samples", "7", "--batch", "3",
                       "--metric", "fd_digits", "--out", tmp_path / f"{who}-sweep"]]
                for who in ("one", "two")}
    for argv in commands["one"]:
        assert main([str(a) for a in argv]) == 0
    result = next(RunDir(run).eval.glob("fd_digits-*.json"))
    one = json.loads(result.read_text())
    result.unlink()
    train = ["train", write_config(tiny_config(training={"steps": 2}), tmp_path / "tiny.yaml"), "--out",
             tmp_path / "ddp-run", "--no-progress"]
    argv = tmp_path / "argv.json"
    argv.write_text(json.dumps([[str(a) for a in c] for c in commands["two"] + [train]]))
    r = torchrun(RUNS, "cli", argv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote 10 samples") == 3 and r.stdout.count("on 2 processes") == 3  # rank 0 only
    assert r.stdout.count(f"wrote {result}") == 1 and r.stdout.count("fd_digits-vs-nfe.csv") == 1
    assert r.stdout.count("trained to step 2 ") == 1, r.stdout

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
    two = json.loads(result.read_text())
    assert two["value"] == pytest.approx(one["value"], rel=1e-12, abs=1e-12) and one["value"] > 0
    sweep = (tmp_path / "one-sweep" / "fd_digits-vs-nfe.csv").read_text()
    assert sweep == (tmp_path / "two-sweep" / "fd_digits-vs-nfe.csv").read_text() and len(sweep.splitlines()) == 3


def test_an_error_on_one_rank_ends_all_ranks(torchrun, tmp_path):
    # rank 1 fails before the gather that rank 0 waits in: torchrun must end rank 0 too (no hang)
    script = tmp_path / "fail.py"
    script.write_text("import torch\nfrom elucidate.runtime.distributed import init_sampling, map_batches\n"
                      "info = init_sampling()\n"
                      "def f(b):\n    if info.rank == 1:\n        raise SystemExit(3)\n"
                      "    return torch.zeros(len(b), 2)\n"
                      "map_batches(f, 10, 3)\n")
    r = torchrun(script, timeout=60)
    assert r.returncode != 0 and "exitcode  : 3" in r.stderr
