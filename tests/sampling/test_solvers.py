"""Solvers against k-diffusion 0.1.1, against a literal reading of EDM Algorithm 2, and against
the exact solution of the probability-flow ODE of a Gaussian mixture."""
import math

import numpy as np
import pytest
import torch

from elucidate import sample
from elucidate.sampling import (
    SAMPLERS,
    ablation,
    dpmpp_2m,
    dpmpp_2m_sde,
    dpmpp_3m_sde,
    euler,
    euler_ancestral,
    exponential_sigmas,
    heun,
    karras_sigmas,
    lms,
    nfe,
)

f64 = torch.float64


def start(gmm, sigmas, n=16, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, gmm.dim, generator=g, dtype=dtype) * float(sigmas[0])


class SharedNoise:
    """The same noise sequence for two solvers: draw k comes from seed (base, k)."""

    def __init__(self, like, base=123):
        self.like, self.base, self.k = like, base, 0

    def __call__(self, sigma=None, sigma_next=None):
        g = torch.Generator().manual_seed(self.base * 1000 + self.k)
        self.k += 1
        return torch.randn(self.like.shape, generator=g, dtype=self.like.dtype)


DETERMINISTIC = [
    ("euler", "sample_euler", {}),
    ("heun", "sample_heun", {}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}),
    ("lms", "sample_lms", {}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.0}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.0}),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.0}),
]


@pytest.mark.parametrize("ours,theirs,kwargs", DETERMINISTIC, ids=[d[0] for d in DETERMINISTIC])
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_deterministic_solvers_equal_kdiffusion(kdiff, gmm, ours, theirs, kwargs, schedule):
    sigmas = karras_sigmas(12) if schedule == "karras" else exponential_sigmas(12, 0.01, 50.0)
    x = start(gmm, sigmas)
    mine = SAMPLERS[ours](gmm.denoise, x, sigmas, **kwargs)
    ref = getattr(kdiff, theirs)(gmm.denoise, x, sigmas, disable=True, **kwargs)
    assert mine.dtype == f64
    assert torch.allclose(mine, ref, rtol=0, atol=1e-9), (mine - ref).abs().max()


STOCHASTIC = [
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 1.0}),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 0.5, "s_noise": 1.01}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 1.0}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.7, "solver_type": "heun"}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 1.0}),
]


@pytest.mark.parametrize("ours,theirs,kwargs", STOCHASTIC, ids=[f"{s[0]}-{i}" for i, s in enumerate(STOCHASTIC)])
def test_stochastic_solvers_equal_kdiffusion_on_identical_noise(kdiff, gmm, ours, theirs, kwargs):
    sigmas = karras_sigmas(10)
    x = start(gmm, sigmas)
    mine = SAMPLERS[ours](gmm.denoise, x, sigmas, noise_sampler=SharedNoise(x), **kwargs)
    ref = getattr(kdiff, theirs)(gmm.denoise, x, sigmas, disable=True, noise_sampler=SharedNoise(x), **kwargs)
    assert torch.allclose(mine, ref, rtol=0, atol=1e-9), (mine - ref).abs().max()


@pytest.mark.parametrize("name", ["heun", "euler"])
def test_churn_equals_kdiffusion(kdiff, gmm, name):
    # With churn active on every step k-diffusion draws torch.randn_like once per step, as we do.
    sigmas = karras_sigmas(10)
    x = start(gmm, sigmas)
    kw = dict(s_churn=5.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.003)
    torch.manual_seed(7)
    mine = SAMPLERS[name](gmm.denoise, x, sigmas, noise_sampler=lambda a, b: torch.randn_like(x), **kw)
    torch.manual_seed(7)
    ref = getattr(kdiff, f"sample_{name}")(gmm.denoise, x, sigmas, disable=True, **kw)
    assert torch.allclose(mine, ref, rtol=0, atol=1e-9)


def algorithm2(D, x, t, S_churn=0.0, S_tmin=0.0, S_tmax=math.inf, S_noise=1.0, eps=None):
    """EDM Algorithm 2, line by line, as printed in the paper."""
    N = len(t) - 1
    for i in range(N):
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_tmin <= t[i] <= S_tmax else 0.0
        t_hat = t[i] + gamma * t[i]
        x_hat = x + math.sqrt(t_hat ** 2 - t[i] ** 2) * (S_noise * eps[i] if gamma > 0 else 0)
        d = (x_hat - D(x_hat, torch.full((x.shape[0],), t_hat, dtype=x.dtype))) / t_hat
        x_next = x_hat + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d_prime = (x_next - D(x_next, torch.full((x.shape[0],), t[i + 1], dtype=x.dtype))) / t[i + 1]
            x_next = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


