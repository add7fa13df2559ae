"""Rectified flow's reflow: pairs files, training on a pair's own noise, starting a run from weights, and the
``elucidate reflow`` command end to end (resume, bad inputs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from elucidate.config import parse_config
from elucidate.data import DataError, build_dataset, read_pairs, write_pairs
from elucidate.errors import UserError
from elucidate.losses import denoising_loss
from elucidate.run.checkpoint import load_checkpoint
from elucidate.run.model import load_run
from elucidate.runtime.rng import batch_indices, derived_generator
from elucidate.sampling.api import SeededNoise
from elucidate.training import Trainer
from elucidate.training.loop import load_matching
from elucidate.training.reflow import make_pairs, pair_seeds

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def flow_run(tiny_config, write_config, tmp_path, cli_main):
    """A tiny Flow run (4 steps) trained with `elucidate train`."""
    cfg = write_config(tiny_config(diffusion={"type": "Flow"}, sampling={"steps": 3}), tmp_path / "flow.yaml")
    assert cli_main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])[0] == 0
    return tmp_path / "run"


def _pairs(tmp_path, n=12, labels=False):
    g = torch.Generator().manual_seed(3)
    images, noise = torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)
    path = write_pairs(tmp_path / "pairs.npz", images, noise, torch.arange(n) % 10 if labels else None)
    return path, images, noise


def test_pairs_dataset_gives_each_sample_its_noise_in_the_datas_units(tmp_path):
    path, images, noise = _pairs(tmp_path, labels=True)
    data = build_dataset({"dataset": "digits", "pairs": str(path)})
    real = build_dataset({"dataset": "digits"})
    assert data.normalizer == real.normalizer and len(data) == 12 and data.num_classes == 10
    idx = torch.tensor([5, 0, 11])
    x, y = data.get_batch(idx)
    torch.testing.assert_close(x, images[idx], atol=1e-5, rtol=0)  # model units, through the data's normalizer
    assert torch.equal(data.get_noise(idx), noise[idx]) and y.tolist() == [5, 0, 1]
    assert real.get_noise(idx) is None  # ordinary data: training draws fresh noise


def test_pairs_files_are_checked_in_one_line(tmp_path):
    path, _, _ = _pairs(tmp_path)
    with pytest.raises(DataError, match="xflip cannot be used with pairs"):
        build_dataset({"dataset": "digits", "pairs": str(path), "xflip": True})
    with pytest.raises(DataError, match=r"pairs of shape \(1, 8, 8\) but the data .* is \(1, 16, 16\)"):
        build_dataset({"dataset": "digits", "resolution": 16, "pairs": str(path)})
    with pytest.raises(DataError, match="no such pairs file"):
        build_dataset({"dataset": "digits", "pairs": str(tmp_path / "missing.npz")})
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match="not a pairs file: no 'noise' array"):
        read_pairs(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="must be equal"):
        write_pairs(tmp_path / "bad.npz", torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4))


def test_training_on_pairs_adds_each_pairs_own_noise(tmp_path, tiny_config):
    """The loss of step 0 is the denoising loss of the batch's samples with their stored noise (not fresh draws)."""
    path, images, noise = _pairs(tmp_path)
    config = parse_config(tiny_config(diffusion={"type": "Flow"}, data={"pairs": str(path)},
                                      training={"batch_size": 4}))
    trainer = Trainer(config, tmp_path / "run", progress=False, log=lambda *a: None)
    try:
        _, cond, sigma, batch_noise = trainer._batch(0)
        idx = batch_indices(config.training.seed, 0, 4, 12)
        assert torch.equal(batch_noise, noise[idx])
        expected_sigma = trainer.formulation.training_sigma(4, generator=derived_generator(1, "noise", 0))
        torch.testing.assert_close(sigma, expected_sigma)
        net = trainer.denoiser
        want = denoising_loss(net, images[idx], sigma=sigma, noise=noise[idx])
        got = denoising_loss(net, *trainer._batch(0)[:1], sigma=sigma, noise=batch_noise)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    finally:
        trainer.close()


def test_pairs_cannot_be_augmented(tmp_path, tiny_config):
    path, _, _ = _pairs(tmp_path)
    config = parse_config(tiny_config(data={"pairs": str(path)}, training={"augment": {"p": 0.1}}))
    with pytest.raises(UserError, match="cannot be combined with training.augment"):
        Trainer(config, tmp_path / "run", progress=False, log=lambda *a: None)


