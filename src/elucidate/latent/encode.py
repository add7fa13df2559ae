"""Encoding a dataset with an autoencoder: the posterior mean and std of every image, and the file that holds
them (``elucidate encode DATA --vae RUN --out latents.npz``), so latent training never runs the encoder."""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..data.mapped import open_array_member
from ..errors import ConfigError, UserError
from ..runtime.files import atomic_path
from .autoencoder import AutoencoderKL

__all__ = ["encode_posteriors", "write_encoded", "read_encoded", "check_pixels", "ENCODED_FORMAT"]

#: ``meta["format"]`` of an encoded-latents file.
ENCODED_FORMAT = "elucidate-latents-1"


@torch.no_grad()
def encode_posteriors(vae: AutoencoderKL, dataset, *, batch_size: int = 256, device=None,
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of ``q(z | x)`` for every item of ``dataset`` (x-flipped copies included), float32 CPU."""
    device = next(vae.parameters()).device if device is None else torch.device(device)
    was_training = vae.training
    vae.eval()
    means, stds = [], []
    starts = range(0, len(dataset), batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(dataset), desc="encoding", unit="img")
    try:
        for start in starts:
            x, _ = dataset.get_batch(torch.arange(start, min(start + batch_size, len(dataset))))
            posterior = vae.encode(x.to(device, torch.float32))
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
            if bar is not None:
                bar.update(x.shape[0])
    finally:
        vae.train(was_training)
        if bar is not None:
            bar.close()
    return torch.cat(means), torch.cat(stds)


def write_encoded(path: str | Path, mean: torch.Tensor, std: torch.Tensor, meta: dict) -> Path:
    """An ``.npz`` with float32 ``mean``, ``std`` and a JSON ``meta`` string, written atomically."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise UserError(f"--out {path}: expected a .npz file")
    meta = dict(meta, format=ENCODED_FORMAT, count=int(mean.shape[0]), latent_shape=list(mean.shape[1:]))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mean=mean.float().numpy(), std=std.float().numpy(), meta=np.array(json.dumps(meta)))
    return path


def read_encoded(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(mean, std, meta) of a file written by :func:`write_encoded` (one-line errors otherwise). ``mean`` and
    ``std`` are memory-mapped (the file's members are stored uncompressed, files of every version alike): a
    batch reads its rows from the file, nothing is copied whole into memory."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"latent.encoded = {str(path)!r} does not exist (write it with `elucidate encode`)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
        mean, std = open_array_member(path, "mean"), open_array_member(path, "std")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, struct.error) as e:
        raise UserError(f"{path} is not an encoded-latents file from `elucidate encode` ({type(e).__name__})") from None
    if meta.get("format") != ENCODED_FORMAT or mean.shape != std.shape or mean.ndim != 4 \
            or mean.dtype != np.float32 or std.dtype != np.float32:
        raise UserError(f"{path} is not an encoded-latents file from `elucidate encode` (format or shapes)")
    return torch.from_numpy(mean), torch.from_numpy(std), meta


def check_pixels(vae: AutoencoderKL, where: Path, pixels) -> None:
    """A ConfigError unless the dataset's images have the channels and resolution the VAE takes."""
    want = (int(vae.in_channels), tuple(vae.img_resolution))
    got = (int(pixels.channels), tuple(pixels.resolution))
    if want != got:
        raise ConfigError(f"the data are {got[0]}x{got[1][0]}x{got[1][1]} but the VAE ({where}) takes "
                          f"{want[0]}x{want[1][0]}x{want[1][1]}; set data.resolution (and channels) to match")
