"""EMA of the weights: one concept with two kinds.

* The **half-life EMA** (:class:`EMA`, NVlabs/edm's): one averaged copy of the network, updated every step with
  a half-life in images (``training.ema_halflife``, ramped up by ``ema_rampup``); the ``ema.*`` tensors of
  every checkpoint and what ``sample``/``eval`` use by default (``--no-ema``: the raw weights).
* The **post-hoc power EMA** (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
  Models", EDM2, Section 3 and Appendix C; ``training.ema: {type: power, stds: [...]}``): a few power-function
  averages tracked during training and stored as snapshots in ``RUN/phema/``, from which the EMA of *any*
  length is rebuilt afterwards (``elucidate ema RUN --std S``, ``--ema-std S``).

A power-function EMA with exponent gamma averages the weights seen up to training time t with the
profile p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (eq. 121); its width is
the relative standard deviation sigma_rel (eq. 123). During training, :class:`PowerEMA` tracks a few
such averages (e.g. sigma_rel 0.05 and 0.10); :func:`save_snapshot` stores them now and then; after
training, :func:`reconstruct` combines the snapshots by least squares over their profiles into the
EMA of *any* sigma_rel at the last snapshot time (Algorithm 3).

Time t counts optimizer steps: the k-th update (1-based) is at t = k. The discrete tracker is then
exactly the continuous power EMA of the piecewise-constant weight trajectory (weights theta_k held
on (k - 1, k]), so the continuous closed forms of the paper apply without approximation. Any unit
proportional to steps (images with a constant batch size) gives identical betas.
"""
from __future__ import annotations

import copy
import json
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config.training import MAX_SIGMA_REL
from ..errors import UserError
from ..run.checkpoint import read_header, save_checkpoint
from ..run.model import load_run
from ..run.rundir import RunDir
from ..runtime.files import atomic_path

__all__ = ["EMA", "MAX_SIGMA_REL", "PowerEMA", "SnapshotInfo", "gamma_to_sigma_rel", "list_snapshots",
           "power_beta", "profile", "profile_inner", "read_snapshot_info", "reconstruct",
           "save_snapshot", "sigma_rel_to_gamma", "snapshot_name", "solve_weights", "PREFIX", "RunPowerEMA",
           "check_std", "ema_checkpoint", "write_ema_checkpoint"]


# ----------------------------------------------------------------------------------- the half-life EMA
class EMA:
    """Keeps ``module``, an averaged copy of a network.

    Each update uses beta = 0.5 ** (batch_size / halflife), where the half-life (in images) is
    optionally ramped up as ``min(halflife, rampup * images_seen)`` so early weights fade fast.
    """

    def __init__(self, net: nn.Module, halflife: float, rampup: float | None = 0.05):
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        self.halflife = float(halflife)
        self.rampup = rampup
        self._tensors: tuple | None = None  # (source net id, tensor lists): module traversal is slow

    def beta(self, images_seen: int, batch_size: int) -> float:
        """The decay used after ``images_seen`` images with this batch size."""
        halflife = self.halflife
        if self.rampup is not None:
            halflife = min(halflife, images_seen * self.rampup)
        return 0.5 ** (batch_size / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, net: nn.Module, images_seen: int, batch_size: int) -> None:
        """Move the average towards ``net``'s current weights (buffers are copied)."""
        beta = self.beta(images_seen, batch_size)
        if self._tensors is None or self._tensors[0] != id(net):
            self._tensors = (id(net), list(self.module.parameters()), [p.detach() for p in net.parameters()],
                             list(self.module.buffers()), list(net.buffers()))
        _, averaged, current, ema_buffers, buffers = self._tensors
        if averaged:
            torch._foreach_lerp_(averaged, [p.to(q.dtype) for p, q in zip(current, averaged)], 1 - beta)
        for b_ema, b in zip(ema_buffers, buffers):
            b_ema.copy_(b)


