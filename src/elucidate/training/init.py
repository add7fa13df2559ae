"""Fine-tuning: a new run that starts from existing weights (``elucidate train CONFIG --out RUN --init SOURCE``).

What SOURCE can be, and what the run's network and EMA start from (the optimizer, the step and the power EMA
start from zero; the start is the run's step-0 checkpoint, so a run stopped before its first checkpoint resumes
from it):

* an elucidate **run directory** (its newest usable checkpoint) or **checkpoint file**: the network and the EMA
  start from its EMA weights (what sampling uses; edm's ``--transfer`` does the same). With ``ema=True``
  (``--init-ema``) the network starts from its raw weights and the EMA from its EMA: both continue as they were;
* a **diffusers folder**: a ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
  or a pipeline folder with ``unet/``; the run's network must be ``arch: diffusers_unet2d`` with the same
  configuration (its formulation should be the scheduler's: see docs/diffusers.md);
* an **exported NVlabs/edm network** (``.safetensors`` of edm's ``net.model.state_dict()``, docs/edm.md): the
  run's network must be ``arch: ddpmpp``, ``ncsnpp`` or ``adm`` with the same arguments; or an **exported
  NVlabs/edm2 UNet** (``net.unet.state_dict()`` or the whole Precond's): ``arch: edm2``.

The tensors are read without unpickling anything and must fit the run's network exactly: a one-line error names
the first tensor that is missing, extra or of another shape (:func:`~.loop.load_matching`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..run.checkpoint import load_checkpoint
from ..run.model import CHECKPOINT_KIND, resolve_checkpoint
from ..run.rundir import RunDir

__all__ = ["InitSource", "resolve_source", "init_states", "start_from_weights", "check_new_run", "SOURCE_KINDS"]

SOURCE_KINDS = ("run", "checkpoint", "diffusers", "edm", "edm2")
#: What each kind needs of the run's network.
_ARCHS = {"diffusers": ("diffusers_unet2d",), "edm": ("ddpmpp", "ncsnpp", "adm"), "edm2": ("edm2",)}
_EXPECTED = ("expected a run directory, a checkpoint, a diffusers UNet folder or an exported edm/edm2 network "
             ".safetensors")
_EDM2_PRECOND = ("logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight")


@dataclass(frozen=True)
class InitSource:
    """What ``--init SOURCE`` is: ``kind`` (one of :data:`SOURCE_KINDS`) and ``path`` (the checkpoint of a run,
    the UNet folder of a diffusers pipeline, else SOURCE itself)."""

    kind: str
    path: Path

    def describe(self, ema: bool = False) -> str:
        """SOURCE and what is taken from it (the ``source`` of the run's start_from event)."""
        if self.kind in ("run", "checkpoint"):
            return f"{self.path} ({'network and EMA' if ema else 'EMA'})"
        return f"{self.path} ({self.kind})"


def _diffusers_unet_dir(path: Path) -> Path | None:
    """The UNet folder of a diffusers pipeline (``model_index.json`` + ``unet/``) or UNet folder, else None."""
    if (path / "model_index.json").is_file():
        return path / "unet"
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        return path
    return None


def resolve_source(source: str | os.PathLike) -> InitSource:
    """What SOURCE is (cheap: only headers are read); a one-line UserError if it is none of the kinds."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"--init {source}: does not exist ({_EXPECTED})")
    if path.is_dir():
        unet = _diffusers_unet_dir(path)
        if unet is not None:
            return InitSource("diffusers", unet)
        return _elucidate(path, "run")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"--init {source}: expected a .safetensors file ({_EXPECTED}); elucidate never unpickles "
                        f"a .pt/.pkl: export its tensors with safetensors (docs/edm.md)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad files
        raise UserError(f"--init {source}: not a readable safetensors file ({type(e).__name__})") from None
    if "elucidate" in metadata:
        return _elucidate(path, "checkpoint")
    names = {k.removeprefix("unet.").removeprefix("model.") for k in keys}
    if "emb_fourier.freqs" in names:
        return InitSource("edm2", path)
    if "map_layer0.weight" in names:
        return InitSource("edm", path)
    raise UserError(f"--init {source}: neither an elucidate checkpoint nor an exported edm/edm2 network (it has "
                    f"no {'tensors' if not keys else 'map_layer0.weight or emb_fourier.freqs'})")


def _elucidate(path: Path, kind: str) -> InitSource:
    ckpt = resolve_checkpoint(path)  # a run's newest usable checkpoint; one-line errors otherwise
    from ..run.checkpoint import read_header

    if read_header(ckpt)[1].get("kind") == CHECKPOINT_KIND:
        raise UserError(f"--init {path}: {ckpt.name} is an autoencoder (train-vae) checkpoint, not a diffusion model "
                        f"(a latent run takes it as latent.vae)")
    return InitSource(kind, ckpt)


def check_new_run(out: str | os.PathLike, source: str | os.PathLike) -> None:
    """A one-line UserError if ``out`` already has checkpoints: that run resumes, it does not start again."""
    found = RunDir(out).list_checkpoints()
    if found:
        raise UserError(f"--init {source}: {out} already has checkpoints ({found[-1].name}): it resumes from them "
                        f"(drop --init), or start from {source} in a new --out directory")


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad files
        raise UserError(f"--init {path}: its tensors cannot be read ({type(e).__name__})") from None


def _diffusers_state(unet_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict of the ``diffusers_unet2d`` network (``unet.*``) holding the UNet saved in ``unet_dir``."""
    import json

    from ..nets.diffusers_unet import import_diffusers

    config = unet_dir / "config.json"
    try:
        cls = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"--init {unet_dir}: {config} is missing or not a JSON object (a diffusers UNet folder "
                        f"has config.json and diffusion_pytorch_model.safetensors)") from None
    if cls != "UNet2DModel":
        raise UserError(f"--init {unet_dir}: holds a {cls or 'model of unknown class'}, but network.arch "
                        f"diffusers_unet2d is a UNet2DModel")
    if not any((unet_dir / f"diffusion_pytorch_model.safetensors{s}").is_file() for s in ("", ".index.json")):
        raise UserError(f"--init {unet_dir}: no diffusion_pytorch_model.safetensors (safetensors weights only; "
                        f"re-save it with save_pretrained(safe_serialization=True))")
    try:
        unet = import_diffusers().UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True,
                                                              local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--init {unet_dir}: cannot load the UNet: {first}") from None
    return {f"unet.{k}": v for k, v in unet.state_dict().items()}


