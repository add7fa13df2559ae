"""Export an elucidate run to a diffusers ``DDPMPipeline`` folder (``elucidate export RUN --diffusers OUT``).

Exportable: runs whose network is ``diffusers_unet2d`` (a diffusers ``UNet2DModel``) and whose formulation
is ``DDPM`` (no shift) or ``Flow`` (any shift). The folder holds the UNet (EMA weights by default,
safetensors), a scheduler config and ``model_index.json`` naming ``DDPMPipeline``; it is written to a temporary
folder next to ``OUT`` and renamed into place, so ``OUT`` is either complete or absent.

* DDPM: a ``DDPMScheduler`` config equal to the run's DDPM (:func:`~elucidate.interop.diffusers.scheduler_config`).
* Flow: a ``FlowMatchEulerDiscreteScheduler`` config (``num_train_timesteps`` 1000, the run's ``shift``, no
  dynamic shifting). ``DDPMPipeline`` runs it unchanged: it draws unit noise (x_t at t = 1 is the noise), calls
  ``scheduler.set_timesteps(N)``, ``unet(x_t, 1000 t)`` (the velocity Flow's network predicts) and
  ``scheduler.step``, which is the flow-matching Euler step. diffusers has no flow pipeline for a ``UNet2DModel``.
  The pipeline's default levels (``set_timesteps(N)``: t = linspace(1, 1/1000 shifted, N) shifted, then 0) are
  not ``Flow.sampling_sigmas(N)`` (t = 0.999, then 1 - k/N, shifted, then 0): on the same levels the two sample
  alike to float32 round-off; on their own defaults they differ slightly (measured in docs/flow.md).

``DDPMPipeline`` ends with ``(x / 2 + 0.5).clamp(0, 1)``, i.e. expects data normalized to [-1, 1] (elucidate's
default for images); other normalizations export with a warning.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

from ..errors import UserError
from ..formulations import DDPM, Flow, Shifted
from .diffusers import ELUCIDATE_KEY, scheduler_config

__all__ = ["export_diffusers", "EXPORTABLE"]

EXPORTABLE = "runs with network.arch diffusers_unet2d and diffusion.type DDPM (without shift) or Flow"
#: The FlowMatchEulerDiscreteScheduler of a Flow: diffusers' flow timesteps are 1000 t, as Flow's c_noise.
FLOW_TIMESTEPS = 1000


def _check_exportable(run: Path, config) -> None:
    problems = []
    arch = config.network.get("arch", "unet")
    if arch != "diffusers_unet2d":
        problems.append(f"its network is {arch!r}")
    formulation = config.formulation()
    if type(formulation) not in (DDPM, Flow):
        problems.append(f"its formulation is {getattr(formulation, 'name', type(formulation).__name__)}"
                        + (" with a shift" if isinstance(formulation, Shifted) else ""))
    if problems:
        raise UserError(f"{run} cannot be exported to diffusers ({' and '.join(problems)}); exportable: {EXPORTABLE}")


def _scheduler(diffusers, formulation):
    """The diffusers scheduler of an exportable formulation (DDPM or Flow)."""
    if type(formulation) is Flow:
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=FLOW_TIMESTEPS,
                                                         shift=float(formulation.shift), use_dynamic_shifting=False)
    return diffusers.DDPMScheduler(**scheduler_config(formulation))


def _replace_dir(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise UserError(f"{out} already exists; remove it or pass --force to replace it")
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def export_diffusers(run: str | Path, out: str | Path, *, ema: bool = True, force: bool = False) -> Path:
    """Write ``out`` as a diffusers DDPMPipeline folder from a run directory or checkpoint; returns ``out``.
    ``diffusers.DDPMPipeline.from_pretrained(out)`` loads it (and samples it, for unconditional models), with a
    ``DDPMScheduler`` for DDPM runs and a ``FlowMatchEulerDiscreteScheduler`` for Flow runs."""
    from ..config import parse_config
    from ..nets.diffusers_unet import import_diffusers
    from ..run.checkpoint import load_checkpoint
    from ..run.model import load_run, resolve_checkpoint

    run, out = Path(run), Path(out)
    ckpt = resolve_checkpoint(run)
    _, meta = load_checkpoint(ckpt)
    config = parse_config(meta["config"])
    _check_exportable(run, config)
    diffusers = import_diffusers()
    normalizer = meta.get("normalizer") or {}
    if normalizer and normalizer.get("mode") != "minus_one_one":
        warnings.warn(f"the run's data normalization is {normalizer.get('mode')!r}, but DDPMPipeline turns samples "
                      f"into images assuming [-1, 1]; the UNet and scheduler are exact, its images are not",
                      stacklevel=2)
    loaded = load_run(ckpt, ema=ema)
    net = loaded.denoiser.net
    pipe = diffusers.DDPMPipeline(unet=net.unet, scheduler=_scheduler(diffusers, loaded.denoiser.formulation))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        provenance = {"run": str(run), "checkpoint": ckpt.name, "step": loaded.step, "weights": "ema" if ema else "net"}
        if net.label_dim:  # what diffusers' config cannot say: which class embedding means "no label"
            provenance.update(label_dim=net.label_dim, null_class=net.null_class)
        unet_config = tmp / "unet" / "config.json"
        data = json.loads(unet_config.read_text())
        data[ELUCIDATE_KEY] = provenance
        unet_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