# ----------------------------------------------------------------------------------- the power EMA: math
SNAPSHOT_FORMAT = "elucidate-phema-snapshot/1"
_NAME = re.compile(r"^phema-(\d{8,})\.safetensors$")


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative std of the power profile with exponent ``gamma`` (EDM2 eq. 123)."""
    if not gamma > 0 or not math.isfinite(gamma):
        raise UserError(f"power EMA exponent gamma={gamma!r} must be a finite number > 0")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent gamma of the power profile with relative std ``sigma_rel`` in (0, 1/sqrt(12)):
    the largest real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + 12 - sigma_rel^-2
    (EDM2 eq. 125-126, Algorithm 2)."""
    if not isinstance(sigma_rel, numbers.Real) or not 0 < sigma_rel < MAX_SIGMA_REL:
        raise UserError(f"EMA relative std sigma_rel={sigma_rel!r} must be in (0, {MAX_SIGMA_REL:.4f})")
    inv = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(t_prev: float, t: float, gamma: float) -> float:
    """Decay of the power EMA from time ``t_prev`` to ``t`` (EDM2 eq. 127 generalised to any step):
    beta = (t_prev / t)^(gamma + 1); for consecutive steps (1 - 1/t)^(gamma + 1)."""
    if not 0 <= t_prev < t:
        raise UserError(f"power EMA time must increase: t_prev={t_prev!r}, t={t!r}")
    return (t_prev / t) ** (gamma + 1)


def profile(tau: Any, t: float, gamma: float) -> np.ndarray:
    """Weight function p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t], else 0
    (eq. 121); integrates to 1 over tau."""
    tau = np.asarray(tau, dtype=np.float64)
    inside = (tau >= 0) & (tau <= t)
    return np.where(inside, (gamma + 1) / t * (np.clip(tau, 0, t) / t) ** gamma, 0.0)


