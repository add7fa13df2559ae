"""Likelihood by the probability-flow ODE: closed forms, Hutchinson, k-diffusion, networks, bits/dim, runs."""
import itertools
import math

import numpy as np
import pytest
import torch

import elucidate.likelihood as lk
from elucidate import EDM, Denoiser, GaussianMixture, build_network
from elucidate.config import parse_config
from elucidate.config.network import DataInfo, build_network_for
from elucidate.errors import UserError
from elucidate.likelihood import bits_per_dim, log_likelihood, run_likelihood
from elucidate.run.model import LoadedRun, load_run

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def gaussian_log_prior(z: torch.Tensor, sigma: float = SIGMA_MAX) -> torch.Tensor:
    z = z.reshape(z.shape[0], -1)
    return -0.5 * (z.square().sum(1) / sigma ** 2 + z.shape[1] * math.log(2 * math.pi * sigma ** 2))


def noisy_samples(mixture: GaussianMixture, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = mixture.sample(n, generator=g)
    return y + SIGMA_MIN * torch.randn(y.shape, generator=g, dtype=y.dtype)


def test_mixture_closed_form_at_sigma_min(gmm):
    x = noisy_samples(gmm, 24)
    log_p, z = log_likelihood(gmm.denoise, x, return_latent=True)
    exact = gmm.log_prob(x, SIGMA_MIN)  # the mixture convolved with N(0, sigma_min^2)
    assert log_p.dtype == torch.float64 and log_p.shape == (24,)
    # The integral itself: swap the N(0, sigma_max^2) prior for the mixture's true density at sigma_max.
    integrated = log_p - gaussian_log_prior(z) + gmm.log_prob(z, SIGMA_MAX)
    assert (integrated - exact).abs().max() < 1e-3
    # With the Gaussian prior only the prior mismatch (~|mean| |z| / sigma_max^2) remains.
    assert (log_p - exact).abs().mean() < 1e-2


def test_single_gaussian_everything_closed_form():
    mu = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    s = torch.tensor([0.5, 0.1, 1.0], dtype=torch.float64)
    gauss = GaussianMixture(mu[None], s[None])
    x = noisy_samples(gauss, 16, seed=1)
    # x(sigma) - mu grows like sqrt(s^2 + sigma^2); int div f dsigma = sum 0.5 log((s^2 + smax^2) / (s^2 + smin^2))
    ratio = ((s ** 2 + SIGMA_MAX ** 2) / (s ** 2 + SIGMA_MIN ** 2))
    z_exact = mu + ratio.sqrt() * (x - mu)
    expected = gaussian_log_prior(z_exact) + 0.5 * ratio.log().sum()
    for trace in ("exact", "hutchinson"):  # the Jacobian is diagonal, so one Rademacher probe is exact
        log_p, z = log_likelihood(gauss.denoise, x, trace=trace, return_latent=True,
                                  generator=torch.Generator().manual_seed(0))
        assert torch.allclose(z, z_exact, rtol=1e-4, atol=0)
        assert (log_p - expected).abs().max() < 1e-3, trace
    # vs the true density at sigma_min the only difference is the prior's: N(0, smax^2) for N(mu, smax^2 + s^2)
    prior_error = gaussian_log_prior(z) - gauss.log_prob(z, SIGMA_MAX)
    assert (log_p - gauss.log_prob(x, SIGMA_MIN) - prior_error).abs().max() < 1e-3
    assert prior_error.abs().max() < 5 * mu.norm() / SIGMA_MAX  # ~ mu . z / smax^2 with z ~ N(0, smax^2 I)


def test_rk4_and_heun_converge_at_their_order():
    gauss = GaussianMixture([[0.0, 0.0]], [[0.3, 0.05]])
    x = noisy_samples(gauss, 8, seed=2)
    s = gauss.stds[0]
    expected = gaussian_log_prior(x * ((s ** 2 + SIGMA_MAX ** 2) / (s ** 2 + SIGMA_MIN ** 2)).sqrt())
    expected = expected + 0.5 * ((s ** 2 + SIGMA_MAX ** 2) / (s ** 2 + SIGMA_MIN ** 2)).log().sum()

    def error(method, steps):
        return (log_likelihood(gauss.denoise, x, method=method, steps=steps) - expected).abs().max().item()
    assert error("rk4", 32) / error("rk4", 64) > 12  # 4th order: 16x per halving
    assert 3 < error("heun", 128) / error("heun", 256) < 5  # 2nd order: 4x
    assert error("rk4", None) < 2e-4 and error("heun", None) < 3e-3  # the defaults


def test_hutchinson_over_all_sign_vectors_is_exact(gmm):
    x = noisy_samples(gmm, 4, seed=3)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=gmm.dim)), dtype=torch.float64)
    probes = signs[:, None, :].expand(-1, x.shape[0], -1)  # E[v v^T] = I exactly over all sign patterns
    exact = log_likelihood(gmm.denoise, x, steps=16)
    hutch = log_likelihood(gmm.denoise, x, trace="hutchinson", probes=probes, steps=16, chunk_size=12)
    assert torch.allclose(hutch, exact, rtol=0, atol=1e-10)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(gmm, probe):
    x = noisy_samples(gmm, 1, seed=4).expand(600, -1)
    exact = log_likelihood(gmm.denoise, x[:1], steps=16)
    est = log_likelihood(gmm.denoise, x, trace="hutchinson", probe=probe, steps=16,
                         generator=torch.Generator().manual_seed(5))
    assert est.std() > 1e-3  # it is an estimate ...
    assert abs(est.mean() - exact[0]) < 4 * est.std() / math.sqrt(len(est))  # ... whose mean is exact
    again = log_likelihood(gmm.denoise, x[:8], trace="hutchinson", probe=probe, steps=16,
                           generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, est[:8])  # same generator, same probes
    averaged = log_likelihood(gmm.denoise, x[:1], trace="hutchinson", probe=probe, steps=16, num_probes=400,
                              generator=torch.Generator().manual_seed(6))
    assert abs(averaged[0] - exact[0]) < 4 * est.std() / math.sqrt(400)


