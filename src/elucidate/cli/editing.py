"""Editing from the command line: ``sample RUN --init PATH --strength S`` (image-to-image, SDEdit) and ``sample RUN
--init PATH --mask PATH [--resample R]`` (inpainting, RePaint), and the ``--compare`` grid (not a command module:
sample uses it)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

__all__ = ["add_editing_options", "check_editing_args", "editing_inputs", "edit_rows", "write_compare"]


def add_editing_options(p) -> None:
    """``--init``, ``--strength``, ``--mask``, ``--resample`` and ``--compare``."""
    g = p.add_argument_group("editing (docs/editing.md)")
    g.add_argument("--init", type=Path, default=None, metavar="PATH",
                   help="images to edit: a PNG/JPG, a folder of them or an .npz (as sample --out writes: uint8 samples "
                        "[N, H, W, C], or values in the data's units), of the run's resolution and channels; with "
                        "fewer images than seeds they repeat cyclically (seed i edits image i %% N) (default: none, "
                        "sample from noise)")
    g.add_argument("--strength", type=float, default=None, metavar="S",
                   help="image-to-image (SDEdit): how much of the schedule to run from --init, 0 (return the input) "
                        "to 1 (start from pure noise) (default: none; --init needs --strength or --mask)")
    g.add_argument("--mask", type=Path, default=None, metavar="PATH",
                   help="inpainting (RePaint): keep --init where the mask is white (PNG) or 1 (.npz, [H, W] or one "
                        "per image), generate the rest (default: none)")
    g.add_argument("--resample", type=int, default=None, metavar="R",
                   help="inpainting: RePaint's resampling, each step run R times (1 = plain replacement; the cost "
                        "grows R-fold) (default: 10)")
    g.add_argument("--compare", action="store_true",
                   help="with --init: the --out grid shows input, mask (inpainting) and result side by side, one row "
                        "per seed (default: results only)")


def check_editing_args(args) -> None:
    """The editing flags' combinations and values, before anything is loaded (one-line UserErrors)."""
    init, strength, mask, resample = args.init, args.strength, args.mask, args.resample
    if init is None:
        for flag, value in (("--strength", strength), ("--mask", mask), ("--resample", resample)):
            if value is not None:
                raise UserError(f"{flag} needs --init PATH (the images to edit)")
        if args.compare:
            raise UserError("--compare needs --init PATH (the images to edit)")
        return
    if strength is None and mask is None:
        raise UserError("--init needs --strength S (image-to-image) or --mask PATH (inpainting)")
    if strength is not None and mask is not None:
        raise UserError("--strength and --mask are two different edits: give one (--strength: image-to-image, "
                        "--mask: inpainting)")
    if strength is not None and not 0 <= strength <= 1:
        raise UserError(f"--strength {strength:g}: expected a number in [0, 1] (0 returns the input, 1 ignores it)")
    if resample is not None and mask is None:
        raise UserError("--resample needs --mask PATH (it is inpainting's)")
    if resample is not None and resample < 1:
        raise UserError(f"--resample {resample}: expected an integer >= 1 (1 = plain replacement)")
    if args.compare and Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"--compare draws a grid: --out {args.out} must be a .png (or .jpg) file")
    if getattr(args, "trajectory", None) is not None:
        raise UserError("--trajectory draws sampling from noise; it does not combine with --init")


def editing_inputs(run, args, seeds: list[int]) -> dict:
    """The keyword arguments of :meth:`LoadedRun.sample` the editing flags ask for (``{}`` without ``--init``):
    ``init`` (one row per seed, model units), ``strength`` or ``mask`` and ``resample``."""
    if args.init is None:
        return {}
    if run.decode is not None:
        raise UserError(f"--init edits images in pixel space, but {run.checkpoint} is a latent diffusion run")
    images = read_images(args.init, run, "--init")
    init = images[[i % len(images) for i in range(len(seeds))]]  # fewer images than seeds: cyclically
    if args.mask is None:
        return {"init": init, "strength": args.strength}
    mask = read_mask(args.mask, run)
    if mask.ndim == 4 and mask.shape[0] > 1:
        mask = mask[[i % len(mask) for i in range(len(seeds))]]
    return {"init": init, "mask": mask, "resample": 10 if args.resample is None else args.resample}


