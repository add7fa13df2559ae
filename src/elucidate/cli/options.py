"""Options and helpers shared by the command modules (the help formatter, the run flags every model-running command
takes, sampler flags, seeds, labels, tables)."""
from __future__ import annotations

import argparse
import dataclasses

from ..config import SECTION_TYPES
from ..config.schema import load_yaml
from ..errors import UserError
from ..params import describe
from ..run.model import resolve_checkpoint
from ..runtime.precision import PRECISIONS
from ..sampling import CONFIG_OPTIONS, SAMPLERS, SCHEDULES, get_sampler
from ..tuning.stored import tuned_config

__all__ = ["HelpFormatter", "add_run_options", "DEVICE_HELP", "PROGRESS_HELP", "add_sampling_options",
           "sampling_from_args", "check_guidance", "parse_seed_arg", "parse_seeds", "class_labels_for", "int_list",
           "print_table", "sampler_help", "schedule_help", "sampling_flags"]


class HelpFormatter(argparse.HelpFormatter):
    """The help of every command: each option's default after its help, as "(default: X)", unless the help already
    says it. Flags (store_true/false) and options whose default is None show none: their help says what leaving
    them out does (tests/cli/test_cli_contract.py checks it)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.nargs == 0 or default in (None, argparse.SUPPRESS)
                or isinstance(default, bool) or default == [] or "default" in text.lower()):
            return text
        return text + " (default: %(default)s)"


#: ``--device``'s help (the default is resolved once, by :func:`elucidate.runtime.distributed.pick_device`)
DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda if available, else cpu; under torchrun each rank's own GPU)"
#: ``--no-progress``'s help
PROGRESS_HELP = "no progress bars or progress lines (default: shown)"


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--no-progress``: the flags of every command that runs a model, the same everywhere
    (``args.device`` None means the default device, which ``elucidate.cli.main`` resolves; ``args.progress``)."""
    g = p.add_argument_group("running")
    g.add_argument("--device", default=None, help=DEVICE_HELP)
    g.add_argument("--no-progress", dest="progress", action="store_false", help=PROGRESS_HELP)


def sampler_help() -> str:
    """The registered samplers with their one-line descriptions (for --sampler's help)."""
    return "; ".join(f"{name}: {spec.description}" for name, spec in SAMPLERS.items())


def schedule_help() -> str:
    """The named schedules with their one-line descriptions (for --schedule's help)."""
    return "auto (the formulation's own discretization); " + "; ".join(
        f"{name}: {spec.description}" for name, spec in SCHEDULES.items()) + "; options after a colon: karras:rho=3"


def sampling_flags() -> list:
    """The sampling keys that are command-line flags (declared ``flag=True``), in declaration order."""
    return [p for p in describe(SECTION_TYPES["sampling"]) if p.flag]


