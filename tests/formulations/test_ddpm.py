"""The discrete DDPM family against diffusers' schedulers (test-only reference) and hand formulas:
beta schedules, timestep selection, DDIM and DDPM sampling on identical inputs, the posterior, the
eps/x0/v losses and the VLB weights, and the sigma <-> timestep conversions."""
from __future__ import annotations

import math

import pytest
import torch

from elucidate import DDPM, Denoiser, denoising_loss
from elucidate.sampling import ddim, ddpm, euler, euler_ancestral

diffusers = pytest.importorskip("diffusers")
f64 = torch.float64
DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                      "sigmoid": "sigmoid"}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


@pytest.mark.parametrize("schedule", list(DIFFUSERS_SCHEDULE))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_beta_schedules_equal_diffusers(schedule, zero_snr):
    ours = DDPM(beta_schedule=schedule, rescale_zero_terminal_snr=zero_snr)
    theirs = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[schedule], rescale_betas_zero_snr=zero_snr)
    assert ours.alphas_cumprod.dtype == f64 and ours.alphas_cumprod.shape == (1000,)
    assert torch.allclose(ours.alphas_cumprod, theirs.alphas_cumprod.double(), rtol=2e-5, atol=1e-7)


def test_latent_diffusion_schedule_names():
    # ldm's make_beta_schedule: "linear" is linear in sqrt(beta), "sqrt_linear" linear in beta, "sqrt" its root
    lin = torch.linspace(1e-4, 2e-2, 1000, dtype=f64)
    assert torch.allclose(DDPM(beta_schedule="sqrt_linear")._betas, lin)
    assert torch.allclose(DDPM(beta_schedule="sqrt")._betas, lin.sqrt())
    assert torch.allclose(DDPM(beta_schedule="scaled_linear")._betas,
                          torch.linspace(1e-2, 2e-2 ** 0.5, 1000, dtype=f64) ** 2)
    explicit = DDPM(betas=lin.tolist(), num_timesteps=1000)
    assert torch.equal(explicit.alphas_cumprod, DDPM().alphas_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 999])
def test_timesteps_equal_diffusers_ddim(spacing, steps):
    scheduler = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    scheduler.set_timesteps(steps)
    ours = DDPM(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    assert ours.timesteps(steps) == scheduler.timesteps.tolist()
    sigmas = ours.sampling_sigmas(steps)
    assert sigmas[-1] == 0 and torch.equal(sigmas[:-1], ours.sigmas[scheduler.timesteps])


class TinyUNet(torch.nn.Module):
    """A fixed random function of (x_t, t) standing in for a trained eps/x0/v network."""

    def __init__(self, channels=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(channels, channels, generator=g) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(channels, generator=g) * 0.1)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / 1000
        return torch.tanh(torch.einsum("oc,bchw->bohw", self.w, x) + self.b[:, None, None] * torch.cos(3 * t))


def _start(sigma_T: float, dtype=torch.float32):
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return x_T, x_T * math.sqrt(1 + sigma_T ** 2)  # VP chain x_T -> x_VE = x_T / sqrt(alpha_bar)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])  # diffusers' DDIM has no sigmoid
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_ddim_equals_diffusers_ddim_loop(schedule, spacing, prediction, dtype):
    steps = 20
    net = TinyUNet().to(dtype)
    scheduler = diffusers.DDIMScheduler(beta_schedule=DIFFUSERS_SCHEDULE[schedule], clip_sample=False,
                                        prediction_type=DIFFUSERS_PREDICTION[prediction], set_alpha_to_one=True,
                                        timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    f = DDPM(beta_schedule=schedule, prediction=prediction, timestep_spacing=spacing)
    if dtype == f64:  # diffusers computes its schedule in float32: give it ours to compare the steps exactly
        scheduler.alphas_cumprod = f.alphas_cumprod.clone()
    sigmas = f.sampling_sigmas(steps)
    x_T, x = _start(float(sigmas[0]), dtype)
    with torch.no_grad():
        sample = x_T.clone()
        for t in scheduler.timesteps:
            sample = scheduler.step(net(sample, t), t, sample, eta=0.0).prev_sample
        ours = ddim(Denoiser(net, f), x, sigmas)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == f64 else dict(rtol=1e-3, atol=5e-4)
    assert torch.allclose(ours, sample, **tol), (ours - sample).abs().max()


def test_ddim_is_euler_and_eta_is_the_ancestral_step(gmm):
    f = DDPM(beta_schedule="cosine")
    sigmas = f.sampling_sigmas(25)
    x = torch.randn(64, gmm.dim, generator=torch.Generator().manual_seed(0), dtype=f64) * float(sigmas[0])
    assert torch.allclose(ddim(gmm.denoise, x, sigmas), euler(gmm.denoise, x, sigmas), rtol=1e-10, atol=1e-10)
    a = ddim(gmm.denoise, x, sigmas, eta=0.7, generator=torch.Generator().manual_seed(3))
    b = euler_ancestral(gmm.denoise, x, sigmas, eta=0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_sampler_equals_diffusers_ddpm_on_identical_noise(variance, prediction):
    M = 60
    net = TinyUNet(seed=2)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=M, clip_sample=False,
                                        variance_type="fixed_" + variance,
                                        prediction_type=DIFFUSERS_PREDICTION[prediction])
    scheduler.set_timesteps(M)
    f = DDPM(num_timesteps=M, prediction=prediction)
    sigmas = f.sampling_sigmas(M)
    x_T, x = _start(float(sigmas[0]))
    g_theirs, g_ours = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    with torch.no_grad():
        sample = x_T.clone()
        for t in scheduler.timesteps:
            sample = scheduler.step(net(sample, t), t, sample, generator=g_theirs).prev_sample
        ours = ddpm(Denoiser(net, f), x, sigmas, variance=variance,
                    noise_sampler=lambda s, s_next: torch.randn(x.shape, generator=g_ours))
    assert torch.allclose(ours, sample, rtol=1e-3, atol=1e-4), (ours - sample).abs().max()


def test_posterior_equals_diffusers():
    # diffusers' DDPMScheduler.step (on our float64 alpha_bar, so the comparison is exact): with a model
    # predicting x0, prev = c_x0 * x0 + c_xt * x_t + sqrt(var) z; probe it with x0 = 1, x_t = 0 and the reverse
    f = DDPM()
    scheduler = diffusers.DDPMScheduler(prediction_type="sample", clip_sample=False)
    scheduler.alphas_cumprod = f.alphas_cumprod.clone()
    one, zero = torch.ones(1, 1, 1, 1, dtype=f64), torch.zeros(1, 1, 1, 1, dtype=f64)
    for t in (1, 10, 500, 999):
        coef_x0, coef_xt, variance, log_var = f.posterior(t)
        z = torch.randn(1, 1, 1, 1, generator=torch.Generator().manual_seed(t), dtype=f64)
        step = scheduler.step
        a = step(one, t, zero, generator=torch.Generator().manual_seed(t)).prev_sample
        b = step(zero, t, one, generator=torch.Generator().manual_seed(t)).prev_sample
        assert float(a) == pytest.approx(float(coef_x0 + variance.sqrt() * z), rel=1e-12)
        assert float(b) == pytest.approx(float(coef_xt + variance.sqrt() * z), rel=1e-12)
        assert variance == pytest.approx(float(scheduler._get_variance(t)), rel=1e-12)
        assert log_var == pytest.approx(math.log(float(variance)), rel=1e-12)
    _, _, var0, log0 = f.posterior(0)
    assert var0 == 0 and log0 == f.posterior(1)[3]  # clipped at t = 0, as latent-diffusion does
    mixed = DDPM(v_posterior=0.3)
    assert mixed.posterior(5)[2] == pytest.approx(0.7 * f.posterior(5)[2] + 0.3 * float(f._betas[5]))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_losses_are_the_walk_throughs(prediction, loss_type):
    f = DDPM(prediction=prediction, loss_type=loss_type)
    net = TinyUNet()
    y = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 3, 400, 999])
    sigma = f.sigmas[t].float()
    loss = denoising_loss(Denoiser(net, f), y, sigma=sigma, noise=eps)
    a = f.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * y + (1 - a).sqrt() * eps
    target = {"eps": eps, "x0": y, "v": a.sqrt() * eps - (1 - a).sqrt() * y}[prediction]
    error = (target - net(x_t, t.float()))
    expected = (error.abs() if loss_type == "l1" else error.square()).flatten(1).mean(1)
    assert torch.allclose(loss, expected, rtol=2e-4, atol=1e-6)


