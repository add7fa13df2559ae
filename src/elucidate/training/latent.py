"""Latent diffusion's data: the training set of a latent run (the posterior of every image under the run's own
copy of its autoencoder, the scale factor fixed once) and ``elucidate encode`` (pre-encoding a dataset). The
autoencoder is a train-vae run or checkpoint, or a diffusers ``AutoencoderKL`` folder (a Stable-Diffusion-style
VAE: :mod:`elucidate.latent.diffusers_vae`; its ``scaling_factor`` is the scale factor unless one is given).

A latent run holds ``vae.safetensors`` (the autoencoder it was trained with) and ``latent.json`` (scale
factor, latent shape, where the VAE came from); checkpoints carry the same record under ``meta["latent"]``,
so :func:`elucidate.run.load_run` gives a decoder and every reader sees images, not latents.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..config.schema import check_data, read_config_file
from ..data import build_dataset, data_section_for
from ..errors import ConfigError, UserError
from ..latent.data import LatentDataset, LatentDecoder, scale_for
from ..latent.diffusers_vae import DIFFUSERS_VAE_KEY, DiffusersVAE, diffusers_vae_dir
from ..latent.encode import check_pixels, encode_posteriors, read_encoded, write_encoded
from ..run.checkpoint import save_checkpoint
from ..run.model import CHECKPOINT_KIND, load_vae, load_vae_checkpoint
from ..run.rundir import RunDir
from ..runtime.files import atomic_write_text

__all__ = ["latent_training_data", "encode_dataset", "resolve_data_spec"]


def _vae_identity(meta: dict, path: Path) -> dict:
    return {"source": str(Path(path).resolve()), "step": int(meta.get("step", 0)), "crc32": int(meta["crc32"])}


def _open_vae(source: str | Path, device=None) -> tuple:
    """(the autoencoder, its identity ``{source, step, crc32}``, where it is) of a train-vae run or checkpoint,
    or of a diffusers ``AutoencoderKL`` folder (step 0, the CRC-32 of its tensors)."""
    folder = diffusers_vae_dir(source)
    if folder is not None:
        vae = load_vae(folder, device=device)
        return vae, {"source": str(folder.resolve()), "step": 0, "crc32": vae.weights_crc32(),
                     "format": "diffusers"}, folder
    _, meta, ckpt = load_vae_checkpoint(source)
    return load_vae(ckpt, device=device), _vae_identity(meta, ckpt), ckpt


def _copy_vae(source: str, run_dir: Path) -> dict:
    """Write the autoencoder of ``source`` (a train-vae run or checkpoint, or a diffusers ``AutoencoderKL``
    folder) to ``run_dir/vae.safetensors`` (weights and metadata, no optimizer or discriminator); returns where it
    came from."""
    try:
        if diffusers_vae_dir(source) is not None:
            vae, identity, _ = _open_vae(source)
            meta = {"kind": CHECKPOINT_KIND, "step": 0, DIFFUSERS_VAE_KEY: vae.config_dict(),
                    "source": identity["source"], "config": {"diffusers": "AutoencoderKL"},
                    "data": {"channels": vae.in_channels, "resolution": list(vae.img_resolution)}}
            save_checkpoint(RunDir(run_dir).vae, net=torch.nn.ModuleDict({"vae": vae.vae}), ema=None,
                            optimizer=None, meta=meta)
            return identity
        _, meta, ckpt = load_vae_checkpoint(source)
        vae = load_vae(ckpt)
    except UserError as e:
        raise ConfigError(f"latent.vae = {source!r}: {e}") from None
    keep = {k: meta[k] for k in ("kind", "step", "images", "seconds", "config", "data", "latent_shape", "normalizer",
                                 "eval", "skipped_steps") if k in meta}
    save_checkpoint(RunDir(run_dir).vae, net=torch.nn.ModuleDict({"vae": vae}), ema=None, optimizer=None, meta=keep)
    return _vae_identity(meta, ckpt)


def _fit(vae, pixels):
    """A diffusers VAE takes any resolution its down-sampling divides: set it to the data's."""
    return vae.at_resolution(pixels.resolution) if isinstance(vae, DiffusersVAE) else vae


