"""Models back from run directories: the newest usable checkpoint of a run, a diffusion run ready to sample
(:func:`load_run`), a train-vae run's autoencoder (:func:`load_vae`) and a latent run's decoder.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, SamplingConfig, parse_config
from ..config.network import DataInfo, build_network_for
from ..config.vae import VAEConfig, parse_vae_config
from ..data import Normalizer
from ..denoiser import Denoiser, with_null_condition
from ..errors import ConfigError, UserError
from ..latent.autoencoder import AutoencoderKL
from ..latent.data import LatentDecoder
from ..sampling import inpaint, sample
from .checkpoint import (
    CheckpointDamaged,
    CheckpointWarning,
    check_fits,
    check_run_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_usable,
)
from .rundir import RunDir

__all__ = ["first_usable", "resolve_checkpoint", "LoadedRun", "load_run", "CHECKPOINT_KIND", "build_autoencoder",
           "load_vae_checkpoint", "load_vae", "load_latent_decoder"]


def _candidates(path: Path) -> tuple[list[Path], bool]:
    """(checkpoints to try, newest first; whether ``path`` is a run directory)."""
    if path.is_dir():
        found = RunDir(path).list_checkpoints() or list_checkpoints(path)
        if not found:
            raise UserError(f"{path} has no checkpoints (expected {RunDir(path).checkpoints}/ckpt-*.safetensors)")
        return found[::-1], True
    if not path.exists():
        raise UserError(f"{path} does not exist (expected a run directory or a checkpoint file)")
    return [path], False


def first_usable(path: Path, attempt: Callable[[Path], tuple]) -> tuple:
    """``attempt(ckpt)`` (a tuple ending in the metadata) on the newest checkpoint of ``path`` that
    is not damaged. In a run directory a damaged one is skipped with a :class:`CheckpointWarning`
    (and left in place: readers never move files); a damaged file named explicitly is an error."""
    candidates, is_run = _candidates(path)
    damaged: list[CheckpointDamaged] = []

    def on_damaged(error: CheckpointDamaged) -> None:
        if not is_run:
            raise error
        damaged.append(error)

    found = newest_usable(candidates, attempt, on_damaged)
    if found is None:
        raise UserError(f"{path} has no usable checkpoint: {damaged[0] if damaged else 'they all vanished'}"
                        + (f" (and {len(damaged) - 1} older ones are damaged too)" if len(damaged) > 1 else ""))
    ckpt, result = found
    if damaged:  # warn_explicit without a source line: the warning prints as one line
        warnings.warn_explicit(f"{'; '.join(str(e) for e in damaged)}; using {ckpt.name} (step "
                               f"{result[-1]['step']}), the newest usable checkpoint", CheckpointWarning,
                               "elucidate", 0)
    return result


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file from a run directory (its newest undamaged one, see ``load_run``) or a
    checkpoint path (checked to be a readable checkpoint)."""
    return first_usable(Path(path), lambda c: (c, check_run_checkpoint(c)[1]))[0]


