"""Table 1 of the EDM paper, checked against values computed by hand."""
import math

import pytest
import torch

from elucidate import EDM, IDDPM, VE, VP, Denoiser, denoising_loss, make_formulation
from elucidate.sampling import iddpm_sigmas, karras_sigmas, ve_sigmas, vp_sigmas
from elucidate.sampling.schedules import iddpm_u

f64 = torch.float64


def close(a, b, tol=1e-12):
    return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def test_paper_defaults():
    e = EDM()
    assert (e.sigma_data, e.sigma_min, e.sigma_max, e.rho, e.P_mean, e.P_std) == (0.5, 0.002, 80, 7, -1.2, 1.2)
    v = VP()
    assert (v.beta_d, v.beta_min, v.M, v.epsilon_t, v.epsilon_s) == (19.9, 0.1, 1000, 1e-5, 1e-3)
    assert (VE().sigma_min, VE().sigma_max) == (0.02, 100)
    i = IDDPM()
    assert (i.C_1, i.C_2, i.M, i.sigma_min, i.sigma_max) == (0.001, 0.008, 1000, 0.002, 81)


@pytest.mark.parametrize("sigma,expected", [
    # sigma = sigma_data = 0.5: c_skip = 1/2, c_out = 0.25/sqrt(0.5), c_in = 1/sqrt(0.5), c_noise = ln(0.5)/4
    (0.5, (0.5, 0.25 / math.sqrt(0.5), 1 / math.sqrt(0.5), math.log(0.5) / 4, 0.5 / 0.0625)),
    # sigma = 2: sigma^2 + sigma_data^2 = 4.25
    (2.0, (0.25 / 4.25, 1.0 / math.sqrt(4.25), 1 / math.sqrt(4.25), math.log(2) / 4, 4.25 / 1.0)),
])
def test_edm_preconditioning_by_hand(sigma, expected):
    e = EDM()
    c = e.precondition(torch.tensor(sigma, dtype=f64))
    for got, want in zip((*c, e.loss_weight(torch.tensor(sigma, dtype=f64))), expected):
        assert close(got, want)


def test_vp_by_hand():
    v = VP()
    # sigma(1) = sqrt(exp(19.9/2 + 0.1) - 1), sigma(eps_s) likewise
    assert close(v.sigma(torch.tensor(1.0, dtype=f64)), math.sqrt(math.exp(10.05) - 1))
    assert close(v.sigma_max, math.sqrt(math.exp(10.05) - 1))
    assert close(v.sigma_min, math.sqrt(math.exp(0.5 * 19.9e-6 + 1e-4) - 1))
    t = torch.tensor([0.3, 0.5, 0.9], dtype=f64)
    sigma = v.sigma(t)
    assert torch.allclose(v.sigma_inv(sigma), t, rtol=1e-12)
    assert torch.allclose(v.scale(t), 1 / (1 + sigma ** 2).sqrt(), rtol=1e-12)
    c_skip, c_out, c_in, c_noise = v.precondition(sigma)
    assert torch.all(c_skip == 1) and torch.allclose(c_out, -sigma)
    assert torch.allclose(c_in, 1 / (sigma ** 2 + 1).sqrt())
    assert torch.allclose(c_noise, 999 * t, rtol=1e-12)  # (M - 1) sigma^-1(sigma)
    assert torch.allclose(v.loss_weight(sigma), 1 / sigma ** 2)
    # derivatives against central differences
    h = 1e-6
    assert torch.allclose(v.sigma_deriv(t), (v.sigma(t + h) - v.sigma(t - h)) / (2 * h), rtol=1e-6)
    assert torch.allclose(v.scale_deriv(t), (v.scale(t + h) - v.scale(t - h)) / (2 * h), rtol=1e-6)


