"""NVlabs/edm and NVlabs/edm2 networks as run directories (``elucidate import``).

A safetensors export of an edm network (loaded by :func:`elucidate.nets.edm_port.load_edm_network`) or an edm2
network (:func:`elucidate.nets.load_edm2_network`) becomes an ordinary run directory: ``config.yaml`` whose
``network`` section rebuilds exactly the imported network (the structural arguments read off its tensors), whose
``diffusion`` section is the formulation of the network's Precond and whose ``sampling`` section is EDM's Heun
sampler; and one checkpoint at step 0 holding the imported weights as both the raw and the EMA weights. Every command
that takes a run (sample, eval, sweep, tune, report ...) then works on it unchanged. See docs/edm.md.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import UserError

__all__ = ["IMPORT_SOURCES", "PRECONDS", "UNKNOWN_DATA", "import_edm"]

#: What ``import_edm(source=...)`` reads: edm's SongUNet/DhariwalUNet or edm2's UNet.
IMPORT_SOURCES = ("edm", "edm2")
#: edm's Precond classes (by elucidate's formulation name) -> the diffusion section of their formulation; edm's
#: Precond defaults are the formulations' defaults (docs/edm.md).
PRECONDS = {"EDM": {"type": "EDM", "sigma_data": 0.5}, "VP": {"type": "VP"}, "VE": {"type": "VE"},
            "iDDPM": {"type": "iDDPM"}}
#: The ``data`` section of a run imported without ``data``: it records no data (eval/sweep then need ``--ref``).
UNKNOWN_DATA = {"dataset": "unknown"}
#: edm2 networks with this many channels denoise Stable Diffusion VAE latents (edm2's img512 models).
_LATENT_CHANNELS = 4
#: Keys that tell the families apart (with or without the Precond's ``model.`` / ``unet.`` prefix).
_FAMILY_KEYS = {"edm": "map_layer0.weight", "edm2": "emb_fourier.freqs"}


def _keys(path: Path) -> dict[str, tuple[int, ...]] | None:
    """The file's tensor names and shapes without its prefix, or None when it is not a readable safetensors file
    (the loader then says why)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception:  # safetensors raises its own error types for bad files
        return None
    return {key.removeprefix("model.").removeprefix("unet."): shape for key, shape in shapes.items()}


def _check_family(path: Path, source: str, keys: dict | None) -> None:
    if keys is None:
        return
    for family, key in _FAMILY_KEYS.items():
        if family != source and key in keys and _FAMILY_KEYS[source] not in keys:
            raise UserError(f"{path} is an {family} network (it has {key!r}), not {source}: use --from {family}")


def _edm_arch(keys: dict) -> str:
    """edm's arch from the tensors: DhariwalUNet (adm) has ``out_conv``; SongUNet with Fourier noise features is
    NCSN++, else DDPM++ (the two differ only in what the tensors say)."""
    if "out_conv.weight" in keys:
        return "adm"
    return "ncsnpp" if "map_noise.freqs" in keys else "ddpmpp"


