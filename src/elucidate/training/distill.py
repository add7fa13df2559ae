"""One- and few-step generation from a trained run: consistency distillation (CD, Song et al. 2023, "Consistency
Models", Algorithm 2) and easy consistency tuning (ECT, Geng et al. 2024, "Consistency Models Made Easy").

In EDM's view a consistency model is f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in x, c_noise) with the
boundary c_skip = 1, c_out = 0 at the lowest level, i.e. any elucidate denoiser whose formulation has that boundary:
every formulation has it at sigma = 0 (ECT's choice), :class:`~elucidate.formulations.Consistency` at a positive
epsilon (Song et al.'s). The student starts from the trained run's EMA weights and learns to map every point of a
trajectory to the same x0:

* ``cd``: n ~ U{1, ..., N-1} on the Karras discretization sigma_1 = sigma_min < ... < sigma_N = sigma_max;
  x_{n+1} = y + sigma_{n+1} z; x_hat_n is one step of the frozen teacher's ODE (Heun by default) from sigma_{n+1}
  to sigma_n; loss d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x_hat_n, sigma_n)) with lambda = 1.
* ``ect``: no teacher calls. t ~ log-normal(P_mean, P_std), r = t (1 - (1/q)^(stage+1) adj(t)) (0 at least), stage =
  step // double; one noise direction n for both points; loss ||f(y + t n, t) - sg f(y + r n, r)|| / (t - r) (or
  its pseudo-Huber form), the target y itself where r = 0 (ECT's loss.py).

theta- is the stop-gradient student itself (improved CT, Song & Dhariwal 2023, and ECT), not Song et al.'s target
EMA: nothing beyond the run's own state is needed to resume, and the improved-CT paper found the EMA target
unnecessary. Both calls of a step see the same dropout mask (the generator is reseeded before each, as ECT does).
The step's skeleton (micro-batches, autocast and fp16 loss scaling, clipping, the NaN/Inf guard), the half-life EMA
(what samples are made from), checkpoints, resume, DDP and logging are the diffusion trainer's.

Pixel runs only: the teacher must be a diffusion run on pixels (a latent run is refused: its data would first have
to be encoded here, which reflow and distillation do not do).

``distill(run, out, method=...)`` writes ``out`` as a new run whose config is the teacher's with a ``distill``
section (method, teacher checkpoint, settings) and a sampling section defaulting to the ``consistency`` sampler with
2 steps; it starts from the teacher's EMA weights (its step-0 checkpoint). Calling it again resumes.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from torch import nn

from ..config import Config, load_config, parse_config
from ..config.distill import METHODS
from ..config.schema import SECTIONS, parse_with_overrides
from ..config.training import AUGMENT_LABEL_DIM
from ..denoiser import Denoiser
from ..errors import UserError
from ..formulations import EDM, Consistency
from ..run.checkpoint import check_run_checkpoint
from ..run.model import load_run, resolve_checkpoint
from ..run.rundir import RunDir
from ..runtime.rng import derive_seed, derived_generator
from ..sampling import karras_sigmas
from .diffusion import Trainer

__all__ = ["distill", "distill_config", "DistillTrainer", "consistency_distance", "cd_levels", "teacher_step",
           "ect_r", "DEFAULT_STEPS", "MID_SIGMA", "CD_EPSILON"]

DEFAULT_STEPS = 2000
#: the intermediate level of the distilled run's default 2-step sampling (iCT's and ECT's mid_t, 0.821)
MID_SIGMA = 0.821
#: Song et al.'s boundary epsilon (= their sigma_min) for cd of an EDM teacher
CD_EPSILON = 0.002
#: improved CT's pseudo-Huber constant per sqrt(dimension): c = 0.00054 sqrt(d) (Song & Dhariwal 2023)
HUBER_PER_SQRT_D = 0.00054


# ------------------------------------------------------------------------------------------------ the math
def consistency_distance(a: torch.Tensor, b: torch.Tensor, metric: str, c: float = 0.0) -> torch.Tensor:
    """d(a, b) per sample: ``l2`` = mean squared difference over the elements (Song et al.'s squared l2, divided by
    d); ``pseudo_huber`` = sqrt(||a - b||^2 + c^2) - c over all d elements (improved CT; c = 0 gives ||a - b||, ECT's
    default)."""
    diff = (a.float() - b.float()).flatten(1)
    if metric == "l2":
        return diff.square().mean(1)
    if metric == "pseudo_huber":
        return (diff.square().sum(1) + c * c).sqrt() - c
    raise ValueError(f"unknown metric {metric!r}; expected l2 or pseudo_huber")


def cd_levels(formulation, num_levels: int) -> torch.Tensor:
    """sigma_1 < ... < sigma_N (float64): the Karras discretization (EDM eq. 5) of the formulation's schedule range
    with its rho (7 if it has none), as Song et al. 2023 discretize [epsilon, T]."""
    lo, hi = formulation.schedule_range()
    return karras_sigmas(num_levels, lo, hi, float(getattr(formulation, "rho", 7.0)))[:-1].flip(0)


def teacher_step(D, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, solver: str = "heun",
                 **cond) -> torch.Tensor:
    """One step of the teacher's probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from ``sigma`` to
    ``sigma_next`` (per sample, both > 0): Euler, or Heun's correction (EDM Algorithm 1, lines 5-8)."""
    view = (-1,) + (1,) * (x.ndim - 1)
    t_cur, t_next = sigma.reshape(view).to(x.dtype), sigma_next.reshape(view).to(x.dtype)
    d = (x - D(x, sigma, **cond)) / t_cur  # Algorithm 1, line 4
    x_next = x + (t_next - t_cur) * d  # line 5: Euler step
    if solver == "heun":  # lines 7-8: second-order correction
        d_prime = (x_next - D(x_next, sigma_next, **cond)) / t_next
        x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_prime)
    return x_next