def test_ve_by_hand():
    v = VE()
    c_skip, c_out, c_in, c_noise = v.precondition(torch.tensor([2.0, 20.0], dtype=f64))
    assert c_skip.tolist() == [1, 1] and c_out.tolist() == [2, 20] and c_in.tolist() == [1, 1]
    assert torch.allclose(c_noise, torch.tensor([0.0, math.log(10)], dtype=f64))  # log(sigma / 2)
    assert close(v.sigma(torch.tensor(4.0)), 2.0) and close(v.sigma_inv(torch.tensor(3.0)), 9.0)


def test_iddpm_by_hand():
    M, C_1, C_2 = 1000, 0.001, 0.008
    alpha_bar = lambda j: math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2  # noqa: E731
    u_999 = math.sqrt(1 / max(alpha_bar(999) / alpha_bar(1000), C_1) - 1)  # u_M = 0
    u_998 = math.sqrt((u_999 ** 2 + 1) / max(alpha_bar(998) / alpha_bar(999), C_1) - 1)
    u = iddpm_u()
    assert close(u[999], u_999) and close(u[998], u_998)
    assert torch.all(u[1:] < u[:-1])
    f = IDDPM()
    c_skip, c_out, c_in, c_noise = f.precondition(u[[0, 8, 500, 999]])
    assert c_noise.tolist() == [999, 991, 499, 0]  # M - 1 - argmin_j |u_j - sigma|
    assert torch.allclose(c_out, -u[[0, 8, 500, 999]]) and torch.all(c_skip == 1)
    assert close(f.round_sigma(torch.tensor(u_998 * 1.001, dtype=f64)), u_998)
    # the paper's j_0 = 8 for sigma_max = 81
    assert close(f.sampling_sigmas(5)[0], u[8])


