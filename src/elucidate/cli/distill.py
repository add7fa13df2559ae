"""The distill command: one- and few-step generation from a trained run by consistency distillation (cd) or easy
consistency tuning (ect) into a new run (docs/distillation.md)."""
from __future__ import annotations

from pathlib import Path

from .options import add_run_options

__all__ = ["register"]


def register(sub) -> dict:
    """Add the distill subcommand; returns its handler."""
    from ..config.distill import METHODS
    from ..training.distill import DEFAULT_STEPS

    p = sub.add_parser("distill", help="one- and few-step generation: distill a run into a consistency model, a new "
                                       "run (cd or ect; docs/distillation.md)")
    p.add_argument("run", type=Path, help="the trained run directory or checkpoint (its EMA weights)")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="cd: consistency distillation on the run's ODE (Song et al. 2023); ect: easy consistency "
                        "tuning, no teacher calls (Geng et al. 2024)")
    p.add_argument("--out", type=Path, required=True, help="the new run directory (resumed if it has started)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help=f"distillation steps (default {DEFAULT_STEPS}; sets training.steps, may be raised on resume)")
    p.add_argument("--metric", default=None, choices=("l2", "pseudo_huber"),
                   help="the distance d (default: cd l2, ect ECT's ||.||, i.e. pseudo_huber with c = 0)")
    p.add_argument("--epsilon", type=float, default=None,
                   help="the student's boundary f(x, epsilon) = x (default: cd of an EDM run 0.002, Song et al.'s; "
                        "else 0, the run's own preconditioning)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the new run's config, e.g. --set training.lr=1e-4 or --set "
                        "distill.levels=40 (repeatable)")
    add_run_options(p)
    return {"distill": cmd_distill}


def cmd_distill(args) -> int:
    from ..errors import UserError
    from ..run import RunDir
    from ..training.distill import DEFAULT_STEPS, distill
    from .train import _report

    started = RunDir(args.out).config.is_file()
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: expected an integer >= 1")
    if started and (args.metric is not None or args.epsilon is not None):
        raise UserError(f"{args.out} has started: its metric and epsilon are in its config; leave out --metric and "
                        f"--epsilon to resume it")
    overrides = list(args.overrides) + ([f"training.steps={args.steps}"] if (started and args.steps) else [])
    summary = distill(args.run, args.out, method=args.method, steps=args.steps or DEFAULT_STEPS, metric=args.metric,
                      epsilon=args.epsilon, overrides=overrides, device=args.device, progress=args.progress)
    return _report(summary, f"distilled ({args.method}) to step {summary['step']}; checkpoint: "
                            f"{summary['checkpoint']}; sample it with: elucidate sample {args.out} --steps 1 (or 2, 4) "
                            f"--out grid.png")
