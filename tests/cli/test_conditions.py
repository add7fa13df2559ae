"""Every condition at sample time (issue 30 item 3): ``sample --cond FILE.npz`` for concat and crossattn runs, the
missing-condition error, ``--unconditional``, eval's default conditions (the training data's), ``Guided(null=)`` /
``--null-cond``, and training-time grids sampled with the data's conditions."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses

import numpy as np
import pytest
import torch
import yaml

from elucidate.data import build_dataset
from elucidate.denoiser import Guided
from elucidate.errors import UserError
from elucidate.run import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {"concat": ("lowres", 0.5), "crossattn": ("class_tokens", 0.0)}  # (data condition, cond_drop_prob)


@pytest.fixture(scope="module")
def runs(tiny_config, tmp_path_factory) -> dict:
    """A tiny concat run (trained with condition dropout) and a tiny crossattn run (without)."""
    from elucidate.cli import main

    root = tmp_path_factory.mktemp("cond")
    out = {}
    for kind, (condition, drop) in KINDS.items():
        raw = tiny_config(data={"max_size": 32, "condition": condition},
                          network={"attn_resolutions": [4], "conditioning": kind},
                          training={"steps": 2, "batch_size": 4, "checkpoint_every": 2, "cond_drop_prob": drop})
        (root / f"{kind}.yaml").write_text(yaml.safe_dump(raw))
        assert main(["train", str(root / f"{kind}.yaml"), "--out", str(root / kind), "--no-progress"]) == 0
        out[kind] = root / kind
    return out


def data_of(run_dir):
    return build_dataset(load_run(run_dir).config.data)


def raw_conditions(dataset, kind: str, n: int) -> dict:
    """The first n data items' conditions in the data's own units (what a --cond file holds)."""
    key = "concat" if kind == "concat" else "context"
    return {key: getattr(dataset, key)[:n].numpy()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_cond_file_samples_as_the_library_does_with_the_data_conditions(runs, kind, cli_main, tmp_path):
    dataset = data_of(runs[kind])
    np.savez(tmp_path / "cond.npz", **raw_conditions(dataset, kind, 4))
    code, err = cli_main(["sample", runs[kind], "--seeds", "3-6", "--cond", tmp_path / "cond.npz",
                          "--out", tmp_path / "x.npz", "--no-progress"])
    assert code == 0, err
    run = load_run(runs[kind])
    # normalized exactly as training did: the file's rows are the data's conditions in model units
    from elucidate.cli.conditions import read_conditions
    read = read_conditions(run, tmp_path / "cond.npz", 4)
    expected = dataset.get_conditions(torch.arange(4))
    assert read.keys() == expected.keys() and all(torch.equal(read[k], expected[k]) for k in read)
    assert (run.cond_normalizer is not None) == (kind == "concat")  # stored in the checkpoint
    if kind == "concat":  # a run from before it was stored: refitted from the training data, the same
        older = load_run(runs[kind])
        older.cond_normalizer = None
        assert torch.equal(read_conditions(older, tmp_path / "cond.npz", 4)["concat"], expected["concat"])
    x = run.sample([3, 4, 5, 6], cond=expected)
    from elucidate.run import write_samples
    write_samples(x, [3, 4, 5, 6], tmp_path / "ref.npz", normalizer=run.normalizer)
    written, ref = np.load(tmp_path / "x.npz"), np.load(tmp_path / "ref.npz")
    assert written.files == ref.files and all(np.array_equal(written[k], ref[k]) for k in ref.files)
    # one row is broadcast to every seed; other conditions give other samples
    one = {k: v[:1] for k, v in raw_conditions(dataset, kind, 1).items()}
    np.savez(tmp_path / "one.npz", **one)
    assert cli_main(["sample", runs[kind], "--seeds", "3-6", "--cond", tmp_path / "one.npz",
                     "--out", tmp_path / "one_out.npz", "--no-progress"])[0] == 0
    first = {k: v[:1] for k, v in expected.items()}
    write_samples(run.sample([3, 4, 5, 6], cond=first), [3, 4, 5, 6], tmp_path / "one_ref.npz",
                  normalizer=run.normalizer)
    written, ref = np.load(tmp_path / "one_out.npz"), np.load(tmp_path / "one_ref.npz")
    assert all(np.array_equal(written[k], ref[k]) for k in ref.files)

@pytest.mark.parametrize("kind", list(KINDS))
def test_a_conditional_run_refuses_to_sample_without_its_condition(runs, kind, cli_main, tmp_path):
    key = "concat" if kind == "concat" else "context"
    code, err = cli_main(["sample", runs[kind], "--seeds", "0-3", "--out", tmp_path / "x.png", "--no-progress"])
    assert code == 2 and len(err) == 1, err
    assert key in err[0] and "--cond" in err[0] and "--unconditional" in err[0], err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(UserError, match=f"trained with a {key} condition"):
        load_run(runs[kind]).sample(range(2))


@pytest.mark.parametrize("kind", list(KINDS))
def test_unconditional_uses_the_null_condition_and_warns_without_dropout(runs, kind, cli_main, tmp_path):
    code, err = cli_main(["sample", runs[kind], "--seeds", "0-3", "--unconditional", "--out", tmp_path / "x.png",
                          "--no-progress"])
    assert code == 0, err
    warned = [line for line in err if "never saw the null condition" in line]
    assert len(warned) == (1 if KINDS[kind][1] == 0 else 0), err
    run = load_run(runs[kind])
    null = run.null_conditions(4)
    assert all(bool((v == 0).all()) for v in null.values()) and set(null) == set(run.condition_shapes)
    cond_run = load_run(runs[kind])
    from elucidate.cli.conditions import attach_conditions
    with pytest.warns(UserWarning, match="never saw") if KINDS[kind][1] == 0 else contextlib.nullcontext():
        attach_conditions(cond_run, argparse.Namespace(run=runs[kind], unconditional=True), [0, 1, 2, 3])
    assert torch.equal(cond_run.sample(range(4)), run.sample(range(4), cond=null))


def test_eval_conditions_default_to_the_training_data(runs):
    from elucidate.cli.conditions import attach_conditions

    run = load_run(runs["concat"])
    attach_conditions(run, argparse.Namespace(run=runs["concat"]), None)
    dataset = data_of(runs["concat"])
    seeds = [0, 5, 31, 32, 40]
    got = run.conditions(seeds)
    assert torch.equal(got["concat"], dataset.get_conditions(torch.tensor(seeds) % dataset.num_images)["concat"])


def test_eval_of_a_concat_run_runs_with_the_data_conditions(runs, cli_main, tmp_path):
    import shutil
    run = shutil.copytree(runs["concat"], tmp_path / "run")
    code, err = cli_main(["eval", run, "--num", "8", "--no-progress"])
    assert code == 0, err


class Toy(torch.nn.Module):
    """D(x, sigma, concat, class_labels): a nonlinear function of everything, for the guidance formula."""

    def __init__(self):
        super().__init__()
        self.net = argparse.Namespace(label_dim=3)

    def forward(self, x, sigma, concat=None, class_labels=None):
        out = torch.tanh(x) * (1 + torch.as_tensor(sigma).reshape(-1, 1, 1, 1))
        if concat is not None:
            out = out + concat.square()
        if class_labels is not None:
            out = out + (class_labels @ torch.arange(1.0, 4.0)).reshape(-1, 1, 1, 1)
        return out


def test_guided_null_equals_the_formula():
    D = Toy()
    g = torch.Generator().manual_seed(0)
    x, c, n = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(3))
    sigma = torch.rand(4, generator=g) + 0.1
    labels = torch.tensor([0, 2, 1, 2])
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    null_label = torch.tensor([1])
    null_onehot = torch.nn.functional.one_hot(null_label, 3).float().expand(4, 3)
    w = 2.5
    got = Guided(D, w, null={"concat": n, "class_labels": null_label})(x, sigma, concat=c, class_labels=labels)
    uncond = D(x, sigma, concat=n, class_labels=null_onehot)
    want = uncond + w * (D(x, sigma, concat=c, class_labels=onehot) - uncond)
    torch.testing.assert_close(got, want)
    # keys the null leaves out keep the built-in null (zeros); w = 0 is the given null alone
    got = Guided(D, w, null={"concat": n[:1]})(x, sigma, concat=c, class_labels=labels)
    uncond = D(x, sigma, concat=n[:1].expand(4, -1, -1, -1), class_labels=torch.zeros(4, 3))
    torch.testing.assert_close(got, uncond + w * (D(x, sigma, concat=c, class_labels=onehot) - uncond))
    torch.testing.assert_close(Guided(D, 0, null={"concat": n})(x, sigma, concat=c), D(x, sigma, concat=n))
    # without null: the built-in zeros
    plain = Guided(D, w)(x, sigma, concat=c)
    torch.testing.assert_close(plain, D(x, sigma, concat=torch.zeros_like(c))
                               + w * (D(x, sigma, concat=c) - D(x, sigma, concat=torch.zeros_like(c))))
    with pytest.raises(ValueError, match="null has"):
        Guided(D, w, null={"context": torch.zeros(1, 2, 3)})(x, sigma, concat=c)
    with pytest.raises(ValueError, match="null must be"):
        Guided(D, w, null=[n])


def test_null_cond_file_is_the_unconditional_branch(runs, cli_main, tmp_path):
    run_dir = runs["concat"]
    dataset = data_of(run_dir)
    np.savez(tmp_path / "cond.npz", **raw_conditions(dataset, "concat", 4))
    np.savez(tmp_path / "null.npz", concat=dataset.concat[9:10].numpy())
    args = ["sample", run_dir, "--seeds", "0-3", "--cond", tmp_path / "cond.npz", "--guidance", "2"]
    code, err = cli_main(args + ["--null-cond", tmp_path / "null.npz", "--out", tmp_path / "a.npz", "--no-progress"])
    assert code == 0, err
    code, err = cli_main(args + ["--out", tmp_path / "b.npz", "--no-progress"])
    assert code == 0, err
    run = load_run(run_dir)
    run.null_cond = {"concat": dataset.get_conditions(torch.tensor([9]))["concat"]}
    cfg = dataclasses.replace(run.config.sampling, guidance=2.0)
    x = run.sample(range(4), cfg, cond=dataset.get_conditions(torch.arange(4)))
    run.null_cond = None
    y = run.sample(range(4), cfg, cond=dataset.get_conditions(torch.arange(4)))
    assert not torch.equal(x, y)  # the given null changes the guided samples
    from elucidate.run import write_samples
    for name, samples in (("a", x), ("b", y)):  # and the CLI samples exactly these
        write_samples(samples, range(4), tmp_path / f"{name}_ref.npz", normalizer=run.normalizer)
        written, ref = np.load(tmp_path / f"{name}.npz"), np.load(tmp_path / f"{name}_ref.npz")
        assert all(np.array_equal(written[k], ref[k]) for k in ref.files)
    code, err = cli_main(["sample", run_dir, "--seeds", "0-3", "--cond", tmp_path / "cond.npz", "--guidance", "1",
                          "--null-cond", tmp_path / "null.npz", "--out", tmp_path / "c.png"])
    assert code == 2 and "--null-cond" in err[-1], err


def test_training_grids_use_the_data_conditions(tiny_config, tmp_path, monkeypatch):
    from elucidate.config import parse_config
    from elucidate.run.model import LoadedRun
    from elucidate.training import Trainer

    raw = tiny_config(data={"max_size": 16, "condition": ["lowres", "class_tokens"]},
                      network={"attn_resolutions": [4], "conditioning": "hybrid"},
                      training={"steps": 1, "batch_size": 4, "checkpoint_every": 1, "num_sample_images": 6})
    trainer = Trainer(parse_config(raw), tmp_path / "run", progress=False, log=lambda *a: None)
    seen = {}
    original = LoadedRun.sample

    def spy(self, seeds, cfg=None, **kwargs):
        seen.update(kwargs.get("cond") or {})
        return original(self, seeds, cfg, **kwargs)

    monkeypatch.setattr(LoadedRun, "sample", spy)
    trainer.train_step(0)
    trainer.picture()
    expected = trainer.dataset.get_conditions(torch.arange(6))
    assert set(seen) == {"concat", "context"}
    assert all(torch.equal(seen[k], expected[k]) for k in expected)