@dataclass
class LoadedRun:
    """A trained model ready to sample: denoiser (in eval mode), config, data info (of what the model
    generates: latents for a latent run), normalizer (of the images) and ``decode`` (latents -> images
    for a latent run, else None)."""

    denoiser: Denoiser
    config: Config
    info: DataInfo
    normalizer: object | None
    step: int
    checkpoint: Path
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: the normalizer of the spatial condition (``concat``) the run was trained with (None: none, or an older run)
    cond_normalizer: object | None = None
    #: ``conditions(seeds) -> {key: [len(seeds), ...]}``, in model units: the conditions :meth:`sample` uses for the
    #: keys its ``cond`` leaves out (the CLI sets it from ``--cond``, the training data or ``--unconditional``)
    conditions: Callable[[list[int]], dict] | None = None
    #: the unconditional branch of guidance (``Guided(null=...)``), in model units; None = the built-in null
    null_cond: dict | None = None
    #: autoguidance denoisers loaded by :meth:`load_guide`, by (path, device)
    guides: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape the sampler generates (latents for a latent run)."""
        return (self.info.channels, *self.info.resolution)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Generated samples as images in model range: decoded for a latent run, else ``x`` itself."""
        return x if self.decode is None else self.decode(x)

    @property
    def label_dim(self) -> int:
        """Classes of a class-conditional model (0 = unconditional)."""
        return int(getattr(self.denoiser.net, "label_dim", 0) or 0)

    @property
    def condition_shapes(self) -> dict[str, tuple]:
        """The spatial / token conditions the network was trained with and needs: ``concat`` -> (C', H, W),
        ``context`` -> (L, D) (L as in the data; any L works). Class labels are not listed: they have a default."""
        net = getattr(self.denoiser, "net", None)
        shapes = {}
        if int(getattr(net, "cond_channels", 0) or 0):
            shapes["concat"] = (int(net.cond_channels), *self.info.resolution)
        if int(getattr(net, "context_dim", 0) or 0):
            shapes["context"] = (*(self.info.context_shape or (1,))[:1], int(net.context_dim))
        return shapes

    def null_conditions(self, n: int, device=None) -> dict[str, torch.Tensor]:
        """The null condition the run was trained with (its ``cond_drop_prob`` dropout) for ``n`` samples: every key
        the network takes (class labels, concat, context), as :func:`~elucidate.denoiser.with_null_condition` makes
        it."""
        net = getattr(self.denoiser, "net", None)
        templates = {key: torch.zeros(n, *shape, device=device) for key, shape in self.condition_shapes.items()}
        if self.label_dim:
            templates["class_labels"] = torch.zeros(n, dtype=torch.long, device=device)
        return {key: with_null_condition(net, key, value)[1] for key, value in templates.items()}

    def load_guide(self, path, device=None) -> Denoiser:
        """The EMA denoiser of another run or checkpoint ``path`` for autoguidance (``sampling.guide``, ``--guide``),
        loaded once per device: it must generate what this run generates (shape, classes, conditions)."""
        key = (str(path), str(device))
        if key not in self.guides:
            other = load_run(Path(path), ema=True, device=device)
            mine = {"shape": self.shape, "label_dim": self.label_dim, "conditions": self.condition_shapes,
                    "latent": self.decode is not None}
            theirs = {"shape": other.shape, "label_dim": other.label_dim, "conditions": other.condition_shapes,
                      "latent": other.decode is not None}
            wrong = [k for k in mine if mine[k] != theirs[k]]
            if wrong:
                diff = ", ".join(f"{k} {theirs[k]} vs {mine[k]}" for k in wrong)
                raise UserError(f"guide {path}: its model does not match this one ({diff}); autoguidance needs a "
                                "model of the same data")
            self.guides[key] = other.denoiser
        return self.guides[key]

    def sample(self, seeds: Sequence[int], cfg: SamplingConfig | None = None, *, class_labels=None, cond=None,
               batch_size: int = 64, device=None, precision: str = "fp32", progress: bool = False,
               callback=None, init=None, strength=None, mask=None, resample: int = 10) -> torch.Tensor:
        """:func:`elucidate.sampling.sample` with the run's sampling settings (or ``cfg``): float32 samples on
        the CPU in model range (latents for a latent run: see :meth:`images`); sample i depends on seeds[i].

        ``cond``: conditions in model units (``concat`` [N, C', H, W], ``context`` [N, L, D], ``class_labels``;
        N = len(seeds) or 1), as :func:`elucidate.sampling.sample` takes them; the keys it leaves out come from
        :attr:`conditions` (if set), then ``class_labels``. A network trained with a spatial or token condition
        refuses to sample without one (a ``UserError`` naming the key): give it, or :meth:`null_conditions` for the
        unconditional model. ``init`` + ``strength``: image-to-image (SDEdit); ``init`` + ``mask`` (1 = keep):
        inpainting (RePaint, ``resample`` times per step); ``init`` in model units, one row per seed."""
        cfg = self.config.sampling if cfg is None else cfg
        seeds = list(seeds)
        given = dict(cond or {})
        if self.conditions is not None:
            given = {**self.conditions(seeds), **given}
        if class_labels is not None and "class_labels" not in given:
            given["class_labels"] = torch.as_tensor(class_labels)
        missing = [key for key in self.condition_shapes if key not in given]
        if missing:
            key, shape = missing[0], self.condition_shapes[missing[0]]
            raise UserError(f"the model was trained with a {key} condition but none was given: pass cond={{{key!r}: "
                            f"[N, {', '.join(map(str, shape))}]}} (model units) or cond=run.null_conditions(N) for the "
                            "unconditional model")
        cond = {key: torch.as_tensor(value).to(device or "cpu") for key, value in given.items()} or None
        if cfg.clip_denoised and self.decode is not None:
            raise UserError("clip_denoised clamps x0_hat to [-1, 1], the range of images, but this run generates "
                            "latents (unbounded): leave it off")
        guide = self.load_guide(cfg.guide, device) if cfg.guide is not None and cfg.guidance != 1 else None
        denoiser = cfg.guided(self.denoiser, guide=guide, null=dict(self.null_cond) if self.null_cond else None)
        if mask is not None:  # RePaint: init where mask is 1, the rest generated
            x = inpaint(denoiser, init, mask, seeds=seeds, cond=cond, batch_size=batch_size, device=device,
                        precision=precision, callback=callback, resample=resample,
                        **cfg.sample_kwargs(self.denoiser.formulation))
            return x.float().cpu()
        x = sample(denoiser, (len(seeds), *self.shape), seeds=seeds, cond=cond, batch_size=batch_size,
                   device=device, precision=precision, progress=progress, callback=callback, init=init,
                   strength=strength, **cfg.sample_kwargs(self.denoiser.formulation))
        return x.float().cpu()


