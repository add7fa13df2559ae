"""Extension points: a sampler added through its declaration alone, and a formulation through its
class alone, are found by sample(), config validation, the CLI, sweeps and the config reference."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import pytest
import torch

from elucidate import Denoiser, denoising_loss, sample
from elucidate.cli import build_parser
from elucidate.cli.options import sampling_from_args
from elucidate.config import parse_config
from elucidate.config.docs import config_docs
from elucidate.config.sampling import SamplingConfig
from elucidate.errors import ConfigError, UserError
from elucidate.formulations import FORMULATIONS, Formulation, Preconditioning, as_tensor, make_formulation
from elucidate.params import param
from elucidate.sampling import SAMPLERS, karras_sigmas, register_sampler, sweep_samplers
from elucidate.tuning.sandbox import sandbox_sweep


@pytest.fixture
def toy_solver():
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


def test_a_sampler_declared_once_is_everywhere(toy_solver, gmm):
    import elucidate.sampling as sampling

    assert sampling.toy is toy_solver and "toy" in dir(sampling)
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
    args = argparse.Namespace(sampler="toy", steps=None, solver_options=["gain=0.25"])
    assert sampling_from_args(SamplingConfig(), args).sampler_kwargs() == {"gain": 0.25}
    with pytest.raises(UserError, match="--eta was given but sampler 'toy' does not take it"):
        sampling_from_args(SamplingConfig(), argparse.Namespace(sampler="toy", eta=0.5))
    # sweeps (its declaration says sweep=True) and the sandbox
    assert "toy" in sweep_samplers() and "toy" in sweep_samplers(deterministic=True)
    rows = sandbox_sweep(samplers=["toy"], schedules=["karras"], nfes=[5], num_samples=4, reference_steps=20)
    assert rows[0]["sampler"] == "toy" and rows[0]["nfe"] == 5 and math.isfinite(rows[0]["rmse"])
    assert "toy: Euler with a damped step" in config_docs() and "gain" in config_docs()


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