def edit_rows(edit: dict, rows: range) -> dict:
    """``edit`` for the seeds ``rows`` (a process's share under torchrun)."""
    out = dict(edit)
    for key in ("init", "mask"):
        value = out.get(key)
        if value is not None and value.ndim == 4 and value.shape[0] > 1:
            out[key] = value[rows.start:rows.stop]
    return out


def _expected(run) -> str:
    C, H, W = run.shape
    return f"{H}x{W} images with {C} channel{'s' if C > 1 else ''}"


def read_images(path: Path, run, flag: str):
    """Images in model units ``[N, C, H, W]`` from a PNG/JPG, a folder of them or an .npz, checked against ``run``."""
    import torch

    from ..data import IMAGE_EXTENSIONS

    path = Path(path)
    C, H, W = run.shape
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file or folder (expected {_expected(run)})")
    if path.suffix.lower() == ".npz":
        return _check_shape(_npz_images(path, run, flag), path, run, flag)
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise UserError(f"{flag} {path}: no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) in the folder")
    elif path.suffix.lower() in IMAGE_EXTENSIONS:
        names, path = [path.name], path.parent
    else:
        raise UserError(f"{flag} {path}: expected a PNG/JPG image, a folder of them or an .npz ({_expected(run)})")
    pixels = _decode(path, names, C, flag)
    _check_shape(pixels, path / names[0] if len(names) == 1 else path, run, flag)
    return _pixels_to_model(pixels.to(torch.float32), run)


def _decode(folder: Path, names: list[str], channels: int | None, flag: str):
    from ..data import DataError
    from ..data.images import load_images

    try:
        return load_images(names, lambda n: (folder / n).read_bytes(), str(folder), channels=channels)
    except (DataError, OSError) as e:
        raise UserError(f"{flag} {e}") from None


def _check_shape(x, path: Path, run, flag: str):
    if tuple(x.shape[1:]) != tuple(run.shape):
        got = f"{x.shape[-2]}x{x.shape[-1]} with {x.shape[1]} channels" if x.ndim == 4 else f"shape {list(x.shape)}"
        raise UserError(f"{flag} {path}: {got}, but the run generates {_expected(run)}")
    return x


def _pixels_to_model(pixels, run):
    """0..255 pixel values -> model units: back through the stored range (e.g. digits 0..16) and the run's normalizer,
    the inverse of the conversion every written image went through (:func:`elucidate.data.pixels.to_uint8`)."""
    normalizer = run.normalizer
    if normalizer is not None and getattr(normalizer, "value_range", None) is not None:
        lo, hi = normalizer.value_range
        return normalizer.to_model(lo + pixels / 255.0 * (hi - lo))
    return pixels / 127.5 - 1.0


def _npz_images(path: Path, run, flag: str):
    import numpy as np
    import torch

    arrays = _load_npz(path, flag)
    C, H, W = run.shape
    if "values" in arrays:  # sample --out FILE.npz: the data's own units [N, H, W, C]
        values = torch.from_numpy(np.asarray(arrays["values"], dtype=np.float32))
        values = _nchw(values, path, run, flag)
        return values if run.normalizer is None else run.normalizer.to_model(values)
    key = "samples" if "samples" in arrays else next(iter(arrays)) if len(arrays) == 1 else None
    if key is None:
        raise UserError(f"{flag} {path}: expected an array 'samples' (uint8 [N, H, W, C]) or 'values' (the data's "
                        f"units), or a single array; found {', '.join(arrays)}")
    array = np.asarray(arrays[key])
    if array.dtype != np.uint8:
        raise UserError(f"{flag} {path}: {key} is {array.dtype}; expected uint8 pixels [N, {H}, {W}, {C}] (or "
                        "'values' in the data's units)")
    return _pixels_to_model(_nchw(torch.from_numpy(array).float(), path, run, flag), run)


