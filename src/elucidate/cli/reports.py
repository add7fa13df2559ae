"""Commands that draw a run: plot, report."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..run.rundir import RunDir

__all__ = ["register"]


def register(sub) -> dict:
    """Add the plot/report subcommands; returns their handlers."""
    p = sub.add_parser("plot", help="a run's plots (RUN), or the didactic ones: schedules, flow")
    p.add_argument("target", help="a run directory, 'schedules' or 'flow'")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN/plots or ./plots)")

    p = sub.add_parser("report", help="one self-contained HTML page for a run")
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--out", type=Path, default=None, help="the HTML file to write (default: RUN/report.html)")
    return {"plot": cmd_plot, "report": cmd_report}


def cmd_plot(args) -> int:
    from .. import viz

    target = args.target
    written = []
    if target in ("schedules", "flow"):
        out = args.out or Path("plots")
        if target == "schedules":
            written.append(viz.save_figure(viz.plot_schedules(), out / "schedules.png"))
            written.append(viz.save_figure(viz.plot_alpha_bar(), out / "alpha_bar.png"))
            written.append(viz.save_figure(viz.plot_alpha_bar(viz.shifted_alpha_bar_curves()),
                                           out / "shifted_schedules.png"))
        else:
            for kind in ("ode", "sde", "forward"):
                written.append(viz.save_figure(viz.plot_flow(kind=kind), out / f"flow_{kind}.png"))
            written.append(viz.save_figure(viz.plot_flow_comparison(), out / "flow_comparison.png"))
    else:
        run = RunDir(target)
        if not run.path.is_dir():
            raise UserError(f"plot target {target!r}: expected a run directory, 'schedules' or 'flow'")
        if not run.metrics.is_file():
            raise UserError(f"{run} has no {run.metrics.name} (is it a run directory?)")
        records = viz.read_metrics(run.metrics)
        if not records:
            raise UserError(f"{run.metrics} has no training records yet")
        out = args.out or run.plots
        written.append(viz.save_figure(viz.plot_loss(records), out / "loss.png"))
        written.append(viz.save_figure(viz.plot_loss_by_sigma(records), out / "loss_by_sigma.png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_report(args) -> int:
    from ..evaluation.report import write_report

    run = RunDir(args.run)
    if not run.path.is_dir():
        raise UserError(f"{args.run} is not a run directory")
    if not run.is_run():
        raise UserError(f"{args.run} is not a run directory (no {run.config.name}, {run.metrics.name} or "
                        f"{run.checkpoints.name}/)")
    print(f"wrote {write_report(args.run, args.out)}")
    return 0
