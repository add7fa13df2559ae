"""tune(boundary=...): the hardest draws of a pool join the tuning batch, weighted by the share of the
pool each draw stands for (elucidate.tuning.boundary, objectives.weighted_loss, `elucidate tune --boundary`)."""
from __future__ import annotations

import pytest
import torch

from elucidate import GaussianMixture
from elucidate.cli import main
from elucidate.sampling import SAMPLERS, exponential_sigmas, karras_sigmas
from elucidate.tuning import tune
from elucidate.tuning.boundary import (
    POOL_SEED_OFFSET,
    ReferenceCache,
    hardest_draws,
    picker_evaluations,
    stratify,
    stratify_models,
)
from elucidate.tuning.objectives import LOSSES, Models, geometric_mean_loss, per_sample_rms, weighted_loss
from elucidate.tuning.stored import TunedSchedule
from elucidate.tuning.tuner import NOISE_SEED_OFFSET, tuning_noise

f64 = torch.float64
# two close narrow modes and a far one: a few draws sit near the boundary between the close two
GMM = GaussianMixture(torch.tensor([[0.3, 0.0], [-0.3, 0.0], [0.0, 2.0]]), torch.tensor([0.05, 0.05, 0.1]),
                      [0.4, 0.4, 0.2])
KW = dict(sigma_min=0.002, sigma_max=80.0, reference_steps=200)


def test_weighted_loss_is_the_loss_of_the_population_the_batch_stands_for():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, generator=g, dtype=f64), torch.randn(6, 3, generator=g, dtype=f64)
    for name, loss in LOSSES.items():  # equal weights: the loss itself
        assert weighted_loss(name, torch.full((6,), 1 / 6, dtype=f64))(a, b) == pytest.approx(loss(a, b), rel=1e-12)
    # weight 2/6 on row 0 and 1/6 on rows 2-5 is the loss of the batch with row 0 twice and row 1 left out
    w = torch.tensor([2, 0, 1, 1, 1, 1], dtype=f64) / 6
    rows = [0, 0, 2, 3, 4, 5]
    for name, loss in LOSSES.items():
        assert weighted_loss(name, w)(a, b) == pytest.approx(loss(a[rows], b[rows]), rel=1e-12)
    with pytest.raises(ValueError, match="loss"):
        weighted_loss("l1", w)


def test_hardest_draws_are_those_plain_solvers_get_most_wrong():
    pool = tuning_noise((256, 2), 5, 80.0)
    idx = hardest_draws(GMM.denoise, pool, 6, 8, chunk=100, **KW)
    assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == 8
    ref = SAMPLERS["heun"](GMM.denoise, pool, karras_sigmas(200))
    outs = [SAMPLERS["dpmpp_2m"](GMM.denoise, pool, karras_sigmas(6)),
            SAMPLERS["unipc"](GMM.denoise, pool, exponential_sigmas(6))]
    worst = torch.maximum(*(per_sample_rms(out, ref) for out in outs))
    assert set(idx.tolist()) == set(worst.topk(8).indices.tolist())
    # the rare draws that either solver sends to another mode than the reference's are all among them
    flipped = torch.stack([GMM.classify(out) != GMM.classify(ref) for out in outs]).any(0)
    assert 0 < flipped.sum() <= 8 and flipped[idx].sum() == flipped.sum()


def test_stratified_batch_over_the_rest_of_the_pool_gives_the_pool_loss():
    pool = tuning_noise((64, 2), 7, 80.0)
    idx = hardest_draws(GMM.denoise, pool, 4, 6, chunk=64, **KW)
    rest = pool[[i for i in range(64) if i not in set(idx.tolist())]]
    batch, w = stratify(GMM.denoise, rest, pool, 4, 6, chunk=64, **KW)
    assert batch.shape == (64, 2) and w.sum().item() == pytest.approx(1.0)
    assert torch.equal(batch[:6], pool[idx]) and torch.equal(batch[6:], rest)
    out = SAMPLERS["dpmpp_2m"](GMM.denoise, batch, karras_sigmas(4))
    ref = SAMPLERS["heun"](GMM.denoise, batch, karras_sigmas(200))
    for name, loss in LOSSES.items():  # every pool draw counted once: the weighted loss is the pool's loss
        assert weighted_loss(name, w)(out, ref) == pytest.approx(loss(out, ref), rel=1e-12)


def test_tune_with_boundary_draws_reports_the_pool_estimate_within_budget():
    t = tune(GMM.denoise, (32, 2), 4, seed=2, boundary=6, pool=128, samplers=["dpmpp_2m", "unipc"],
             reference_steps=200, max_evals=20, finalists=1)
    assert (t.boundary, t.pool, t.num_samples, t.nfe) == (6, 128, 32, 4)
    assert TunedSchedule.from_dict(t.to_dict()).boundary == 6
    assert SAMPLERS[t.sampler].nfe(t.steps) <= 4
    # the reported tuning error is the weighted RMSE over [6 hardest of the pool, 32 tuning draws]
    pool = tuning_noise((128, 2), 2 + POOL_SEED_OFFSET, 80.0)
    batch, w = stratify(GMM.denoise, tuning_noise((32, 2), 2, 80.0), pool, 4, 6, chunk=32, **KW)
    ref = SAMPLERS["heun"](GMM.denoise, batch, karras_sigmas(200))
    assert t.tuning_error == pytest.approx(weighted_loss("rmse", w)(t(GMM.denoise, batch), ref), rel=1e-9)
    assert POOL_SEED_OFFSET > 1 and NOISE_SEED_OFFSET + POOL_SEED_OFFSET != NOISE_SEED_OFFSET + 1
    with pytest.raises(ValueError, match="smaller than pool"):
        tune(GMM.denoise, (8, 2), 4, boundary=16, pool=16)
    with pytest.raises(ValueError, match="boundary"):
        tune(GMM.denoise, (8, 2), 4, boundary=-1)