def profile_inner(t_a: Any, gamma_a: Any, t_b: Any, gamma_b: Any) -> np.ndarray:
    """Closed-form inner product <p_{t_a,gamma_a}, p_{t_b,gamma_b}> = integral of the product of two
    power profiles (broadcasts; EDM2 Appendix C.3, Algorithm 3):
    (ga + 1)(gb + 1) / ((ga + gb + 1) t_max) * (t_min / t_max)^g_max, g_max the exponent of the
    profile ending at t_max."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    t_min, t_max = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_long = np.where(t_a >= t_b, gamma_a, gamma_b)
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_max) * (t_min / t_max) ** g_long


def solve_weights(snapshot_times: Sequence[float], snapshot_gammas: Sequence[float], target_time: float,
                  target_gamma: float, *, normalize: bool = True) -> np.ndarray:
    """Coefficients x [n] such that sum_i x_i p_{t_i,gamma_i} is the least-squares (L2 over tau) fit
    of p_{target_time,target_gamma} (EDM2 Algorithm 3: solve A x = b with A_ij = <p_i, p_j>,
    b_i = <p_i, p_target>). With ``normalize`` the coefficients are scaled to sum to 1, so the
    reconstructed profile integrates to exactly 1 like every EMA profile."""
    t = np.asarray(snapshot_times, dtype=np.float64).reshape(-1)
    g = np.asarray(snapshot_gammas, dtype=np.float64).reshape(-1)
    if t.shape != g.shape or t.size == 0:
        raise UserError(f"solve_weights: need as many snapshot times as gammas (got {t.size} and {g.size})")
    if not (t > 0).all() or not (g > 0).all() or not target_time > 0 or not target_gamma > 0:
        raise UserError("solve_weights: times and gammas must be > 0")
    scale = float(target_time)  # work in units of the target time (the solution is scale-free)
    ts, tr = t / scale, 1.0
    A = profile_inner(ts[:, None], g[:, None], ts[None, :], g[None, :])
    b = profile_inner(ts, g, tr, float(target_gamma))
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    if normalize:
        x = x / x.sum()
    return x


class PowerEMA:
    """Power-function EMAs of ``net``'s parameters, one averaged copy per relative std in ``stds``.

    Call :meth:`update` after every optimizer step k with ``t = k`` (also after a step the NaN guard
    skipped: the weights did not change and the profile stays exact). If calls are missed, the
    current weights are taken to have held since the last update. Buffers are copied, not averaged.
    """

    def __init__(self, net: nn.Module, stds: Sequence[float] = (0.05, 0.10)) -> None:
        if isinstance(stds, (int, float)) or len(stds) == 0:
            raise UserError(f"power EMA stds={stds!r} must be a non-empty list of relative stds")
        if len(set(stds)) != len(stds):
            raise UserError(f"power EMA stds={list(stds)} has duplicates")
        self.stds = tuple(float(s) for s in stds)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.stds)
        self.t = 0.0
        params = dict(net.named_parameters())
        self.param_names = list(params)
        self.buffer_names = [k for k in net.state_dict() if k not in params]
        with torch.no_grad():
            self.averages = [[params[n].detach().clone() for n in self.param_names] for _ in self.stds]
            state = net.state_dict()
            self.buffers = [state[n].detach().clone() for n in self.buffer_names]
        self._source: tuple | None = None  # (id of the net, its parameters, its buffers), see update()

    @torch.no_grad()
    def update(self, net: nn.Module, t: float) -> None:
        """Fold ``net``'s current weights in at time ``t`` (> the previous update's time)."""
        if self._source is None or self._source[0] != id(net):  # module traversal is slow: cache it
            params, buffers = dict(net.named_parameters()), dict(net.named_buffers())
            if list(params) != self.param_names or any(n not in buffers for n in self.buffer_names):
                raise UserError(f"PowerEMA.update: the network's parameters differ from the tracked ones "
                                f"({len(params)} vs {len(self.param_names)} tensors)")
            self._source = (id(net), [p.detach() for p in params.values()], [buffers[n] for n in self.buffer_names])
        _, current, buffers = self._source
        betas = [power_beta(self.t, float(t), gamma) for gamma in self.gammas]
        for beta, averaged in zip(betas, self.averages):
            if averaged:
                torch._foreach_lerp_(averaged, [p.to(q.dtype) for p, q in zip(current, averaged)], 1.0 - beta)
        for mine, theirs in zip(self.buffers, buffers):
            mine.copy_(theirs)
        self.t = float(t)

    def averaged_state_dict(self, index: int) -> dict[str, Tensor]:
        """The full network state dict (averaged parameters + current buffers) of profile ``index``."""
        out = dict(zip(self.param_names, self.averages[index]))
        out.update(zip(self.buffer_names, self.buffers))
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors (safetensors-ready): ``t``, ``stds``, ``avg.{k}.{name}``, ``buf.{name}``."""
        out = {"t": torch.tensor(self.t, dtype=torch.float64), "stds": torch.tensor(self.stds, dtype=torch.float64)}
        for k, averaged in enumerate(self.averages):
            out.update({f"avg.{k}.{n}": v for n, v in zip(self.param_names, averaged)})
        out.update({f"buf.{n}": v for n, v in zip(self.buffer_names, self.buffers)})
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from :meth:`state_dict` (bit-exact); the stds and tensor names must match."""
        expected = set(self.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise UserError(f"power EMA state does not match the network: missing {missing[:3]}, "
                            f"unexpected {extra[:3]}")
        stds = tuple(float(s) for s in state["stds"].tolist())
        if stds != self.stds:
            raise UserError(f"power EMA state has stds {list(stds)}, the tracker has {list(self.stds)}")
        for k, averaged in enumerate(self.averages):
            for n, v in zip(self.param_names, averaged):
                v.copy_(state[f"avg.{k}.{n}"])
        for n, v in zip(self.buffer_names, self.buffers):
            v.copy_(state[f"buf.{n}"])
        self.t = float(state["t"].item())


# ----------------------------------------------------------------------------------- the power EMA: snapshots
@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot file's metadata says: its training ``step`` and EMA ``time``, the profiles
    (``stds``, ``gammas``) and the caller's ``meta``."""

    path: Path
    step: int
    time: float
    stds: tuple[float, ...]
    gammas: tuple[float, ...]
    meta: dict


def snapshot_name(step: int) -> str:
    """The file name of the snapshot after ``step`` steps."""
    return f"phema-{step:08d}.safetensors"


def save_snapshot(path: str | Path, tracker: PowerEMA, step: int, meta: dict | None = None) -> Path:
    """Write every profile's averaged parameters (``{k}.{name}``, k indexing ``tracker.stds``) and
    the buffers (``buf.{name}``, once) as safetensors, atomically, with JSON metadata (step, time,
    stds, gammas, ``meta``)."""
    if tracker.t <= 0:
        raise UserError("save_snapshot: the tracker has not been updated yet (time 0)")
    tensors = {f"buf.{n}": v for n, v in zip(tracker.buffer_names, tracker.buffers)}
    for k, averaged in enumerate(tracker.averages):
        tensors.update({f"{k}.{n}": v for n, v in zip(tracker.param_names, averaged)})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    info = {"format": SNAPSHOT_FORMAT, "step": int(step), "time": tracker.t, "stds": list(tracker.stds),
            "gammas": list(tracker.gammas), "meta": meta or {}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"elucidate-phema": json.dumps(info)})
    return Path(path)


