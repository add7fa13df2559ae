"""Extension points: a sampler, a named schedule and a training option added through their one declaration, and
a formulation through its class alone, are found by sample(), config validation, the CLI, sweeps and the
generated docs (docs/extending.md's recipes)."""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

import elucidate.config as config_module
import elucidate.config.vae as vae_config_module
from elucidate import Denoiser, denoising_loss, sample
from elucidate.cli import build_parser, main
from elucidate.cli.docs import BLOCKS
from elucidate.cli.options import sampling_from_args
from elucidate.config import TrainingConfig, load_config, parse_config, schedule_for
from elucidate.config.docs import config_docs
from elucidate.config.sampling import SamplingConfig
from elucidate.config.vae import VAETrainingConfig, parse_vae_config
from elucidate.errors import ConfigError, UserError
from elucidate.formulations import EDM, FORMULATIONS, Formulation, Preconditioning, as_tensor, make_formulation
from elucidate.params import param
from elucidate.sampling import (
    SAMPLERS,
    SCHEDULES,
    exponential_sigmas,
    karras_sigmas,
    register_sampler,
    register_schedule,
    sweep_samplers,
)
from elucidate.tuning.sandbox import sandbox_sweep


@pytest.fixture
def toy_sampler():
    @register_sampler(description="toy: Euler with a damped step", order=1, sweep=True,
                     option_docs={"gain": "fraction of the Euler step taken"})
    @torch.no_grad()
    def toy(D, x, sigmas, *, gain: float = 1.0, callback=None):
        t = sigmas.tolist()
        for i in range(len(t) - 1):
            denoised = D(x, x.new_full((x.shape[0],), t[i]))
            x = x + gain * (t[i + 1] - t[i]) * (x - denoised) / t[i]
        return x

    yield toy
    SAMPLERS.pop("toy")


def test_a_sampler_declared_once_is_everywhere(toy_sampler, gmm):
    import elucidate.sampling as sampling

    assert sampling.toy is toy_sampler and "toy" in dir(sampling)
    x = sample(gmm.denoise, (8, gmm.dim), sampler="toy", steps=5, gain=1.0, dtype=torch.float64)
    euler = sample(gmm.denoise, (8, gmm.dim), sampler="euler", steps=5, dtype=torch.float64)
    assert torch.allclose(x, euler)  # gain 1 is Euler
    cfg = SamplingConfig(sampler="toy", options={"gain": 0.5})
    cfg.validate()
    assert cfg.sampler_kwargs() == {"gain": 0.5}
    with pytest.raises(ConfigError, match="gain = 'big', expected a number"):
        SamplingConfig(sampler="toy", options={"gain": "big"}).validate()
    with pytest.raises(ConfigError, match="does not take option 'order'"):
        SamplingConfig(sampler="toy", options={"order": 2}).validate()
    # the CLI: help, --sampler and --option
    sample_parser = build_parser()._subparsers._group_actions[0].choices["sample"]
    assert "toy: Euler with a damped step" in " ".join(sample_parser.format_help().split())
    args = argparse.Namespace(sampler="toy", steps=None, sampler_options=["gain=0.25"])
    assert sampling_from_args(SamplingConfig(), args).sampler_kwargs() == {"gain": 0.25}
    with pytest.raises(UserError, match="--eta was given but sampler 'toy' does not take it"):
        sampling_from_args(SamplingConfig(), argparse.Namespace(sampler="toy", eta=0.5))
    # sweeps (its declaration says sweep=True) and the sandbox
    assert "toy" in sweep_samplers() and "toy" in sweep_samplers(deterministic=True)
    rows = sandbox_sweep(samplers=["toy"], schedules=["karras"], nfes=[5], num_samples=4, reference_steps=20)
    assert rows[0]["sampler"] == "toy" and rows[0]["nfe"] == 5 and math.isfinite(rows[0]["rmse"])
    assert "toy: Euler with a damped step" in config_docs() and "gain" in config_docs()
    assert "`toy`" in BLOCKS["samplers"]() and "`toy`" in BLOCKS["registry"]()