def load_run(path: Path, *, ema: bool = True, device: torch.device | str | None = None) -> LoadedRun:
    """Load a run directory or checkpoint for sampling (EMA weights by default).

    In a run directory whose newest checkpoint is damaged (truncated, unreadable, bad metadata,
    data not matching its checksum) the newest usable one is loaded with a
    :class:`~elucidate.run.checkpoint.CheckpointWarning` naming both; the files are left as they are.
    A checkpoint whose tensors do not fit the configured network is a one-line ``UserError``."""
    def attempt(ckpt: Path):
        layout, _ = check_run_checkpoint(ckpt)
        tensors, meta = load_checkpoint(ckpt)
        return ckpt, layout, tensors, meta

    ckpt, layout, tensors, meta = first_usable(Path(path), attempt)
    device = torch.device(device) if device is not None else torch.device("cpu")
    config = parse_config(meta["config"])
    info = DataInfo.from_dict(meta["data"])
    net = build_network_for(config, info)
    prefix = "ema." if ema and any(k.startswith("ema.") for k in tensors) else "net."
    check_fits(ckpt, layout, meta, {prefix: net})
    net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    normalizer = Normalizer.from_config(meta["normalizer"]) if meta.get("normalizer") is not None else None
    cond_normalizer = meta.get("cond_normalizer")
    cond_normalizer = Normalizer.from_config(cond_normalizer) if cond_normalizer is not None else None
    denoiser = Denoiser(net, config.formulation()).to(device).eval().requires_grad_(False)
    decode = load_latent_decoder(ckpt, meta["latent"], device) if meta.get("latent") is not None else None
    return LoadedRun(denoiser, config, info, normalizer, int(meta["step"]), ckpt, decode, cond_normalizer)


# -------------------------------------------------------------------------------- autoencoder runs
#: ``meta["kind"]`` of an autoencoder checkpoint (diffusion checkpoints have none).
CHECKPOINT_KIND = "vae"


def build_autoencoder(config: VAEConfig, channels: int, resolution: tuple[int, int]) -> AutoencoderKL:
    """The config's AutoencoderKL for data with ``channels`` and ``(H, W)`` resolution."""
    H, W = resolution
    try:
        return AutoencoderKL(img_resolution=(H, W), in_channels=channels, **config.model.kwargs())
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def load_vae_checkpoint(run_or_checkpoint: str | Path) -> tuple[dict, dict, Path]:
    """(tensors, metadata, checkpoint path) of an autoencoder run directory's latest checkpoint or a
    checkpoint file; a diffusion checkpoint is refused."""
    ckpt = resolve_checkpoint(Path(run_or_checkpoint))
    tensors, meta = load_checkpoint(ckpt)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"{ckpt} is not an autoencoder checkpoint (written by `elucidate train`, not train-vae)")
    return tensors, meta, ckpt


def load_vae(run_or_checkpoint: str | Path, device: torch.device | str | None = None):
    """The trained autoencoder of a VAE run directory (latest checkpoint) or checkpoint file, or the diffusers
    ``AutoencoderKL`` of a diffusers VAE folder (a :class:`~elucidate.latent.diffusers_vae.DiffusersVAE`, as is a
    latent run's copy of one), in eval mode without gradients, on ``device`` (default CPU)."""
    from ..latent.diffusers_vae import DIFFUSERS_VAE_KEY, DiffusersVAE, diffusers_vae_dir, load_diffusers_vae

    if diffusers_vae_dir(run_or_checkpoint) is not None:
        return load_diffusers_vae(run_or_checkpoint, device=device)
    tensors, meta, ckpt = load_vae_checkpoint(run_or_checkpoint)
    state = {k[len("net.vae."):]: v for k, v in tensors.items() if k.startswith("net.vae.")}
    if meta.get(DIFFUSERS_VAE_KEY) is not None:  # a latent run's copy of a diffusers VAE
        vae = DiffusersVAE.from_state(meta[DIFFUSERS_VAE_KEY], state, where=f"checkpoint {ckpt}")
    else:
        config = parse_vae_config(meta["config"])
        data = meta["data"]
        vae = build_autoencoder(config, int(data["channels"]), tuple(int(v) for v in data["resolution"]))
        missing, unexpected = vae.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"checkpoint {ckpt} does not match its model config "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    vae.eval().requires_grad_(False)
    return vae.to(device) if device is not None else vae


def load_latent_decoder(path: Path, record: dict, device=None) -> LatentDecoder:
    """The decoder of a latent run from the ``vae.safetensors`` of its run directory (``path`` is the run
    or one of its checkpoints) or, failing that, from the VAE the run was trained from."""
    own = RunDir.of(path).vae
    if own.is_file():
        return LatentDecoder(load_vae(own, device=device), record["scale_factor"])
    source = record["vae"]["source"]
    if Path(source).exists():  # a checkpoint file or a diffusers VAE folder
        return LatentDecoder(load_vae(source, device=device), record["scale_factor"])
    raise UserError(f"{path} is a latent-diffusion model but its autoencoder is missing (expected "
                    f"{own}, or {source})")
