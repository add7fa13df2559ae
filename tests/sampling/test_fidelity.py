"""Fidelity to NVlabs/edm: the EDM sampler on iDDPM/VP/VE models (range clipped to the model's,
levels rounded to a discrete grid with repeats merged), float64 sampling through real networks,
and churn that stays on a discrete grid."""
from __future__ import annotations

import pytest
import torch

from elucidate import EDM, IDDPM, VE, VP, Denoiser, build_network, sample
from elucidate.config.sampling import SamplingConfig, schedule_for
from elucidate.sampling import heun, karras_sigmas, num_steps

f64 = torch.float64


@pytest.mark.parametrize("steps", [18, 64, 256])
def test_karras_schedule_on_an_iddpm_model_is_clipped_rounded_and_merged(steps):
    f = IDDPM()
    sigmas = schedule_for(SamplingConfig(schedule="karras", steps=steps), f)
    levels = sigmas[:-1]
    assert sigmas[-1] == 0 and (levels.diff() < 0).all()  # strictly decreasing: repeats merged
    assert torch.equal(f.round_sigma(levels), levels)  # every level is one the network was trained on
    lo, hi = f.supported_range
    assert levels[-1] == pytest.approx(lo) and levels[0] == f.round_sigma(torch.tensor(80.0, dtype=f64))
    assert len(levels) <= steps and (steps < 64 or len(levels) < steps)  # many low levels coincide at 256
    # edm's sampler evaluates the duplicates as zero-length steps: same points, fewer evaluations here
    assert num_steps(sigmas) == len(levels)


def test_the_edm_sampler_runs_on_an_iddpm_network():
    torch.manual_seed(0)
    net = build_network("unet", img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_blocks=1)
    D = Denoiser(net, IDDPM()).eval()
    for steps in (18, 64):
        x = sample(D, (2, 1, 8, 8), **SamplingConfig(schedule="karras", steps=steps).sample_kwargs(D.formulation))
        assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("formulation,expected", [(VP(), (0.002, 80.0)), (VE(), (0.02, 80.0)),
                                                  (EDM(), (0.002, 80.0)), (EDM(sigma_max=20.0), (0.002, 20.0))])
def test_named_schedules_use_the_papers_range_clipped_to_the_model(formulation, expected):
    sigmas = schedule_for(SamplingConfig(schedule="karras", steps=10), formulation)
    assert (float(sigmas[-2]), float(sigmas[0])) == pytest.approx(expected)
    # an explicit range is clipped too (VE's network knows nothing below 0.02)
    sigmas = schedule_for(SamplingConfig(schedule="exponential", steps=10, sigma_min=1e-4, sigma_max=500.0),
                          formulation)
    lo, hi = formulation.supported_range
    assert float(sigmas[-2]) == pytest.approx(max(1e-4, lo)) and float(sigmas[0]) == pytest.approx(min(500.0, hi))


def test_a_range_outside_the_model_is_a_clear_error():
    with pytest.raises(ValueError, match="outside the range the model supports"):
        schedule_for(SamplingConfig(schedule="karras", steps=10, sigma_min=200.0, sigma_max=300.0), VE())


NETS = {
    "unet": dict(model_channels=8, channel_mult=(1, 2), num_blocks=1),
    "ddpmpp": dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0),
    "ncsnpp": dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0),
    "adm": dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0,
                channels_per_head=8),
}


@pytest.mark.parametrize("arch", list(NETS))
def test_float64_sampling_through_each_network(arch):
    torch.manual_seed(0)
    net = build_network(arch, img_resolution=8, in_channels=2, **NETS[arch])
    with torch.no_grad():  # a network that is not the identity at init (zero-initialized outputs)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    D = Denoiser(net, EDM()).eval()
    assert sample(D, (3, 2, 8, 8), sampler="dpmpp_2m", steps=6, dtype=f64).dtype == f64
    x0 = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1)) * 80
    x64 = heun(D, x0.double(), karras_sigmas(6))
    x32 = heun(D, x0, karras_sigmas(6))
    assert x64.dtype == f64 and next(net.parameters()).dtype == torch.float32
    assert torch.isfinite(x64).all() and torch.allclose(x64.float(), x32, atol=1e-3, rtol=1e-3)
    # the skip connection stays in float64: c_skip x is exact beyond float32 precision
    y = torch.full((1, 2, 8, 8), 1.0 + 1e-12, dtype=f64)
    with torch.no_grad():
        out = D(y, 1e-9)
    assert out.dtype == f64 and (out - y).abs().max() < 1e-9


def test_churn_on_a_discrete_grid_stays_on_the_grid():
    f = IDDPM()
    seen = []

    def recording(x, sigma):
        seen.append(sigma)
        return torch.zeros_like(x)

    recording.round_sigma = f.round_sigma
    sigmas = schedule_for(SamplingConfig(schedule="karras", steps=12), f)
    sample(recording, (2, 3), sampler="heun", sigmas=sigmas, s_churn=40.0, s_tmin=0.05, s_tmax=50.0, dtype=f64)
    levels = torch.cat(seen)
    assert torch.equal(f.round_sigma(levels), levels)
    raised = levels[~torch.isin(levels, sigmas)]
    assert len(raised) > 0  # churn raised some levels (t_hat) and they were snapped to the grid
    # without the rounding, the raised levels would fall between grid points
    seen.clear()
    del recording.round_sigma
    sample(recording, (2, 3), sampler="heun", sigmas=sigmas, s_churn=40.0, s_tmin=0.05, s_tmax=50.0, dtype=f64)
    levels = torch.cat(seen)
    assert not torch.equal(f.round_sigma(levels), levels)
