"""Flow models against diffusers (test-only reference): a randomly initialised UNet2DModel sampled by elucidate's
Euler on a Flow formulation equals diffusers' FlowMatchEulerDiscreteScheduler loop on the same levels, and
from_diffusers maps FlowMatch schedulers (objects and saved folders) to Flow, honouring ``shift`` and refusing
what Flow does not model with one clear line."""
from __future__ import annotations

import pytest
import torch

from elucidate import Flow, from_diffusers
from elucidate.errors import UserError
from elucidate.interop import flow_from_scheduler
from elucidate.sampling import euler

diffusers = pytest.importorskip("diffusers")
SMALL = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=4)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(channels: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), **SMALL).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 10])
def test_euler_equals_diffusers_flow_match_euler_loop(unet, shift, steps):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    D = from_diffusers(unet, scheduler)
    assert D.formulation == Flow(shift=shift)
    # the same levels: Flow's own unshifted t's (t = 1 stood in by FLOW_T_MAX), shifted by diffusers
    t_unshifted = Flow().sigma_inv(Flow().sampling_sigmas(steps))[:-1]
    scheduler.set_timesteps(sigmas=t_unshifted.tolist())
    ts = scheduler.sigmas.double()  # diffusers' "sigmas" are flow times t, shifted, with 0 appended
    assert torch.allclose(D.formulation.sigma_inv(D.formulation.sampling_sigmas(steps)), ts, rtol=1e-6, atol=1e-7)
    sigmas = ts / (1 - ts)  # run exactly diffusers' (float32) levels
    x_T = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = x_T.clone()
        for t in scheduler.timesteps:
            theirs = scheduler.step(unet(theirs, t).sample, t, theirs).prev_sample
        # x = x_t / s(t), s(t) = 1 - t; in float64 (the net still runs in float32): at t = 0.999, x is 1000 x_t
        ours = euler(D, x_T.double() / (1 - ts[0]), sigmas).float()
    scale = float(theirs.abs().max())
    assert (ours - theirs).abs().max() <= 1e-6 * scale, ((ours - theirs).abs().max(), scale)
    # a different shift on the same levels gives a different answer (the test can tell them apart)
    with torch.no_grad():
        other = euler(from_diffusers(unet, diffusers.FlowMatchEulerDiscreteScheduler(shift=shift + 1)),
                      x_T.double() / (1 - ts[0]), Flow(shift=shift + 1).sampling_sigmas(steps)).float()
    assert (other - theirs).abs().max() > 1e-3 * scale


def test_from_diffusers_flow_folder(unet, tmp_path):
    unet.save_pretrained(str(tmp_path / "bare"), safe_serialization=True)
    diffusers.FlowMatchEulerDiscreteScheduler(shift=2.5).save_pretrained(str(tmp_path / "bare"))
    D = from_diffusers(tmp_path / "bare")
    assert D.formulation == Flow(shift=2.5)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = from_diffusers(unet, diffusers.FlowMatchEulerDiscreteScheduler(shift=2.5))
        assert torch.allclose(D(x, 3.0), direct(x, 3.0))
    assert flow_from_scheduler(tmp_path / "bare" / "scheduler_config.json") == Flow(shift=2.5)
    assert flow_from_scheduler(diffusers.FlowMatchHeunDiscreteScheduler(shift=1.5)) == Flow(shift=1.5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(use_dynamic_shifting=True), "use_dynamic_shifting = True is not supported"),
    (dict(shift_terminal=0.1), "shift_terminal"),
    (dict(use_karras_sigmas=True), "use_karras_sigmas"),
    (dict(invert_sigmas=True), "invert_sigmas"),
    (dict(num_train_timesteps=500), "num_train_timesteps = 500"),
])
def test_unsupported_flow_schedulers_are_refused_in_one_line(unet, kwargs, message):
    with pytest.raises(UserError, match=message) as info:
        from_diffusers(unet, diffusers.FlowMatchEulerDiscreteScheduler(**kwargs))
    assert "\n" not in str(info.value) and str(info.value).startswith("FlowMatchEulerDiscreteScheduler: ")
