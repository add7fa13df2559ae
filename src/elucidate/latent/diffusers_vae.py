"""A diffusers ``AutoencoderKL`` (a Stable-Diffusion-style VAE) as a latent run's autoencoder.

:class:`DiffusersVAE` gives a saved diffusers ``AutoencoderKL`` the interface the rest of elucidate uses of an
autoencoder (:class:`~.autoencoder.AutoencoderKL`): ``encode(x)`` -> the posterior (mean, std), ``decode(z)`` ->
images, ``in_channels``, ``img_resolution``, ``latent_shape``. The VAE's ``shift_factor`` (if set) is folded in:
``encode`` gives the posterior of ``E(x) - shift`` and ``decode(z)`` is ``D(z + shift)``, so with
``scale_factor = scaling_factor`` a latent run's latents are what diffusers pipelines use,
``(E(x) - shift) * scaling_factor``, and decoding is their ``D(z / scaling_factor + shift)``.

Local folders only (``config.json`` + ``diffusion_pytorch_model.safetensors``, e.g. the ``vae/`` of a Stable
Diffusion pipeline, or the pipeline folder itself); safetensors weights only; nothing is downloaded. diffusers
is needed to use one (``pip install 'elucidate[diffusers]'``).
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, UserError
from ..nets.diffusers_unet import import_diffusers
from .distribution import DiagonalGaussianDistribution

__all__ = ["DiffusersVAE", "diffusers_vae_dir", "load_diffusers_vae", "DIFFUSERS_VAE_KEY", "VAE_CLASS"]

VAE_CLASS = "AutoencoderKL"
#: ``meta`` key of a run's copy (``vae.safetensors``) of a diffusers VAE: its diffusers config.
DIFFUSERS_VAE_KEY = "diffusers_vae_config"
_WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_vae_dir(path: str | os.PathLike) -> Path | None:
    """The folder of the diffusers ``AutoencoderKL`` at ``path`` (the folder itself, or a pipeline's ``vae/``),
    or None if ``path`` is not a diffusers VAE folder (e.g. a train-vae run). A diffusers folder of another
    model is a one-line UserError."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "model_index.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        cls = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{config} is not a JSON object (a diffusers VAE folder has config.json and "
                        f"{_WEIGHTS})") from None
    if cls != VAE_CLASS:
        raise UserError(f"{path} holds a diffusers {cls or 'model of unknown class'}, not an {VAE_CLASS} (a VAE)")
    if not any((path / f"{_WEIGHTS}{s}").is_file() for s in ("", ".index.json")):
        raise UserError(f"{path} has no {_WEIGHTS} (safetensors weights only; re-save the VAE with "
                        f"save_pretrained(safe_serialization=True))")
    return path


def load_diffusers_vae(path: str | os.PathLike, device=None) -> DiffusersVAE:
    """The diffusers ``AutoencoderKL`` saved at ``path`` (:func:`diffusers_vae_dir`) as a :class:`DiffusersVAE`,
    float32, in eval mode without gradients."""
    folder = diffusers_vae_dir(path)
    if folder is None:
        raise UserError(f"{path} is not a diffusers {VAE_CLASS} folder (config.json + {_WEIGHTS})")
    try:
        vae = import_diffusers().AutoencoderKL.from_pretrained(str(folder), use_safetensors=True,
                                                               local_files_only=True, low_cpu_mem_usage=False,
                                                               torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the VAE from {folder}: {first}") from None
    out = DiffusersVAE(vae).eval().requires_grad_(False)
    return out.to(device) if device is not None else out


def _resolution(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class DiffusersVAE(nn.Module):
    """A diffusers ``AutoencoderKL`` with the interface of :class:`~.autoencoder.AutoencoderKL` (module
    docstring). ``img_resolution`` starts as the VAE's ``sample_size``; the VAE is convolutional, so
    :meth:`at_resolution` sets it to any size divisible by its down-sampling factor."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        c = vae.config
        self.in_channels, self.out_channels = int(c.in_channels), int(c.out_channels)
        self.embed_dim = self.z_channels = int(c.latent_channels)
        self.factor = 2 ** (len(c.block_out_channels) - 1)
        self.double_z = True
        self.scaling_factor = float(c.scaling_factor)
        self.shift_factor = float(c.get("shift_factor") or 0.0)
        self.img_resolution = _resolution(c.sample_size)

    @classmethod
    def from_state(cls, config: dict, state: dict[str, torch.Tensor], where: str = "the checkpoint") -> DiffusersVAE:
        """The VAE of a diffusers ``config`` holding ``state`` (a run's copy of it)."""
        vae = import_diffusers().AutoencoderKL.from_config(config)
        missing, unexpected = vae.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"{where} does not match its diffusers {VAE_CLASS} config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        return cls(vae)

    def config_dict(self) -> dict:
        """The diffusers config (JSON-able) that rebuilds the VAE (:meth:`from_state`)."""
        return json.loads(json.dumps(dict(self.vae.config), default=lambda v: list(v) if isinstance(v, tuple)
                                     else str(v)))

    def weights_crc32(self) -> int:
        """CRC-32 of the VAE's tensors (names and bytes, in key order): which VAE latents were encoded with."""
        crc = 0
        state = self.vae.state_dict()
        for key in sorted(state):
            crc = zlib.crc32(key.encode("utf-8"), crc)
            crc = zlib.crc32(state[key].detach().float().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(),
                             crc)
        return crc

    def at_resolution(self, resolution) -> DiffusersVAE:
        """This VAE, taking images of ``resolution`` ((H, W) or an int): a ConfigError unless the down-sampling
        factor divides it."""
        H, W = _resolution(resolution)
        if H % self.factor or W % self.factor:
            raise ConfigError(f"the data are {H}x{W} but the diffusers VAE down-samples by {self.factor}: set "
                              f"data.resolution to a multiple of {self.factor}")
        self.img_resolution = (H, W)
        return self

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.embed_dim, self.img_resolution[0] // self.factor, self.img_resolution[1] // self.factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """The posterior of ``E(x) - shift_factor`` for images ``x [B, in_channels, H, W]`` in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"the diffusers VAE expects [B, {self.in_channels}, H, W] with H and W divisible by "
                             f"{self.factor}, got {list(x.shape)}")
        posterior = self.vae.encode(x).latent_dist
        return DiagonalGaussianDistribution(torch.cat([posterior.mean - self.shift_factor, posterior.logvar], dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``D(z + shift_factor)`` for latents ``z [B, latent_channels, h, w]``."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"the diffusers VAE decodes [B, {self.embed_dim}, h, w], got {list(z.shape)}")
        return self.vae.decode(z + self.shift_factor).sample