def test_sampling_discretizations():
    s = EDM().sampling_sigmas(18)
    assert len(s) == 19 and s.dtype == f64 and s[-1] == 0
    assert close(s[0], 80) and close(s[-2], 0.002)
    # the explainer's code snippet for step i
    i, N, rho = 5, 18, 7
    assert close(s[i], (80 ** (1 / rho) + i / (N - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho)
    assert torch.equal(s, karras_sigmas(18))
    v = VP().sampling_sigmas(10)
    assert close(v[0], VP().sigma_max) and close(v[-2], VP().sigma_min) and v[-1] == 0
    e = VE().sampling_sigmas(10)
    assert close(e[0], 100) and close(e[-2], 0.02)
    assert torch.allclose(e[:-1] ** 2, 100 ** 2 * (0.02 ** 2 / 100 ** 2) ** (torch.arange(10, dtype=f64) / 9))
    assert torch.equal(IDDPM().sampling_sigmas(7), iddpm_sigmas(7))
    assert torch.equal(VE().sampling_sigmas(4, dtype=torch.float32), ve_sigmas(4).float())
    assert torch.equal(vp_sigmas(1), torch.tensor([VP().sigma_max, 0], dtype=f64))


def test_training_sigma_distributions():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    log_s = EDM().training_sigma(n, generator=g, dtype=f64).log()
    assert abs(log_s.mean() + 1.2) < 0.01 and abs(log_s.std() - 1.2) < 0.01
    v = VP()
    t = v.sigma_inv(v.training_sigma(n, generator=g, dtype=f64))
    assert t.min() >= 1e-5 - 1e-12 and t.max() <= 1 and abs(t.mean() - 0.5) < 0.005
    log_s = VE().training_sigma(n, generator=g, dtype=f64).log()
    assert log_s.min() >= math.log(0.02) - 1e-9 and log_s.max() <= math.log(100) + 1e-9
    assert abs(log_s.mean() - 0.5 * (math.log(0.02) + math.log(100))) < 0.02
    s = IDDPM().training_sigma(1000, generator=g, dtype=f64)
    assert torch.isin(s, iddpm_u()).all()
    assert EDM().training_sigma(3).dtype == torch.get_default_dtype()


def test_make_formulation_and_config_roundtrip():
    for f in (EDM(sigma_data=1.0), VP(), VE(sigma_max=50.0), IDDPM()):
        cfg = f.to_config()
        assert make_formulation(**cfg) == f if not isinstance(f, IDDPM) else make_formulation(**cfg).to_config() == cfg
    assert isinstance(make_formulation("edm"), EDM) and isinstance(make_formulation("iddpm"), IDDPM)
    with pytest.raises(ValueError, match="diffusion type"):
        make_formulation("DDIM")


@pytest.mark.parametrize("kwargs,name", [({"sigma_min": 0.0}, "sigma_min"), ({"sigma_max": -1.0}, "sigma_max"),
                                         ({"rho": 0.0}, "rho"), ({"sigma_data": -0.5}, "sigma_data")])
def test_bad_formulation_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EDM(**kwargs)


class Recorder(torch.nn.Module):
    """F(x_in, c_noise) = 3 x_in + c_noise, recording its inputs."""

    def forward(self, x_in, c_noise, **cond):
        self.seen = (x_in, c_noise, cond)
        return 3 * x_in + c_noise.reshape(-1, *([1] * (x_in.ndim - 1)))


@pytest.mark.parametrize("shape", [(4, 6), (4, 2, 5), (4, 3, 4, 5)])
@pytest.mark.parametrize("formulation", [EDM(), VP(), VE(), IDDPM()], ids=lambda f: f.name)
def test_denoiser_is_eq7(shape, formulation):
    net = Recorder()
    D = Denoiser(net, formulation)
    x = torch.randn(shape, dtype=f64)
    sigma = torch.tensor([0.01, 0.5, 3.0, 70.0], dtype=f64)
    out = D(x, sigma, class_labels=None)
    c_skip, c_out, c_in, c_noise = formulation.precondition(sigma)
    view = (-1,) + (1,) * (x.ndim - 1)
    expected = c_skip.reshape(view) * x + c_out.reshape(view) * (3 * c_in.reshape(view) * x + c_noise.reshape(view))
    assert out.dtype == f64 and torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(net.seen[0], c_in.reshape(view) * x) and net.seen[2] == {"class_labels": None}
    # scalar sigma (float and 0-d tensor) broadcasts to the batch
    assert torch.allclose(D(x, 0.5), D(x, torch.full((4,), 0.5, dtype=f64)))
    assert torch.allclose(D(x, torch.tensor(0.5)), D(x, 0.5))
    with pytest.raises(ValueError, match="batch size"):
        D(x, torch.ones(3))


class Zero(torch.nn.Module):
    def forward(self, x_in, c_noise, **cond):
        return torch.zeros_like(x_in)


def test_loss_matches_definition_and_is_one_at_the_gaussian_optimum():
    # For y ~ N(0, sigma_data^2) the optimal D is c_skip x, i.e. F = 0, and the EDM-weighted
    # expected loss is exactly 1 at every sigma (that is what lambda(sigma) is designed for).
    f = EDM()
    D = Denoiser(Zero(), f)
    g = torch.Generator().manual_seed(1)
    y = 0.5 * torch.randn(20_000, 16, generator=g, dtype=f64)
    for sigma_value in (0.01, 0.3, 2.0, 50.0):
        sigma = torch.full((y.shape[0],), sigma_value, dtype=f64)
        noise = torch.randn(y.shape, generator=g, dtype=f64)
        loss = denoising_loss(D, y, sigma=sigma, noise=noise)
        c_skip = f.precondition(sigma)[0][:, None]
        manual = f.loss_weight(sigma)[:, None] * (c_skip * (y + sigma[:, None] * noise) - y) ** 2
        assert torch.allclose(loss, manual.mean(1), rtol=1e-12)
        assert abs(loss.mean() - 1) < 0.02
    losses = denoising_loss(D, y[:8], generator=g)
    assert losses.shape == (8,)
    with pytest.raises(ValueError, match="noise shape"):
        denoising_loss(D, y[:8], noise=torch.zeros(3, 16, dtype=f64))
