"""Flow matching as a formulation: Table-1 coefficients by hand, the loss identity lambda ||D - y||^2 = ||v_hat - v||^2,
SD3's logit-normal and shift, the time variable, and elucidate's Euler = the flow-matching Euler step."""
import math

import pytest
import torch

from elucidate import Denoiser, Flow, denoising_loss
from elucidate.config import parse_config
from elucidate.formulations import Shifted, make_formulation
from elucidate.formulations.flow import FLOW_T_MAX
from elucidate.sampling import ablation, euler, heun, karras_sigmas

f64 = torch.float64


def velocity_net(dim: int = 6, seed: int = 0):
    """A smooth nonlinear 'network' F(x_t, c_noise) in float64 (it sees only what a real network sees)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, dim, generator=g, dtype=f64) / math.sqrt(dim)
    b = torch.randn(dim, generator=g, dtype=f64)

    def net(x_in, c_noise):
        t = (c_noise / 1000).reshape(-1, 1)
        return torch.tanh(x_in @ A.T + t * b) * (1 + t) - 0.3 * x_in

    return net


def test_preconditioning_by_hand():
    f = Flow()
    sigma = torch.tensor([0.25, 1.0, 3.0, 999.0], dtype=f64)
    t = sigma / (1 + sigma)  # 0.2, 0.5, 0.75, 0.999
    assert torch.allclose(t, torch.tensor([0.2, 0.5, 0.75, 0.999], dtype=f64), rtol=1e-14)
    c_skip, c_out, c_in, c_noise = f.precondition(sigma)
    assert torch.allclose(c_skip, 1 - t, rtol=1e-14) and torch.allclose(c_in, 1 - t, rtol=1e-14)
    assert torch.allclose(c_out, -t, rtol=1e-14) and torch.allclose(c_noise, 1000 * t, rtol=1e-14)
    assert torch.allclose(f.loss_weight(sigma), 1 / t ** 2, rtol=1e-14)
    # D(x; sigma) = x_t - t v_hat with x_t = x / (1 + sigma), and the network is fed (x_t, 1000 t)
    seen = {}

    def net(x_in, c_noise):
        seen.update(x_in=x_in, c_noise=c_noise)
        return torch.full_like(x_in, 2.0)

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=f64)
    D = Denoiser(net, f)(x, sigma)
    x_t = x / (1 + sigma[:, None])
    assert torch.allclose(seen["x_in"], x_t, rtol=1e-14) and torch.allclose(seen["c_noise"], 1000 * t, rtol=1e-14)
    assert torch.allclose(D, x_t - 2.0 * t[:, None], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_weighted_edm_loss_is_the_flow_matching_loss(shift):
    f = Flow(shift=shift)
    net = velocity_net()
    D = Denoiser(net, f)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(64, 6, generator=g, dtype=f64) * 0.7 + 0.2
    n = torch.randn(64, 6, generator=g, dtype=f64)
    sigma = f.training_sigma(64, generator=g, dtype=f64)
    ours = denoising_loss(D, y, sigma=sigma, noise=n)
    t = (sigma / (1 + sigma))[:, None]
    x_t = (1 - t) * y + t * n  # the flow's interpolant: x = y + sigma n is x_t / (1 - t)
    assert torch.allclose((y + sigma[:, None] * n) * (1 - t), x_t, rtol=1e-12, atol=1e-13)
    flow_matching = (net(x_t, 1000 * t.reshape(-1)) - (n - y)).square().mean(dim=1)  # ||v_hat - v||^2, v = n - y
    assert torch.allclose(ours, flow_matching, rtol=1e-10, atol=1e-12), (ours - flow_matching).abs().max()
    # the weight matters: EDM's default 1/sigma^2 would not give it
    plain = ((D(y + sigma[:, None] * n, sigma) - y).square() / sigma[:, None] ** 2).mean(dim=1)
    assert not torch.allclose(plain, flow_matching, rtol=1e-3)


def test_training_levels_are_sd3_logit_normal_and_shifted():
    n = 200_000
    for mean, std, shift in [(0.0, 1.0, 1.0), (0.5, 1.5, 1.0), (-0.3, 0.8, 3.0)]:
        f = Flow(logit_mean=mean, logit_std=std, shift=shift)
        sigma = f.training_sigma(n, generator=torch.Generator().manual_seed(0), dtype=f64)
        t = (sigma / shift) / (1 + sigma / shift)  # undo the shift, back to t = sigmoid(logit_mean + logit_std n)
        logit = torch.logit(t)
        assert abs(logit.mean() - mean) < 0.01 and abs(logit.std() - std) < 0.01, (mean, std, shift)
        # the same draws as sigmoid(mean + std n) with the SD3 shift applied in t
        z = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=f64) * std + mean
        t0 = torch.sigmoid(z)
        t_shift = shift * t0 / (1 + (shift - 1) * t0)
        assert torch.allclose(f.sigma_inv(sigma), t_shift, rtol=1e-12)
    assert Flow().training_sigma(3).dtype == torch.get_default_dtype()


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("steps", [1, 2, 10, 28])
def test_sampling_levels_are_uniform_in_t_with_the_sd3_shift(steps, shift):
    f = Flow(shift=shift)
    sigmas = f.sampling_sigmas(steps)
    assert sigmas.dtype == f64 and sigmas.shape == (steps + 1,) and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    t = torch.linspace(1, 0, steps + 1, dtype=f64)
    t_shift = shift * t / (1 + (shift - 1) * t)  # SD3's shift in t
    assert torch.allclose(f.sigma_inv(sigmas[1:]), t_shift[1:], rtol=1e-12, atol=1e-15)
    # t = 1 (sigma = inf) is stood in for by t = FLOW_T_MAX before the shift (sigma = 999 shift)
    assert math.isclose(float(sigmas[0]), shift * FLOW_T_MAX / (1 - FLOW_T_MAX), rel_tol=1e-12)
    assert torch.equal(f.sampling_sigmas(steps, dtype=torch.float32), sigmas.float())


def test_sampling_stand_in_stays_above_the_next_level_for_many_steps():
    sigmas = Flow().sampling_sigmas(2000)
    assert (sigmas.diff() < 0).all() and math.isclose(float(sigmas[0]), 10 * float(sigmas[1]))


def test_time_variable():
    f = Flow()
    t = torch.tensor([0.1, 0.5, 0.9, 0.999], dtype=f64)
    sigma = f.sigma(t)
    assert torch.allclose(sigma, t / (1 - t), rtol=1e-14)
    assert torch.allclose(f.sigma_inv(sigma), t, rtol=1e-14)
    assert torch.allclose(f.scale(t), 1 - t, rtol=1e-14)
    assert torch.allclose(f.scale(t) * (1 + sigma), torch.ones_like(t), rtol=1e-14)  # s(t) = 1 / (1 + sigma(t))
    h = 1e-7
    assert torch.allclose(f.sigma_deriv(t[:3]), (f.sigma(t[:3] + h) - f.sigma(t[:3] - h)) / (2 * h), rtol=1e-6)
    assert torch.allclose(f.scale_deriv(t), (f.scale(t + h) - f.scale(t - h)) / (2 * h), rtol=1e-6)
    # the probability-flow ODE of EDM eq. 4 in this time variable is dx_t/dt = v_hat:
    # (sigma'/sigma + s'/s) x - sigma' s / sigma D = (x_t - D) / t = v_hat when D = x_t - t v_hat
    a = f.sigma_deriv(t) / sigma + f.scale_deriv(t) / f.scale(t)
    b = f.sigma_deriv(t) * f.scale(t) / sigma
    assert torch.allclose(a, 1 / t, rtol=1e-12) and torch.allclose(b, 1 / t, rtol=1e-12)


@pytest.mark.parametrize("shift,steps", [(1.0, 1), (1.0, 8), (3.0, 8), (1.0, 25)])
def test_euler_is_the_flow_matching_euler_step(shift, steps):
    f = Flow(shift=shift)
    net = velocity_net()
    sigmas = f.sampling_sigmas(steps)
    ts = f.sigma_inv(sigmas)
    x_T = torch.randn(16, 6, generator=torch.Generator().manual_seed(2), dtype=f64)
    flow = x_T.clone()  # x_t at t = ts[0]
    for t, t_next in zip(ts[:-1], ts[1:]):
        flow = flow + (t_next - t) * net(flow, torch.full((16,), 1000 * float(t), dtype=f64))  # x_t' = x_t + (t' - t) v
    trail = []
    ours = euler(Denoiser(net, f), x_T / f.scale(ts[0]), sigmas, callback=trail.append)  # x = x_t / s(t)
    assert torch.allclose(ours, flow, rtol=1e-12, atol=1e-12), (ours - flow).abs().max()
    # every intermediate state too: x_i s(t_i) is the flow's x_t at t_i
    mid = x_T.clone()
    for i, info in enumerate(trail):
        assert torch.allclose(info["x"] * f.scale(ts[i]), mid, rtol=1e-12, atol=1e-12)
        mid = mid + (ts[i + 1] - ts[i]) * net(mid, torch.full((16,), 1000 * float(ts[i]), dtype=f64))


def test_config_shift_is_the_flows_own():
    f = parse_config({"diffusion": {"type": "Flow", "logit_mean": 0.0, "logit_std": 1.0, "shift": 3.0}}).formulation()
    assert f == Flow(shift=3.0) and not isinstance(f, Shifted)
    assert make_formulation(**f.to_config()) == f
    edm = parse_config({"diffusion": {"type": "EDM", "shift": 2.0}}).formulation()
    assert edm == Shifted(make_formulation("EDM"), 2.0)
    with pytest.raises(ValueError):
        Flow(shift=0.0)
    with pytest.raises(ValueError):
        Flow(logit_std=-1.0)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_ablation_in_the_flow_time_variable_is_flow_matching_euler_and_heun(solver):
    f = Flow()
    net = velocity_net()
    D = Denoiser(net, f)
    noise = torch.randn(16, 6, generator=torch.Generator().manual_seed(3), dtype=f64)
    steps = 12
    ours = ablation(D, noise, num_steps=steps, sigma_min=0.01, sigma_max=50.0, discretization="edm",
                    schedule="flow", scaling="flow", solver=solver)
    ts = f.sigma_inv(karras_sigmas(steps, 0.01, 50.0))

    def v(x, t):
        return net(x, torch.full((x.shape[0],), 1000 * float(t), dtype=f64))

    x = noise * ts[0]  # Algorithm 1 line 1: x_0 ~ N(0, sigma(t_0)^2 s(t_0)^2 I), sigma s = t
    for i in range(steps):
        h = ts[i + 1] - ts[i]
        if solver == "euler" or i == steps - 1:  # x_t' = x_t + (t' - t) v
            x = x + h * v(x, ts[i])
        else:  # trapezoid in t (diffusers' FlowMatchHeunDiscreteScheduler step)
            x_pred = x + h * v(x, ts[i])
            x = x + h * (v(x, ts[i]) + v(x_pred, ts[i + 1])) / 2
    assert torch.allclose(ours, x, rtol=1e-11, atol=1e-11), (ours - x).abs().max()
    if solver == "heun":  # EDM's Heun in sigma (elucidate's heun) is a different second-order step on flow models
        sigmas = karras_sigmas(steps, 0.01, 50.0)
        assert not torch.allclose(heun(D, noise * sigmas[0], sigmas), x, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_digits_flow_config_learns_recognizable_digits(tmp_path):
    """configs/digits-flow.yaml as shipped (the demo's network and budget, flow matching instead of EDM): >= 80 % of
    500 samples recognized with confidence >= 0.8 by the bundled digits classifier, all 10 classes present, with
    its own sampler (Heun, 18 steps) and with few-step Euler (8 steps); docs/flow.md has the measured numbers."""
    import dataclasses
    from pathlib import Path

    from elucidate.config import load_config
    from elucidate.evaluation.evaluate import recognizability
    from elucidate.run.model import load_run
    from elucidate.training import Trainer

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "digits-flow.yaml",
                         ["training.sample_every=0"])
    Trainer(config, tmp_path / "flow", progress=False, log=lambda *a: None).train()
    run = load_run(tmp_path / "flow")
    for cfg in (run.config.sampling, dataclasses.replace(run.config.sampling, sampler="euler", steps=8)):
        report = recognizability(run.sample(range(500), cfg, batch_size=500), run.normalizer)
        assert report["confident_fraction"] >= 0.8 and report["classes_present"] == 10, (cfg.sampler, report)
