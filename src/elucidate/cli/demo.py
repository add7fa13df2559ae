"""``elucidate demo`` (what ``make demo`` runs): train a small EDM model on the bundled real digits, then
sample, draw the denoising trajectory and check with the bundled classifier that the digits are recognizable."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import parse_config
from ..evaluation import recognizability
from ..run import RunDir, load_run
from ..runtime.files import atomic_write_text
from ..training import Trainer
from ..viz import TrajectoryRecorder, plot_trajectory, save_figure, save_image_grid
from .options import add_run_options

__all__ = ["register", "DEMO_CONFIG", "run_demo"]

#: The demo run (the same as configs/digits-edm.yaml; a test keeps them equal); 3-7 minutes on 2 CPU cores.
DEMO_CONFIG = {
    "data": {"dataset": "digits", "normalize": "auto"},
    "network": {"arch": "unet"},
    "diffusion": {"type": "EDM", "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "p_mean": -1.2,
                  "p_std": 1.2},
    "training": {"steps": 3000, "batch_size": 64, "lr": 2e-3, "lr_rampup": 20_000, "ema_halflife": 20_000,
                 "precision": "auto", "checkpoint_every": 1000, "sample_every": 1000, "log_every": 50, "seed": 0},
    "sampling": {"steps": 18, "sampler": "heun", "s_churn": 0.0, "s_min": 0.05, "s_max": 50.0, "s_noise": 1.003},
}


def register(sub) -> dict:
    """Add the demo subcommand; returns its handler."""
    p = sub.add_parser("demo", help="train a small EDM model on the bundled digits and write figures")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default: the demo preset, {DEMO_CONFIG['training']['steps']})")
    add_run_options(p)
    return {"demo": cmd_demo}


def cmd_demo(args) -> int:
    run_demo(args.out, steps=args.steps, device=args.device, progress=args.progress)
    return 0


def run_demo(out: Path, *, steps: int | None = None, device: str | None = None, progress: bool = True,
             num_check: int = 500) -> dict:
    """Train (or resume) the demo run in ``out`` and write samples.png, trajectory.png and a
    recognizability report; returns the report."""
    out = Path(out)
    raw = json.loads(json.dumps(DEMO_CONFIG))
    if steps is not None:
        raw["training"]["steps"] = steps
    config = parse_config(raw)
    print(f"elucidate demo: training EDM on the bundled digits into {out} "
          f"({config.training.steps} steps, batch {config.training.batch_size})")
    summary = Trainer(config, out, device=device, progress=progress).train()

    run, files = load_run(out, device=device), RunDir(out)
    cfg = run.config.sampling
    x = run.sample(range(num_check), batch_size=250, device=device)
    grid = save_image_grid(x[:100], files.final_samples, nrow=10, pad=2)
    recorder = TrajectoryRecorder(max_images=4)
    final = run.sample(range(4), device=device, callback=recorder)
    recorder.finish(final)
    trajectory = save_figure(plot_trajectory(recorder, num_columns=8, max_images=4), files.trajectory)
    report = recognizability(x, run.normalizer)
    report.update(step=run.step, sampler=cfg.sampler, steps=cfg.steps, seconds=summary["seconds"])
    atomic_write_text(files.demo_report, json.dumps(report, indent=2) + "\n")
    print(f"  samples:     {grid}")
    print(f"  trajectory:  {trajectory}")
    print(f"  checkpoint:  {run.checkpoint}")
    print(f"  recognizable: {report['confident_fraction']:.1%} of {num_check} samples classified with confidence "
          f">= {report['threshold']}, {report['classes_present']}/10 classes present")
    print(f"  next: elucidate sample {out} --seeds 0-63 --out {out}/grid.png")
    return report
