"""The ``sampling`` section: which sampler, which noise levels and its options, as a run samples by default
(``elucidate sample``/``eval``/``sweep`` flags override them: each field declared ``flag=True`` is one), and
how those settings become the arguments of :func:`elucidate.sampling.sample`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..denoiser import Clipped, Guided, check_interval
from ..errors import ConfigError, UserError
from ..formulations import Formulation
from ..params import did_you_mean, param
from ..sampling import CONFIG_OPTIONS, SAMPLERS, check_options, check_sigmas, get_sampler, num_steps, parse_schedule
from .schema import validate_section

__all__ = ["SamplingConfig", "schedule_for"]


@dataclass
class SamplingConfig:
    """Default sampler settings (the schema of the framework config page, plus a few extras)."""

    steps: int = param(18, "number of steps N (Heun: NFE = 2N - 1)", minimum=1, flag=True)
    sampler: str = param("heun", "a registered sampler (elucidate train --help-config lists them)", flag=True)
    s_churn: float = param(0.0, "EDM Algorithm 2 stochasticity", symbol="S_churn", minimum=0, flag=True)
    s_min: float = param(0.0, "churn only for sigma >= s_min", symbol="S_tmin", minimum=0, allow_inf=True, flag=True)
    s_max: float = param(float("inf"), "churn only for sigma <= s_max", symbol="S_tmax", minimum=0, allow_inf=True,
                         flag=True)
    s_noise: float = param(1.0, "scale of the churn / ancestral noise", symbol="S_noise", minimum=0, exclusive=True,
                           flag=True)
    schedule: str = param("auto", "auto = the formulation's own discretization; or a named schedule (see "
                                  "'schedules' below), options after a colon: karras:rho=3", flag=True)
    sigma_min: float | None = param(None, "lowest sigma of a named schedule (default 0.002, clipped to the "
                                          "model's range)", minimum=0, exclusive=True, flag=True)
    sigma_max: float | None = param(None, "highest sigma of a named schedule (default 80, clipped to the "
                                          "model's range)", minimum=0, exclusive=True, flag=True)
    rho: float | None = param(None, "Karras schedule exponent (default: the formulation's, else 7)", symbol="rho",
                              minimum=0, exclusive=True, flag=True)
    eta: float | None = param(None, "noise of ancestral / SDE / DDIM samplers (null = the sampler's default)",
                              symbol="eta", minimum=0, flag=True)
    options: dict = param(None, "other options of the chosen sampler, e.g. {order: 3} for lms",
                          default_factory=dict)
    guidance: float = param(1.0, "guidance weight: classifier-free D_uncond + w (D_cond - D_uncond), or autoguidance "
                                 "with guide; 1 = off, 0 = unconditional (the guide)", symbol="w", minimum=0,
                            flag=True)
    guide: str | None = param(None, "autoguidance (Karras et al. 2024): a worse model of the same data (another run or "
                                    "checkpoint, e.g. an early one) as D_guide + w (D - D_guide) instead of the "
                                    "unconditional model; needs guidance != 1", flag=True)
    guidance_interval: list | None = param(None, "guide only for sigma in [lo, hi] (Kynkäänniemi et al. 2024), the "
                                                 "plain model elsewhere; null = at every noise level", flag=True)
    clip_denoised: bool = param(False, "clamp the denoised estimate x0_hat to the data range [-1, 1] at every step "
                                       "(latent diffusion's clip_denoised, diffusers' clip_sample)", flag=True)
    sigmas: list | None = param(None, "explicit noise levels from sigma_max down to 0 (a tuned schedule, see "
                                      "elucidate tune); overrides schedule, steps and the sigma range")

    def validate(self) -> None:
        validate_section(self, "sampling")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampling.sampler = {self.sampler!r}{did_you_mean(self.sampler, SAMPLERS)}: "
                              f"expected one of {sorted(SAMPLERS)}")
        if self.schedule != "auto":
            try:
                parse_schedule(self.schedule)
            except ValueError as e:
                raise ConfigError(f"sampling.schedule = {self.schedule!r}: expected 'auto' or a schedule "
                                  f"({e})") from None
        if self.s_min > self.s_max:
            raise ConfigError(f"sampling.s_min = {self.s_min} must not exceed sampling.s_max = {self.s_max}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"sampling.options = {self.options!r}: expected a mapping of sampler options")
        if self.sigmas is not None:
            self._check_sigmas()
        if self.guidance_interval is not None:
            try:
                self.guidance_interval = list(check_interval(self.guidance_interval))
            except ValueError:
                raise ConfigError(f"sampling.guidance_interval = {self.guidance_interval!r}: expected [lo, hi], two "
                                  "noise levels with 0 <= lo <= hi (hi may be .inf)") from None
        try:
            check_options(self.sampler, self.options)
        except ValueError as e:
            raise ConfigError(f"sampling.options: {e}") from None

    def _check_sigmas(self) -> None:
        ok = isinstance(self.sigmas, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.sigmas)
        try:
            if not ok:
                raise ValueError("expected a list of numbers")
            check_sigmas(self.sigmas)
        except ValueError as e:
            raise ConfigError(f"sampling.sigmas: {e}") from None
        self.sigmas = [float(v) for v in self.sigmas]
        self.steps = num_steps(self.sigmas)

    def sampler_kwargs(self) -> dict:
        """Keyword arguments for the chosen sampler: the config values it takes (see
        ``sampling.CONFIG_OPTIONS`` for the config-name -> argument-name map), then ``options``."""
        spec = get_sampler(self.sampler)
        kwargs = {arg: getattr(self, key) for key, arg in CONFIG_OPTIONS.items()
                  if arg in spec.options and getattr(self, key) is not None}
        kwargs.update(self.options)
        return kwargs

    def sample_kwargs(self, formulation: Formulation) -> dict:
        """The keyword arguments of :func:`elucidate.sampling.sample` these settings mean for a model of
        ``formulation``: sampler, noise levels (:func:`schedule_for`) and the sampler's options."""
        return {"sampler": self.sampler, "sigmas": schedule_for(self, formulation), **self.sampler_kwargs()}

    def guided(self, denoiser, *, guide=None, null=None):
        """``denoiser`` as this config samples it: guided when ``guidance`` is not 1 (classifier-free, with ``null``
        as the unconditional branch if given, or autoguidance by ``guide``, the denoiser of :attr:`guide` that the
        caller loaded, e.g. :meth:`elucidate.run.LoadedRun.sample`), only inside ``guidance_interval``; then x0_hat
        clipped to [-1, 1] if ``clip_denoised``."""
        if self.guide is not None and guide is None and self.guidance != 1:
            raise UserError(f"sampling.guide = {self.guide!r} needs the guide's denoiser (load it: LoadedRun.sample "
                            "does)")
        out = denoiser
        if self.guidance != 1:
            out = Guided(denoiser, self.guidance, guide=guide, interval=self.guidance_interval,
                         **({"null": null} if null else {}))
        return Clipped(out) if self.clip_denoised else out