def test_heun_is_algorithm_2(gmm):
    t = karras_sigmas(9)
    x = start(gmm, t)
    eps = [torch.randn_like(x) for _ in range(9)]
    it = iter(eps)
    ours = heun(gmm.denoise, x, t, s_churn=30, s_tmin=0.05, s_tmax=50, s_noise=1.003,
                noise_sampler=lambda a, b: next(it))
    # our solver draws noise only where gamma > 0; hand the paper version the same draws
    t_list = t.tolist()
    gammas = [0.05 <= t_list[i] <= 50 for i in range(9)]
    it2 = iter(eps)
    eps_aligned = [next(it2) if g else None for g in gammas]
    paper = algorithm2(gmm.denoise, x, t_list, 30, 0.05, 50, 1.003, eps_aligned)
    assert torch.allclose(ours, paper, rtol=0, atol=1e-12)
    assert torch.allclose(heun(gmm.denoise, x, t), algorithm2(gmm.denoise, x, t.tolist()), atol=1e-12)


def test_ablation_with_edm_choices_is_heun_and_vp_choices_reach_the_same_ode_solution(gmm):
    t = karras_sigmas(16)
    noise = torch.randn(32, gmm.dim, dtype=f64, generator=torch.Generator().manual_seed(3))
    direct = heun(gmm.denoise, noise * 80.0, t)
    via_alg1 = ablation(gmm.denoise, noise, num_steps=16, discretization="edm", schedule="linear", scaling="none")
    assert torch.allclose(direct, via_alg1, atol=1e-12)
    # Same ODE written in VP time and scaling: converges to the same end point as steps grow.
    ref = heun(gmm.denoise, noise * 80.0, karras_sigmas(400))
    vp = ablation(gmm.denoise, noise, num_steps=400, discretization="vp", schedule="vp", scaling="vp",
                  sigma_min=0.002, sigma_max=80.0)
    ve = ablation(gmm.denoise, noise, num_steps=400, discretization="ve", schedule="ve", scaling="none",
                  sigma_min=0.002, sigma_max=80.0)
    assert (vp - ref).abs().max() < 2e-3 and (ve - ref).abs().max() < 2e-3
    # alpha = 1/2 (midpoint-like) is also 2nd order
    mid = ablation(gmm.denoise, noise, num_steps=64, alpha=0.5)
    assert (mid - ref).abs().max() < 1e-2
    with pytest.raises(ValueError, match="discretization"):
        ablation(gmm.denoise, noise, discretization="cosine")


def rmse_vs_reference(gmm, solver, steps, x0, ref):
    sigmas = karras_sigmas(steps)
    return (solver(gmm.denoise, x0 * 80.0, sigmas) - ref).pow(2).mean().sqrt().item()


def test_convergence_order(gmm):
    # Heun's global error falls ~h^2, Euler's ~h (log-log slope vs number of steps).
    x0 = torch.randn(64, gmm.dim, dtype=f64, generator=torch.Generator().manual_seed(5))
    ref = heun(gmm.denoise, x0 * 80.0, karras_sigmas(2000))
    steps = [40, 80, 160]
    for solver, order in ((heun, 2), (euler, 1), (dpmpp_2m, 2)):
        errors = [rmse_vs_reference(gmm, solver, n, x0, ref) for n in steps]
        slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
        assert abs(slope - order) < 0.35, (solver.__name__, errors, slope)


def test_ode_and_churn_samplers_recover_the_mixture(gmm):
    # The exact denoiser + a good solver must reproduce the mixture weights and component moments.
    n = 3000
    shape = (n, gmm.dim)
    for kwargs in ({"steps": 32}, {"steps": 32, "s_churn": 40, "s_tmin": 0.05, "s_tmax": 50, "s_noise": 1.003}):
        y = sample(gmm.denoise, shape, sampler="heun", dtype=f64, seeds=range(1000, 1000 + n), **kwargs)
        labels = gmm.classify(y)
        freq = torch.bincount(labels, minlength=3).double() / n
        assert torch.allclose(freq, gmm.weights, atol=0.03), freq
        for k in range(3):
            members = y[labels == k]
            assert torch.allclose(members.mean(0), gmm.means[k], atol=0.05)
            assert torch.allclose(members.std(0), gmm.stds[k], rtol=0.12)


def test_nfe_and_callback_counts(gmm):
    calls = []

    def counting(x, sigma):
        calls.append(1)
        return gmm.denoise(x, sigma)

    steps = []
    x = start(gmm, karras_sigmas(7))
    for name in SAMPLERS:
        calls.clear()
        steps.clear()
        SAMPLERS[name](counting, x, karras_sigmas(7), callback=steps.append)
        assert len(calls) == nfe(name, 7) and len(steps) == 7, name
        assert set(steps[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}


@pytest.mark.parametrize("sampler,kwargs", [("heun", {}), ("heun", {"s_churn": 10.0}), ("euler_ancestral", {}),
                                            ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {"eta": 0.5})])
