"""Flow models against diffusers (test-only reference): a randomly initialised UNet2DModel sampled by elucidate's
Euler on a Flow formulation equals diffusers' FlowMatchEulerDiscreteScheduler loop on the same levels, and
from_diffusers maps FlowMatch schedulers (objects and saved folders) to Flow, honouring ``shift`` and refusing
what Flow does not model with one clear line; a diffusers_unet2d Flow run exports to a DDPMPipeline folder with a
FlowMatchEulerDiscreteScheduler that samples as elucidate's euler on the same levels (and close to it on the
defaults), and loads back to the run's denoiser."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from elucidate import Flow, from_diffusers, sample
from elucidate.errors import UserError
from elucidate.formulations.flow import FLOW_T_MAX
from elucidate.interop import flow_from_scheduler
from elucidate.sampling import euler
from elucidate.sampling.api import SeededNoise

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


# --- a Flow run exported to diffusers: DDPMPipeline + FlowMatchEulerDiscreteScheduler -------------------------------
SHIFT = 3.0


@pytest.fixture(scope="module")
def flow_export(train_diffusers_run, tmp_path_factory):
    """(run, exported folder, the run's denoiser, the loaded DDPMPipeline): a tiny diffusers_unet2d run trained 3 steps
    under Flow(shift=3), exported by ``elucidate export RUN --diffusers OUT`` (EMA weights)."""
    from elucidate.cli import main
    from elucidate.run.model import load_run

    run = train_diffusers_run("flow", diffusion={"type": "Flow", "shift": SHIFT}, sampling={"steps": 3,
                                                                                            "sampler": "euler"})
    out = tmp_path_factory.mktemp("flow-export") / "exported"
    assert main(["export", str(run), "--diffusers", str(out)]) == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    return run, out, load_run(run).denoiser, pipe


def _scheduler_loop(pipe, x_t, **levels):
    """DDPMPipeline's loop without the image conversion: x_t at the first level -> x_0 (float32)."""
    pipe.scheduler.set_timesteps(**levels)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x_t = pipe.scheduler.step(pipe.unet(x_t, t).sample, t, x_t).prev_sample
    return x_t


def test_flow_run_exports_a_flow_match_scheduler_and_round_trips(flow_export):
    run, out, D, pipe = flow_export
    assert type(D.formulation) is Flow and D.formulation.shift == SHIFT
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == ["diffusers",
                                                                               "FlowMatchEulerDiscreteScheduler"]
    assert type(pipe).__name__ == "DDPMPipeline" and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    c = pipe.scheduler.config
    assert (c.shift, c.num_train_timesteps, c.use_dynamic_shifting) == (SHIFT, 1000, False)
    again = from_diffusers(out)  # the exported folder is the run's model, exactly
    assert again.formulation == D.formulation == Flow(shift=SHIFT)
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.05, 1.0, 30.0])
    with torch.no_grad():
        assert torch.equal(again(x, sigma), D(x, sigma))
    # the shift is in the levels, not in D(x; sigma): the folder's levels are the run's
    assert torch.equal(again.formulation.sampling_sigmas(10), D.formulation.sampling_sigmas(10))
    assert not torch.allclose(Flow().sampling_sigmas(10), D.formulation.sampling_sigmas(10))