def read_snapshot_info(path: str | Path) -> SnapshotInfo:
    """A snapshot's metadata (reads the header only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"power EMA snapshot {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("elucidate-phema")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"power EMA snapshot {path} is not a readable safetensors file ({type(e).__name__})") from None
    info = json.loads(raw) if raw is not None else {}
    if info.get("format") != SNAPSHOT_FORMAT:
        raise UserError(f"{path} is not a power EMA snapshot (format {info.get('format')!r})")
    return SnapshotInfo(path, int(info["step"]), float(info["time"]), tuple(info["stds"]), tuple(info["gammas"]),
                        info["meta"])


def list_snapshots(directory: str | Path) -> list[Path]:
    """Snapshot files ``phema-XXXXXXXX.safetensors`` in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def reconstruct(snapshots: str | Path | Sequence[str | Path], target_std: float, *,
                target_time: float | None = None) -> dict[str, Tensor]:
    """The network state dict of the power EMA with relative std ``target_std`` at ``target_time``
    (default: the last snapshot's time), reconstructed from snapshot files (a directory or a list
    of paths) by :func:`solve_weights`. Only snapshots up to ``target_time`` are used; buffers come
    from the snapshot at ``target_time``. Accumulates in float64; returns the snapshot dtype."""
    paths = list_snapshots(snapshots) if isinstance(snapshots, (str, Path)) else [Path(p) for p in snapshots]
    if not paths:
        raise UserError(f"no power EMA snapshots (phema-*.safetensors) in {snapshots}")
    infos = sorted((read_snapshot_info(p) for p in paths), key=lambda i: i.time)
    times = sorted({i.time for i in infos})
    if target_time is None:
        target_time = times[-1]
    if target_time not in times:
        raise UserError(f"target_time={target_time} is not the time of a snapshot; snapshot times: {times}")
    infos = [i for i in infos if i.time <= target_time]
    gamma = sigma_rel_to_gamma(target_std)
    times = [i.time for i in infos for _ in i.gammas]
    coef = solve_weights(times, [g for i in infos for g in i.gammas], target_time, gamma)
    out: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    c = iter(coef.tolist())
    for info in infos:
        with safe_open(str(info.path), framework="pt") as f:
            keys = list(f.keys())
            for k in range(len(info.gammas)):
                x, prefix = next(c), f"{k}."
                names = {key[len(prefix):] for key in keys if key.startswith(prefix)}
                if dtypes and names != set(dtypes):
                    raise UserError(f"power EMA snapshot {info.path} holds other parameters than "
                                    f"{infos[0].path} (e.g. {sorted(names ^ set(dtypes))[:3]})")
                for key in (key for key in keys if key.startswith(prefix)):
                    name, value = key[len(prefix):], f.get_tensor(key)
                    dtypes[name] = value.dtype
                    out[name] = out.get(name, 0) + x * value.double()
            if info is infos[-1]:  # buffers are copied, not averaged: take those at target_time
                out.update({key[4:]: f.get_tensor(key) for key in keys if key.startswith("buf.")})
    return {name: value.to(dtypes[name]) if name in dtypes else value for name, value in out.items()}


# ----------------------------------------------------------------------------------- the power EMA of a run
#: prefix of the tracker's tensors in a checkpoint.
PREFIX = "phema."


class RunPowerEMA:
    """The power EMA of a run configured by ``training.ema`` (a validated dict); with ``ema=None`` every
    method does nothing (the run has no power EMA and its checkpoints no ``phema.*`` tensors)."""

    def __init__(self, net: nn.Module, ema: dict | None, run_dir: Path, is_main: bool = True) -> None:
        self.tracker = PowerEMA(net, ema["stds"]) if ema else None
        self.every = int(ema["snapshot_every"]) if ema else 0
        self.folder, self.is_main = RunDir(run_dir).phema, is_main

    def after_step(self, net: nn.Module, step: int, last: bool = False) -> Path | None:
        """Fold in the weights after optimizer step ``step`` (1-based, skipped steps too: t = step, as
        :class:`PowerEMA` expects); write a snapshot every ``snapshot_every`` steps and at the last one."""
        if self.tracker is None:
            return None
        self.tracker.update(net, float(step))
        return self.maybe_snapshot(step, last)

    def maybe_snapshot(self, step: int, last: bool = False) -> Path | None:
        """Write ``phema/phema-XXXXXXXX.safetensors`` every ``snapshot_every`` steps and at ``last`` (rank 0)."""
        if self.tracker is None or not self.is_main or step <= 0 or not (step % self.every == 0 or last):
            return None
        path = self.folder / snapshot_name(step)
        if path.exists():
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        return save_snapshot(path, self.tracker, step)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The tracker's state as checkpoint tensors named ``phema.*`` (none without a tracker)."""
        if self.tracker is None:
            return {}
        return {PREFIX + k: v for k, v in self.tracker.state_dict().items()}

    def resume(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Restore from a checkpoint's ``phema.*`` tensors (bit-exact); drop snapshots after ``step``."""
        if self.tracker is None:
            return
        self.tracker.load_state_dict({k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)})
        self.drop_snapshots_after(step)

    def drop_snapshots_after(self, step: int) -> None:
        """Remove snapshots newer than the checkpoint being resumed (they are rewritten identically)."""
        if self.is_main and self.folder.is_dir():
            for p in self.folder.glob("phema-*.safetensors"):
                if p.stem[6:].isdigit() and int(p.stem[6:]) > step:
                    p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- post-hoc reconstruction
