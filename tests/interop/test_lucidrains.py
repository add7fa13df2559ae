"""The lucidrains-style API (docs/lucidrains.md): ``elucidate.Unet`` and ``elucidate.ElucidatedDiffusion``.

The lucidrains-style snippet runs verbatim (only the import line changes); every method equals the elucidate
core call it is built on (Denoiser, denoising_loss, sampling.heun / dpmpp_2m, karras_sigmas) and an independent
transcription of the lucidrains-style semantics written here; a tiny model learns the digits through it.
The snippet (128x128, minutes) and the learning test are marked slow: `make test-all` runs them.
"""
from __future__ import annotations

import math

import pytest
import torch

from elucidate import EDM, Denoiser, ElucidatedDiffusion, Unet, denoising_loss
from elucidate.data import build_dataset
from elucidate.errors import UserError
from elucidate.sampling import dpmpp_2m, heun, karras_sigmas

EDM_ARGS = dict(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0, P_mean=-1.2, P_std=1.2)
CHURN = dict(S_churn=80, S_tmin=0.05, S_tmax=50, S_noise=1.003)


def _tiny(image_size=(8, 12), channels=2, dtype=torch.float32, **unet) -> ElucidatedDiffusion:
    """A small Unet whose zero-initialized output layers are perturbed, so F is not identically 0."""
    torch.manual_seed(0)
    net = Unet(dim=8, dim_mults=(1, 2), channels=channels, random_or_learned_sinusoidal_cond=True, **unet)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net = net.to(dtype)
    return ElucidatedDiffusion(net, image_size=image_size, channels=channels, num_sample_steps=6, **CHURN)


@pytest.mark.slow
def test_lucidrains_snippet_runs_verbatim():
    # --- the lucidrains-style snippet, verbatim (only the two import lines became one) -----------------
    from elucidate import ElucidatedDiffusion, Unet

    # The U-Net must have `random_or_learned_sinusoidal_cond = True`
    model = Unet(
    dim=64,
    random_or_learned_sinusoidal_cond=True
    )
    diffusion = ElucidatedDiffusion(
    model,
    image_size = 128,
    num_sample_steps = 32, # Much fewer steps are needed
    sigma_min = 0.002,
    sigma_max = 80,
    rho = 7, # Controls the noise schedule curve
    # Stochastic sampling parameters
    S_churn = 80,
    S_tmin = 0.05,
    S_tmax = 50,
    S_noise = 1.003,
    )
    # Training is similar to other models
    images = torch.randn(2, 3, 128, 128)
    loss = diffusion(images)
    loss.backward()
    # Sampling
    # Using the default Heun solver with stochastic churn
    sampled_images = diffusion.sample(batch_size = 4)
    # Using the DPM-Solver++
    sampled_images_dpm = diffusion.sample_using_dpmpp(batch_size = 4)
    # --- end of the lucidrains-style snippet -----------------------------------------------------------
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    for out in (sampled_images, sampled_images_dpm):
        assert out.shape == (4, 3, 128, 128) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert (diffusion.sigma_data, diffusion.P_mean, diffusion.P_std, diffusion.channels) == (0.5, -1.2, 1.2, 3)


