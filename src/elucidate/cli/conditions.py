"""The conditions of sample/eval/sweep: ``--cond FILE.npz``, ``--unconditional`` and ``--null-cond FILE.npz`` (not a
command module: the sampling commands share it)."""
from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import UserError

__all__ = ["add_condition_options", "attach_conditions", "read_conditions", "KEYS"]

#: the keys a condition file may hold, with the shape each has
KEYS = {"class_labels": "[N] int", "concat": "[N, C, H, W]", "context": "[N, L, D]"}


def add_condition_options(p, *, evaluating: bool = False) -> None:
    """``--cond``, ``--unconditional`` and ``--null-cond``; ``evaluating``: eval/sweep's help (default: the conditions
    of the run's training data)."""
    g = p.add_argument_group("conditions (a run trained with network.conditioning; docs/conditioning.md)")
    default = ("default: those of the run's training data, seed i taking data item i %% N" if evaluating else
               "default: none; a run trained with a concat or context condition then needs --unconditional")
    rows = "row i for seed i %% N" if evaluating else "row i for the i-th seed; N = the number of seeds, or 1 for all"
    g.add_argument("--cond", type=Path, default=None, metavar="FILE.npz",
                   help=f"the conditions to sample: an .npz with class_labels [N] (ints), concat [N, C, H, W] (in "
                        f"the training data's units, normalized as training did) and/or context [N, L, D], the keys "
                        f"the run was trained with; {rows} ({default})")
    g.add_argument("--unconditional", action="store_true",
                   help="sample the unconditional model: every condition replaced by the null condition the run was "
                        "trained with (training.cond_drop_prob)")
    g.add_argument("--null-cond", type=Path, default=None, metavar="FILE.npz",
                   help="the unconditional branch of guidance (--guidance W != 1): an .npz of one condition (N = 1) "
                        "with keys as --cond (default: the built-in null: zero label, zero map, no tokens)")