def test_vlb_weights_equal_latent_diffusions_for_eps():
    f = DDPM(l_simple_weight=0.0, original_elbo_weight=1.0)
    betas, a_bar = f._betas, f.alphas_cumprod
    alphas = 1 - betas
    var = f.posterior(torch.arange(1000))[2]
    lvlb = betas ** 2 / (2 * var * alphas * (1 - a_bar))
    lvlb[0] = lvlb[1]
    t = torch.tensor([0, 1, 7, 300, 999])
    assert torch.allclose(f.vlb_weight(f.sigmas[t]), lvlb[t], rtol=1e-9)
    # the VLB is about x0 only: as a weight of ||D - y||^2 it is the same for every parameterization
    # (but at t = 0, where each takes its own space's t = 1 value, as latent-diffusion does)
    for prediction in ("x0", "v"):
        g = DDPM(prediction=prediction, l_simple_weight=0.0, original_elbo_weight=1.0)
        assert torch.allclose(g.loss_weight(g.sigmas[t[1:]]), f.loss_weight(f.sigmas[t[1:]]), rtol=1e-9)


def test_precondition_conversions_round_trip():
    for prediction in ("eps", "x0", "v"):
        f = DDPM(prediction=prediction, beta_schedule="scaled_linear")
        t = torch.tensor([0.0, 0.5, 17.25, 998.9, 999.0], dtype=f64)
        assert torch.allclose(f.sigma_inv(f.sigma(t)), t, atol=1e-9)
        grid = f.sigmas[[0, 10, 999]]
        c_skip, c_out, c_in, c_noise = f.precondition(grid)
        assert torch.equal(c_noise, torch.tensor([0.0, 10.0, 999.0], dtype=f64))
        assert torch.allclose(c_in, f.alphas_cumprod[[0, 10, 999]].sqrt())  # the net sees x_t of the VP chain
        assert torch.allclose(f.scale(torch.tensor([10.0], dtype=f64)), f.alphas_cumprod[10:11].sqrt())
        assert torch.equal(f.round_sigma(grid * 1.0001), grid)