def _nchw(x, path: Path, run, flag: str):
    """[N, H, W, C] (or [N, H, W] for one channel, or [N, C, H, W]) -> [N, C, H, W]."""
    C, H, W = run.shape
    if x.ndim == 3 and C == 1:
        x = x[..., None]
    if x.ndim == 4 and tuple(x.shape[1:]) == (H, W, C):
        return x.permute(0, 3, 1, 2).contiguous()
    if x.ndim == 4 and tuple(x.shape[1:]) == (C, H, W):
        return x
    raise UserError(f"{flag} {path}: shape {list(x.shape)}, but the run generates {_expected(run)} "
                    f"([N, {H}, {W}, {C}])")


def _load_npz(path: Path, flag: str) -> dict:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{flag} {path}: not a readable .npz file ({reason})") from None
    if not isinstance(arrays, dict) or not arrays:
        raise UserError(f"{flag} {path}: an .npz with no arrays")
    return arrays


def read_mask(path: Path, run):
    """The inpainting mask, 1 = keep: a PNG (white = keep, thresholded at half) of the run's resolution, or an .npz
    of one array in [0, 1] shaped [H, W], [1, H, W], [N, 1, H, W] or [N, C, H, W]."""
    import numpy as np
    import torch

    from ..data import IMAGE_EXTENSIONS

    path = Path(path)
    C, H, W = run.shape
    shapes = f"[{H}, {W}], [1, {H}, {W}] or [N, 1, {H}, {W}]" + (f" or [N, {C}, {H}, {W}]" if C > 1 else "")
    if not path.is_file():
        raise UserError(f"--mask {path}: no such file (expected a {H}x{W} PNG, white = keep, or an .npz {shapes})")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        pixels = _decode(path.parent, [path.name], 1, "--mask")
        if tuple(pixels.shape[-2:]) != (H, W):
            raise UserError(f"--mask {path}: {pixels.shape[-2]}x{pixels.shape[-1]}, but the run generates {H}x{W} "
                            "images")
        return (pixels[0, 0] >= 128).float()  # white = keep
    if path.suffix.lower() != ".npz":
        raise UserError(f"--mask {path}: expected a PNG (white = keep) or an .npz {shapes}")
    arrays = _load_npz(path, "--mask")
    key = "mask" if "mask" in arrays else next(iter(arrays)) if len(arrays) == 1 else None
    if key is None:
        raise UserError(f"--mask {path}: expected an array 'mask' or a single array; found {', '.join(arrays)}")
    mask = np.asarray(arrays[key])
    if mask.dtype == bool:
        mask = mask.astype(np.float32)
    if not np.issubdtype(mask.dtype, np.number):
        raise UserError(f"--mask {path}: {key} is {mask.dtype}; expected numbers in [0, 1]")
    mask = torch.from_numpy(mask.astype(np.float32))
    ok = (mask.shape[-2:] == (H, W) and (mask.ndim == 2 or (mask.ndim == 3 and mask.shape[0] == 1)
                                        or (mask.ndim == 4 and mask.shape[1] in (1, C))))
    if not ok:
        raise UserError(f"--mask {path}: shape {list(mask.shape)}; expected {shapes}")
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise UserError(f"--mask {path}: values must be in [0, 1] (1 = keep, 0 = generate)")
    return mask


def write_compare(x, edit: dict, out: Path) -> Path:
    """The --compare grid: one row per seed with the input, the mask shown on it (unknown pixels grey; inpainting
    only) and the result."""
    import torch

    from ..viz import save_image_grid

    init = edit["init"].to(x)
    columns = [init]
    if edit.get("mask") is not None:
        mask = edit["mask"].to(x).expand_as(init)
        columns.append(torch.where(mask >= 0.5, init, torch.zeros_like(init)))
    columns.append(x)
    return save_image_grid(torch.stack(columns, 1).flatten(0, 1), out, nrow=len(columns))