def test_per_sample_seeds_do_not_depend_on_the_batch(gmm, sampler, kwargs):
    big = sample(gmm.denoise, (5, gmm.dim), sampler=sampler, steps=8, seeds=[10, 11, 12, 13, 14], dtype=f64, **kwargs)
    alone = sample(gmm.denoise, (1, gmm.dim), sampler=sampler, steps=8, seeds=[12], dtype=f64, **kwargs)
    reordered = sample(gmm.denoise, (2, gmm.dim), sampler=sampler, steps=8, seeds=[14, 12], dtype=f64, **kwargs)
    # equal up to rounding: the mixture's shared-sigma path uses matrix products, which round differently for
    # different batch sizes (~1e-15); a seed that moved with the batch would differ by O(1)
    for a, b in ((big[2], alone[0]), (big[2], reordered[1]), (big[4], reordered[0])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert (big[0] - big[1]).abs().max() > 0.1


def test_sample_accepts_explicit_sigmas_and_image_shapes():
    from elucidate import GaussianMixture
    g = GaussianMixture(torch.zeros(2, 12), torch.tensor([0.1, 0.3]))
    sigmas = exponential_sigmas(6, 0.01, 20.0)
    out = sample(g.denoise, (3, 1, 3, 4), sigmas=sigmas, sampler="dpmpp_2m", seeds=[1, 2, 3])
    x = torch.stack([torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]) * 20.0
    assert torch.allclose(out, dpmpp_2m(g.denoise, x, sigmas), atol=1e-6)
    assert out.dtype == torch.float32


def test_bad_arguments_raise_named_value_errors(gmm):
    d = gmm.denoise
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(0)
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(10, sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_max"):
        karras_sigmas(10, sigma_max=-1.0)
    with pytest.raises(ValueError, match="rho"):
        karras_sigmas(10, rho=0)
    with pytest.raises(ValueError, match="num_steps"):
        sample(d, (2, 4), steps=0)
    with pytest.raises(ValueError, match="sampler"):
        sample(d, (2, 4), sampler="ddim_magic")
    with pytest.raises(ValueError, match="seeds"):
        sample(d, (2, 4), seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="does not take"):
        sample(d, (2, 4), sampler="dpmpp_2m", s_churn=1.0)
    with pytest.raises(ValueError, match="non-increasing"):
        heun(d, torch.zeros(2, 4), torch.tensor([1.0, 0.5, 0.7, 0.0]))
    with pytest.raises(ValueError, match="sigmas"):
        euler(d, torch.zeros(2, 4), torch.tensor([1.0, -0.5, 0.0]))
    with pytest.raises(ValueError, match="order"):
        lms(d, torch.zeros(2, 4), karras_sigmas(3), order=0)
    with pytest.raises(ValueError, match="solver_type"):
        dpmpp_2m_sde(d, torch.zeros(2, 4), karras_sigmas(3), solver_type="rk4")


def test_generator_makes_stochastic_solvers_reproducible(gmm):
    x = start(gmm, karras_sigmas(6))
    for solver in (euler_ancestral, dpmpp_2m_sde, dpmpp_3m_sde):
        a = solver(gmm.denoise, x, karras_sigmas(6), generator=torch.Generator().manual_seed(4))
        b = solver(gmm.denoise, x, karras_sigmas(6), generator=torch.Generator().manual_seed(4))
        c = solver(gmm.denoise, x, karras_sigmas(6), generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_lms_coefficients_are_adams_bashforth():
    from elucidate.sampling import lms_coefficients
    t = [4.0, 3.0, 2.0, 1.0, 0.0]  # uniform step h = -1
    assert lms_coefficients(t, 0, 1) == pytest.approx([-1.0])
    assert lms_coefficients(t, 1, 2) == pytest.approx([-1.5, 0.5])  # AB2: h (3/2 f_n - 1/2 f_{n-1})
    assert lms_coefficients(t, 2, 3) == pytest.approx([-23 / 12, 16 / 12, -5 / 12])
    assert lms_coefficients(t, 3, 4) == pytest.approx([-55 / 24, 59 / 24, -37 / 24, 9 / 24])


def test_steps_for_nfe_and_vp_range():
    from elucidate.sampling import steps_for_nfe, vp_range_sigmas
    assert [steps_for_nfe("heun", b) for b in (1, 5, 10, 35)] == [1, 3, 5, 18]
    assert all(nfe("heun", steps_for_nfe("heun", b)) <= b for b in range(1, 50))
    assert steps_for_nfe("dpmpp_2m", 10) == 10
    with pytest.raises(ValueError, match="budget"):
        steps_for_nfe("euler", 0)
    s = vp_range_sigmas(12, 0.002, 80.0)
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002) and s[-1] == 0
