"""diffusers interop against diffusers itself (test-only reference): a randomly initialised UNet2DModel
sampled by elucidate's DDIM equals diffusers' DDIM loop; scheduler configs map to the DDPM formulation
(and back); local folders load; a diffusers_unet2d run trained by `elucidate train` exports to a folder
that DDPMPipeline loads with identical weights; and the refusals are one clear line."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from elucidate import DDPM, EDM, Clipped, Thresholded, build_network, from_diffusers, sample
from elucidate.denoiser import Guided
from elucidate.errors import UserError
from elucidate.interop import ddpm_from_scheduler, export_diffusers, load_diffusers, scheduler_config
from elucidate.run import RunDir
from elucidate.sampling import ddim, dpmpp_2m, euler, heun

diffusers = pytest.importorskip("diffusers")
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
SMALL = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=4)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(channels: int = 2, num_class_embeds: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds,
                                 **SMALL).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


# --- sampling a diffusers model -------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_equals_diffusers_ddim_loop(unet, prediction, spacing):
    steps = 10
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction, clip_sample=False, set_alpha_to_one=True,
                                        timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    scheduler.set_timesteps(steps)
    D = from_diffusers(unet, scheduler)
    assert D.formulation.prediction == PREDICTIONS[prediction]
    sigmas = D.formulation.sampling_sigmas(steps)
    assert D.formulation.timesteps(steps) == scheduler.timesteps.tolist()
    x_T = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = x_T.clone()
        for t in scheduler.timesteps:
            theirs = scheduler.step(unet(theirs, t).sample, t, theirs, eta=0.0).prev_sample
        ours = ddim(D, x_T * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas)  # x_VE = x_T / sqrt(alpha_bar)
    scale = float(theirs.abs().max())
    assert (ours - theirs).abs().max() <= 2e-5 * scale, ((ours - theirs).abs().max(), scale)


CLIPPING = {"clip_sample": dict(clip_sample=True), "clip_sample_range": dict(clip_sample=True, clip_sample_range=0.7),
            "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)}


@pytest.mark.parametrize("clipping", sorted(CLIPPING))
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_with_clipping_equals_diffusers_ddim_loop(unet, prediction, clipping):
    steps = 10
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction, set_alpha_to_one=True, timestep_spacing="trailing",
                                        **CLIPPING[clipping])
    scheduler.set_timesteps(steps)
    D = from_diffusers(unet, scheduler)
    assert isinstance(D, Thresholded if clipping == "thresholding" else Clipped)
    plain = from_diffusers(unet, scheduler, clip=False)
    sigmas = D.formulation.sampling_sigmas(steps)
    x_T = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = x_T.clone()
        for t in scheduler.timesteps:  # elucidate's samplers take the noise from the clipped x0 (Glide's convention)
            theirs = scheduler.step(unet(theirs, t).sample, t, theirs, eta=0.0,
                                    use_clipped_model_output=True).prev_sample
        ours = ddim(D, x_T * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas)
        unclipped = ddim(plain, x_T * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas)
    scale = float(theirs.abs().max())
    assert (ours - theirs).abs().max() <= 2e-5 * scale, ((ours - theirs).abs().max(), scale)
    assert (unclipped - theirs).abs().max() > 1e-2 * scale  # the clipping mattered
    bound = 1.5 if clipping == "thresholding" else CLIPPING[clipping].get("clip_sample_range", 1.0)
    assert float(theirs.abs().max()) <= bound + 1e-6


def test_thresholded_equals_diffusers_threshold_sample():
    scheduler = diffusers.DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=2.0)
    x0 = 3 * torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    D = Thresholded(lambda x, sigma: x, percentile=0.8, max_value=2.0)
    torch.testing.assert_close(D(x0, 1.0), scheduler._threshold_sample(x0.clone()))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_second_order_samplers_run_and_beat_euler(unet, prediction):
    # probability-flow ODE on the scheduler's trailing timesteps: Heun and DPM-Solver++(2M) with 20 steps
    # are closer to a 200-step Euler solution than Euler with 20 steps
    D = from_diffusers(unet, diffusers.DDPMScheduler(prediction_type=prediction, timestep_spacing="trailing"),
                       clip=False)  # the schedule, not the clipping (test_ddim_with_clipping_...)
    f = D.formulation
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fine, coarse = f.sampling_sigmas(200), f.sampling_sigmas(20)
    reference = euler(D, x * fine[0], fine)
    errors = {sampler.__name__: float((sampler(D, x * coarse[0], coarse) - reference).abs().max())
              for sampler in (euler, heun, dpmpp_2m)}
    assert all(math.isfinite(e) for e in errors.values())
    assert errors["heun"] < 0.5 * errors["euler"] and errors["dpmpp_2m"] < 0.5 * errors["euler"], errors


def test_every_sampler_kind_and_guidance_on_a_class_conditional_unet():
    net = tiny_unet(num_class_embeds=4, seed=3)  # classes 0..2, embedding 3 = "no label"
    D = from_diffusers(net, diffusers.DDPMScheduler(num_train_timesteps=100), null_class=3, clip=False)
    assert D.net.label_dim == 3
    labels = torch.tensor([0, 2])
    for sampler in ("ddpm", "ddim", "heun", "dpmpp_2m", "euler_ancestral"):
        x = sample(D, (2, 2, 8, 8), sampler=sampler, steps=4, seeds=[0, 1], cond={"class_labels": labels})
        assert x.shape == (2, 2, 8, 8) and torch.isfinite(x).all()
    x = torch.randn(2, 2, 8, 8)
    sigma = torch.tensor([0.3, 2.0])
    with torch.no_grad():
        c_skip, c_out, c_in, t = (v.reshape(-1, 1, 1, 1) for v in D.formulation.precondition(sigma))
        F_c = net(c_in * x, t.reshape(-1), class_labels=labels).sample
        F_u = net(c_in * x, t.reshape(-1), class_labels=torch.tensor([3, 3])).sample
        assert torch.allclose(D(x, sigma, class_labels=labels), c_skip * x + c_out * F_c, atol=1e-6)
        guided = Guided(D, 2.5)(x, sigma, class_labels=labels)
        expected = c_skip * x + c_out * (F_u + 2.5 * (F_c - F_u))
    assert torch.allclose(guided, expected, atol=1e-4)
    with pytest.raises(ValueError, match="no 'no label' class"):
        Guided(from_diffusers(net, diffusers.DDPMScheduler(), clip=False), 2.0)(x, sigma, class_labels=labels)
    with pytest.raises(ValueError, match="one-hot"):
        D(x, sigma, class_labels=torch.full((2, 3), 1 / 3))


def test_unet2d_condition_model_takes_context():
    torch.manual_seed(0)
    net = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, attention_head_dim=2, cross_attention_dim=6).eval()
    null = torch.full((1, 3, 6), 0.5)
    D = from_diffusers(net, diffusers.DDIMScheduler(prediction_type="v_prediction"), null_context=null, clip=False)
    x, context, sigma = torch.randn(2, 2, 8, 8), torch.randn(2, 3, 6), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        c_skip, c_out, c_in, t = (v.reshape(-1, 1, 1, 1) for v in D.formulation.precondition(sigma))
        F_x = net(c_in * x, t.reshape(-1), encoder_hidden_states=context).sample
        assert torch.allclose(D(x, sigma, context=context), c_skip * x + c_out * F_x, atol=1e-6)
        unconditional = D(x, sigma, context=null.expand(2, 3, 6))
        guided = Guided(D, 3.0)(x, sigma, context=context)
        assert torch.allclose(guided, unconditional + 3.0 * (D(x, sigma, context=context) - unconditional), atol=1e-4)
    with pytest.raises(ValueError, match="needs context"):
        D(x, sigma)


# --- scheduler configs <-> DDPM -------------------------------------------------------------------
SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
              "PNDMScheduler"]


@pytest.mark.parametrize("cls,prediction", [(cls, prediction) for cls in SCHEDULERS for prediction in PREDICTIONS
                                             if (cls, prediction) != ("PNDMScheduler", "sample")])  # PNDM has no x0
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_scheduler_config_maps_to_ddpm(cls, schedule, prediction):
    scheduler = getattr(diffusers, cls)(num_train_timesteps=500, beta_schedule=schedule, beta_start=2e-4,
                                        beta_end=0.03, prediction_type=prediction)
    f = ddpm_from_scheduler(scheduler)
    assert (f.num_timesteps, f.prediction) == (500, PREDICTIONS[prediction])
    assert torch.allclose(f.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=2e-5, atol=1e-7)
    assert ddpm_from_scheduler(dict(scheduler.config)) == f  # a plain config mapping works too


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_timestep_conventions_and_zero_snr(spacing, offset, zero_snr):
    scheduler = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset, rescale_betas_zero_snr=zero_snr)
    f = ddpm_from_scheduler(scheduler)
    scheduler.set_timesteps(13)
    assert f.timesteps(13) == scheduler.timesteps.tolist()
    assert f.rescale_zero_terminal_snr == zero_snr
    assert torch.allclose(f.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=2e-5, atol=1e-7)


def test_sigmoid_and_trained_betas():
    sigmoid = diffusers.DDPMScheduler(beta_schedule="sigmoid")
    assert torch.allclose(ddpm_from_scheduler(sigmoid).alphas_cumprod, sigmoid.alphas_cumprod.double(), rtol=2e-5)
    betas = torch.linspace(1e-3, 0.05, 50)
    explicit = diffusers.DDIMScheduler(num_train_timesteps=50, trained_betas=betas.tolist())
    assert torch.allclose(ddpm_from_scheduler(explicit).alphas_cumprod, explicit.alphas_cumprod.double(), rtol=1e-6)


@pytest.mark.parametrize("f", [
    DDPM(), DDPM(num_timesteps=300, beta_schedule="cosine", prediction="v", timestep_spacing="trailing"),
    DDPM(beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012, prediction="x0", steps_offset=1),
    DDPM(num_timesteps=50, beta_schedule="sqrt", rescale_zero_terminal_snr=True),
    DDPM(beta_schedule="cosine", cosine_s=0.02),
    DDPM(num_timesteps=4, betas=[0.1, 0.2, 0.3, 0.4])])
def test_scheduler_config_is_the_inverse(f):
    scheduler = diffusers.DDPMScheduler(**scheduler_config(f))
    back = ddpm_from_scheduler(scheduler)
    assert torch.allclose(back.alphas_cumprod, f.alphas_cumprod, rtol=1e-12, atol=1e-12)
    assert torch.allclose(scheduler.alphas_cumprod.double(), f.alphas_cumprod, rtol=2e-5, atol=1e-7)
    assert (back.prediction, back.timestep_spacing, back.steps_offset) == (f.prediction, f.timestep_spacing,
                                                                           f.steps_offset)


@pytest.mark.parametrize("config,message", [
    ({"num_train_timesteps": 1000, "beta_schedule": "linear", "variance_type": "learned_range"}, "learned_range"),
    ({"num_train_timesteps": 1000, "beta_schedule": "laplace"}, "beta_schedule 'laplace'"),
    ({"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "flow"}, "prediction_type 'flow'"),
    ({"num_train_timesteps": 1000, "beta_schedule": "linear", "timestep_spacing": "karras"}, "timestep_spacing"),
    ({"num_train_timesteps": 1000, "beta_schedule": "linear", "timestep_type": "continuous"}, "timestep_type"),
    ({"num_train_timesteps": 1000, "shift": 3.0, "_class_name": "FlowMatchEulerDiscreteScheduler"},
     "FlowMatchEulerDiscreteScheduler is not a discrete beta-schedule"),
])
def test_unsupported_scheduler_configs_are_refused(config, message):
    with pytest.raises(UserError, match=message):
        ddpm_from_scheduler(config)


def test_non_ddpm_schedulers_and_formulations_are_refused():
    with pytest.raises(UserError, match="EDMEulerScheduler is not a discrete beta-schedule"):
        ddpm_from_scheduler(diffusers.EDMEulerScheduler())
    with pytest.raises(UserError, match="only a DDPM formulation maps to a diffusers scheduler, got EDM"):
        scheduler_config(EDM())


# --- local folders ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    net = tiny_unet(channels=1, seed=5)
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)
    diffusers.DDPMPipeline(unet=net, scheduler=scheduler).save_pretrained(str(root / "pipe"), safe_serialization=True)
    net.save_pretrained(str(root / "bare"), safe_serialization=True)
    scheduler.save_pretrained(str(root / "bare"))
    net.save_pretrained(str(root / "pickled"), safe_serialization=False)
    scheduler.save_pretrained(str(root / "pickled"))
    return root, net, scheduler


def test_from_a_local_pipeline_or_unet_folder(pipeline_dir):
    root, net, scheduler = pipeline_dir
    D = from_diffusers(net, scheduler)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 5.0])
    with torch.no_grad():
        expected = D(x, sigma)
        for folder in ("pipe", "bare"):
            loaded = from_diffusers(root / folder)
            assert loaded.formulation == D.formulation and not loaded.training
            assert torch.equal(loaded(x, sigma), expected)
    with pytest.raises(UserError, match="safetensors"):
        from_diffusers(root / "pickled")
    with pytest.raises(UserError, match="nothing is downloaded"):
        from_diffusers("google/ddpm-cifar10-32")
    with pytest.raises(UserError, match="scheduler"):
        from_diffusers(net)
    latent = root / "latent"
    latent.mkdir(exist_ok=True)
    (latent / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"],
                                                         "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(UserError, match="latent pipeline"):
        load_diffusers(latent)


def test_cli_sample_and_eval_a_diffusers_folder(pipeline_dir, tmp_path, cli_main):
    root = pipeline_dir[0]
    assert cli_main(["sample", "--diffusers", root / "pipe", "--sampler", "dpmpp_2m", "--steps", "3",
                     "--seeds", "0-3", "--out", tmp_path / "s.npz"])[0] == 0
    import numpy as np

    with np.load(tmp_path / "s.npz") as data:
        assert data["samples"].shape == (4, 8, 8, 1)
    assert cli_main(["eval", "--diffusers", root / "pipe", "--ref", "digits", "--num", "16", "--steps", "2",
                     "--batch", "16"])[0] == 0
    assert json.loads(next(RunDir(root / "pipe").eval.glob("fd_digits-ddim-2steps-16-*.json")).read_text())["value"] > 0
    assert cli_main(["sample", "--seeds", "0", "--out", tmp_path / "x.png"]) == (
        2, ["elucidate sample: error: give either a RUN directory or --diffusers DIR"])
    assert cli_main(["eval", "--diffusers", root / "pipe", "--num", "4"]) == (
        2, ["elucidate eval: error: --ref is required with --diffusers (the real data, or its statistics, to compare "
            "with)"])


def test_missing_diffusers_is_one_clear_line(monkeypatch, pipeline_dir, tmp_path, cli_main):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'elucidate\[diffusers\]'"):
        build_network("diffusers_unet2d", img_resolution=8, in_channels=1)
    assert cli_main(["sample", "--diffusers", pipeline_dir[0] / "pipe", "--out", tmp_path / "g.png"]) == (
        2, ["elucidate sample: error: this needs the optional dependency diffusers: "
            "pip install 'elucidate[diffusers]'"])


# --- the diffusers_unet2d architecture: train, export, load back -------------------------------------
@pytest.fixture
def train(train_diffusers_run):
    """``train(name, network=..., diffusion=..., **sections)``: tests/conftest.py's ``train_diffusers_run`` (a tiny
    ``diffusers_unet2d`` run under a v-prediction DDPM by default)."""
    return train_diffusers_run


def test_the_arch_follows_the_network_contract():
    net = build_network("diffusers_unet2d", img_resolution=(8, 16), in_channels=3, out_channels=2, label_dim=5,
                        label_dropout=0.5, **SMALL)
    assert net.unet.config.num_class_embeds == 6 and net.null_class == 5 and net.img_resolution == (8, 16)
    x = torch.randn(4, 3, 8, 16)
    out = net(x, torch.tensor([-1.3, 0.0, 0.4, 2.0]), class_labels=torch.tensor([0, 1, 4, 2]))  # EDM-like c_noise
    assert out.shape == (4, 2, 8, 16)
    out.square().mean().backward()
    net.eval()
    labels = torch.tensor([0, 1, 4, 2])
    with torch.no_grad():
        one_hot = torch.nn.functional.one_hot(labels, 5).float()
        assert torch.equal(net(x, torch.zeros(4), class_labels=one_hot), net(x, torch.zeros(4), labels))
        null = net(x, torch.zeros(4), class_labels=torch.zeros(4, 5))  # no label = the last embedding
        assert torch.equal(null, net.unet(x, torch.zeros(4), class_labels=torch.full((4,), 5)).sample)
        net.label_dropout = 1.0  # training mode drops every label
        assert torch.equal(net.train()(x, torch.zeros(4), labels), null)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_network("diffusers_unet2d", img_resolution=6, in_channels=1, block_out_channels=(8, 8, 8))
    with pytest.raises(TypeError, match="unknown argument"):
        build_network("diffusers_unet2d", img_resolution=8, in_channels=1, channel_mult=(1, 2))


def test_train_export_and_load_back_with_diffusers(train, tmp_path, cli_main):
    run = train("ddpm")
    out = tmp_path / "exported"
    assert cli_main(["export", run, "--diffusers", out])[0] == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    from elucidate.run.checkpoint import load_checkpoint

    tensors, _ = load_checkpoint(RunDir(run).latest_checkpoint())
    ema = {k[len("ema.unet."):]: v for k, v in tensors.items() if k.startswith("ema.unet.")}
    state = pipe.unet.state_dict()
    assert set(state) == set(ema) and all(torch.equal(state[k], ema[k]) for k in ema)
    assert not all(torch.equal(ema[k], tensors["net.unet." + k]) for k in ema)  # EMA, not the raw weights
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.num_train_timesteps == 100
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    assert images.images.shape == (2, 8, 8, 1)
    # the round trip is exact: elucidate's model of the exported folder is the run's model
    from elucidate.run.model import load_run

    original, again = load_run(run).denoiser, from_diffusers(out)
    assert again.formulation == original.formulation
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.05, 1.0, 30.0])
    with torch.no_grad():
        assert torch.equal(again(x, sigma), original(x, sigma))
    code, err = cli_main(["export", run, "--diffusers", out])
    assert code == 2 and "already exists" in "\n".join(err)
    assert cli_main(["export", run, "--diffusers", out, "--no-ema", "--force"])[0] == 0
    raw = diffusers.UNet2DModel.from_pretrained(str(out / "unet")).state_dict()
    assert all(torch.equal(raw[k], tensors["net.unet." + k]) for k in raw)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


def test_other_runs_are_refused_naming_what_is_exportable(train, tmp_path, cli_main):
    edm = train("edm", diffusion={"type": "EDM"})  # a diffusers UNet trains under EDM too
    unet = train("unet", network=None)  # the tiny U-Net, under DDPM
    exportable = ("exportable: runs with network.arch diffusers_unet2d and diffusion.type DDPM (without shift) "
                  "or Flow")
    assert cli_main(["export", edm, "--diffusers", tmp_path / "a"]) == (
        2, [f"elucidate export: error: {edm} cannot be exported to diffusers (its formulation is EDM); " + exportable])
    assert cli_main(["export", unet, "--diffusers", tmp_path / "b"]) == (
        2, [f"elucidate export: error: {unet} cannot be exported to diffusers (its network is 'unet'); " + exportable])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(UserError, match="with a shift"):
        export_diffusers(train("shifted", diffusion={"type": "DDPM", "num_timesteps": 100, "shift": 2.0}),
                         tmp_path / "c")


def test_export_warns_when_the_data_is_not_in_minus_one_one(train, tmp_path):
    run = train("standardized", data={"normalize": "standardize"})
    with pytest.warns(UserWarning, match="normalization is 'standardize'"):
        export_diffusers(run, tmp_path / "out")
    assert (tmp_path / "out" / "model_index.json").is_file()