def latent_training_data(config, pixels, run_dir: Path, *, sigma_data: float | None, is_main: bool = True,
                         barrier: Callable[[], None] = lambda: None, device=None,
                         log=print) -> tuple[LatentDataset, dict]:
    """The training dataset of a latent run and its record (stored in ``latent.json`` and checkpoints).
    The first start copies the VAE into the run and fixes the scale; later starts reuse both."""
    lat, run = config.latent, RunDir(run_dir)
    record_path = run.latent
    if not record_path.is_file():
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            identity = _copy_vae(lat.vae, run_dir)
            atomic_write_text(record_path, json.dumps({"vae": identity, "scale_factor": None}, indent=2) + "\n")
        barrier()
    record = json.loads(record_path.read_text())
    vae = _fit(load_vae(run.vae, device=device), pixels)
    check_pixels(vae, run.vae, pixels)
    if lat.encoded is not None:
        mean, std, file_meta = read_encoded(lat.encoded)
        if file_meta.get("vae_crc32") != record["vae"]["crc32"]:
            raise ConfigError(f"latent.encoded = {lat.encoded!r} was encoded with another autoencoder than this run's "
                              f"({record['vae']['source']}, step {record['vae']['step']}); encode again with it")
    else:
        mean, std = encode_posteriors(vae, pixels, device=device)
    if record.get("scale_factor") is None:  # fixed once per run: resume never recomputes it
        sd = 0.5 if sigma_data is None else float(sigma_data)
        given = getattr(vae, "scaling_factor", None)  # a diffusers VAE's: what its pipelines scale latents by
        if lat.scale_factor != "auto":
            scale, how = float(lat.scale_factor), "given"
        elif given is not None:
            scale, how = float(given), "the VAE's scaling_factor"
        else:
            scale, how = scale_for(mean, sd), "auto"
        record = dict(record, scale_factor=scale, latent_shape=list(mean.shape[1:]),
                      pixel_shape=[int(vae.in_channels), *vae.img_resolution], posterior_mean_std=float(mean.std()))
        if is_main:
            atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
            log(f"latent diffusion: {len(pixels)} images -> latents {list(mean.shape[1:])}, scale factor "
                f"{scale:.4g} ({how})")
        barrier()
    dataset = LatentDataset(pixels, mean, std, record["scale_factor"], sample_posterior=lat.sample_posterior,
                            decode=LatentDecoder(vae, record["scale_factor"]))
    return dataset, record


def encode_dataset(data: dict, vae_source: str | Path, out: str | Path, *, batch_size: int = 256, device=None,
                   progress: bool = True) -> dict:
    """Encode the dataset ``data`` (a config ``data`` section; its resolution defaults to the VAE's)
    with the VAE of ``vae_source``; writes ``out`` and returns its metadata."""
    if Path(out).suffix.lower() != ".npz":  # before any work
        raise UserError(f"--out {out}: expected a .npz file")
    vae, identity, where = _open_vae(vae_source, device=device)
    data = dict(data)
    data.setdefault("resolution", list(vae.img_resolution) if vae.img_resolution[0] != vae.img_resolution[1]
                    else vae.img_resolution[0])
    dataset = build_dataset(data)
    vae = _fit(vae, dataset)
    check_pixels(vae, where, dataset)
    mean, std = encode_posteriors(vae, dataset, batch_size=batch_size, device=device, progress=progress)
    meta = {"vae": identity["source"], "vae_step": identity["step"], "vae_crc32": identity["crc32"], "data": data,
            "posterior_mean_std": float(mean.double().std())}
    write_encoded(out, mean, std, meta)
    return dict(meta, count=int(mean.shape[0]), latent_shape=list(mean.shape[1:]))


def resolve_data_spec(spec: str) -> dict:
    """A ``data`` section from a command-line DATA: a dataset name, a path, or a config YAML's data section."""
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml"):
        raw = read_config_file(path, "DATA needs a config with a data section (e.g. configs/digits-edm.yaml)")
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict):
            raise ConfigError(f"{spec} has no data section")
        return check_data(raw["data"])
    section = data_section_for(spec)
    if section is not None:
        return section
    raise UserError(f"DATA {spec!r}: expected digits, mnist, an image folder, a .zip, an .npz/.npy array or a "
                    f"config .yaml")
