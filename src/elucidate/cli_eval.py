"""Evaluation commands of the CLI: eval, ref, sweep, plot, report."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .errors import UserError

__all__ = ["add_eval_commands", "EVAL_HANDLERS"]


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} {text!r}: expected comma-separated integers, e.g. 5,9,17,35") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{what} {text!r}: expected positive integers")
    return values


def add_eval_commands(sub, add_sampling_options) -> None:
    """Register the evaluation subcommands on ``sub``."""
    p = sub.add_parser("eval", help="sample a run and score it (fd_digits, fid, kid, pr)")
    p.add_argument("run", type=Path)
    p.add_argument("--metric", default="fd_digits", choices=["fd_digits", "fid", "kid", "pr"])
    p.add_argument("--num", type=int, default=10000, help="samples per repeat (seeds 0..num-1, then num..2num-1 ...)")
    p.add_argument("--ref", default=None, help="reference: stats .npz (mu, sigma), 'digits', a folder, zip or array "
                                               "(default: the run's training data)")
    p.add_argument("--repeats", type=int, default=1, help="repeat over disjoint seed ranges; report mean and min "
                                                          "(the EDM paper uses 3)")
    p.add_argument("--features", default=None, help="kid/pr feature network: digits or inception")
    p.add_argument("--inception", default=None, help="local path to pt_inception-2015-12-05-6726825d.pth")
    add_sampling_options(p)

    p = sub.add_parser("ref", help="compute reference feature statistics of a dataset")
    p.add_argument("data", help="'digits', an image folder, a .zip or an .npz/.npy array")
    p.add_argument("--metric", default="fd_digits", choices=["fd_digits", "fid"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--keep-features", action="store_true", help="also store the features (for KID / PR)")
    p.add_argument("--inception", default=None)
    p.add_argument("--device", default=None)

    p = sub.add_parser("sweep", help="quality vs NFE for several samplers (or the exact-denoiser sandbox)")
    p.add_argument("run", type=Path, nargs="?", help="run directory (omit with --sandbox)")
    p.add_argument("--sandbox", action="store_true", help="no model: RMSE to the converged ODE solution of the "
                                                           "digits Gaussian mixture")
    p.add_argument("--samplers", default="heun,euler,dpmpp_2m,lms")
    p.add_argument("--nfe", default="5,9,17,35,63")
    p.add_argument("--metric", default="fd_digits", choices=["fd_digits", "fid", "kid", "pr"])
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--ref", default=None)
    p.add_argument("--features", default=None)
    p.add_argument("--inception", default=None)
    p.add_argument("--schedules", default="karras,exponential,vp", help="sandbox discretizations")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN/sweep or ./sweep)")
    add_sampling_options(p)

    p = sub.add_parser("plot", help="a run's plots (RUN), or the didactic ones: schedules, flow")
    p.add_argument("target", help="a run directory, 'schedules' or 'flow'")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN/plots or ./plots)")

    p = sub.add_parser("report", help="one self-contained HTML page for a run")
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, default=None)


def _reference(args, run, extractor_name: str, need_features: bool):
    from .evaluation import load_reference

    spec = args.ref
    if spec is None:
        data = run.config.data
        spec = data["dataset"] if data["dataset"] in ("digits", "faces") else data.get("path")
        if spec is None:
            raise UserError("--ref is required (the run's data section has no path)")
    return load_reference(spec, extractor_name, inception=args.inception, device=args.device,
                          need_features=need_features)


def _print_table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def cmd_eval(args) -> int:
    from .cli import sampling_from_args
    from .evaluation import evaluate, feature_extractor, feature_name
    from .fileio import atomic_write_text
    from .model import load_run

    run = load_run(args.run, ema=args.ema, device=args.device)
    cfg = sampling_from_args(run.config.sampling, args)
    name = feature_name(args.metric, args.features, run.config.data.get("dataset"))
    ref = _reference(args, run, name, need_features=args.metric in ("kid", "pr"))
    result = evaluate(run, args.metric, num=args.num, ref=ref, extractor=feature_extractor(name, args.inception, args.device),
                      cfg=cfg, repeats=args.repeats, batch_size=args.batch, device=args.device, progress=True)
    run_dir = run.checkpoint.parent.parent if run.checkpoint.parent.name == "checkpoints" else run.checkpoint.parent
    out = run_dir / "eval" / f"{args.metric}-{cfg.sampler}-{cfg.steps}steps-{args.num}-step{run.step}.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    columns = ["metric", "value", "min", "num", "repeats", "sampler", "steps", "nfe", "features", "step"]
    columns += [k for k in ("precision", "recall", "std") if k in result]
    _print_table([result], columns)
    print(f"wrote {out}")
    return 0


def cmd_ref(args) -> int:
    from .evaluation import load_reference
    from .metrics import save_stats

    name = "fd_digits" if args.metric == "fd_digits" else "inception"
    ref = load_reference(args.data, name, inception=args.inception, device=args.device)
    extra = {"features": ref.features} if args.keep_features else {}
    save_stats(args.out, ref.mu, ref.sigma, **extra)
    print(f"wrote {args.out}: {name} statistics of {args.data} ({ref.mu.shape[0]}-d)")
    return 0


def _write_sweep(rows: list[dict], out_dir: Path, stem: str, metric: str, title: str) -> list[Path]:
    from .fileio import atomic_write_text
    from .viz import plot_quality_vs_nfe, save_figure

    columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    csv_path, md_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "png"))
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_text(md_path, _print_table(rows, columns) + "\n")
    save_figure(plot_quality_vs_nfe(rows, metric, title=title), png_path)
    return [csv_path, md_path, png_path]


def cmd_sweep(args) -> int:
    nfes = _int_list(args.nfe, "--nfe")
    if args.sandbox:
        from .sandbox import sandbox_sweep

        solvers = args.samplers.split(",")
        if args.samplers == "heun,euler,dpmpp_2m,lms":
            solvers += ["dpmpp_3m"]
        try:
            rows = sandbox_sweep(solvers=solvers, schedules=args.schedules.split(","), nfes=nfes, progress=True)
        except ValueError as e:  # unknown solver / schedule names
            raise UserError(str(e)) from None
        rows = [{"sampler": f"{r['solver']}/{r['schedule']}", "steps": r["steps"], "nfe": r["nfe"], "value": r["rmse"]}
                for r in rows]
        out_dir = args.out or Path("sweep")
        paths = _write_sweep(rows, out_dir, "sandbox-rmse", "RMSE to converged solution",
                             "Exact digits-mixture denoiser: RMSE vs NFE")
    else:
        if args.run is None:
            raise UserError("sweep needs a RUN directory (or --sandbox)")
        from .cli import sampling_from_args
        from .evaluation import feature_extractor, feature_name, sweep
        from .model import load_run

        run = load_run(args.run, ema=args.ema, device=args.device)
        base = sampling_from_args(run.config.sampling, args)
        samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
        name = feature_name(args.metric, args.features, run.config.data.get("dataset"))
        ref = _reference(args, run, name, need_features=args.metric in ("kid", "pr"))
        rows = sweep(run, args.metric, samplers=samplers, nfes=nfes, num=args.num, ref=ref,
                     extractor=feature_extractor(name, args.inception, args.device), base=base, batch_size=args.batch,
                     device=args.device, progress=True)
        out_dir = args.out or (Path(args.run) / "sweep")
        paths = _write_sweep(rows, out_dir, f"{args.metric}-vs-nfe", args.metric,
                             f"{args.metric} vs NFE ({args.num} samples, step {run.step})")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_plot(args) -> int:
    from . import viz

    target = args.target
    written = []
    if target in ("schedules", "flow"):
        out = args.out or Path("plots")
        if target == "schedules":
            written.append(viz.save_figure(viz.plot_schedules(), out / "schedules.png"))
            written.append(viz.save_figure(viz.plot_alpha_bar(), out / "alpha_bar.png"))
        else:
            for kind in ("ode", "sde", "forward"):
                written.append(viz.save_figure(viz.plot_flow(kind=kind), out / f"flow_{kind}.png"))
            written.append(viz.save_figure(viz.plot_flow_comparison(), out / "flow_comparison.png"))
    else:
        run = Path(target)
        if not run.is_dir():
            raise UserError(f"plot target {target!r}: expected a run directory, 'schedules' or 'flow'")
        metrics = run / "metrics.jsonl"
        if not metrics.is_file():
            raise UserError(f"{run} has no metrics.jsonl (is it a run directory?)")
        records = viz.read_metrics(metrics)
        if not records:
            raise UserError(f"{metrics} has no training records yet")
        out = args.out or run / "plots"
        written.append(viz.save_figure(viz.plot_loss(records), out / "loss.png"))
        written.append(viz.save_figure(viz.plot_loss_by_sigma(records), out / "loss_by_sigma.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    if not args.run.is_dir():
        raise UserError(f"{args.run} is not a run directory")
    print(f"wrote {write_report(args.run, args.out)}")
    return 0


EVAL_HANDLERS = {"eval": cmd_eval, "ref": cmd_ref, "sweep": cmd_sweep, "plot": cmd_plot, "report": cmd_report}