def test_pairs_are_the_runs_ode_from_their_noise(flow_run):
    """make_pairs: each sample is what the run's sampler makes from the stored noise (x = sigma_max n)."""
    run = load_run(flow_run)
    cfg = run.config.sampling
    images, noise, labels = make_pairs(run, 5, cfg, seed=2, progress=False)
    seeds = pair_seeds(2, 5)
    assert labels is None and len(set(seeds)) == 5 and not set(seeds) & set(range(1000))  # never eval's seeds
    assert torch.equal(noise, SeededNoise(seeds, run.shape)())
    from elucidate.sampling import sample

    again = sample(run.denoiser, (5, *run.shape), seeds=seeds, **cfg.sample_kwargs(run.denoiser.formulation))
    torch.testing.assert_close(images, again)
    with pytest.raises(UserError, match="needs a deterministic sampler"):
        make_pairs(run, 2, cfg.__class__(sampler="heun", steps=3, s_churn=10.0), progress=False)
    with pytest.raises(UserError, match="needs a deterministic sampler"):
        make_pairs(run, 2, cfg.__class__(sampler="euler_ancestral", steps=3), progress=False)


def test_reflow_starts_from_the_teachers_ema_and_resumes(flow_run, tmp_path, cli_main):
    out = tmp_path / "reflowed"
    code, _ = cli_main(["reflow", str(flow_run), "--out", str(out), "--pairs", "16", "--steps", "2",
                        "--ode-sampler", "euler", "--ode-steps", "4", "--no-progress"])
    assert code == 0
    teacher, _ = load_checkpoint(sorted((flow_run / "checkpoints").iterdir())[-1])
    start, meta = load_checkpoint(out / "checkpoints" / "ckpt-00000000.safetensors")
    for key, value in teacher.items():
        if key.startswith("ema."):  # the start: net and EMA both the teacher's EMA
            assert torch.equal(start[key], value) and torch.equal(start["net." + key[4:]], value)
    assert meta["step"] == 0 and meta["config"]["data"]["pairs"] == str((out / "pairs.npz").resolve())
    assert meta["config"]["training"]["augment"] is None
    assert len(read_pairs(out / "pairs.npz")[0]) == 16
    # again, with more steps: resumes (the pairs are not generated again)
    mtime = (out / "pairs.npz").stat().st_mtime_ns
    code, _ = cli_main(["reflow", str(flow_run), "--out", str(out), "--steps", "3", "--no-progress"])
    assert code == 0 and load_run(out).step == 3
    assert (out / "pairs.npz").stat().st_mtime_ns == mtime
    # a run that has checkpoints cannot start from weights again
    config = parse_config(load_run(out).config.to_dict())
    trainer = Trainer(config, out, progress=False, log=lambda *a: None)
    try:
        with pytest.raises(UserError, match="already has checkpoints"):
            trainer.start_from({"net": trainer.net.state_dict()}, "somewhere")
    finally:
        trainer.close()


def test_reflow_bad_inputs_are_one_line_errors(flow_run, tmp_path, cli_main):
    code, lines = cli_main(["reflow", str(flow_run), "--out", str(tmp_path / "r"), "--no-progress"])
    assert code == 2 and "--pairs N is needed" in lines[-1]
    code, lines = cli_main(["reflow", str(flow_run), "--out", str(tmp_path / "r"), "--pairs", "4",
                            "--ode-sampler", "euler_ancestral", "--no-progress"])
    assert code == 2 and "needs a deterministic sampler" in lines[-1]
    code, lines = cli_main(["reflow", str(tmp_path / "nothing"), "--out", str(tmp_path / "r"), "--pairs", "4"])
    assert code == 2 and len(lines) == 1


def test_load_matching_names_the_first_mismatching_tensor():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = net.state_dict()
    with pytest.raises(UserError, match=r"tensor '0.weight' has shape \(4, 2\) but this network's is \(3, 2\)"):
        load_matching(net, {**state, "0.weight": torch.zeros(4, 2)}, "src")
    with pytest.raises(UserError, match="no tensor '1.bias'"):
        load_matching(net, {k: v for k, v in state.items() if k != "1.bias"}, "src")
    with pytest.raises(UserError, match="tensor 'extra' has no place"):
        load_matching(net, {**state, "extra": torch.zeros(1)}, "src")