def test_preconditioning_is_the_denoiser_and_eq7():
    d = _tiny()
    torch.manual_seed(1)
    x, sigma = torch.randn(3, 2, 8, 12) * 2, torch.tensor([0.01, 0.7, 30.0])
    out = d.preconditioned_network_forward(x, sigma)
    assert torch.equal(out, Denoiser(d.net, EDM(**EDM_ARGS))(x, sigma))
    # eq. 7 with Table 1's EDM column, written out here
    s, sd = sigma.reshape(-1, 1, 1, 1), 0.5
    root = (s ** 2 + sd ** 2).sqrt()
    c_skip, c_out, c_in = sd ** 2 / root ** 2, s * sd / root, 1 / root
    torch.testing.assert_close(out, c_skip * x + c_out * d.net(c_in * x, sigma.log() / 4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.c_skip(sigma), c_skip.flatten())
    torch.testing.assert_close(d.c_out(sigma), c_out.flatten())
    torch.testing.assert_close(d.c_in(sigma), c_in.flatten())
    torch.testing.assert_close(d.c_noise(sigma), sigma.log() * 0.25)
    assert torch.equal(d.preconditioned_network_forward(x, sigma, clamp=True), out.clamp(-1, 1))
    assert (out.abs() > 1).any()  # the clamp did something
    assert torch.equal(d.preconditioned_network_forward(x, 0.7), Denoiser(d.net, EDM(**EDM_ARGS))(x, 0.7))
    with pytest.raises(UserError, match="self_cond"):
        d.preconditioned_network_forward(x, sigma, self_cond=x)


def test_loss_weight_and_noise_distribution():
    d = _tiny()
    sigma = torch.tensor([0.002, 0.5, 80.0])
    torch.testing.assert_close(d.loss_weight(sigma), (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2)
    torch.manual_seed(3)
    drawn = d.noise_distribution(1000)
    torch.manual_seed(3)
    torch.testing.assert_close(drawn, (-1.2 + 1.2 * torch.randn(1000)).exp())
    assert drawn.shape == (1000,) and abs(drawn.log().mean().item() + 1.2) < 0.15


def test_forward_is_denoising_loss_mean():
    d = _tiny()
    images = torch.rand(4, 2, 8, 12)
    torch.manual_seed(5)
    loss = d(images)
    torch.manual_seed(5)
    core = denoising_loss(Denoiser(d.net, EDM(**EDM_ARGS)), images * 2 - 1).mean()
    assert loss.ndim == 0 and torch.equal(loss, core)
    # the lucidrains-style loss written out: lambda(sigma) * mean((D(y + sigma n) - y)^2) with y = 2 images - 1
    sigma = torch.tensor([0.05, 0.3, 2.0, 40.0])
    torch.manual_seed(6)
    per_sample = d(images, sigma=sigma, loss_reduction="none")
    torch.manual_seed(6)
    y, n = images * 2 - 1, torch.randn(images.shape)
    denoised = d.preconditioned_network_forward(y + sigma.reshape(-1, 1, 1, 1) * n, sigma)
    expected = ((denoised - y) ** 2).mean(dim=(1, 2, 3)) * (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(per_sample, expected)
    with pytest.raises(UserError, match="images must have shape"):
        d(torch.rand(4, 2, 8, 8))
    with pytest.raises(UserError, match="loss_reduction"):
        d(images, loss_reduction="sum")


def test_sample_schedule_is_karras_sigmas_in_float32():
    d = _tiny()
    sched = d.sample_schedule()
    assert sched.dtype == torch.float32 and sched.shape == (7,) and sched[-1] == 0
    assert torch.equal(sched, karras_sigmas(6, 0.002, 80.0, 7.0).float())
    i = torch.arange(10, dtype=torch.float64)
    eq5 = (80 ** (1 / 7) + i / 9 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # eq. 5 written out
    torch.testing.assert_close(d.sample_schedule(10)[:-1], eq5.float())


def _lucidrains_heun(D, x, sigmas, churn, eps):
    """The lucidrains-style Heun loop with churn, transcribed: eps[i] is drawn at every step (0 noise when
    gamma = 0)."""
    N = len(sigmas) - 1
    for i in range(N):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(churn["S_churn"] / N, math.sqrt(2) - 1) if churn["S_tmin"] <= s <= churn["S_tmax"] else 0.0
        s_hat = s + gamma * s
        x_hat = x + math.sqrt(s_hat ** 2 - s ** 2) * churn["S_noise"] * eps[i]
        d = (x_hat - D(x_hat, s_hat)) / s_hat
        x_next = x_hat + (s_next - s_hat) * d
        if s_next != 0:
            x_next = x_hat + 0.5 * (s_next - s_hat) * (d + (x_next - D(x_next, s_next)) / s_next)
        x = x_next
    return (x.clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_is_heun_with_churn(dtype):
    d = _tiny(dtype=dtype)
    torch.manual_seed(7)
    out = d.sample(batch_size=3)
    assert out.shape == (3, 2, 8, 12) and out.dtype == dtype and out.min() >= 0 and out.max() <= 1
    sigmas = karras_sigmas(6, 0.002, 80.0, 7.0).float()
    D = lambda x, s: Denoiser(d.net, EDM(**EDM_ARGS))(x, s).clamp(-1, 1)  # noqa: E731
    torch.manual_seed(7)
    x0 = sigmas[0].item() * torch.randn(3, 2, 8, 12, dtype=dtype)
    core = heun(D, x0, sigmas, s_churn=80, s_tmin=0.05, s_tmax=50, s_noise=1.003)
    assert torch.equal(out, (core.clamp(-1, 1) + 1) / 2)
    # the lucidrains-style loop on the same noise: feed heun the eps of the steps it churns
    eps = torch.randn(6, 3, 2, 8, 12, generator=torch.Generator().manual_seed(8), dtype=dtype)
    index = {float(s): i for i, s in enumerate(sigmas[:-1].double())}
    churned = heun(D, x0, sigmas, s_churn=80, s_tmin=0.05, s_tmax=50, s_noise=1.003,
                   noise_sampler=lambda s, s_hat: eps[index[s]])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((churned.clamp(-1, 1) + 1) / 2, _lucidrains_heun(D, x0, sigmas, CHURN, eps), **tol)
    assert not torch.allclose(churned, heun(D, x0, sigmas))  # churn changed the result
    # clamp=False feeds the raw denoiser
    torch.manual_seed(7)
    unclamped = d.sample(batch_size=3, clamp=False)
    raw = Denoiser(d.net, EDM(**EDM_ARGS))
    torch.manual_seed(7)
    x0 = sigmas[0].item() * torch.randn(3, 2, 8, 12, dtype=dtype)
    expected = heun(raw, x0, sigmas, s_churn=80, s_tmin=0.05, s_tmax=50, s_noise=1.003)
    assert torch.equal(unclamped, (expected.clamp(-1, 1) + 1) / 2)


def _lucidrains_dpmpp_2m(D, x, sigmas):
    """The lucidrains-style DPM-Solver++(2M) loop in t = -log(sigma), transcribed."""
    t = [-math.log(s) if s > 0 else math.inf for s in sigmas.double().tolist()]
    old = None
    for i in range(len(t) - 1):
        denoised = D(x, float(sigmas[i]))
        h = t[i + 1] - t[i]
        if old is None or t[i + 1] == math.inf:
            d_hat = denoised
        else:
            r = (t[i] - t[i - 1]) / h
            d_hat = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old
        x = math.exp(-(t[i + 1] - t[i])) * x - math.expm1(-h) * d_hat
        old = denoised
    return (x.clamp(-1, 1) + 1) / 2


def test_sample_using_dpmpp_is_dpmpp_2m():
    d = _tiny(dtype=torch.float64)
    torch.manual_seed(9)
    out = d.sample_using_dpmpp(batch_size=3, num_sample_steps=8)
    assert out.shape == (3, 2, 8, 12) and out.dtype == torch.float64 and out.min() >= 0 and out.max() <= 1
    sigmas, raw = karras_sigmas(8, 0.002, 80.0, 7.0).float(), Denoiser(d.net, EDM(**EDM_ARGS))
    torch.manual_seed(9)
    x0 = sigmas[0].item() * torch.randn(3, 2, 8, 12, dtype=torch.float64)
    assert torch.equal(out, (dpmpp_2m(raw, x0, sigmas).clamp(-1, 1) + 1) / 2)
    torch.testing.assert_close(out, _lucidrains_dpmpp_2m(raw, x0, sigmas), rtol=1e-10, atol=1e-10)


def test_non_square_images_and_module_behaviour():
    d = _tiny(image_size=(8, 16), channels=1)
    assert d.image_size == (8, 16)
    loss = d(torch.rand(2, 1, 8, 16))
    loss.backward()
    assert d.sample(2, num_sample_steps=3).shape == (2, 1, 8, 16)
    assert d.sample_using_dpmpp(2, num_sample_steps=3).shape == (2, 1, 8, 16)
    assert [id(p) for p in d.parameters()] == [id(p) for p in d.net.parameters()]
    assert d.device == torch.device("cpu")
    d = d.double()
    assert d.dtype == torch.float64 and d(torch.rand(2, 1, 8, 16, dtype=torch.float64)).dtype == torch.float64
    # the same Unet serves any size divisible by 2**(len(dim_mults)-1); the diffusion checks its own
    net = d.net
    assert net.downsample_factor == 2 and net.img_resolution is None
    assert net(torch.randn(1, 1, 6, 10, dtype=torch.float64), torch.zeros(1)).shape == (1, 1, 6, 10)
    with pytest.raises(ValueError, match="divisible by"):
        net(torch.randn(1, 1, 6, 9, dtype=torch.float64), torch.zeros(1))
    with pytest.raises(UserError, match="divisible by the network's downsample factor 2"):
        ElucidatedDiffusion(net, image_size=7, channels=1)
    with pytest.raises(UserError, match="channels=3"):
        ElucidatedDiffusion(net, image_size=8)


def test_unet_arguments_map_onto_our_unet():
    learned = Unet(dim=8, dim_mults=(1, 2, 2), channels=1, learned_sinusoidal_cond=True, learned_sinusoidal_dim=6)
    assert "map_noise.fourier.freqs" in dict(learned.named_parameters())
    assert learned.map_layer0.in_features == 7 and learned.random_or_learned_sinusoidal_cond
    assert [m for m in (1, 2, 2)] == list(learned.channel_mult) and learned.out_channels == 1
    random = Unet(dim=8, dim_mults=(1, 2), channels=1, random_fourier_features=True)
    assert "map_noise.fourier.freqs" in dict(random.named_buffers())
    assert "map_noise.fourier.freqs" not in dict(random.named_parameters())
    plain = Unet(dim=8, dim_mults=(1, 2), channels=1)
    assert not plain.random_or_learned_sinusoidal_cond and plain.map_layer0.in_features == 8
    # full_attn: default only the innermost level (plus the middle blocks); True: every level
    has_attn = lambda net: [any(b.attn is not None for b in blocks) for blocks in net.enc]  # noqa: E731
    assert has_attn(learned) == [False, False, True] and learned.mid[0].attn is not None
    assert has_attn(Unet(dim=8, dim_mults=(1, 2), channels=1, full_attn=True)) == [True, True]
    assert Unet(dim=8, dim_mults=(1, 2), out_dim=3, channels=1).out_channels == 3
    # learned frequencies train
    d = ElucidatedDiffusion(learned, image_size=8, channels=1)
    with torch.no_grad():
        for p in learned.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d(torch.rand(2, 1, 8, 8)).backward()
    assert learned.map_noise.fourier.freqs.grad.abs().sum() > 0
    for kwargs, message in [(dict(self_condition=True), "self_condition"), (dict(learned_variance=True), "variance"),
                            (dict(attn_heads=8), "attn_heads"), (dict(init_dim=5), "init_dim"),
                            (dict(full_attn=(True,)), "full_attn")]:
        with pytest.raises(UserError, match=message):
            Unet(dim=8, dim_mults=(1, 2), **kwargs)


@pytest.mark.slow
def test_tiny_model_learns_digits_through_the_lucidrains_api():
    data = build_dataset({"dataset": "digits", "resolution": 16, "normalize": "zero_one"})
    images, _ = data.get_batch(torch.arange(data.num_images))
    assert images.min() >= 0 and images.max() <= 1
    torch.manual_seed(0)
    d = ElucidatedDiffusion(Unet(dim=8, dim_mults=(1, 2), channels=1, learned_sinusoidal_cond=True),
                            image_size=16, channels=1)
    held_out = images[:256]

    def eval_loss() -> float:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(123)  # the same sigma and noise at both evaluations
            return d(held_out).item()

    before = eval_loss()
    opt = torch.optim.Adam(d.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        batch = images[torch.randint(256, data.num_images, (16,), generator=gen)]
        opt.zero_grad()
        d(batch).backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)  # measured: 1.46 -> 0.25
