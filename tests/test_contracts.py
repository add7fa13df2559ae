"""Contracts every registered sampler, named schedule and formulation must meet, checked on exact denoisers.

Parametrized over the registries, so a new sampler, schedule or formulation is tested here without a test of
its own: for samplers dtype/device/shape, determinism under a seed, NFE equal to the declaration, zero-length
steps, convergence (ODE samplers) or recovery of the data distribution (stochastic samplers); for schedules
num_steps + 1 float64 levels decreasing to exactly 0 within the range, declared and documented options that
``name:option=value`` spells, and the same levels through sample() and the config; for formulations
preconditioning consistency with a perfect network, training draws, discretization, rounding and config
round-trip. Last, the names from before the rename to "sampler" still work, with a warning.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import elucidate
import elucidate.sampling as sampling
from elucidate import EDM, Denoiser, sample
from elucidate.config import parse_config
from elucidate.config.sampling import SamplingConfig, schedule_for
from elucidate.formulations import FORMULATIONS, Shifted, make_formulation
from elucidate.sampling import (
    SAMPLERS,
    SCHEDULES,
    get_schedule,
    karras_sigmas,
    ode_samplers,
    parse_schedule,
    stochastic_samplers,
)

f64 = torch.float64


class CountingNoise:
    """Noise draws k = 0, 1, ... from seed (base, k): the same sequence for any two runs."""

    def __init__(self, like: torch.Tensor, base: int = 7):
        self.like, self.base, self.k = like, base, 0

    def __call__(self, sigma=None, sigma_next=None):
        g = torch.Generator().manual_seed(self.base * 10_000 + self.k)
        self.k += 1
        return torch.randn(self.like.shape, generator=g, dtype=self.like.dtype).to(self.like.device)


def run(name, D, x, sigmas, noise_base=7, **kwargs):
    spec = SAMPLERS[name]
    if spec.takes("noise_sampler"):
        kwargs.setdefault("noise_sampler", CountingNoise(x, noise_base))
    if "s_churn" in spec.options:
        kwargs.setdefault("s_churn", 5.0)  # exercise the stochastic path of euler/heun too
    return spec(D, x, sigmas, **kwargs)


def start(gmm, n=16, seed=0, dtype=f64, sigma_max=80.0):
    return torch.randn(n, gmm.dim, generator=torch.Generator().manual_seed(seed), dtype=dtype) * sigma_max


# --- samplers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_sampler_preserves_dtype_device_and_shape(gmm, name, dtype):
    x = start(gmm, dtype=dtype)
    out = run(name, gmm.denoise, x, karras_sigmas(6))
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_is_deterministic_given_its_noise(gmm, name):
    x = start(gmm)
    a, b = run(name, gmm.denoise, x, karras_sigmas(6)), run(name, gmm.denoise, x, karras_sigmas(6))
    assert torch.equal(a, b)
    if SAMPLERS[name].stochastic:
        assert not torch.equal(a, run(name, gmm.denoise, x, karras_sigmas(6), noise_base=8))


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_nfe_and_callbacks_equal_the_declaration(gmm, name, steps):
    calls, infos = [], []

    def counting(x, sigma):
        calls.append(sigma)
        return gmm.denoise(x, sigma)

    run(name, counting, start(gmm), karras_sigmas(steps), callback=infos.append, s_churn=0.0) \
        if "s_churn" in SAMPLERS[name].options else run(name, counting, start(gmm), karras_sigmas(steps),
                                                       callback=infos.append)
    assert len(calls) == SAMPLERS[name].nfe(steps) and len(infos) == steps
    assert set(infos[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert SAMPLERS[name].steps_for_nfe(SAMPLERS[name].nfe(steps)) == steps


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_zero_length_steps_cost_nothing_and_change_nothing(gmm, name):
    sigmas = karras_sigmas(6)
    repeated = torch.cat([sigmas[:1], sigmas[:3], sigmas[2:4], sigmas[3:]])  # levels 0, 2 and 3 twice
    calls = []

    def counting(x, sigma):
        calls.append(1)
        return gmm.denoise(x, sigma)

    x = start(gmm)
    kwargs = {"s_churn": 0.0} if "s_churn" in SAMPLERS[name].options else {}
    expected = run(name, gmm.denoise, x, sigmas, **kwargs)
    got = run(name, counting, x, repeated, **kwargs)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12) and len(calls) == SAMPLERS[name].nfe(6)


@pytest.fixture(scope="module")
def converged(gmm_module):
    x = start(gmm_module, n=64, seed=5)
    return x, SAMPLERS["heun"](gmm_module.denoise, x, karras_sigmas(2000))


@pytest.mark.parametrize("name", ode_samplers())
def test_ode_samplers_converge_at_their_order(gmm, name, converged):
    # global error vs a fine Heun reference; multistep samplers that start with lower-order steps show
    # their full order only asymptotically, so at least min(order, 2) is asserted.
    x, reference = converged
    steps = [32, 64, 128]
    errors = [(SAMPLERS[name](gmm.denoise, x, karras_sigmas(n)) - reference).pow(2).mean().sqrt().item()
              for n in steps]
    assert errors[0] > errors[1] > errors[2], errors
    slope = math.log(errors[1] / errors[2]) / math.log(2)
    assert slope > min(SAMPLERS[name].order, 2) - 0.3, (errors, slope)


@pytest.mark.parametrize("name", [n for n in stochastic_samplers() if not SAMPLERS[n].consistency])
def test_stochastic_samplers_sample_the_mixture(gmm, name):  # consistency samplers: tests/sampling/test_consistency.py
    n = 2000
    x = torch.randn(n, gmm.dim, generator=torch.Generator().manual_seed(3), dtype=f64) * 80.0
    y = SAMPLERS[name](gmm.denoise, x, karras_sigmas(40), generator=torch.Generator().manual_seed(4))
    freq = torch.bincount(gmm.classify(y), minlength=3).double() / n
    assert torch.allclose(freq, gmm.weights, atol=0.04), freq
    # mean log-density of the samples vs of true draws: a first-order sampler is biased at 40 steps
    # (ancestral Euler concentrates its samples: +0.53 nats here), higher orders much less (< 0.1)
    true = gmm.sample(n, generator=torch.Generator().manual_seed(5))
    gap = (gmm.log_prob(y, 0.0).mean() - gmm.log_prob(true, 0.0).mean()).abs()
    assert gap < 0.6 / SAMPLERS[name].order, gap


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_options_are_declared_documented_and_configurable(name):
    spec = SAMPLERS[name]
    assert spec.description and spec.order >= 1 and spec.evals_per_step >= 1
    assert all(spec.doc(option) for option in spec.options)
    cfg = SamplingConfig(sampler=name, options={k: v for k, v in spec.options.items()
                                                if k not in ("s_churn", "s_tmin", "s_tmax", "s_noise", "eta")})
    cfg.validate()
    assert set(cfg.sampler_kwargs()) <= set(spec.options)


# --- named schedules -------------------------------------------------------------------------------

#: (sigma_min, sigma_max): the paper's range, VE's, and a narrow one
RANGES = [(0.002, 80.0), (0.02, 100.0), (0.01, 10.0)]


def _check_levels(sigmas, num_steps, sigma_min, sigma_max):
    where = (num_steps, sigma_min, sigma_max, sigmas)
    assert sigmas.dtype == f64 and sigmas.shape == (num_steps + 1,), where
    assert sigmas[-1] == 0 and (sigmas.diff() < 0).all(), where
    assert (sigmas[:-1] >= sigma_min * (1 - 1e-9)).all() and (sigmas[:-1] <= sigma_max * (1 + 1e-9)).all(), where


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_decreases_to_zero_within_the_range(name):
    spec = SCHEDULES[name]
    for sigma_min, sigma_max in RANGES:
        for num_steps in (1, 2, 5, 18, 64):
            _check_levels(spec(num_steps, sigma_min, sigma_max), num_steps, sigma_min, sigma_max)
    # computed in float64, then cast
    assert torch.equal(spec(7, 0.002, 80.0, dtype=torch.float32, device="cpu"), spec(7, 0.002, 80.0).float())


def _other_value(default):
    """A value of the option's type that is not its default."""
    return type(default)(default * 2)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_options_are_declared_documented_and_spelled_by_name(name):
    spec = SCHEDULES[name]
    assert spec.description and get_schedule(name) is spec
    assert set(spec.option_docs) == set(spec.options) and all(spec.option_docs.values())
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec.options.values()), spec.options
    # "name" and "name:key=value[,key=value]" round trip, each value with its option's type
    assert parse_schedule(name) == (spec, {})
    changed = {key: _other_value(default) for key, default in spec.options.items()}
    for key, value in changed.items():
        got_spec, got = parse_schedule(f"{name}:{key}={value}")
        assert got_spec is spec and got == {key: value} and type(got[key]) is type(value)
    if changed:
        assert parse_schedule(f"{name}:" + ",".join(f"{k}={v}" for k, v in changed.items())) == (spec, changed)
        _check_levels(spec(18, 0.002, 80.0, **changed), 18, 0.002, 80.0)  # still a valid schedule
    with pytest.raises(ValueError, match="nope"):
        spec(4, 0.002, 80.0, nope=1.0)
    with pytest.raises(ValueError, match="expected"):
        parse_schedule(f"{name}:nope=1")


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_is_the_same_through_sample_and_the_config(name, gmm):
    spec = SCHEDULES[name]
    by_name = sample(gmm.denoise, (4, gmm.dim), sampler="euler", schedule=name, steps=5, dtype=f64)
    by_levels = sample(gmm.denoise, (4, gmm.dim), sampler="euler", sigmas=spec(5, 0.002, 80.0), dtype=f64)
    assert torch.equal(by_name, by_levels)
    cfg = SamplingConfig(schedule=name, steps=5, sigma_min=0.01, sigma_max=10.0)
    cfg.validate()
    assert torch.equal(schedule_for(cfg, EDM()), spec(5, 0.01, 10.0))