def test_matches_k_diffusion_log_likelihood(gmm, kdiff):
    x = noisy_samples(gmm, 6, seed=7)
    torch.manual_seed(11)
    probes = (torch.randint_like(x, 2) * 2 - 1)[None]  # what k-diffusion draws after the same seed
    torch.manual_seed(11)
    ref, _ = kdiff.log_likelihood(gmm.denoise, x, SIGMA_MIN, SIGMA_MAX, atol=1e-8, rtol=1e-8)
    ours = log_likelihood(gmm.denoise, x, trace="hutchinson", probes=probes, steps=128)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-4)


def test_float32_agrees_with_float64(gmm):
    x = noisy_samples(gmm, 8, seed=8)
    lp64 = log_likelihood(gmm.denoise, x, steps=32)
    lp32 = log_likelihood(gmm.denoise, x.float(), steps=32)
    assert lp32.dtype == torch.float32 and torch.allclose(lp32.double(), lp64, rtol=0, atol=1e-3)


def tiny_denoiser(label_dim: int = 0, dtype=torch.float32) -> Denoiser:
    torch.manual_seed(0)
    net = build_network("unet", img_resolution=4, in_channels=1, out_channels=1, model_channels=8,
                        channel_mult=[1], num_blocks=1, attn_resolutions=[], label_dim=label_dim)
    with torch.no_grad():  # the output layers start at zero (D would be linear): make every layer count
        for param in net.parameters():
            if not param.any():
                param.normal_(0, 0.3)
    return Denoiser(net, EDM()).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_network_denoiser_no_grad_context_and_no_leak(dtype):
    D = tiny_denoiser(label_dim=3, dtype=dtype)
    x = torch.randn(3, 1, 4, 4, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 0.5
    cond = {"class_labels": torch.tensor([0, 2, 1])}
    with torch.no_grad():
        small = log_likelihood(D, x, steps=3, cond=cond, chunk_size=3)  # one dimension per pass
        big = log_likelihood(D, x, steps=3, cond=cond)  # all 16 dimensions in one pass
        hutch = log_likelihood(D, x, steps=3, cond=cond, trace="hutchinson", num_probes=2,
                               generator=torch.Generator().manual_seed(1))
    for out in (small, big, hutch):
        assert out.shape == (3,) and out.dtype == dtype and torch.isfinite(out).all() and not out.requires_grad
    assert torch.allclose(small, big, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-10)
    assert all(p.grad is None for p in D.parameters()) and all(p.requires_grad for p in D.parameters())
    # per-sample: one sample alone gives the same as in the batch (and the label matters)
    alone = log_likelihood(D, x[1:2], steps=3, cond={"class_labels": cond["class_labels"][1:2]})
    assert torch.allclose(alone, big[1:2], rtol=0, atol=1e-4)
    other = log_likelihood(D, x[1:2], steps=3, cond={"class_labels": torch.tensor([0])})
    assert not torch.allclose(other, alone)


def test_bits_per_dim_by_hand():
    # Uniform density on [-1, 1]^D in model units = uniform over pixels 0..255 (scale 2/255): log2(255) bits
    D = 12
    uniform = torch.tensor([-D * math.log(2.0)], dtype=torch.float64)
    assert bits_per_dim(uniform, D, scale=2 / 255).item() == pytest.approx(math.log2(255), abs=1e-12)
    # no scale: plain conversion nats -> bits per dim
    assert bits_per_dim(torch.tensor([-7.0]), 7).item() == pytest.approx(1 / math.log(2), rel=1e-6)
    # per-channel scales split the dimensions equally: 2 channels x 3 dims
    lp = torch.tensor([1.5, -2.0], dtype=torch.float64)
    by_hand = -(lp + 3 * math.log(0.5) + 3 * math.log(0.25)) / (6 * math.log(2))
    assert torch.allclose(bits_per_dim(lp, 6, scale=[0.5, -0.25]), by_hand)
    with pytest.raises(UserError, match="scale"):
        bits_per_dim(lp, 6, scale=[1.0, 2.0, 3.0, 4.0])
    with pytest.raises(UserError, match="num_dims"):
        bits_per_dim(lp, 0)


def test_bad_options_are_one_line_errors(gmm):
    x = noisy_samples(gmm, 2)
    for kwargs, word in [({"trace": "exactly"}, "trace"), ({"method": "rk45"}, "method"), ({"steps": 0}, "steps"),
                         ({"sigma_min": 0.0}, "sigma_min"), ({"sigma_max": 0.001}, "sigma_min"),
                         ({"trace": "hutchinson", "probe": "uniform"}, "probe"),
                         ({"trace": "hutchinson", "probes": torch.ones(2, 3, 4)}, "probes")]:
        with pytest.raises(UserError, match=word):
            log_likelihood(gmm.denoise, x, **kwargs)
    with pytest.raises(UserError, match="floating"):
        log_likelihood(gmm.denoise, torch.zeros(2, 4, dtype=torch.long))


@pytest.fixture
def uint8_run(tmp_path, tiny_config) -> LoadedRun:
    """An untrained run (the tiny U-Net) over a tiny uint8 .npz dataset (2 channels, 4x4)."""
    images = np.random.default_rng(0).integers(0, 256, size=(10, 4, 4, 2), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", images=images)
    raw = tiny_config()
    raw["data"] = {"dataset": "npz", "path": str(tmp_path / "data.npz"), "layout": "NHWC"}
    config = parse_config(raw)
    from elucidate.data import build_dataset
    dataset = build_dataset(config.data)
    info = DataInfo(2, (4, 4))
    denoiser = Denoiser(build_network_for(config, info), config.formulation()).eval().requires_grad_(False)
    return LoadedRun(denoiser, config, info, dataset.normalizer, 0, tmp_path / "ckpt.safetensors")


def test_run_likelihood_dequantizes_and_applies_the_jacobian(uint8_run, monkeypatch):
    run = uint8_run
    assert run.normalizer.scale == (2 / 255, 2 / 255) and run.normalizer.bias == (-1.0, -1.0)
    seen = []
    reference = GaussianMixture(torch.zeros(1, 32), torch.ones(1), dtype=torch.float64)

    def fake_log_likelihood(D, x, **kwargs):  # a known log-density in model units
        seen.append(x)
        return reference.log_prob(x.double())
    monkeypatch.setattr(lk, "log_likelihood", fake_log_likelihood)
    out = run_likelihood(run, 7, batch_size=3, trace="exact", seed=1)
    x = torch.cat(seen)
    from elucidate.data import build_dataset
    raw = build_dataset(run.config.data).images.double()
    pixels = (x.double() + 1) * 127.5  # back to 0..256
    # each input is one stored image + u, u in [0, 1): find which and check the offsets
    offsets = pixels[:, None] - raw[None]
    match = ((offsets >= -1e-4) & (offsets < 1 + 1e-4)).flatten(2).all(2)
    assert (match.sum(1) == 1).all() and len(set(match.float().argmax(1).tolist())) == 7
    assert offsets[match].flatten().std() > 0.2  # uniform noise, not a constant shift
    by_hand = -(reference.log_prob(x.double()) + 32 * math.log(2 / 255)) / (32 * math.log(2))
    assert out["mean"] == pytest.approx(by_hand.mean().item(), abs=1e-9)
    assert out["std"] == pytest.approx(by_hand.std().item(), abs=1e-9)
    assert out["num"] == 7 and out["num_dims"] == 32 and out["settings"]["dequantization"] == "uniform"


def test_run_likelihood_on_the_trained_run(trained_run):
    """run_likelihood end to end on a real checkpoint, fast (4 steps; the learning check is the slow test below)."""
    run = load_run(trained_run)
    out = run_likelihood(run, 6, batch_size=6, trace="hutchinson", seed=0, steps=4)
    assert math.isfinite(out["mean"]) and 0 < out["std"] < 1.0 and out["num"] == 6 and out["num_dims"] == 64
    settings = out["settings"]
    assert settings["dequantization"] == "uniform" and settings["scale"] == [0.125] and settings["step"] == 6
    rebatched = run_likelihood(run, 6, batch_size=4, trace="hutchinson", seed=0, steps=4)
    assert rebatched["mean"] == pytest.approx(out["mean"], abs=1e-4)  # per-image draws, not per-batch
    exact = run_likelihood(run, 6, batch_size=6, trace="exact", seed=0, steps=4)
    assert exact["mean"] == pytest.approx(out["mean"], abs=0.1)  # the same quantity, without probe noise


@pytest.mark.slow
def test_run_likelihood_on_a_tiny_trained_run(tmp_path, tiny_config):
    """A run trained 40 steps scores better than a uniform model (batching and the exact trace: the fast test)."""
    from elucidate.training import Trainer
    raw = tiny_config(data={"max_size": 200}, network={"model_channels": 16, "channel_mult": [1, 2]},
                      training={"steps": 40, "batch_size": 16, "lr": 2e-3, "lr_rampup": 64, "ema_halflife": 200,
                                "checkpoint_every": 40, "log_every": 20, "seed": 3})
    Trainer(parse_config(raw), tmp_path / "run", progress=False, log=lambda *a: None).train()
    out = run_likelihood(load_run(tmp_path / "run"), 6, batch_size=6, trace="hutchinson", seed=0, steps=16)
    # digits: 17 levels (0..16), so a uniform model scores log2(17) = 4.09 bits/dim; 40 steps do a bit better
    assert 2.0 < out["mean"] < math.log2(17) and 0 < out["std"] < 1.0 and out["settings"]["step"] == 40


def test_log_likelihood_is_reachable_as_the_issue_spells_it():
    import elucidate

    assert elucidate.log_likelihood is log_likelihood and "log_likelihood" in elucidate.__all__

