"""``elucidate demo``: train a small EDM model on the bundled real digits, then sample, draw the
denoising trajectory and check with the bundled classifier that the digits are recognizable."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import parse_config
from .fileio import atomic_write_text

__all__ = ["DEMO_CONFIG", "run_demo", "recognizability"]

#: The demo run (the same as configs/digits-edm.yaml); about 4 minutes on 2 CPU cores.
DEMO_CONFIG = {
    "data": {"dataset": "digits", "normalize": "auto"},
    "network": {"arch": "unet"},
    "diffusion": {"type": "EDM", "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "p_mean": -1.2,
                  "p_std": 1.2},
    "training": {"steps": 3000, "batch_size": 64, "lr": 2e-3, "lr_rampup": 20_000, "ema_halflife": 20_000,
                 "precision": "auto", "checkpoint_every": 1000, "sample_every": 1000, "log_every": 50, "seed": 0},
    "sampling": {"steps": 18, "sampler": "heun", "s_churn": 0.0, "s_min": 0.05, "s_max": 50.0, "s_noise": 1.003},
}


def recognizability(images: torch.Tensor, normalizer=None, threshold: float = 0.8) -> dict:
    """How many generated digits (model range, ``[N, 1, H, W]``; ``normalizer`` maps them to pixels,
    default [-1, 1]) the bundled classifier recognizes with confidence >= ``threshold``, and which
    classes appear."""
    from .metrics import classifier_score, load_digits_classifier
    from .pixels import to_pixels

    classifier = load_digits_classifier()
    with torch.no_grad():
        probabilities = classifier.predict_proba(to_pixels(images, normalizer))
    score = classifier_score(probabilities, threshold=threshold)
    return {"num": int(images.shape[0]), "threshold": threshold, "confident_fraction": float(score.confident_fraction),
            "classes_present": int((score.histogram > 0).sum()), "class_counts": score.histogram.tolist(),
            "mean_confidence": float(score.mean_confidence)}


def run_demo(out: Path, *, steps: int | None = None, device: str | None = None, progress: bool = True,
             num_check: int = 500) -> dict:
    """Train (or resume) the demo run in ``out`` and write samples.png, trajectory.png and a
    recognizability report; returns the report."""
    from .generate import generate
    from .model import load_run
    from .training import Trainer
    from .viz import TrajectoryRecorder, plot_trajectory, save_figure, save_image_grid

    out = Path(out)
    raw = json.loads(json.dumps(DEMO_CONFIG))
    if steps is not None:
        raw["training"]["steps"] = steps
    config = parse_config(raw)
    print(f"elucidate demo: training EDM on the bundled digits into {out} "
          f"({config.training.steps} steps, batch {config.training.batch_size})")
    summary = Trainer(config, out, device=device, progress=progress).train()

    run = load_run(out, device=device)
    cfg = run.config.sampling
    x = generate(run.denoiser, run.denoiser.formulation, run.shape, range(num_check), cfg, batch_size=250,
                 device=device)
    grid = save_image_grid(x[:100], out / "samples.png", nrow=10, pad=2)
    recorder = TrajectoryRecorder(max_images=4)
    final = generate(run.denoiser, run.denoiser.formulation, run.shape, range(4), cfg, device=device, callback=recorder)
    recorder.finish(final)
    trajectory = save_figure(plot_trajectory(recorder, num_columns=8, max_images=4), out / "trajectory.png")
    report = recognizability(x, run.normalizer)
    report.update(step=run.step, sampler=cfg.sampler, steps=cfg.steps, seconds=summary["seconds"])
    atomic_write_text(out / "demo.json", json.dumps(report, indent=2) + "\n")
    print(f"  samples:     {grid}")
    print(f"  trajectory:  {trajectory}")
    print(f"  checkpoint:  {run.checkpoint}")
    print(f"  recognizable: {report['confident_fraction']:.1%} of {num_check} samples classified with confidence "
          f">= {report['threshold']}, {report['classes_present']}/10 classes present")
    print(f"  next: elucidate sample {out} --seeds 0-63 --out {out}/grid.png")
    return report