def test_a_reference_cache_solves_each_pool_once_for_several_budgets():
    options = dict(seed=2, boundary=6, pool=128, samplers=["dpmpp_2m"], reference_steps=200, max_evals=10,
                   finalists=1)
    references = ReferenceCache()
    first = tune(GMM.denoise, (32, 2), 4, references=references, **options)
    assert references.rows_solved == 2 * 128  # the tuning and the held-out pool
    cached = tune(GMM.denoise, (32, 2), 5, references=references, **options)
    assert references.rows_solved == 2 * 128  # the same pools at NFE 5: nothing solved again
    fresh = tune(GMM.denoise, (32, 2), 5, **options)
    assert (cached.sampler, cached.sigmas, cached.options) == (fresh.sampler, fresh.sigmas, fresh.options)
    assert (cached.tuning_error, cached.heldout_error) == (fresh.tuning_error, fresh.heldout_error)
    # evaluations count what was spent: the cached call skipped 2 x 128 Heun references, not the pickers
    assert fresh.evaluations - cached.evaluations == 2 * 128 * SAMPLERS["heun"].nfe(200)
    heun = SAMPLERS["heun"].nfe(200)
    assert first.evaluations >= 2 * 128 * (heun + picker_evaluations(4)) + 2 * 38 * heun
    # another denoiser, pool or reference is solved anew (the key holds the denoiser and the exact bits)
    other = GaussianMixture(GMM.means, GMM.stds * 1.5, [0.4, 0.4, 0.2])
    pool = tuning_noise((64, 2), 7, 80.0)
    sigmas = karras_sigmas(50)
    a = references.solve(other.denoise, pool, sigmas, 32)
    assert references.rows_solved == 2 * 128 + 64
    assert references.solve(other.denoise, pool, sigmas, 32) is a and references.rows_solved == 2 * 128 + 64
    assert torch.equal(a, torch.cat([SAMPLERS["heun"](other.denoise, part, sigmas) for part in pool.split(32)]))
    references.solve(other.denoise, pool, karras_sigmas(60), 32)
    references.solve(other.denoise, pool + 1e-9, sigmas, 32)
    assert references.rows_solved == 2 * 128 + 3 * 64

    class Unhashable:  # defines __eq__ without __hash__: never stored, solved each time
        def __eq__(self, other):
            return self is other

        def __call__(self, x, sigma):
            return other.denoise(x, sigma)
    D = Unhashable()
    references.solve(D, pool, sigmas, 32)
    assert torch.equal(references.solve(D, pool, sigmas, 32), a) and references.rows_solved == 2 * 128 + 5 * 64


def test_tune_a_list_with_boundary_draws_stratifies_each_model_on_its_own_pool():
    other = GaussianMixture(torch.tensor([[1.0, 1.0], [1.0, 0.6]]), torch.tensor([0.04, 0.04]), [0.5, 0.5])
    models = [GMM.denoise, other.denoise]
    t = tune(models, (16, 2), 4, seed=3, boundary=4, pool=64, samplers=["dpmpp_2m"], reference_steps=200,
             max_evals=10, finalists=1, loss="l4")
    assert (t.boundary, t.pool, t.num_samples) == (4, 64, 32)
    x, pool = tuning_noise((32, 2), 3, 80.0), tuning_noise((128, 2), 3 + POOL_SEED_OFFSET, 80.0)
    batch, weights = stratify_models(models, x, pool, 4, 4, **KW)
    for i, D in enumerate(models):  # model i: its 4 hardest of pool rows 64i.., then its 16 random draws
        own, w = stratify(D, x[16 * i:16 * (i + 1)], pool[64 * i:64 * (i + 1)], 4, 4, chunk=16, **KW)
        assert torch.equal(batch[20 * i:20 * (i + 1)], own) and torch.equal(weights[i], w)
    D = Models(models, 20)
    out, ref = t(D, batch), SAMPLERS["heun"](D, batch, karras_sigmas(200))
    # the report weighs every model's pool equally; the loss is the geometric mean of the models' own
    assert t.tuning_error == pytest.approx(weighted_loss("rmse", torch.cat(weights) / 2)(out, ref), rel=1e-9)
    per_model = [weighted_loss("l4", w)(out[20 * i:20 * (i + 1)], ref[20 * i:20 * (i + 1)])
                 for i, w in enumerate(weights)]
    geometric = geometric_mean_loss([weighted_loss("l4", w) for w in weights], 2)(out, ref)
    assert geometric == pytest.approx((per_model[0] * per_model[1]) ** 0.5, rel=1e-12)
    with pytest.raises(ValueError, match="one loss per group"):
        geometric_mean_loss([weighted_loss("l4", w) for w in weights], 3)


def test_cli_tune_boundary(tmp_path, capsys):
    assert main(["tune", "--sandbox", "--nfe", "4", "--num", "16", "--boundary", "4", "--pool", "64",
                 "--reference-steps", "48", "--max-evals", "10", "--finalists", "1", "--samplers", "dpmpp_2m",
                 "--out", str(tmp_path)]) == 0
    t = TunedSchedule.load(tmp_path / "nfe4.json")
    assert (t.boundary, t.pool, t.num_samples) == (4, 64, 16)
    assert "the 4 hardest of 64" in capsys.readouterr().out
    assert main(["tune", "--sandbox", "--nfe", "4", "--boundary", "-1", "--out", str(tmp_path)]) == 2
    assert "--boundary must be >= 0" in capsys.readouterr().err
