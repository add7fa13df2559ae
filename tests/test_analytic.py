"""Exact denoisers against independent computations (scipy densities, brute-force posteriors)."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from elucidate import EmpiricalDenoiser, GaussianMixture, sample
from elucidate.sampling import heun, karras_sigmas

f64 = torch.float64


def test_log_prob_matches_scipy(gmm):
    x = torch.randn(7, 4, dtype=f64, generator=torch.Generator().manual_seed(0))
    for sigma in (0.0, 0.3, 2.0):
        ours = gmm.log_prob(x, sigma)
        ref = np.log(sum(
            float(w) * multivariate_normal(mean=m.numpy(), cov=np.diag(s.numpy() ** 2 + sigma ** 2)).pdf(x.numpy())
            for w, m, s in zip(gmm.weights, gmm.means, gmm.stds)))
        assert np.allclose(ours.numpy(), ref, rtol=1e-10)


def test_denoiser_is_the_posterior_mean_and_tweedie(gmm):
    x = torch.randn(5, 4, dtype=f64, generator=torch.Generator().manual_seed(1))
    sigma = 0.7
    # Tweedie: D(x) = x + sigma^2 grad log p(x; sigma), with the gradient by autograd
    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(gmm.log_prob(xg, sigma).sum(), xg)
    assert torch.allclose(gmm.denoise(x, sigma), x + sigma ** 2 * grad, atol=1e-10)
    assert torch.allclose(gmm.score(x, sigma), grad, atol=1e-10)
    # a single Gaussian component: the Wiener filter mu + s^2/(s^2+sigma^2)(x - mu)
    g = GaussianMixture(torch.tensor([[0.5, -1.0]]), torch.tensor([[0.3, 2.0]]))
    y = torch.tensor([[1.0, 1.0]], dtype=f64)
    expected = torch.tensor([[0.5 + 0.09 / 0.58 * 0.5, -1.0 + 4.0 / 4.49 * 2.0]], dtype=f64)
    assert torch.allclose(g.denoise(y, 0.7), expected, atol=1e-12)


def test_shared_sigma_fast_path_equals_the_per_sample_posterior():
    # one sigma for the batch takes [B, K] matrix products; per-sample sigmas take the [B, K, d] path: the
    # same posterior mean, also with stds down to 0.005 at sigma 0.002 and far-out x at sigma 80
    g = torch.Generator().manual_seed(3)
    m = GaussianMixture(torch.rand(6, 64, generator=g, dtype=f64) * 1.6 - 0.8,
                        torch.exp(torch.empty(6, 64, dtype=f64).uniform_(math.log(0.005), math.log(0.3), generator=g)),
                        torch.rand(6, generator=g, dtype=f64) + 0.2)
    for sigma in (80.0, 3.0, 0.3, 0.01, 0.002):
        x = m.sample(9, generator=g) + sigma * torch.randn(9, 64, generator=g, dtype=f64)
        shared = m.denoise(x, torch.tensor(sigma, dtype=f64))
        assert m._shared_sigma(x, sigma) == sigma
        spread = torch.full((9,), sigma, dtype=f64)
        spread[1:] = torch.nextafter(spread[1:], torch.full_like(spread[1:], math.inf))  # not all equal
        assert m._shared_sigma(x, spread) is None
        one_by_one = torch.cat([m.denoise(x[i:i + 1], spread[i:i + 1]) for i in range(9)])
        general = m.denoise(x, spread)
        torch.testing.assert_close(shared, general, rtol=0, atol=1e-12)
        torch.testing.assert_close(shared, one_by_one, rtol=0, atol=1e-12)
    assert m._shared_sigma(x, 0.0) is None  # sigma = 0 (and float32 mixtures) use the general path
    empty = torch.empty(0, 64, dtype=f64)  # an empty batch, with one sigma or a per-sample (empty) one
    assert m.denoise(empty, 1.0).shape == m.denoise(empty, torch.empty(0, dtype=f64)).shape == (0, 64)


def test_sampling_shapes_labels_and_errors(gmm):
    y, labels = gmm.sample(20_000, generator=torch.Generator().manual_seed(2), return_labels=True)
    assert y.shape == (20_000, 4)
    freq = torch.bincount(labels, minlength=3).double() / 20_000
    assert torch.allclose(freq, gmm.weights, atol=0.015)
    assert torch.equal(gmm.classify(gmm.means), torch.arange(3))
    assert gmm.denoise(torch.zeros(3, 1, 2, 2), 1.0).shape == (3, 1, 2, 2)  # any data shape
    with pytest.raises(ValueError, match="d = 4"):
        gmm.denoise(torch.zeros(3, 5), 1.0)
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 3), torch.ones(2), [1.0, -1.0])


def test_empirical_denoiser_limits_and_memorization():
    g = torch.Generator().manual_seed(3)
    data = torch.randn(50, 6, generator=g, dtype=f64)
    D = EmpiricalDenoiser(data, chunk=16)  # chunked streaming softmax
    x = data[:4] + 1e-3 * torch.randn(4, 6, generator=g, dtype=f64)
    assert torch.allclose(D(x, 0.01), data[:4], atol=1e-8)  # small sigma: the nearest point
    assert torch.allclose(D(x, 1e4), data.mean(0).expand(4, 6), atol=1e-6)  # large sigma: the mean
    # against a brute-force softmax over all points at a moderate sigma
    sigma = 0.8
    w = torch.softmax(-torch.cdist(x, data).square() / (2 * sigma ** 2), dim=1)
    assert torch.allclose(D(x, sigma), w @ data, atol=1e-12)
    # the exact ODE of a finite dataset reproduces training points (memorization)
    noise = torch.randn(8, 6, generator=g, dtype=f64)
    out = heun(D, noise * 80.0, karras_sigmas(64))
    nearest = torch.cdist(out, data).min(dim=1).values
    assert nearest.max() < 1e-3


def test_empirical_denoiser_image_shapes_and_float32():
    data = torch.rand(10, 1, 4, 4)
    D = EmpiricalDenoiser(data)
    out = sample(D, (3, 1, 4, 4), steps=10)
    assert out.shape == (3, 1, 4, 4) and out.dtype == torch.float32
    assert math.isfinite(float(out.abs().max()))
