"""The consistency formulation's boundary and the consistency sampler (Song et al. 2023, Algorithm 1): by hand, on
an exact consistency function, through sample() with seeds, and what tune does with it."""
from __future__ import annotations

import math

import pytest
import torch

from elucidate import EDM, Denoiser, sample
from elucidate.formulations import FORMULATIONS, Consistency, make_formulation
from elucidate.sampling import SAMPLERS, karras_sigmas
from elucidate.sampling.consistency import consistency

f64 = torch.float64


# ------------------------------------------------------------------------------------------------ the boundary
@pytest.mark.parametrize("epsilon", [0.002, 0.01, 0.5])
def test_the_boundary_is_exact(epsilon):
    f = Consistency(sigma_data=0.5, sigma_min=max(epsilon, 0.002), epsilon=epsilon)
    c = f.precondition(torch.tensor([epsilon], dtype=f64))
    assert c.c_skip.item() == 1.0 and c.c_out.item() == 0.0  # f(x, epsilon) = x exactly
    sigma = torch.tensor([1.0], dtype=f64)
    sd2 = 0.25  # Song et al. 2023, Appendix C
    assert math.isclose(f.precondition(sigma).c_skip.item(), sd2 / ((1 - epsilon) ** 2 + sd2), rel_tol=1e-15)
    assert math.isclose(f.precondition(sigma).c_out.item(), 0.5 * (1 - epsilon) / math.sqrt(sd2 + 1), rel_tol=1e-15)


def test_epsilon_zero_is_edm_exactly():
    sigma = torch.logspace(-3, 2, 50, dtype=f64)
    a, b = Consistency(epsilon=0.0).precondition(sigma), EDM().precondition(sigma)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # an EDM teacher's student equals it at step 0


@pytest.mark.parametrize("name", [n for n in FORMULATIONS if n not in ("DDPM", "Consistency")])
def test_every_continuous_formulation_has_the_boundary_at_zero(name):
    c = make_formulation(name).precondition(torch.tensor([0.0], dtype=f64))
    assert c.c_skip.item() == 1.0 and c.c_out.item() == 0.0  # ECT's boundary: the formulation's own


def test_epsilon_above_the_schedule_is_refused():
    with pytest.raises(ValueError, match="epsilon"):
        Consistency(epsilon=0.01, sigma_min=0.002)


# ------------------------------------------------------------------------------------------------ the sampler
def toy_f(x, sigma):
    """A made-up consistency function (anything nonlinear in x and sigma)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return torch.tanh(x / (1 + s)) + 0.1 * s.log1p()


class Noise:
    def __init__(self, shape):
        self.shape, self.k, self.draws = shape, 0, []

    def __call__(self, sigma=None, sigma_next=None):
        z = torch.randn(self.shape, generator=torch.Generator().manual_seed(100 + self.k), dtype=f64)
        self.k += 1
        self.draws.append(z)
        return z


def test_one_step_is_f_at_sigma_max():
    n = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=f64)
    x = consistency(toy_f, 80.0 * n, torch.tensor([80.0, 0.0]), noise_sampler=Noise(n.shape))
    assert torch.equal(x, toy_f(80.0 * n, torch.full((5,), 80.0, dtype=f64)))


def test_two_steps_are_algorithm_1():
    n = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=f64)
    noise, eps, tau = Noise(n.shape), 0.002, 0.821
    x = consistency(toy_f, 80.0 * n, torch.tensor([80.0, tau, 0.0], dtype=f64), epsilon=eps, noise_sampler=noise)
    x0 = toy_f(80.0 * n, torch.full((5,), 80.0, dtype=f64))  # line 2
    x_tau = x0 + math.sqrt(tau ** 2 - eps ** 2) * noise.draws[0]  # line 5, fresh noise z
    assert len(noise.draws) == 1 and torch.allclose(x, toy_f(x_tau, torch.full((5,), tau, dtype=f64)), rtol=0,
                                                    atol=1e-15)


def test_levels_below_epsilon_are_refused():
    with pytest.raises(ValueError, match="epsilon"):
        consistency(toy_f, torch.zeros(2, 3), torch.tensor([80.0, 0.001, 0.0]), epsilon=0.002)


def test_declaration():
    spec = SAMPLERS["consistency"]
    assert spec.stochastic and spec.consistency and not spec.sweep and [spec.nfe(n) for n in (1, 2, 4)] == [1, 2, 4]


def gaussian_f(mu: float, s: float):
    """The exact consistency function of data N(mu, s^2 I): the probability-flow ODE maps x at sigma to
    mu + s (x - mu) / sqrt(s^2 + sigma^2)."""
    def f(x, sigma):
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return mu + s * (x - mu) / (s ** 2 + sigma ** 2).sqrt()
    return f


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_with_the_exact_consistency_function_it_samples_the_data(steps):
    # with f exact, every step's output is distributed as the data: N(0.3, 0.5^2) here, at any number of steps
    f = gaussian_f(0.3, 0.5)
    x = torch.randn(20000, 4, generator=torch.Generator().manual_seed(1), dtype=f64) * 80.0
    y = consistency(f, x, karras_sigmas(steps, 0.5, 80.0), generator=torch.Generator().manual_seed(2))
    assert abs(y.mean().item() - 0.3) < 0.01 and abs(y.std().item() - 0.5) < 0.01


def test_sample_with_seeds_gives_each_image_its_own_noise():
    D = Denoiser(lambda x, c_noise, **k: torch.sin(3 * x) * c_noise.reshape(-1, 1, 1, 1), EDM())
    sigmas = torch.tensor([80.0, 2.0, 0.5, 0.0], dtype=f64)
    both = sample(D, (2, 1, 2, 2), sampler="consistency", sigmas=sigmas, seeds=[7, 8])
    alone = sample(D, (1, 1, 2, 2), sampler="consistency", sigmas=sigmas, seeds=[8])
    assert torch.equal(both[1:], alone)
    again = sample(D, (2, 1, 2, 2), sampler="consistency", sigmas=sigmas, seeds=[7, 8])
    assert torch.equal(both, again) and not torch.equal(both[0], both[1])


def test_tune_places_its_levels_not_the_ode_tuner():
    # the ODE tuner scores against a converged ODE solution, which re-noising breaks; the consistency tuner scores the
    # samples' distribution (here the Frechet distance of 1-d samples to the data N(0.3, 0.5^2)) on common seeds
    from elucidate.tuning.consistency import tune_consistency
    from elucidate.tuning.tuner import candidate_samplers

    with pytest.raises(ValueError, match="draws noise"):
        candidate_samplers(["consistency"])
    f = gaussian_f(0.3, 0.5)

    def fd(sigmas, seeds):
        y = sample(f, (len(seeds), 1), sampler="consistency", sigmas=torch.tensor(sigmas), seeds=seeds, dtype=f64)
        return (y.mean().item() - 0.3) ** 2 + (y.std().item() - 0.5) ** 2

    tuned = tune_consistency(fd, 2, sigma_max=80.0, lo=0.004, default=[80.0, 0.821, 0.0], num=200, grid=3, refine=2)
    assert tuned.sampler == "consistency" and tuned.steps == 2 and tuned.tuning_error <= tuned.baselines[0][
        "tuning_error"]