def check_std(std: float) -> float:
    """``std`` if it is a valid relative EMA std, else a one-line UserError."""
    if isinstance(std, bool) or not isinstance(std, numbers.Real) or not 0 < std < MAX_SIGMA_REL:
        raise UserError(f"EMA std {std!r} must be in (0, {MAX_SIGMA_REL:.4f}) (EDM2's sigma_rel)")
    return float(std)


def _snapshots(run: Path) -> list[Path]:
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run} is not a run directory (post-hoc EMA needs the run's phema/ snapshots)")
    snaps = list_snapshots(RunDir(run).phema)
    if not snaps:
        raise UserError(f"{run} has no power EMA snapshots in {RunDir(run).phema} (train with training.ema: "
                        f"{{type: power, stds: [0.05, 0.10]}})")
    return snaps


def write_ema_checkpoint(run: str | Path, std: float, out: str | Path | None = None, *,
                         step: int | None = None) -> Path:
    """Reconstruct the EMA of relative std ``std`` at the run's last snapshot (or at the snapshot of training step
    ``step``: the run as it was then, e.g. an early sibling to guide the final model with) and write it as a
    checkpoint (``ema.*`` and ``net.*`` = the reconstruction; config, data and normalizer of the run's latest
    checkpoint); default ``RUN/phema/ema-{std:.3f}[-step{step:08d}].safetensors`` (:meth:`RunDir.ema_checkpoint`)."""
    run, std = Path(run), check_std(std)
    snaps = _snapshots(run)
    infos = [read_snapshot_info(s) for s in snaps]
    if step is None:
        at = infos[-1]
    else:
        at = next((i for i in infos if i.step == step), None)
        if at is None:
            raise UserError(f"--step {step}: {RunDir(run).phema} has snapshots at steps "
                            f"{', '.join(str(i.step) for i in infos)} only")
    state = reconstruct(snaps, std, target_time=at.time)
    loaded = load_run(run, ema=True)
    net = loaded.denoiser.net
    missing = set(net.state_dict()) ^ set(state)
    if missing:
        raise UserError(f"the snapshots in {RunDir(run).phema} do not fit the run's network "
                        f"(e.g. {sorted(missing)[:2]})")
    net.load_state_dict(state)
    _, meta = read_header(loaded.checkpoint)
    meta = {k: v for k, v in meta.items() if k not in ("optimizer", "crc32", "format")}
    meta.update(step=at.step, phema={"std": std, "snapshot_step": at.step,
                                     "snapshots": sum(i.time <= at.time for i in infos)})
    path = Path(out) if out is not None else RunDir(run).ema_checkpoint(std, step=step)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, net=net, ema=net, optimizer=None, meta=meta)


def ema_checkpoint(run: str | Path, std: float) -> Path:
    """The cached reconstruction ``RUN/phema/ema-{std:.3f}.safetensors`` if it is up to date with the
    run's last snapshot, else a fresh one."""
    run, std = Path(run), check_std(std)
    last = read_snapshot_info(_snapshots(run)[-1])
    path = RunDir(run).ema_checkpoint(std)
    if path.is_file():
        try:
            cached = read_header(path)[1].get("phema") or {}
        except Exception:  # damaged cache: rebuild it
            cached = {}
        if cached.get("snapshot_step") == last.step and cached.get("std") == std:
            return path
    return write_ema_checkpoint(run, std)
