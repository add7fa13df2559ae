"""Diffusion in a VAE's latent space: the training data (posterior of every image, a latent drawn
per use), the scale factor, the run's own copy of the autoencoder, and decoding at sampling time.

A latent run holds ``vae.safetensors`` (the autoencoder it was trained with) and ``latent.json``
(scale factor, latent shape, where the VAE came from); checkpoints carry the same record under
``meta["latent"]``, so ``load_run`` gives a decoder and every reader sees images, not latents.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import save_checkpoint
from ..errors import ConfigError, UserError
from ..fileio import atomic_write_text
from .autoencoder import AutoencoderKL
from .build import load_vae, load_vae_checkpoint
from .encode import check_pixels, encode_posteriors, read_encoded

__all__ = ["LatentDataset", "latent_training_data", "scale_for", "LatentDecoder", "load_latent_decoder",
           "RUN_VAE", "RUN_LATENT"]

#: the run's copy of its autoencoder, and its latent record.
RUN_VAE, RUN_LATENT = "vae.safetensors", "latent.json"


class LatentDataset:
    """Scaled VAE posteriors of a pixel dataset, with its labels and conditions: ``get_batch`` gives the
    posterior means, ``draw_batch(indices, generator)`` a sample ``s (mean + std n)``, n ~ N(0, I)."""

    def __init__(self, pixels, mean: torch.Tensor, std: torch.Tensor, scale_factor: float, *,
                 sample_posterior: bool = True, decode: LatentDecoder | None = None):
        if len(pixels) != mean.shape[0]:
            raise ConfigError(f"the encoded latents hold {mean.shape[0]} items but the data section gives "
                              f"{len(pixels)} images; encode the same data (same xflip, max_size)")
        if getattr(pixels, "cond_channels", 0):
            raise ConfigError("a spatial (concat) condition is not supported in latent space; use class labels or "
                              "a context")
        self.pixels, self.mean, self.std = pixels, mean.float(), std.float()
        self.scale_factor, self.sample_posterior = float(scale_factor), sample_posterior
        self.normalizer = getattr(pixels, "normalizer", None)  # of the decoded images
        self.decode = decode  # latents -> images (the run's VAE), for the training loop's sample grids

    def __len__(self) -> int:
        return self.mean.shape[0]

    channels = property(lambda self: int(self.mean.shape[1]))
    resolution = property(lambda self: (int(self.mean.shape[2]), int(self.mean.shape[3])))
    num_classes = property(lambda self: int(self.pixels.num_classes))
    cond_channels = property(lambda self: 0)
    context_shape = property(lambda self: getattr(self.pixels, "context_shape", None))

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled posterior means, labels) of ``indices``."""
        return self.mean[indices] * self.scale_factor, self.pixels.get_labels(indices)

    def draw_batch(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A scaled posterior sample for each index (the mean with ``sample_posterior: false``)."""
        mean = self.mean[indices]
        if not self.sample_posterior:
            return mean * self.scale_factor
        noise = torch.randn(mean.shape, generator=generator)
        return (mean + self.std[indices] * noise) * self.scale_factor

    def get_conditions(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.pixels.get_conditions(indices).items() if k != "concat"}


def scale_for(mean: torch.Tensor, sigma_data: float) -> float:
    """``sigma_data / std`` of all posterior-mean elements (so latents have the formulation's sigma_data)."""
    std = float(mean.double().std())
    if not std > 0:
        raise UserError("the VAE's latents of this data are constant (std 0): cannot scale them")
    return sigma_data / std


def _vae_identity(meta: dict, path: Path) -> dict:
    return {"source": str(Path(path).resolve()), "step": int(meta.get("step", 0)), "crc32": int(meta["crc32"])}


def _copy_vae(source: str, run_dir: Path) -> dict:
    """Write the autoencoder of ``source`` (a train-vae run or checkpoint) to ``run_dir/vae.safetensors``
    (weights and metadata, no optimizer or discriminator); returns where it came from."""
    try:
        _, meta, ckpt = load_vae_checkpoint(source)
        vae = load_vae(ckpt)
    except UserError as e:
        raise ConfigError(f"latent.vae = {source!r}: {e}") from None
    keep = {k: meta[k] for k in ("kind", "step", "images", "seconds", "config", "data", "latent_shape", "normalizer",
                                 "eval", "skipped_steps") if k in meta}
    save_checkpoint(run_dir / RUN_VAE, net=torch.nn.ModuleDict({"vae": vae}), ema=None, optimizer=None, meta=keep)
    return _vae_identity(meta, ckpt)


def latent_training_data(config, pixels, run_dir: Path, *, sigma_data: float | None, is_main: bool = True,
                         barrier: Callable[[], None] = lambda: None, device=None,
                         log=print) -> tuple[LatentDataset, dict]:
    """The training dataset of a latent run and its record (stored in ``latent.json`` and checkpoints).
    The first start copies the VAE into the run and fixes the scale; later starts reuse both."""
    lat = config.latent
    record_path = run_dir / RUN_LATENT
    if not record_path.is_file():
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            identity = _copy_vae(lat.vae, run_dir)
            atomic_write_text(record_path, json.dumps({"vae": identity, "scale_factor": None}, indent=2) + "\n")
        barrier()
    record = json.loads(record_path.read_text())
    vae = load_vae(run_dir / RUN_VAE, device=device)
    check_pixels(vae, run_dir / RUN_VAE, pixels)
    if lat.encoded is not None:
        mean, std, file_meta = read_encoded(lat.encoded)
        if file_meta.get("vae_crc32") != record["vae"]["crc32"]:
            raise ConfigError(f"latent.encoded = {lat.encoded!r} was encoded with another autoencoder than this run's "
                              f"({record['vae']['source']}, step {record['vae']['step']}); encode again with it")
    else:
        mean, std = encode_posteriors(vae, pixels, device=device)
    if record.get("scale_factor") is None:  # fixed once per run: resume never recomputes it
        sd = 0.5 if sigma_data is None else float(sigma_data)
        scale = scale_for(mean, sd) if lat.scale_factor == "auto" else float(lat.scale_factor)
        record = dict(record, scale_factor=scale, latent_shape=list(mean.shape[1:]),
                      pixel_shape=[int(vae.in_channels), *vae.img_resolution], posterior_mean_std=float(mean.std()))
        if is_main:
            atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
            log(f"latent diffusion: {len(pixels)} images -> latents {list(mean.shape[1:])}, scale factor "
                f"{scale:.4g} ({'auto' if lat.scale_factor == 'auto' else 'given'})")
        barrier()
    dataset = LatentDataset(pixels, mean, std, record["scale_factor"], sample_posterior=lat.sample_posterior,
                            decode=LatentDecoder(vae, record["scale_factor"]))
    return dataset, record


class LatentDecoder:
    """``z -> D(z / scale_factor)`` in batches, float32 images in the VAE's model range, on ``z``'s device."""

    def __init__(self, vae: AutoencoderKL, scale_factor: float, batch_size: int = 256):
        self.vae, self.scale_factor, self.batch_size = vae, float(scale_factor), batch_size

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        device = next(self.vae.parameters()).device
        out = [self.vae.decode(z[i:i + self.batch_size].to(device, torch.float32) / self.scale_factor)
               for i in range(0, z.shape[0], self.batch_size)]
        return torch.cat(out).float().to(z.device)


def load_latent_decoder(path: Path, record: dict, device=None) -> LatentDecoder:
    """The decoder of a latent run from the ``vae.safetensors`` of its run directory (``path`` is the run
    or one of its checkpoints) or, failing that, from the VAE the run was trained from."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / RUN_VAE).is_file():
            return LatentDecoder(load_vae(folder / RUN_VAE, device=device), record["scale_factor"])
    source = record["vae"]["source"]
    if Path(source).is_file():
        return LatentDecoder(load_vae(source, device=device), record["scale_factor"])
    raise UserError(f"{path} is a latent-diffusion model but its autoencoder is missing (expected "
                    f"{RUN_VAE} in its run directory, or {source})")