@pytest.mark.parametrize("steps", [1, 10])
def test_exported_pipeline_equals_euler_on_the_same_levels(flow_export, steps):
    _, _, D, pipe = flow_export
    f, seeds, shape = D.formulation, [3, 4, 5], (3, 1, 8, 8)
    sigmas = f.sampling_sigmas(steps)
    t0 = float(f.sigma_inv(sigmas[0]))
    unshifted = Flow().sigma_inv(Flow().sampling_sigmas(steps))[:-1].tolist()  # diffusers shifts them itself
    noise = SeededNoise(seeds, shape[1:])()
    # the scheduler loop from elucidate's start (x = sigma_0 n, i.e. x_t = t_0 n) equals sample(..., "euler")
    theirs = _scheduler_loop(pipe, t0 * noise, sigmas=unshifted)
    assert torch.allclose(pipe.scheduler.sigmas.double(), f.sigma_inv(sigmas), rtol=1e-6, atol=1e-7)
    ours = sample(D, shape, sampler="euler", sigmas=sigmas, seeds=seeds, dtype=torch.float64).float()
    scale = float(theirs.abs().max())
    assert (ours - theirs).abs().max() <= 2e-6 * scale, ((ours - theirs).abs().max(), scale)
    # in float32 (sample's default) the state x = x_t / (1 - t) is sigma_0 n, about 3000 n: its round-off
    # sigma_0 |n| eps is what remains after the first step
    ours32 = sample(D, shape, sampler="euler", sigmas=sigmas, seeds=seeds)
    bound = float(sigmas[0]) * float(noise.abs().max()) * torch.finfo(torch.float32).eps
    assert (ours32 - theirs).abs().max() <= bound, ((ours32 - theirs).abs().max(), bound)
    # DDPMPipeline itself on these levels: noise from the seeds' generators is x_t at t_0, images (x / 2 + 0.5)
    scheduler = pipe.scheduler
    scheduler.set_timesteps = functools.partial(type(scheduler).set_timesteps, scheduler, sigmas=unshifted)
    try:
        images = pipe(batch_size=3, generator=[torch.Generator().manual_seed(s) for s in seeds],
                      num_inference_steps=steps, output_type="pt").images
    finally:
        del scheduler.set_timesteps
    with torch.no_grad():
        x0 = euler(D, noise.double() / (1 - t0), sigmas).float()  # x = x_t / s(t_0) = n / (1 - t_0)
    expected = (x0 / 2 + 0.5).clamp(0, 1)
    assert ((expected > 0) & (expected < 1)).float().mean() > 0.2  # not all clamped: the comparison has teeth
    assert (images - expected).abs().max() <= 2e-6 * max(1.0, float(x0.abs().max())), (images - expected).abs().max()


@pytest.mark.parametrize("steps", [1, 3, 10, 28])
def test_default_euler_is_close_to_the_pipeline_default_loop(flow_export, steps):
    """DDPMPipeline's default levels (``set_timesteps(N)``): t = 1 (x_t = n), then linspace(1, t_min, N)[1:] and 0,
    shifted, with t_min = 1/1000 shifted twice (diffusers shifts its already shifted sigma_min again). elucidate's
    default ``Flow.sampling_sigmas(N)``: the stand-in t_0 = FLOW_T_MAX shifted (x_t = t_0 n), then 1 - k / N, shifted.
    (1) The stand-in alone (diffusers' levels with t = 1 -> t_0): the first Euler steps differ by
    (1 - t_0)(n - v_b) - (1 - t_1)(v_a - v_b), v_a = v(n, 1000), v_b = v(t_0 n, 1000 t_0): the start moves by
    (1 - t_0) = 3.3e-4 relative and the network's time input by 1000 (1 - t_0) = 0.33, to which a sinusoidal time
    embedding is sensitive; bound 20 (1 - t_0) relative (measured 1.1 ... 9.3 (1 - t_0), most for N = 1, where
    1 - t_1 = 1). (2) Both defaults also differ in the later levels, i.e. in Euler's discretization error."""
    _, _, D, pipe = flow_export
    f, seeds, shape = D.formulation, [0, 1, 2, 3], (4, 1, 8, 8)
    noise = SeededNoise(seeds, shape[1:])()
    theirs = _scheduler_loop(pipe, noise.clone(), num_inference_steps=steps)  # DDPMPipeline's default levels
    t = pipe.scheduler.sigmas.double()
    assert float(t[0]) == 1.0 and float(t[-1]) == 0.0
    t0 = float(f.sigma_inv(f.sampling_sigmas(steps)[0]))
    assert 1 - t0 == pytest.approx((1 - FLOW_T_MAX) / SHIFT, rel=1e-3)  # 3.3e-4: t_0 = 0.999 shifted
    stand_in = torch.cat([t.new_tensor([t0]), t[1:]])
    scale = float(theirs.abs().max())
    only_stand_in = sample(D, shape, sampler="euler", sigmas=f.sigma(stand_in), seeds=seeds, dtype=torch.float64)
    defaults = sample(D, shape, sampler="euler", sigmas=f.sampling_sigmas(steps), seeds=seeds, dtype=torch.float64)
    d_stand_in = float((only_stand_in - theirs).abs().max()) / scale
    d_defaults = float((defaults - theirs).abs().max()) / scale
    assert d_stand_in <= 20 * (1 - t0), d_stand_in  # measured 3.7e-4 ... 3.1e-3 (docs/flow.md)
    assert d_defaults <= 0.05, d_defaults  # measured 0.35% ... 2% (docs/flow.md)