# --- formulations --------------------------------------------------------------------------------

#: every registered formulation with its defaults, plus shifted ones (the shift applies to any of them)
FORMULATION_CASES = {**{name: (lambda name=name: make_formulation(name)) for name in FORMULATIONS},
                     "DDPM-cosine-v-shift2": lambda: Shifted(make_formulation("DDPM", beta_schedule="cosine",
                                                                                prediction="v"), 2.0),
                     "EDM-shift0.5": lambda: Shifted(make_formulation("EDM"), 0.5),
                     "iDDPM-shift3": lambda: Shifted(make_formulation("iDDPM"), 3.0),
                     "Flow-shift3": lambda: make_formulation("Flow", shift=3.0, logit_mean=0.5, logit_std=1.5)}

def _sigma_grid(formulation, n=9):
    lo, hi = formulation.supported_range
    lo, hi = max(lo, 1e-3), min(hi, 1e3)
    return torch.logspace(math.log10(lo), math.log10(hi), n, dtype=f64)


def _perfect_network(formulation, exact):
    """A network that knows the answer but sees only (c_in x, c_noise), like a real one: it recovers
    sigma from c_noise on a fine grid and returns the F that makes D exact."""
    fine = torch.logspace(math.log10(max(formulation.supported_range[0], 1e-4)),
                          math.log10(min(formulation.supported_range[1], 1e4)), 20001, dtype=f64)
    fine = formulation.round_sigma(fine)
    levels = formulation.precondition(fine).c_noise

    def net(x_in, c_noise):
        sigma = fine[(c_noise.reshape(-1, 1).to(f64) - levels).abs().argmin(dim=1)]
        c_skip, c_out, c_in, _ = formulation.precondition(sigma)
        x = x_in / c_in[:, None]
        return (exact(x, sigma) - c_skip[:, None] * x) / c_out[:, None]

    return net