@pytest.fixture
def toy_formulation():
    @dataclass
    class Toy(Formulation):
        """sigma-scaled identity skip (a made-up formulation for the test)."""

        width: float = param(1.0, "data scale", symbol="w", minimum=0, exclusive=True)
        steps_exponent: int = param(3, "schedule exponent", minimum=1)
        name = "toy"
        description = "a test formulation"

        def precondition(self, sigma):
            sigma = as_tensor(sigma)
            c = 1 / (sigma ** 2 + self.width ** 2)
            return Preconditioning(self.width ** 2 * c, sigma * self.width * c.sqrt(), c.sqrt(), sigma.log())

        def training_sigma(self, n, *, generator=None, device=None, dtype=None):
            return self._rand(n, generator, device, dtype, True).exp()

        def sampling_sigmas(self, num_steps, *, device=None, dtype=torch.float64):
            return karras_sigmas(num_steps, 0.01, 10.0, float(self.steps_exponent), device=device, dtype=dtype)

    yield Toy
    FORMULATIONS.pop("toy")


def test_a_formulation_defined_once_is_everywhere(toy_formulation):
    config = parse_config({"diffusion": {"type": "toy", "width": 2.0}})
    assert isinstance(config.formulation(), toy_formulation) and config.formulation().width == 2.0
    assert config.diffusion == {"type": "toy", "width": 2.0, "steps_exponent": 3}
    assert make_formulation("TOY", steps_exponent=2).steps_exponent == 2
    with pytest.raises(ConfigError, match=r"diffusion.steps_exponent = 1.5: expected an integer"):
        parse_config({"diffusion": {"type": "toy", "steps_exponent": 1.5}})
    with pytest.raises(ConfigError, match=r"diffusion.width = -1: expected a number > 0"):
        parse_config({"diffusion": {"type": "toy", "width": -1}})
    with pytest.raises(ConfigError, match="did you mean 'width'"):
        parse_config({"diffusion": {"type": "toy", "widht": 1}})
    assert "type: toy" in config_docs() and "schedule exponent" in config_docs()
    D = Denoiser(lambda x, c_noise: torch.zeros_like(x), config.formulation())
    loss = denoising_loss(D, torch.randn(4, 3), generator=torch.Generator().manual_seed(0))
    assert loss.shape == (4,) and torch.isfinite(loss).all()


@pytest.fixture
def toy_schedule():
    @register_schedule(description="toy: exponential spacing with the steps pushed towards sigma_max",
                       option_docs={"bend": "exponent of the step index"})
    def toy_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, *, bend: float = 1.0,
                   device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        ramp = (torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)) ** bend
        sigmas = torch.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max)))
        return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=dtype)

    yield toy_sigmas
    SCHEDULES.pop("toy")