def read_conditions(run, path: Path, n: int | None, flag: str = "--cond") -> dict:
    """The conditions of an .npz file in model units, checked against what ``run`` takes (one-line UserErrors
    naming the file and key): ``n`` rows (or 1), any number of rows when ``n`` is None."""
    import zipfile

    import numpy as np
    import torch

    if Path(path).is_file() and not zipfile.is_zipfile(path):
        raise UserError(f"{flag} {path}: not an .npz file (expected arrays saved by numpy.savez: "
                        f"{', '.join(f'{k} {s}' for k, s in KEYS.items())})")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except (OSError, ValueError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{flag} {path}: not a readable .npz file ({reason})") from None
    if not arrays:
        raise UserError(f"{flag} {path}: not an .npz of condition arrays (expected keys "
                        f"{', '.join(f'{k} {s}' for k, s in KEYS.items())})")
    takes = _takes(run)
    out = {}
    for key, value in arrays.items():
        if key not in KEYS:
            raise UserError(f"{flag} {path}: unknown key {key!r} (expected {', '.join(KEYS)})")
        if key not in takes:
            raise UserError(f"{flag} {path}: key {key} but the model takes no {key} (it takes "
                            f"{', '.join(f'{k} {s}' for k, s in takes.items()) or 'no condition'})")
        expected = takes[key]
        rows = value.shape[0] if value.ndim else None
        if value.ndim != len(expected) or (n is not None and rows not in (n, 1)) or rows == 0 \
                or any(e is not None and e != g for e, g in zip(expected[1:], value.shape[1:])):
            want = "[" + ", ".join(str(v) if v is not None else "L" for v in
                                   ((n if n is not None else "N"), *expected[1:])) + "]"
            raise UserError(f"{flag} {path}: {key} has shape {list(value.shape)}, expected {want}"
                            + (f" (N = {n}, the number of seeds, or 1)" if n is not None else ""))
        if key == "class_labels":
            if value.dtype.kind not in "iu":
                raise UserError(f"{flag} {path}: class_labels must be integers, got {value.dtype}")
            if value.min() < 0 or value.max() >= run.label_dim:
                raise UserError(f"{flag} {path}: class_labels must lie in 0..{run.label_dim - 1}, got "
                                f"{int(value.min())}..{int(value.max())}")
            out[key] = torch.as_tensor(value).long()
            continue
        if value.dtype not in (np.uint8, np.float32, np.float64, np.float16):
            raise UserError(f"{flag} {path}: {key} must be uint8 or float, got {value.dtype}")
        tensor = torch.as_tensor(value if value.dtype == np.uint8 else value.astype(np.float32))
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{flag} {path}: {key} has non-finite values (NaN/Inf)")
        if key == "concat":
            tensor = _cond_normalizer(run).to_model(tensor)
        else:
            tensor = tensor.float()
        out[key] = tensor
    return out


def _takes(run) -> dict[str, tuple]:
    """key -> expected shape (None = any size) of the conditions ``run`` takes."""
    takes = {key: (None, *shape) for key, shape in run.condition_shapes.items()}
    if "context" in takes:
        takes["context"] = (None, None, takes["context"][2])  # any number of tokens
    if run.label_dim:
        takes["class_labels"] = (None,)
    return takes


def _cond_normalizer(run):
    """The run's condition normalizer: stored in its checkpoints, else (an older run) refitted from its training data
    as training fitted it."""
    if getattr(run, "cond_normalizer", None) is None:
        from ..data import build_dataset

        run.cond_normalizer = getattr(build_dataset(run.config.data), "cond_normalizer", None)
        if run.cond_normalizer is None:
            raise UserError("the run's training data has no spatial condition to normalize --cond's concat like")
    return run.cond_normalizer


def _missing(run, key: str, where: str) -> str:
    shape = ", ".join(str(v) for v in run.condition_shapes[key])
    return (f"{where} was trained with a {key} condition: give it with --cond FILE.npz (key {key} of shape "
            f"[N, {shape}], N = the number of seeds), or sample the unconditional model with --unconditional")


def attach_conditions(run, args, seeds: list[int] | None = None, cfg=None) -> None:
    """Set ``run.conditions`` (and ``run.null_cond``) from ``--cond`` / ``--unconditional`` / ``--null-cond``.
    ``seeds``: sample's seeds (a --cond file has one row per seed, or 1); None for eval/sweep, whose default is the
    run's training data (seed i -> data item i % N) and whose --cond rows repeat (seed i -> row i % N)."""
    import torch

    cond_file, unconditional = getattr(args, "cond", None), getattr(args, "unconditional", False)
    null_file = getattr(args, "null_cond", None)
    where = str(getattr(args, "run", None) or "the model")
    if cond_file is not None and unconditional:
        raise UserError("--cond and --unconditional exclude each other")
    if unconditional and getattr(args, "class_label", None) is not None:
        raise UserError("--class and --unconditional exclude each other")
    if null_file is not None:
        if unconditional:
            raise UserError("--null-cond is the unconditional branch of guidance; --unconditional samples it alone")
        if cfg is not None and cfg.guidance == 1:
            raise UserError("--null-cond is the unconditional branch of guidance: it needs --guidance W != 1")
        null = read_conditions(run, null_file, 1, "--null-cond")
        run.null_cond = null
    if unconditional:
        if (run.condition_shapes or run.label_dim) and not run.config.training.cond_drop_prob:
            warnings.warn_explicit(f"--unconditional: {where} was trained with training.cond_drop_prob = 0, so the "
                                   "model never saw the null condition (its unconditional samples are untrained "
                                   "behaviour)",
                                   UserWarning, "elucidate", 0)
        run.conditions = lambda s: run.null_conditions(len(s))
        return
    if cond_file is not None:
        given = read_conditions(run, cond_file, None if seeds is None else len(seeds))
        missing = [key for key in run.condition_shapes if key not in given]
        if missing:
            shape = ", ".join(str(v) for v in run.condition_shapes[missing[0]])
            raise UserError(f"--cond {cond_file} has no key {missing[0]}: {where} was trained with a {missing[0]} "
                            f"condition (give it as key {missing[0]} of shape [N, {shape}], or use --unconditional)")
        class_label = getattr(args, "class_label", None)
        if class_label is not None and "class_labels" in given:
            raise UserError(f"--class {class_label} and --cond {cond_file} with class_labels exclude each other")
        position = None if seeds is None else {s: i for i, s in enumerate(seeds)}

        def from_file(chosen):
            out = {}
            for key, value in given.items():
                if value.shape[0] == 1:
                    out[key] = value.expand(len(chosen), *value.shape[1:])
                else:
                    rows = [position[s] if position is not None else s % value.shape[0] for s in chosen]
                    out[key] = value[torch.tensor(rows)]
            return out
        run.conditions = from_file
        return
    if not run.condition_shapes:
        return
    if seeds is not None:
        raise UserError(_missing(run, next(iter(run.condition_shapes)), where))
    if run.decode is not None:
        raise UserError(f"{where} is a latent run trained with a condition: give it with --cond FILE.npz or use "
                        "--unconditional")
    from ..data import build_dataset

    dataset = build_dataset(run.config.data)  # eval/sweep: the training data's conditions, seed i -> item i % N
    keys = set(run.condition_shapes)
    num = dataset.num_images
    run.conditions = lambda chosen: {k: v for k, v in dataset.get_conditions(torch.tensor(
        [s % num for s in chosen])).items() if k in keys}