def ect_r(t: torch.Tensor, stage: int, *, q: float, mapping: str = "sigmoid", k: float = 8.0,
          b: float = 1.0) -> torch.Tensor:
    """ECT's r(t) at ``stage``: t (1 - (1/q)^(stage+1) adj(t)), adj = 1 + k sigmoid(-b t) or 1, clamped at 0."""
    adj = 1 + k * torch.sigmoid(-b * t) if mapping == "sigmoid" else torch.ones_like(t)
    return (t * (1 - (1 / q) ** (stage + 1) * adj)).clamp(min=0)


class Student(nn.Module):
    """f_theta(x, sigma) as one module (the DDP unit of a distillation step)."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.denoiser(x, sigma, **cond)


# ------------------------------------------------------------------------------------------------ the trainer
class DistillTrainer(Trainer):
    """The diffusion trainer with a consistency step (``config.distill``): data, the step's skeleton
    (:meth:`~.diffusion.Trainer._step_over_micro_batches`), EMA, checkpoints, resume and DDP are
    :class:`~.diffusion.Trainer`'s."""

    def build(self, init) -> None:
        d = self.config.distill
        if d is None:
            raise UserError("this config has no distill section: train it with `elucidate train`")
        if self.config.latent is not None:
            raise UserError("distillation of latent runs is not supported (pixel runs only)")
        if self.config.training.loss_weighting != "fixed":
            raise UserError("training.loss_weighting: uncertainty does not apply to distillation; set it to fixed")
        super().build(init)
        self.teacher = None
        if d.method == "cd":
            if not Path(d.teacher).exists():
                raise UserError(f"the teacher {d.teacher} (distill.teacher) is missing: cd needs it to train and "
                                f"to resume")
            teacher = load_run(Path(d.teacher), ema=True, device=self.device)
            if teacher.decode is not None:
                raise UserError(f"the teacher {d.teacher} is a latent run: distillation supports pixel runs only")
            self.teacher = teacher.denoiser.eval().requires_grad_(False)
            self.levels = cd_levels(self.formulation, d.levels)

    def make_objective(self) -> nn.Module:
        return Student(self.denoiser)

    def _dropout_seed(self, step: int, micro: int) -> int:
        return derive_seed(self.t.seed, "dropout", step, self.dist.rank, micro)

    def optimizer_step(self, step: int) -> tuple[tuple, bool]:
        """One distillation step: ((per-sample losses, their sigma: sigma_{n+1} for cd, t for ect), applied)."""
        d, B = self.config.distill, self.t.batch_size
        images, conds, _, noise = self._batch(step)  # the formulation's sigma is not used: the method draws its own
        part = slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)
        g = derived_generator(self.t.seed, "distill", step)
        if d.method == "cd":  # n ~ U{1, ..., N-1}: the pair (sigma_n, sigma_{n+1})
            n = torch.randint(0, len(self.levels) - 1, (B,), generator=g)
            sigma, sigma_to = self.levels[n + 1].float(), self.levels[n].float()
        else:  # t ~ log-normal(P_mean, P_std) (clipped to the model's range), r = ECT's mapping at this stage
            lo, hi = self.formulation.supported_range
            sigma = (torch.randn(B, generator=g) * d.p_std + d.p_mean).exp().clamp(max(lo, 1e-6), hi)
            sigma_to = ect_r(sigma, step // d.double, q=d.q, mapping=d.mapping, k=d.k, b=d.b)
        to = dict(device=self.device, non_blocking=True)
        sigma, sigma_to = sigma[part].to(**to), sigma_to[part].to(**to)

        def micro_loss(m: int, rows: slice) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
            cond = {key: value[rows] for key, value in conds.items()}
            loss = self._loss(images[rows], noise[rows], sigma[rows], sigma_to[rows], cond, step, m)
            return loss, (loss,)

        (losses,), applied = self._step_over_micro_batches(step, micro_loss)
        return (losses, sigma), applied

    def _loss(self, y, z, sigma, sigma_to, cond, step: int, micro: int) -> torch.Tensor:
        """Per-sample loss of one micro-batch (the formula of the module docstring)."""
        d, view = self.config.distill, (-1,) + (1,) * (y.ndim - 1)
        seed = self._dropout_seed(step, micro)
        if d.method == "cd":
            x = y + sigma.reshape(view) * z  # x_{n+1} = y + sigma_{n+1} z
            with torch.no_grad():  # x_hat_n: the frozen teacher's ODE step (Song et al. 2023, Algorithm 2)
                x_to = teacher_step(self.teacher, x, sigma, sigma_to, d.solver, **cond)
            torch.manual_seed(seed)  # the target first (see below), then the student with the same dropout mask
            with torch.no_grad():
                target = self.objective(x_to, sigma_to, **cond)  # f_theta-(x_hat_n, sigma_n), theta- = sg(theta)
            torch.manual_seed(seed)
            pred = self.model(x, sigma, **cond)  # f_theta(x_{n+1}, sigma_{n+1})
            return consistency_distance(pred, target, d.metric, d.huber_c)  # lambda(sigma_n) = 1
        # The stop-gradient target is evaluated before the student: a network that renormalizes its weights in place
        # when called in training mode (edm2's forced weight normalization) would otherwise change, after the
        # student's call, weights its backward pass still needs.
        positive = sigma_to > 0
        torch.manual_seed(seed)  # the same dropout mask for both calls (ECT reseeds the RNG)
        with torch.no_grad():  # sg f(y + r n, r); at r = 0 the target is y itself (ECT's loss.py)
            r = torch.where(positive, sigma_to, sigma)  # rows with r = 0 are evaluated at t and then replaced
            target = torch.nan_to_num(self.objective(y + r.reshape(view) * z, r, **cond))
            target = torch.where(positive.reshape(view), target.to(y.dtype), y)
        torch.manual_seed(seed)
        pred = self.model(y + sigma.reshape(view) * z, sigma, **cond)  # f(y + t n, t)
        return consistency_distance(pred, target, d.metric, d.huber_c) / (sigma - sigma_to)  # ECT's 1 / (t - r)


# ------------------------------------------------------------------------------------------------ a new run
def distill_config(teacher: Config, checkpoint: Path, method: str, *, steps: int, epsilon: float, dim: int,
                   metric: str | None = None, overrides: list[str] = ()) -> Config:
    """The distilled run's config: the teacher's (no augmentation, no reflow pairs, fixed loss weighting) for
    ``steps`` steps, its formulation given the boundary ``epsilon`` (:class:`Consistency`; 0 = the teacher's own),
    sampling by the ``consistency`` sampler with 2 steps (levels: Karras from sigma_max down to :data:`MID_SIGMA`),
    a ``distill`` section with the method's defaults (cd: l2; ect: ECT's ||.||; ``dim`` sets improved CT's c), then
    ``overrides``."""
    raw = teacher.to_dict()
    raw["data"] = {k: v for k, v in raw["data"].items() if k != "pairs"}
    raw["training"] = {**raw["training"], "steps": int(steps), "augment": None, "loss_weighting": "fixed"}
    if method == "ect":  # ECT's loss divides a difference of two outputs by t - r, which shrinks by q per stage to
        raw["training"]["precision"] = "fp32"  # below bf16's resolution: fp32 unless --set says otherwise
    if teacher.training.augment is not None:  # the same network: its augment input stays (fed zeros, as sampling does)
        raw["network"] = {**raw["network"], "augment_dim": AUGMENT_LABEL_DIM}
    if epsilon > 0:
        formulation = teacher.formulation()
        if type(formulation) is not EDM:
            raise UserError(f"a boundary epsilon > 0 needs an EDM teacher (Song et al.'s parametrization), this one "
                            f"is {formulation.name}: use --epsilon 0 (its own c_skip(0) = 1, c_out(0) = 0)")
        params = {k: v for k, v in formulation.to_config().items() if k != "type"}
        try:
            raw["diffusion"] = Consistency(**params, epsilon=float(epsilon)).to_config()
        except ValueError as e:
            raise UserError(f"--epsilon {epsilon}: {e}") from None
    sampling = {k: v for k, v in raw["sampling"].items() if k not in ("sigmas", "s_churn", "eta")}
    raw["sampling"] = {**sampling, "sampler": "consistency", "steps": 2, "schedule": "auto",
                       "sigma_min": MID_SIGMA, "sigma_max": None, "rho": None, "options": {"epsilon": float(epsilon)}}
    metric = metric or ("l2" if method == "cd" else "pseudo_huber")
    huber_c = HUBER_PER_SQRT_D * math.sqrt(dim) if (metric == "pseudo_huber" and method == "cd") else 0.0
    raw["distill"] = {"method": method, "teacher": str(Path(checkpoint).resolve()), "metric": metric,
                      "huber_c": huber_c}
    return parse_with_overrides(raw, list(overrides), parse_config, SECTIONS, source="the distillation configuration")


def distill(run: str | Path, out: str | Path, *, method: str, steps: int = DEFAULT_STEPS, metric: str | None = None,
            epsilon: float | None = None, overrides: list[str] = (), device=None, progress: bool = True,
            log=print) -> dict:
    """Distill ``run`` into the new run ``out`` by ``method`` (``cd`` or ``ect``; module docstring); returns the
    training summary. ``epsilon``: the student's boundary (default: cd of an EDM teacher Song et al.'s 0.002, else
    0 = the teacher's own preconditioning). An ``out`` that has started is resumed with its stored config."""
    if method not in METHODS:
        raise UserError(f"unknown distillation method {method!r}: expected {' or '.join(METHODS)}")
    out = Path(out)
    rundir = RunDir(out)
    if rundir.config.is_file():  # started before: resume it as it is
        config = load_config(rundir.config, list(overrides))
        if config.distill is None:
            raise UserError(f"{out} is a run but not a distilled run (its config has no distill section); use a new "
                            f"--out")
        if config.distill.method != method:
            raise UserError(f"{out} was distilled with --method {config.distill.method}, not {method}: resume it with "
                            f"--method {config.distill.method} or use a new --out")
        log(f"resuming {out} with its stored configuration ({rundir.config})")
        trainer = DistillTrainer(config, out, device=device, progress=progress, log=log)
        if not rundir.list_checkpoints():
            raise UserError(f"{out} has a config but no checkpoint (its start was interrupted): remove {out} and run "
                            f"distill again")
        return trainer.train()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"--steps {steps!r}: expected an integer >= 1")
    checkpoint = resolve_checkpoint(Path(run))
    if check_run_checkpoint(checkpoint)[1].get("kind") is not None:
        raise UserError(f"{run} is not a diffusion run (it holds an autoencoder from train-vae): distill a run "
                        f"trained with `elucidate train`")
    teacher = load_run(checkpoint, ema=True, device=device)
    if teacher.decode is not None:
        raise UserError(f"{run} is a latent run: distillation supports pixel runs only")
    if teacher.config.distill is not None:
        log(f"note: {run} is itself distilled ({teacher.config.distill.method}); distilling it again")
    if epsilon is None:
        epsilon = CD_EPSILON if (method == "cd" and type(teacher.config.formulation()) is EDM) else 0.0
    if epsilon < 0:
        raise UserError(f"--epsilon {epsilon}: expected a number >= 0")
    dim = teacher.info.channels * math.prod(teacher.info.resolution)
    config = distill_config(teacher.config, checkpoint, method, steps=steps, epsilon=epsilon, dim=dim, metric=metric,
                            overrides=overrides)
    created = not out.exists()
    trainer = DistillTrainer(config, out, device=device, progress=progress, log=log)
    ema = {k: v.detach().clone() for k, v in teacher.denoiser.net.state_dict().items()}
    try:
        trainer.start_from({"net": ema, "ema": ema}, source=f"{checkpoint} (EMA)")
    except BaseException:  # nothing half-written: a run that could not start is not left behind
        trainer.close()
        if created and trainer.dist.is_main:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return trainer.train()