@pytest.mark.parametrize("name", list(FORMULATION_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_preconditioning_is_finite_and_keeps_shape_and_dtype(name, dtype):
    f = FORMULATION_CASES[name]()
    sigma = _sigma_grid(f).to(dtype)
    for c in f.precondition(sigma):
        assert c.shape == sigma.shape and c.dtype == dtype and torch.isfinite(c).all()
    assert (f.loss_weight(sigma) > 0).all() and torch.isfinite(f.loss_weight(sigma)).all()
    c_noise = f.precondition(_sigma_grid(f)).c_noise
    assert (c_noise.diff() > 0).all() or (c_noise.diff() < 0).all(), "c_noise must be monotone in sigma"


@pytest.mark.parametrize("name", list(FORMULATION_CASES))
def test_a_perfect_network_gives_the_exact_denoiser_and_the_identity_at_small_sigma(name, gmm):
    f = FORMULATION_CASES[name]()
    D = Denoiser(_perfect_network(f, gmm.denoise), f)
    x = gmm.sample(32, generator=torch.Generator().manual_seed(0)) + torch.randn(32, gmm.dim, dtype=f64)
    for sigma in _sigma_grid(f, 5):
        sigma = float(f.round_sigma(sigma))
        assert torch.allclose(D(x, sigma), gmm.denoise(x, torch.full((32,), sigma, dtype=f64)), atol=1e-8)
    lo = max(f.supported_range[0], 1e-3)
    y = gmm.sample(32, generator=torch.Generator().manual_seed(1))
    assert (D(y, lo) - y).pow(2).mean().sqrt() < 5 * lo


@pytest.mark.parametrize("name", list(FORMULATION_CASES))
def test_training_draws_and_sampling_discretization(name):
    f = FORMULATION_CASES[name]()
    lo, hi = f.supported_range
    draws = f.training_sigma(4000, generator=torch.Generator().manual_seed(0), dtype=f64)
    again = f.training_sigma(4000, generator=torch.Generator().manual_seed(0), dtype=f64)
    assert torch.equal(draws, again) and draws.dtype == f64 and draws.shape == (4000,)
    assert (draws > 0).all() and torch.isfinite(draws).all()
    if math.isfinite(hi):
        assert (draws >= lo * (1 - 1e-9)).all() and (draws <= hi * (1 + 1e-9)).all()
    for n in (1, 5, 18):
        s = f.sampling_sigmas(n)
        assert s.shape == (n + 1,) and s[-1] == 0 and (s[:-1] > 0).all() and (s.diff() < 0).all()
        assert (s[:-1] >= lo * (1 - 1e-9)).all() and (s[:-1] <= hi * (1 + 1e-9)).all()
    snapped = f.round_sigma(_sigma_grid(f))
    assert torch.equal(f.round_sigma(snapped), snapped)
    s_lo, s_hi = f.schedule_range()
    assert lo <= s_lo < s_hi <= hi


@pytest.mark.parametrize("name", list(FORMULATION_CASES))
def test_formulation_config_round_trip(name):
    f = FORMULATION_CASES[name]()
    if not isinstance(f, Shifted):
        assert make_formulation(**f.to_config()) == f
    assert parse_config({"diffusion": f.to_config()}).formulation() == f
    assert np.isfinite([v for v in f.to_config().values() if isinstance(v, float)]).all()


# --- renamed names -------------------------------------------------------------------------------

@pytest.mark.parametrize("old,new", [("SOLVERS", "SAMPLERS"), ("SolverSpec", "SamplerSpec"),
                                     ("register_solver", "register_sampler"), ("get_solver", "get_sampler"),
                                     ("ode_solvers", "ode_samplers"), ("stochastic_solvers", "stochastic_samplers"),
                                     ("sweep_solvers", "sweep_samplers")])
def test_old_sampling_names_still_work_with_a_warning(old, new):
    with pytest.warns(DeprecationWarning, match=f"elucidate.sampling.{old} is now {new}"):
        assert getattr(sampling, old) is getattr(sampling, new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(sampling, new)  # the new name does not warn


def test_elucidate_UNet_is_nets_UNet_with_a_warning():
    with pytest.warns(DeprecationWarning, match="elucidate.UNet is elucidate.nets.UNet"):
        assert elucidate.UNet is elucidate.nets.UNet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert elucidate.Unet is not elucidate.nets.UNet  # the lucidrains-style network, without a warning