def _learned_variance(keys: dict, in_channels: int) -> bool:
    """Whether the final convolution has twice the image channels (edm's iDDPMPrecond: mean and variance)."""
    final = [shape for key, shape in keys.items() if key == "out_conv.weight" or key.endswith("_aux_conv.weight")]
    return any(shape[0] == 2 * in_channels for shape in final)


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _load(path: Path, source: str, arch: str | None, precond: str | None) -> tuple[torch.nn.Module, dict, str, str]:
    """(the loaded network, the network section that rebuilds it, arch, precond)."""
    from safetensors.torch import load_file

    keys = _keys(path) if path.is_file() else None
    _check_family(path, source, keys)
    if source == "edm2":
        from ..nets.edm2 import edm2_network_kwargs, load_edm2_network

        if arch not in (None, "edm2"):
            raise UserError(f"--arch {arch}: edm2 networks are arch edm2")
        if precond not in (None, "EDM"):
            raise UserError(f"--precond {precond}: edm2's Precond is EDM's (sigma_data 0.5); leave --precond out")
        net = load_edm2_network(path)
        kwargs, arch, precond = edm2_network_kwargs(load_file(str(path))), "edm2", "EDM"
    else:
        from ..nets.edm_port import EDM_ARCHS, edm_network_kwargs, load_edm_network

        if arch is not None and arch not in EDM_ARCHS:
            raise UserError(f"--arch {arch}: edm's networks are {', '.join(EDM_ARCHS)}")
        arch = arch or (_edm_arch(keys) if keys is not None else "ddpmpp")
        net = load_edm_network(path, arch)
        kwargs = edm_network_kwargs(load_file(str(path)), arch)
        variance = _learned_variance(keys or {}, int(kwargs["in_channels"]))
        if precond is None:
            precond = "iDDPM" if variance else "EDM"
        elif variance != (precond == "iDDPM"):
            why = ("its output has twice the image channels (mean and variance): only edm's iDDPMPrecond builds "
                   "such a network, use --precond iDDPM" if variance else
                   "edm's iDDPMPrecond networks have twice the image channels at the output; this one does not")
            raise UserError(f"--precond {precond} does not fit {path}: {why}")
    network = {"arch": arch, **{k: _plain(v) for k, v in kwargs.items()
                                if k not in ("img_resolution", "in_channels", "out_channels")}}
    return net, network, arch, precond


def _steps(source: str, resolution: int) -> int:
    """EDM's deterministic Heun steps: 18 (NFE 35) at 32x32 and below, 40 (NFE 79) above (edm's FFHQ/AFHQv2 64x64);
    edm2: 32 (NFE 63, edm2's generate.py)."""
    if source == "edm2":
        return 32
    return 18 if resolution <= 32 else 40


def _data_section(spec: str | None) -> dict:
    from ..data import data_section_for

    if spec is None:
        return dict(UNKNOWN_DATA)
    section = data_section_for(spec)
    if section is None:
        raise UserError(f"--data {spec!r}: expected 'digits', 'faces', 'mnist', an image folder, a .zip or an "
                        f".npz/.npy array (what `elucidate train --data` takes)")
    return section


def _check_data(config, info) -> None:
    """The dataset of ``config.data`` must be what the network generates (channels, resolution, classes)."""
    from ..data import build_dataset

    dataset = build_dataset(config.data)
    theirs = (int(dataset.channels), tuple(dataset.resolution))
    if theirs != (info.channels, info.resolution):
        raise UserError(f"data {config.data.get('path') or config.data['dataset']} has {theirs[0]}-channel "
                        f"{theirs[1][0]}x{theirs[1][1]} images but the network generates {info.channels}-channel "
                        f"{info.resolution[0]}x{info.resolution[1]} ones (set data.resolution with --set, or leave "
                        f"--data out)")
    if info.num_classes and int(dataset.num_classes) not in (0, info.num_classes):
        raise UserError(f"data {config.data.get('path') or config.data['dataset']} has {dataset.num_classes} "
                        f"classes but the network takes {info.num_classes}")