def _numbers(text: str) -> list[float]:
    """A list flag's value: comma-separated numbers, e.g. --guidance-interval 0.3,5 (inf allowed)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0.3,5") from None


_KINDS = {"int": int, "float": float, "str": str, "list": _numbers}
_HELP = {"sampler": sampler_help, "schedule": schedule_help}
_METAVARS = {"guide": "RUN_OR_CKPT", "guidance_interval": "LO,HI"}


def add_sampling_options(p: argparse.ArgumentParser, *, tuned: bool = True) -> None:
    """The sampler flags of sample/eval/sweep, one per sampling key declared ``flag=True`` (defaults: the run's
    ``sampling`` section), plus ``--option KEY=VALUE``; ``tuned`` adds ``--nfe N`` (the run's schedule tuned for N
    evaluations, see ``elucidate tune``); and the run options (:func:`add_run_options`)."""
    g = p.add_argument_group("sampler (defaults: the run's sampling section)")
    if tuned:
        g.add_argument("--nfe", dest="tuned_nfe", type=int, metavar="N",
                       help="use the sampler and schedule tuned for N evaluations (RUN/schedules/nfeN.json, "
                            "made by `elucidate tune RUN --nfe N`; default: the run's sampling section)")
    for doc in sampling_flags():
        text = _HELP[doc.name]() if doc.name in _HELP else doc.doc + (f" ({doc.symbol})" if doc.symbol else "")
        if "default" not in text:  # else the key's own doc says what its default means
            text += f" (default: the run's sampling.{doc.name})"
        if doc.kind == "bool":  # --clip-denoised / --no-clip-denoised (left out: the run's setting)
            g.add_argument("--" + doc.name.replace("_", "-"), dest=doc.name, action=argparse.BooleanOptionalAction,
                           default=None, help=text.replace("%", "%%"))
            continue
        metavar = _METAVARS.get(doc.name, "NAME" if doc.kind == "str" else None)
        g.add_argument("--" + doc.name.replace("_", "-"), dest=doc.name, type=_KINDS[doc.kind],
                       metavar=metavar, help=text.replace("%", "%%"))
    g.add_argument("--option", dest="sampler_options", action="append", default=[], metavar="KEY=VALUE",
                   help="another option of the chosen sampler, e.g. --option order=3 (repeatable)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="use the EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw training weights")
    p.add_argument("--batch", type=int, default=64, help="images per sampling batch (does not change results)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="fp32, bf16 or fp16 autocast of the network (the solver stays float32), or auto: bf16 "
                        "where the device has bf16 hardware, else fp32; fp16 for GPUs without bf16 (V100, T4)")
    add_run_options(p)


def sampling_from_args(base, args, *, run=None):
    """The run's SamplingConfig with the command-line overrides applied (validated). A flag given
    explicitly that the chosen sampler does not take is an error (a config default is not); so is ``--guidance``
    for a ``run`` (LoadedRun) without a condition to guide (:func:`check_guidance`)."""
    if run is not None:
        check_guidance(run, getattr(args, "guidance", None), guide=getattr(args, "guide", None) or base.guide)
    changes = {p.name: getattr(args, p.name) for p in sampling_flags() if getattr(args, p.name, None) is not None}
    if getattr(args, "tuned_nfe", None) is not None:
        base, changes = _tuned(base, args, changes)
    same_sampler = changes.get("sampler", base.sampler) == base.sampler
    options = dict(base.options) if same_sampler else {}  # the config's extra options belong to its sampler
    for item in getattr(args, "sampler_options", None) or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option {item!r}: expected KEY=VALUE, e.g. --option order=3")
        options[key.strip()] = load_yaml(text)
    cfg = dataclasses.replace(base, options=options, **changes)
    cfg.validate()
    for key in ("guide", "guidance_interval"):
        if key in changes and cfg.guidance == 1:
            raise UserError(f"--{key.replace('_', '-')} has no effect without guidance: give --guidance W (W != 1, "
                            "e.g. 2)")
    spec = get_sampler(cfg.sampler)
    for key, arg in CONFIG_OPTIONS.items():
        if key in changes and arg not in spec.options:
            raise UserError(f"--{key.replace('_', '-')} was given but sampler {cfg.sampler!r} does not take it "
                            f"(it takes {sorted(spec.options) or 'no options'})")
    return cfg


#: the network attributes that make a model conditional (class labels, concatenated maps, cross-attention tokens)
_CONDITIONS = ("label_dim", "cond_channels", "context_dim")


def check_guidance(run, guidance: float | None, *, guide=None) -> None:
    """``--guidance W`` (W != 1) on a model without a condition is an error: classifier-free guidance mixes the
    conditional and the unconditional prediction, and such a model has only one. With a ``guide`` (autoguidance,
    ``--guide``) any model can be guided."""
    if guidance is None or guidance == 1 or guide is not None:
        return
    net = getattr(run.denoiser, "net", None)
    if not any(getattr(net, name, 0) for name in _CONDITIONS):
        raise UserError(f"--guidance {guidance:g}: the model has no condition to guide (it is not class-conditional "
                        "and takes no condition maps or tokens); classifier-free guidance needs a conditional model "
                        "trained with training.cond_drop_prob > 0 (docs/guidance.md)")


def _tuned(base, args, changes: dict):
    """``--nfe N``: the run's tuned sampler, options and sigmas (flags that would change them are errors)."""
    clash = [k for k in ("sampler", "steps", "schedule", "sigma_min", "sigma_max", "rho") if k in changes]
    clash += ["option"] if getattr(args, "sampler_options", None) else []
    if clash:
        flags = ", ".join("--" + k.replace("_", "-") for k in clash)
        raise UserError(f"--nfe uses the tuned sampler and schedule; drop {flags}")
    if args.tuned_nfe < 1:
        raise UserError(f"--nfe must be >= 1, got {args.tuned_nfe}")
    return tuned_config(base, args.run, args.tuned_nfe, checkpoint=resolve_checkpoint(args.run).name), changes


def parse_seed_arg(text: str) -> list[int]:
    """--seeds as a list of ints (UserError naming the flag, e.g. "--seeds 0-3,2: seed 2 appears twice")."""
    try:
        return parse_seeds(text)
    except ValueError as e:
        message, prefix = str(e), f"seeds {text!r}: "
        raise UserError(f"--seeds {text}: {message.removeprefix(prefix)}") from None


def class_labels_for(run, seeds: list[int], class_label: int | None):
    """Labels for a class-conditional model: ``--class`` for all, else ``seed % num_classes``
    (so an image's label, like its noise, depends on its seed only)."""
    import torch

    label_dim = run.label_dim
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


#: the most seeds one range may name (a typo such as 0-10000000000 must not exhaust memory)
MAX_SEEDS = 10_000_000


def parse_seeds(text: str) -> list[int]:
    """'0-63' -> [0..63]; '1,5,9' and '0-9,20-29' also work."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i or hi_i - lo_i >= MAX_SEEDS:
                    raise ValueError
                seeds.extend(range(lo_i, hi_i + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"seeds {text!r}: expected e.g. 0-63 or 1,5,9 (at most {MAX_SEEDS:,} per range)") from None
    if not seeds:
        raise ValueError(f"seeds {text!r}: no seeds given")
    if len(set(seeds)) < len(seeds):
        seen: set[int] = set()
        twice = next(s for s in seeds if s in seen or seen.add(s))
        raise ValueError(f"seeds {text!r}: seed {twice} appears twice (each seed is one image)")
    if min(seeds) < 0 or max(seeds) >= 2**63:
        raise ValueError(f"seeds {text!r}: seeds must be in 0..2**63-1")
    return seeds
