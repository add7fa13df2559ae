"""The discrete DDPM family (Ho et al. 2020; latent diffusion; diffusers' schedulers) as a view of the
VP chain in sigma-space: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), x_VE = x_t / sqrt(alpha_bar_t).

The network sees x_t of the VP chain (c_in = 1 / sqrt(1 + sigma^2)) and the timestep t (c_noise), like a
diffusers ``UNet2DModel``; ``prediction`` eps / x0 / v picks (c_skip, c_out). Every sampler then runs
on a DDPM model, and DDIM(eta) is exactly an ancestral Euler step in sigma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..params import param
from .base import Formulation, Preconditioning, as_tensor

__all__ = ["DDPM", "BETA_SCHEDULES", "make_betas", "rescale_zero_terminal_snr", "TIMESTEP_SPACINGS"]

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2", "sqrt_linear", "sqrt", "sigmoid")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("eps", "x0", "v")
#: alpha_bar that stands in for an exact 0 (zero terminal SNR): sigma = 1e4 instead of infinity (or 10x
#: the previous level's sigma if that is larger).
ALPHA_BAR_FLOOR = 1e-8


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008) -> torch.Tensor:
    """beta_1..beta_M of a named schedule, float64 (names as in diffusers; ``sqrt_linear`` and ``sqrt``
    as in latent-diffusion, whose "linear" is diffusers' ``scaled_linear``)."""
    M = num_timesteps
    f64 = dict(dtype=torch.float64)
    if schedule in ("linear", "sqrt_linear"):  # linear in beta (ldm calls it sqrt_linear)
        return torch.linspace(beta_start, beta_end, M, **f64)
    if schedule == "scaled_linear":  # linear in sqrt(beta): ldm's "linear"
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, M, **f64) ** 2
    if schedule == "sqrt":
        return torch.linspace(beta_start, beta_end, M, **f64) ** 0.5
    if schedule in ("cosine", "squaredcos_cap_v2"):  # Nichol & Dhariwal: alpha_bar(t) = cos^2((t/M + s)/(1 + s) pi/2)
        t = torch.arange(M + 1, **f64) / M
        alpha_bar = torch.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    if schedule == "sigmoid":  # GeoDiff
        return torch.sigmoid(torch.linspace(-6, 6, M, **f64)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"beta_schedule must be one of {list(BETA_SCHEDULES)}, got {schedule!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has zero SNR."""
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


@dataclass
class DDPM(Formulation):
    """Discrete-time DDPM with a beta schedule and eps / x0 / v prediction."""

    num_timesteps: int = param(1000, "number of diffusion steps M (t = 0 .. M - 1)", symbol="M", minimum=2)
    beta_schedule: str = param("linear", "the beta schedule (diffusers' names; 'cosine' = squaredcos_cap_v2)",
                               choices=BETA_SCHEDULES)
    beta_start: float = param(1e-4, "beta_1 of the linear-type schedules", symbol="beta_start", minimum=0,
                              exclusive=True, maximum=1)
    beta_end: float = param(0.02, "beta_M of the linear-type schedules", symbol="beta_end", minimum=0,
                            exclusive=True, maximum=1)
    prediction: str = param("eps", "what the network predicts: eps (noise), x0 (clean data) or v", choices=PREDICTIONS)
    betas: list | None = param(None, "explicit betas (overrides the schedule; length = num_timesteps)")
    rescale_zero_terminal_snr: bool = param(False, "rescale to zero terminal SNR (Lin et al. 2023); the last "
                                                   "level becomes sigma = 1e4")
    cosine_s: float = param(0.008, "offset s of the cosine schedule", symbol="s", minimum=0)
    timestep_spacing: str = param("leading", "default timesteps of sampling_sigmas (as diffusers' DDIM)",
                                  choices=TIMESTEP_SPACINGS)
    steps_offset: int = param(0, "added to 'leading' timesteps (diffusers' steps_offset)", minimum=0)
    loss_type: str = param("l2", "l2 or l1 norm of the training error", choices=("l2", "l1"))
    l_simple_weight: float = param(1.0, "weight of ||target - F|| (the simple loss)", minimum=0)
    original_elbo_weight: float = param(0.0, "weight of the VLB-weighted term", minimum=0)
    v_posterior: float = param(0.0, "posterior variance = (1 - v) beta_tilde + v beta", minimum=0, maximum=1)
    name = "DDPM"
    description = "discrete DDPM: beta schedule, eps/x0/v prediction, c_noise = timestep (diffusers-compatible)"

    def check(self) -> None:
        if self.betas is not None:
            betas = torch.as_tensor(self.betas, dtype=torch.float64).reshape(-1)
            if betas.numel() != self.num_timesteps:
                raise ValueError(f"betas has {betas.numel()} values but num_timesteps = {self.num_timesteps}")
            if not (torch.isfinite(betas).all() and (betas > 0).all() and (betas < 1).all()):
                raise ValueError("betas must all lie in (0, 1)")
        else:
            betas = make_betas(self.beta_schedule, self.num_timesteps, self.beta_start, self.beta_end, self.cosine_s)
        if self.rescale_zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self._betas = betas
        self._alphas_cumprod = alphas_cumprod
        positive = alphas_cumprod[alphas_cumprod > 0]
        floor = min(ALPHA_BAR_FLOOR, float(positive.min()) / 100) if len(positive) else ALPHA_BAR_FLOOR
        bar = torch.where(alphas_cumprod > 0, alphas_cumprod, torch.full_like(alphas_cumprod, floor))
        self._sigmas = ((1 - bar) / bar).sqrt()  # increasing in t
        if not (self._sigmas.diff() > 0).all():
            raise ValueError("the beta schedule must give strictly increasing noise levels")
        self._log_sigmas = self._sigmas.log()

    # --- the chain ------------------------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t, t = 0 .. M-1 (float64)."""
        return self._alphas_cumprod

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), t = 0 .. M-1, increasing (float64)."""
        return self._sigmas

    def posterior(self, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) at integer timesteps ``t``: (mean coefficient of x_0, mean coefficient of
        x_t, variance, log-variance clipped at t = 0 to the value at t = 1), as in DDPM eq. 7."""
        t = torch.as_tensor(t).long()
        a_bar = self._alphas_cumprod
        a_prev = torch.cat([a_bar.new_ones(1), a_bar[:-1]])
        beta = self._betas
        coef_x0 = beta * a_prev.sqrt() / (1 - a_bar)
        coef_xt = (1 - a_prev) * (1 - beta).sqrt() / (1 - a_bar)
        beta_tilde = (1 - a_prev) / (1 - a_bar) * beta
        variance = (1 - self.v_posterior) * beta_tilde + self.v_posterior * beta
        log_clipped = torch.log(torch.cat([variance[1:2], variance[1:]]))
        return coef_x0[t], coef_xt[t], variance[t], log_clipped[t]

    # --- time variable: the continuous timestep t in [0, M - 1] ----------------------------------
    def sigma(self, t):
        """sigma at (fractional) timesteps, interpolated in log sigma between the grid points."""
        t = as_tensor(t)
        s = self._sigmas.to(t.device)
        t64 = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        low = t64.floor().long().clamp(max=self.num_timesteps - 2)
        w = t64 - low
        log_s = (1 - w) * s[low].log() + w * s[low + 1].log()
        return log_s.exp().to(t.dtype)

    def sigma_inv(self, sigma):
        """The (fractional) timestep of ``sigma`` (log-sigma interpolation, clamped to [0, M - 1])."""
        sigma = as_tensor(sigma)
        log_s = self._log_sigmas.to(sigma.device)
        x = sigma.to(torch.float64).clamp_min(1e-300).log()
        i = torch.searchsorted(log_s, x.reshape(-1).contiguous()).reshape(x.shape).clamp(1, self.num_timesteps - 1)
        lo, hi = log_s[i - 1], log_s[i]
        t = (i - 1) + ((x - lo) / (hi - lo)).clamp(0, 1)
        t = torch.where(x <= log_s[0], torch.zeros_like(t), t)
        return t.to(sigma.dtype)

    def scale(self, t):
        """s(t) = sqrt(alpha_bar) = 1 / sqrt(1 + sigma(t)^2): x_t = s(t) x_VE."""
        return 1 / (1 + self.sigma(t) ** 2).sqrt()

    @property
    def supported_range(self) -> tuple[float, float]:
        return float(self._sigmas[0]), float(self._sigmas[-1])

    def round_sigma(self, sigma):
        """The nearest training level sigma_t (in log sigma)."""
        sigma = as_tensor(sigma)
        t = self.sigma_inv(sigma).to(torch.float64).round().long()
        return self._sigmas.to(sigma.device)[t].to(sigma.dtype)

    # --- Table 1 rows ----------------------------------------------------------------------------
    def precondition(self, sigma) -> Preconditioning:
        sigma = as_tensor(sigma)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        if self.prediction == "eps":
            c_skip, c_out = torch.ones_like(sigma), -sigma
        elif self.prediction == "x0":
            c_skip, c_out = torch.zeros_like(sigma), torch.ones_like(sigma)
        else:  # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
            c_skip, c_out = 1 / (1 + sigma ** 2), -sigma * c_in
        return Preconditioning(c_skip, c_out, c_in, self.sigma_inv(sigma))

    def training_sigma(self, n, *, generator=None, device=None, dtype=None):
        # t ~ U{0, ..., M - 1}
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)
        return self._sigmas.to(t.device)[t].to(dtype or torch.get_default_dtype())

    def vlb_weight(self, sigma) -> torch.Tensor:
        """The VLB weight of ||target - F||^2 at the timestep of ``sigma`` (latent-diffusion's lvlb_weights):
        the term L_{t-1} = ||mu_tilde - mu_theta||^2 / (2 var_post) = c_1^2 / (2 var_post) ||x0 - x0_hat||^2,
        with c_1 the posterior mean coefficient of x_0, is c_1^2 c_out^2 / (2 var_post) ||target - F||^2.
        t = 0 (no posterior variance) takes t = 1's value, as latent-diffusion does."""
        t = self.sigma_inv(as_tensor(sigma)).to(torch.float64).round().long().clamp(min=1).cpu()
        coef_x0, _, variance, _ = self.posterior(t)
        c_out = self.precondition(self._sigmas[t]).c_out
        return (coef_x0 ** 2 * c_out ** 2 / (2 * variance)).to(as_tensor(sigma).device)

    def _target_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        weight = torch.full_like(sigma, self.l_simple_weight)
        if self.original_elbo_weight:
            weight = weight + self.original_elbo_weight * self.vlb_weight(sigma).to(sigma.dtype)
        return weight

    def loss_weight(self, sigma):
        """lambda(sigma) of ||D - y||^2: (l_simple_weight + original_elbo_weight vlb_weight) / c_out^2, so that
        the loss is that weight times ||target - F||^2 (target = eps, x0 or v)."""
        sigma = as_tensor(sigma)
        return self._target_weight(sigma) / self.precondition(sigma).c_out ** 2

    def pointwise_loss(self, D_yn: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "l2":
            return super().pointwise_loss(D_yn, y, sigma)
        # L1: weight x |target - F| = weight x |D - y| / |c_out|
        view = (-1,) + (1,) * (y.ndim - 1)
        weight = self._target_weight(sigma) / self.precondition(sigma).c_out.abs()
        return weight.reshape(view) * (D_yn - y).abs()

    def timesteps(self, num_steps: int, *, spacing: str | None = None, steps_offset: int | None = None) -> list[int]:
        """The sampling timesteps, descending, chosen as diffusers' DDIMScheduler.set_timesteps does."""
        spacing = self.timestep_spacing if spacing is None else spacing
        offset = self.steps_offset if steps_offset is None else steps_offset
        M = self.num_timesteps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= M:
            raise ValueError(f"num_steps must be an integer in [1, {M}], got {num_steps!r}")
        if spacing == "linspace":
            ts = torch.linspace(0, M - 1, num_steps, dtype=torch.float64).round().long().flip(0)
        elif spacing == "leading":
            ts = (torch.arange(num_steps) * (M // num_steps)).flip(0) + offset
        elif spacing == "trailing":
            ts = torch.round(torch.arange(M, 0, -M / num_steps, dtype=torch.float64)).long() - 1
        else:
            raise ValueError(f"spacing must be one of {list(TIMESTEP_SPACINGS)}, got {spacing!r}")
        return ts.clamp(0, M - 1).tolist()

    def sampling_sigmas(self, num_steps, *, spacing: str | None = None, steps_offset: int | None = None,
                        device=None, dtype=torch.float64):
        """sigma at :meth:`timesteps` (descending), then 0."""
        ts = self.timesteps(num_steps, spacing=spacing, steps_offset=steps_offset)
        sigmas = torch.cat([self._sigmas[ts], self._sigmas.new_zeros(1)])
        return sigmas.to(device=device, dtype=dtype)
