"""Post-hoc EMA commands: ema (reconstruct an EMA length from a run's snapshots), and the EMA-length
sweep behind ``elucidate sweep RUN --ema-stds``."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

__all__ = ["register", "ema_stds", "ema_sweep"]


def register(sub) -> dict:
    """Add the ema subcommand; returns its handler."""
    p = sub.add_parser("ema", help="reconstruct the EMA of any relative std from a run's power EMA snapshots")
    p.add_argument("run", type=Path, help="run directory trained with training.ema: {type: power, ...}")
    p.add_argument("--std", type=float, required=True, help="relative std sigma_rel of the EMA, e.g. 0.07")
    p.add_argument("--out", type=Path, default=None,
                   help="checkpoint to write (default RUN/phema/ema-STD.safetensors, which --ema-std reuses; "
                        "with --step RUN/phema/ema-STD-stepSTEP.safetensors)")
    p.add_argument("--step", type=int, default=None,
                   help="reconstruct the EMA as it was at this training step (a snapshot's; e.g. an early sibling "
                        "for autoguidance: sample RUN --guide THAT_FILE) (default: the last snapshot)")
    return {"ema": cmd_ema}


def cmd_ema(args) -> int:
    from ..training.ema import write_ema_checkpoint

    path = write_ema_checkpoint(args.run, args.std, args.out, step=args.step)
    if args.step is None:
        print(f"wrote {path} (EMA with relative std {args.std:g}; `elucidate sample {path} ...` or --ema-std "
              f"{args.std:g} uses it)")
    else:
        print(f"wrote {path} (EMA with relative std {args.std:g} at step {args.step}; `elucidate sample {path} ...`, "
              f"or `--guide {path}` to autoguide the final model by it)")
    return 0


def ema_stds(text: str) -> list[float]:
    """``--ema-stds 0.02,0.04`` as numbers (each checked)."""
    from ..training.ema import check_std

    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--ema-stds {text!r}: expected comma-separated numbers, e.g. 0.02,0.05,0.10") from None
    if not values:
        raise UserError("--ema-stds: give at least one relative std")
    return [check_std(s) for s in values]


def ema_sweep(args, evaluate_run) -> list[Path]:
    """Quality at the configured sampler for each ``--ema-stds`` value: a table and a plot of the
    metric vs EMA length in RUN/sweep. ``evaluate_run(run) -> (result, cfg)`` scores one LoadedRun."""
    from ..run import RunDir, load_run
    from ..runtime.files import atomic_write_text
    from ..training.ema import ema_checkpoint
    from ..viz.common import new_figure, save_figure
    from .options import print_table

    stds, rows = ema_stds(args.ema_stds), []
    for std in stds:
        run = load_run(ema_checkpoint(args.run, std), device=args.device)
        result, cfg = evaluate_run(run)
        rows.append({"ema_std": std, "sampler": cfg.sampler, "steps": cfg.steps, "nfe": result["nfe"],
                     "value": result["value"], "step": run.step})
        print(f"  EMA std {std:.3f}  {args.metric} {result['value']:.4g}")
    out_dir = args.out or RunDir(args.run).sweep
    stem = f"{args.metric}-vs-ema-std"
    md_path, png_path = out_dir / f"{stem}.md", out_dir / f"{stem}.png"
    atomic_write_text(md_path, print_table(rows, list(rows[0])) + "\n")
    fig = new_figure(6.5, 4.2)
    ax = fig.subplots(1, 1)
    ax.plot([r["ema_std"] for r in rows], [r["value"] for r in rows], "o-", lw=1.8)
    best = min(rows, key=lambda r: r["value"])
    ax.plot(best["ema_std"], best["value"], "o", ms=12, mfc="none", mec="k", mew=1.2)
    ax.set_xlabel("EMA length (relative std sigma_rel)")
    ax.set_ylabel(args.metric)
    ax.set_title(f"{args.metric} vs post-hoc EMA length ({rows[0]['sampler']}, NFE {rows[0]['nfe']}, "
                 f"{args.num} samples, step {rows[0]['step']})", fontsize=9)
    save_figure(fig, png_path)
    return [md_path, png_path]
