"""Options and helpers shared by the command modules (sampler flags, seeds, labels, tables)."""
from __future__ import annotations

import argparse
import dataclasses

from ..errors import UserError

__all__ = ["add_sampling_options", "sampling_from_args", "parse_seed_arg", "class_labels_for", "int_list",
           "print_table", "solver_help"]


def solver_help() -> str:
    """The registered solvers with their one-line descriptions (for --sampler's help)."""
    from ..sampling import SOLVERS

    return "; ".join(f"{name}: {spec.description}" for name, spec in SOLVERS.items())


def add_sampling_options(p: argparse.ArgumentParser, *, tuned: bool = True) -> None:
    """The sampler flags of sample/eval/sweep (defaults: the run's ``sampling`` section); ``tuned``
    adds ``--nfe N`` (the run's schedule tuned for N evaluations, see ``elucidate tune``)."""
    from ..sampling import SCHEDULES

    g = p.add_argument_group("sampler (defaults: the run's sampling section)")
    if tuned:
        g.add_argument("--nfe", dest="tuned_nfe", type=int, metavar="N",
                       help="use the sampler and schedule tuned for N evaluations (RUN/schedules/nfeN.json, "
                            "made by `elucidate tune RUN --nfe N`)")
    g.add_argument("--sampler", metavar="NAME", help=solver_help())
    g.add_argument("--steps", type=int, help="number of steps N (Heun: NFE = 2N - 1)")
    g.add_argument("--schedule", metavar="NAME",
                   help="auto (the formulation's own discretization) or " + ", ".join(SCHEDULES))
    g.add_argument("--s-churn", dest="s_churn", type=float, help="S_churn (EDM Algorithm 2)")
    g.add_argument("--s-min", dest="s_min", type=float, help="S_tmin: churn only for sigma >= this")
    g.add_argument("--s-max", dest="s_max", type=float, help="S_tmax: churn only for sigma <= this")
    g.add_argument("--s-noise", dest="s_noise", type=float, help="S_noise")
    g.add_argument("--eta", type=float, help="noise of ancestral / SDE samplers")
    g.add_argument("--sigma-min", dest="sigma_min", type=float, help="lowest sigma of a named schedule")
    g.add_argument("--sigma-max", dest="sigma_max", type=float, help="highest sigma of a named schedule")
    g.add_argument("--rho", type=float, help="Karras schedule exponent")
    g.add_argument("--guidance", type=float, help="classifier-free guidance weight w (1 = off, 0 = unconditional)")
    g.add_argument("--option", dest="solver_options", action="append", default=[], metavar="KEY=VALUE",
                   help="another option of the chosen solver, e.g. --option order=3 (repeatable)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="use the EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw training weights")
    p.add_argument("--batch", type=int, default=64, help="images per sampling batch (does not change results)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="fp32, bf16 autocast, or auto: bf16 where the device has bf16 hardware")


#: Flags that set a SamplingConfig field of the same name.
_SAMPLING_FLAGS = ("sampler", "steps", "schedule", "s_churn", "s_min", "s_max", "s_noise", "eta", "sigma_min",
                   "sigma_max", "rho", "guidance")


def sampling_from_args(base, args):
    """The run's SamplingConfig with the command-line overrides applied (validated). A flag given
    explicitly that the chosen solver does not take is an error (a config default is not)."""
    import yaml

    from ..config import SamplingConfig
    from ..sampling import CONFIG_OPTIONS, get_solver

    changes = {k: getattr(args, k) for k in _SAMPLING_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "tuned_nfe", None) is not None:
        base, changes = _tuned(base, args, changes)
    same_solver = changes.get("sampler", base.sampler) == base.sampler
    options = dict(base.options) if same_solver else {}  # the config's extra options belong to its solver
    for item in getattr(args, "solver_options", None) or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option {item!r}: expected KEY=VALUE, e.g. --option order=3")
        options[key.strip()] = yaml.safe_load(text)
    cfg = dataclasses.replace(base, options=options, **changes)
    SamplingConfig.validate(cfg)
    spec = get_solver(cfg.sampler)
    for key in ("s_churn", "s_min", "s_max", "s_noise", "eta"):
        if key in changes and CONFIG_OPTIONS[key] not in spec.options:
            raise UserError(f"--{key.replace('_', '-')} was given but sampler {cfg.sampler!r} does not take it "
                            f"(it takes {sorted(spec.options) or 'no options'})")
    return cfg


def _tuned(base, args, changes: dict):
    """``--nfe N``: the run's tuned sampler, options and sigmas (flags that would change them are errors)."""
    from ..model import resolve_checkpoint
    from ..sampling.tuned import tuned_config

    clash = [k for k in ("sampler", "steps", "schedule", "sigma_min", "sigma_max", "rho") if k in changes]
    clash += ["option"] if getattr(args, "solver_options", None) else []
    if clash:
        flags = ", ".join("--" + k.replace("_", "-") for k in clash)
        raise UserError(f"--nfe uses the tuned sampler and schedule; drop {flags}")
    if args.tuned_nfe < 1:
        raise UserError(f"--nfe must be >= 1, got {args.tuned_nfe}")
    return tuned_config(base, args.run, args.tuned_nfe, checkpoint=resolve_checkpoint(args.run).name), changes


def parse_seed_arg(text: str) -> list[int]:
    """--seeds as a list of ints (UserError naming the flag)."""
    from ..generate import parse_seeds

    try:
        return parse_seeds(text)
    except ValueError as e:
        raise UserError(f"--seeds: {e}") from None


def class_labels_for(run, seeds: list[int], class_label: int | None):
    """Labels for a class-conditional model: ``--class`` for all, else ``seed % num_classes``
    (so an image's label, like its noise, depends on its seed only)."""
    import torch

    label_dim = int(getattr(run.denoiser.net, "label_dim", 0) or 0)
    if class_label is not None:
        if not label_dim:
            raise UserError("--class was given but the model is not class-conditional")
        if not 0 <= class_label < label_dim:
            raise UserError(f"--class {class_label} is out of range: the model has {label_dim} classes")
        return torch.full((len(seeds),), class_label, dtype=torch.long)
    return torch.tensor(seeds) % label_dim if label_dim else None


def int_list(text: str, what: str) -> list[int]:
    """'5,9,17' -> [5, 9, 17] (positive integers; UserError naming ``what``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} {text!r}: expected comma-separated integers, e.g. 5,9,17,35") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{what} {text!r}: expected positive integers")
    return values


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def print_table(rows: list[dict], columns: list[str]) -> str:
    """Print rows as a Markdown table and return its text."""
    widths = [max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text