def _filter_taps(f: torch.Tensor) -> tuple[float, ...]:
    row = f.float().reshape(f.shape[-2:])[0]
    return tuple(round(float(t), 6) for t in row / row[0])


def _edm_state(path: Path, arch: str, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """edm's tensors in our layout for the run's ``arch`` network (its resample filter must be the network's)."""
    from ..nets.edm_port import convert_edm_state_dict, edm_network_kwargs
    from ..nets.layers import Conv2d

    tensors = _read_safetensors(path)
    theirs = edm_network_kwargs(tensors, arch).get("resample_filter")
    ours = next((m.resample_filter for m in net.modules() if isinstance(m, Conv2d) and m.resample_filter is not None),
                None)
    if theirs is not None and ours is not None and tuple(theirs) != _filter_taps(ours):
        raise UserError(f"--init {path}: it resamples with the filter {list(theirs)} but this network with "
                        f"{list(_filter_taps(ours))}: set network.resample_filter: {list(theirs)}")
    return convert_edm_state_dict(tensors, arch, out_channels=int(net.out_channels))


def _edm2_state(path: Path) -> dict[str, torch.Tensor]:
    """edm2's UNet tensors (a whole Precond's ``unet.*``, its logvar head dropped): our ``edm2`` layout."""
    tensors = _read_safetensors(path)
    if not any(k.startswith("unet.") for k in tensors):
        return tensors
    extra = [k for k in tensors if not k.startswith("unet.") and k not in _EDM2_PRECOND]
    if extra:
        raise UserError(f"--init {path}: unexpected tensor {extra[0]!r} (neither 'unet.*' nor the Precond's logvar "
                        f"head)")
    return _strip(tensors, "unet.")


def init_states(source: str | os.PathLike | InitSource, trainer, *, ema: bool = False
                ) -> dict[str, dict[str, torch.Tensor]]:
    """The states a run starts from (``{"net": ..., "ema": ...}``, for :meth:`~.loop.TrainingLoop.start_from`):
    SOURCE's weights in the layout of ``trainer``'s network (module docstring). ``ema``: for an elucidate run
    or checkpoint, the network from its raw weights and the EMA from its EMA (default: both from its EMA)."""
    src = source if isinstance(source, InitSource) else resolve_source(source)
    net = trainer.modules["net"]
    arch = trainer.config.network.get("arch", "unet")
    if src.kind in ("run", "checkpoint"):
        tensors, _ = load_checkpoint(src.path)
        raw = _strip(tensors, "net.")
        averaged = _strip(tensors, "ema.") or raw  # a checkpoint without an EMA: its network
        return {"net": raw, "ema": averaged} if ema else {"net": averaged, "ema": averaged}
    if ema:
        raise UserError(f"--init-ema: {src.path} is a {src.kind} export, which holds one set of weights (the "
                        f"network and its EMA both start from them without --init-ema)")
    if arch not in _ARCHS[src.kind]:
        raise UserError(f"--init {src.path}: a {src.kind} network needs network.arch "
                        f"{' or '.join(_ARCHS[src.kind])} with the same configuration; this run's is {arch!r}")
    if src.kind == "diffusers":
        state = _diffusers_state(src.path)
    elif src.kind == "edm":
        state = _edm_state(src.path, arch, net)
    else:
        state = _edm2_state(src.path)
    return {"net": state, "ema": state}


def start_from_weights(trainer, source: str | os.PathLike, *, ema: bool = False, log=print):
    """Start ``trainer``'s new run from SOURCE's weights (:func:`init_states`): writes the step-0 checkpoint and
    returns its path. The trainer's run directory is released if it fails; call ``trainer.train()`` next.

    In Python::

        trainer = Trainer(config, "runs/finetuned")
        start_from_weights(trainer, "runs/base")
        trainer.train()
    """
    try:
        src = resolve_source(source)
        check_new_run(trainer.run_dir, source)
        states = init_states(src, trainer, ema=ema)
        path = trainer.start_from(states, source=src.describe(ema))
    except BaseException:
        trainer.close()
        raise
    if trainer.dist.is_main:
        what = ("the network from its raw weights and the EMA from its EMA" if ema else
                "the network and its EMA from its EMA weights" if src.kind in ("run", "checkpoint") else
                "the network and its EMA from its weights")
        log(f"starting {trainer.run_dir} from {src.path}: {what}; step 0 is {path.name}")
    return path