def test_a_schedule_declared_once_is_everywhere(toy_schedule, gmm):
    # sample(): by name, with steps and the range (bend 1 is the exponential schedule)
    x = sample(gmm.denoise, (8, gmm.dim), sampler="euler", schedule="toy", steps=6, dtype=torch.float64)
    exp = sample(gmm.denoise, (8, gmm.dim), sampler="euler", sigmas=exponential_sigmas(6), dtype=torch.float64)
    assert torch.allclose(x, exp)
    # config validation and the sigmas a config means
    cfg = SamplingConfig(schedule="toy", steps=6, sigma_min=0.01, sigma_max=10.0)
    cfg.validate()
    assert torch.allclose(schedule_for(cfg, EDM()), toy_schedule(6, 0.01, 10.0))
    bent = SamplingConfig(schedule="toy:bend=2", steps=6, sigma_min=0.01, sigma_max=10.0)  # with an option
    bent.validate()
    assert torch.allclose(schedule_for(bent, EDM()), toy_schedule(6, 0.01, 10.0, bend=2.0))
    assert torch.allclose(sample(gmm.denoise, (8, gmm.dim), sampler="euler", schedule="toy:bend=2", steps=6,
                                 dtype=torch.float64),
                          sample(gmm.denoise, (8, gmm.dim), sampler="euler", sigmas=toy_schedule(6, bend=2.0),
                                 dtype=torch.float64))
    with pytest.raises(ConfigError, match="sampling.schedule = 'toyy'"):
        SamplingConfig(schedule="toyy").validate()
    # the CLI: --schedule and its help
    sample_parser = build_parser()._subparsers._group_actions[0].choices["sample"]
    assert "toy: exponential spacing" in " ".join(sample_parser.format_help().split())
    assert sampling_from_args(SamplingConfig(), argparse.Namespace(schedule="toy")).schedule == "toy"
    # the sandbox sweep, with an option
    rows = sandbox_sweep(samplers=["euler"], schedules=["toy", "toy:bend=2"], nfes=[5], num_samples=4,
                         reference_steps=20)
    assert [r["schedule"] for r in rows] == ["toy", "toy:bend=2"] and rows[0]["rmse"] != rows[1]["rmse"]
    # the generated docs
    assert "toy: exponential spacing" in config_docs() and "bend=1" in BLOCKS["schedules"]()


#: A training option as a developer declares it: one field (here added to both trainers' training section,
#: as a field of LoopConfig is).
TOY_OPTION = ("toy_clip", float, param(1.0, "toy: a clip the loop would apply", minimum=0, exclusive=True,
                                       resumable=True))


@pytest.fixture
def toy_training_option(monkeypatch):
    diffusion = dataclasses.make_dataclass("TrainingConfig", [TOY_OPTION], bases=(TrainingConfig,))
    vae = dataclasses.make_dataclass("VAETrainingConfig", [TOY_OPTION], bases=(VAETrainingConfig,))
    monkeypatch.setitem(config_module.SECTION_TYPES, "training", diffusion)
    monkeypatch.setitem(vae_config_module.VAE_SECTION_TYPES, "training", vae)
    return diffusion, vae


def test_a_training_option_declared_once_is_everywhere(toy_training_option, tiny_config, tiny_vae_config,
                                                         write_config, tmp_path, capsys):
    # config validation, in both trainers' configs, from its declaration
    assert parse_config(tiny_config()).training.toy_clip == 1.0
    assert parse_vae_config(tiny_vae_config(training={"toy_clip": 0.5})).training.toy_clip == 0.5
    for parse, raw in ((parse_config, tiny_config), (parse_vae_config, tiny_vae_config)):
        with pytest.raises(ConfigError, match=r"training.toy_clip = -1: expected a number > 0"):
            parse(raw(training={"toy_clip": -1}))
    # the CLI: --set, and --help-config
    cfg = write_config(tiny_config(training={"steps": 2}), tmp_path / "tiny.yaml")
    assert load_config(cfg, ["training.toy_clip=2.5"]).training.toy_clip == 2.5
    assert main(["train", str(cfg), "--out", str(tmp_path / "x"), "--set", "training.toy_clip=0"]) == 2
    assert "training.toy_clip = 0: expected a number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(cfg), "--help-config"])
    assert "toy: a clip the loop would apply" in capsys.readouterr().out
    # the resume check follows its declaration: resumable, so a resumed run may change it
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert main(["train", str(cfg), "--out", str(run), "--no-progress", "--set", "training.steps=3",
                 "--set", "training.toy_clip=3"]) == 0
    assert main(["train", str(cfg), "--out", str(run), "--no-progress", "--set", "training.steps=4",
                 "--set", "training.lr=0.5"]) == 2  # lr is not resumable
    assert "training.lr = 0.001" in capsys.readouterr().err
    # the generated docs
    assert "toy: a clip the loop would apply" in config_docs() and "toy_clip" in BLOCKS["config"]()