def schedule_for(cfg: SamplingConfig, formulation: Formulation, *, device=None) -> torch.Tensor:
    """The sigmas the config asks for (float64, ending in 0): ``cfg.sigmas`` if given (a tuned schedule).

    ``schedule: auto`` with no range override is the formulation's own discretization (EDM Table 1).
    A named schedule (or ``auto`` with ``sigma_min``/``sigma_max``/``rho`` given, which means Karras)
    spans ``cfg.sigma_min``..``cfg.sigma_max`` (default: the paper's 0.002..80) clipped to the range the
    network supports, as EDM's sampler does; each option of the schedule comes from the schedule name
    (``karras:rho=3``), else from the config field of that name if set (``rho``), else from the formulation's
    parameter of that name (EDM's ``rho``, iDDPM's grid ``C_1, C_2, M``), else its default. Levels are then
    snapped to the network's grid (iDDPM) and repeated levels dropped, so every step costs evaluations and moves.
    """
    own = cfg.schedule == "auto" and cfg.sigma_min is None and cfg.sigma_max is None and cfg.rho is None
    if cfg.sigmas is not None:  # explicit levels (a tuned schedule) override the rest
        sigmas = torch.tensor(cfg.sigmas, dtype=torch.float64)
    elif own:
        sigmas = formulation.sampling_sigmas(cfg.steps)
    else:
        lo, hi = formulation.schedule_range(cfg.sigma_min, cfg.sigma_max)
        if not lo < hi:
            raise UserError(f"sampling range [{cfg.sigma_min}, {cfg.sigma_max}] lies outside the range the "
                            f"model supports [{formulation.supported_range[0]:.4g}, "
                            f"{formulation.supported_range[1]:.4g}]")
        named, options = parse_schedule("karras" if cfg.schedule == "auto" else cfg.schedule)
        for name in set(named.options) - set(options):  # then the config key, then the formulation's parameter
            value = getattr(cfg, name, None)
            value = getattr(formulation, name, None) if value is None else value
            if value is not None:
                options[name] = value
        try:
            sigmas = named(cfg.steps, lo, hi, **options)
        except ValueError as e:
            raise UserError(f"sampling.schedule = {cfg.schedule!r}: {e}") from None
    sigmas = torch.cat([formulation.round_sigma(sigmas[:-1]), sigmas[-1:]])  # discrete nets: known levels only
    sigmas = torch.unique_consecutive(sigmas)  # a level repeated by rounding would be a zero-length step
    return sigmas if device is None else sigmas.to(device)