def import_edm(path: str | os.PathLike, out: str | os.PathLike, *, source: str = "edm", arch: str | None = None,
               precond: str | None = None, data: str | None = None, overrides=()) -> Path:
    """Write the run directory ``out`` for the edm (``source="edm"``) or edm2 network exported to ``path``.

    ``arch``: edm's ``ddpmpp``, ``ncsnpp`` or ``adm`` (default: read off the tensors; edm2: ``edm2``).
    ``precond``: the Precond the network was trained with, by formulation name (:data:`PRECONDS`; default EDM, or
    iDDPM for a network with twice the image channels at its output; edm2: EDM only). ``data``: the data the
    network was trained on, any spec ``elucidate train --data`` takes (checked against the network's shape); without
    it the run records no data (:data:`UNKNOWN_DATA`) and eval/sweep need ``--ref``. ``overrides``: ``--set
    section.key=value`` strings applied to the written config (e.g. ``network.channels_per_head=32``, a non-default
    edm2 hyper-parameter the tensors do not show, or ``sampling.steps=64``); they may not change the network's
    tensors. The run is built in a temporary folder next to ``out`` and renamed into place; an existing ``out``
    is refused. Returns ``out``."""
    from ..config import DataInfo, build_network_for, dump_config, parse_config  # run-level code: loaded on use
    from ..config.schema import SECTIONS, parse_with_overrides
    from ..data import Normalizer
    from ..run.checkpoint import save_checkpoint
    from ..run.rundir import RunDir
    from ..runtime.files import _default_mode

    path, out = Path(path), Path(out)
    if source not in IMPORT_SOURCES:
        raise UserError(f"--from {source!r}: expected one of {', '.join(IMPORT_SOURCES)}")
    if precond is not None and precond not in PRECONDS:
        raise UserError(f"--precond {precond!r}: expected one of {', '.join(PRECONDS)}")
    if out.exists():
        raise UserError(f"{out} already exists: give a new --out directory")
    net, network, arch, precond = _load(path, source, arch, precond)
    H, W = net.img_resolution if isinstance(net.img_resolution, tuple) else (net.img_resolution,) * 2
    info = DataInfo(int(net.in_channels), (int(H), int(W)), int(getattr(net, "label_dim", 0) or 0))
    latent = source == "edm2" and info.channels == _LATENT_CHANNELS
    raw = {"data": _data_section(data), "network": network, "diffusion": dict(PRECONDS[precond]),
           "sampling": {"sampler": "heun", "steps": _steps(source, max(H, W)),
                        "schedule": "auto" if precond == "EDM" else "karras"}}
    config = parse_with_overrides(raw, list(overrides), parse_config, SECTIONS, source=path)
    if data is not None or config.data != UNKNOWN_DATA:
        _check_data(config, info)
    rebuilt = build_network_for(config, info)
    try:
        rebuilt.load_state_dict(net.state_dict())
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"--set changes the network's structure, so the tensors of {path} no longer fit ({first})") \
            from None
    for name, buffer in net.named_buffers():  # constants outside the state dict (resample filters)
        mine = dict(rebuilt.named_buffers()).get(name)
        if mine is None or mine.shape != buffer.shape or not torch.equal(mine, buffer):
            raise UserError(f"--set changes the network's constant {name!r}, which {path} fixes")
    rebuilt.eval().requires_grad_(False)
    normalizer = None if latent else Normalizer.fit(torch.zeros(1, info.channels, 1, 1, dtype=torch.uint8),
                                                    "minus_one_one")
    meta = {"step": 0, "images": 0, "config": config.to_dict(), "data": info.to_dict(),
            "normalizer": None if normalizer is None else normalizer.to_config(), "latent": None,
            "cond_normalizer": None,
            "imported": {"from": source, "source": str(path.resolve()), "arch": arch, "precond": precond}}
    if latent:
        warnings.warn(f"{path} has {_LATENT_CHANNELS} channels: an edm2 latent model (img512, Stable Diffusion VAE "
                      f"latents); elucidate cannot decode them without that VAE, so its samples are the raw latents",
                      stacklevel=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        mode = _default_mode()
        os.chmod(tmp, mode | (mode & 0o444) >> 2)  # a directory's usual mode (mkdtemp makes it private)
        run = RunDir(tmp)
        run.write_config(dump_config(config))
        run.checkpoints.mkdir()
        save_checkpoint(run.checkpoint(0), net=rebuilt, ema=rebuilt, optimizer=None, meta=meta)
        if out.exists():
            raise UserError(f"{out} already exists: give a new --out directory")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

