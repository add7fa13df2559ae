"""The EDM2 recipe on MNIST (issue 32): configs/mnist-edm.yaml against configs/mnist-edm2.yaml at the same budget,
the contribution of each ingredient, the FD-against-training-time curve of each run, and autoguidance.

1. Runs (``--variants``, each trained into RUNS/NAME; skipped when it has its last checkpoint):
   ``mnist-edm``       configs/mnist-edm.yaml (DDPM++ 1.75 M, fixed EDM weighting, constant lr 0.002, power EMA)
   ``+uncertainty``    ... + ``training.loss_weighting: uncertainty`` (EDM2 eq. 21)
   ``+inv_sqrt``       ... + ``training.lr_schedule: {kind: inv_sqrt, ref_batches: 600}``
   ``mnist-edm2``      configs/mnist-edm2.yaml: ... + the magnitude-preserving network (arch: edm2, its lr 0.01,
                       Adam betas (0.9, 0.99) and P_mean/P_std) — the full recipe.
   Each adds one ingredient to the row before it (EDM2's Table 1 reads the same way). The post-hoc EMA length is the
   fourth ingredient: every run's final weights are scored at each ``--ema-stds`` (``elucidate ema``).
2. The curve: every ``--curve-every`` steps, the post-hoc EMA of the first ``--ema-stds`` as it was then
   (``elucidate ema RUN --std S --step K``, from the power EMA snapshots) is scored. The last points are fitted by
   log FD = a + b log step to say when each run would reach ``--target-fd`` (0.5x mnist-edm's 223 = 112 by
   default) if the trend held. Steps, not the seconds a run measured, are the time axis:
   the seconds depend on what else the machine ran.
3. Autoguidance (Karras et al. 2024b): the final model of each ``--guided`` run (post-hoc EMA of the first std)
   guided by itself as it was at step ``--guide-step`` (an early, weaker sibling: the curve's post-hoc EMA there),
   at each ``--guidance`` weight. It costs a second network evaluation per step, no training.
Scores: fd_mnist of ``--num`` samples (seeds 0..num-1; Heun, 18 steps = NFE 35, the configs' sampler) against the
5,000 real digits, and the share the bundled MNIST classifier recognizes (confidence >= 0.8). Both configs train at
about the same cost per step (0.66 and 0.69 s on 2 quiet AVX512-BF16 cores), so equal steps are equal wall-clock;
the seconds each run took are printed next to its scores.

Prints markdown tables and writes RUNS/results.json (and RUNS/fd_vs_time.png if matplotlib is installed).

    python benchmarks/mnist_edm2.py [--runs runs/mnist_bench] [--variants mnist-edm,mnist-edm2] [--num 500]
                                    [--curve-every 800] [--ema-stds 0.05,0.10] [--guided mnist-edm2]
                                    [--guide-step 800] [--guidance 1.5,2,3] [--target-fd 112] [--no-train]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distillation import cost  # noqa: E402  (steps and training seconds of a checkpoint)

INV_SQRT = "training.lr_schedule={kind: inv_sqrt, ref_batches: 600}"
#: name -> (config, --set overrides): each row adds one ingredient to the one before it
VARIANTS = {
    "mnist-edm": ("configs/mnist-edm.yaml", []),
    "+uncertainty": ("configs/mnist-edm.yaml", ["training.loss_weighting=uncertainty"]),
    "+inv_sqrt": ("configs/mnist-edm.yaml", ["training.loss_weighting=uncertainty", INV_SQRT]),
    "mnist-edm2": ("configs/mnist-edm2.yaml", []),
}


def elucidate(*args: str) -> None:
    print("  $ elucidate " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "elucidate", *args, "--no-progress"], check=True)


def train(runs: Path, name: str) -> Path:
    from elucidate.config import load_config
    from elucidate.run import RunDir

    config, overrides = VARIANTS[name]
    path = runs / name
    steps = load_config(ROOT / config).training.steps
    if not RunDir(path).checkpoint(steps).is_file():  # (resumes a run that was stopped)
        sets = [a for o in overrides for a in ("--set", o)]
        elucidate("train", str(ROOT / config), "--out", str(path), *sets)
    return path


class Scorer:
    """fd_mnist and the MNIST classifier's recognized share of a run's samples from seeds 0..num-1."""

    def __init__(self, num: int):
        from elucidate.evaluation import feature_extractor, load_dataset_stats
        from elucidate.metrics.digits_net import load_mnist_classifier

        self.num, self.extractor = num, feature_extractor("fd_mnist")
        self.ref = load_dataset_stats("mnist", "fd_mnist")
        self.classifier = load_mnist_classifier()

    def __call__(self, run, cfg=None) -> dict:
        import torch

        from elucidate.data.pixels import to_pixels
        from elucidate.evaluation.evaluate import compute_metric, sampler_nfe
        from elucidate.metrics import FeatureStats, classifier_score

        x = run.sample(range(self.num), cfg, batch_size=250, precision="bf16")
        pixels = to_pixels(x, run.normalizer)
        stats = FeatureStats(keep_features=True)
        stats.update(self.extractor(pixels))
        with torch.no_grad():
            score = classifier_score(self.classifier.predict_proba(pixels), threshold=0.8)
        return {"fd": compute_metric("fd_mnist", stats, self.ref)["value"],
                "recognizable": float(score.confident_fraction), "classes": int((score.histogram > 0).sum()),
                "nfe": sampler_nfe(cfg or run.config.sampling, run.denoiser.formulation)}


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """The step at which log FD = a + b log step, fitted to the last three (step, FD) points, reaches ``target``."""
    pts = [(math.log(t), math.log(fd)) for t, fd in points[-3:] if t > 0 and fd > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / max(sum((x - mx) ** 2 for x, _ in pts), 1e-12)
    if b >= 0:
        return None  # not improving: never, on this trend
    return math.exp(mx + (math.log(target) - my) / b)


def fmt(r: dict) -> str:
    return f"{r['fd']:.1f} ({100 * r['recognizable']:.1f} %)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "mnist_bench")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--curve-every", type=int, default=800)
    p.add_argument("--ema-stds", default="0.05,0.10")
    p.add_argument("--guided", default="mnist-edm2", help="runs to autoguide ('' for none)")
    p.add_argument("--guide-step", type=int, default=800)
    p.add_argument("--guidance", default="1.5,2,3")
    p.add_argument("--target-fd", type=float, default=112.0)
    p.add_argument("--no-train", action="store_true", help="score only the runs that are trained")
    args = p.parse_args(argv)

    from elucidate.run import RunDir
    from elucidate.run.model import load_run
    from elucidate.training.ema import write_ema_checkpoint

    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants {','.join(unknown)}: expected names from {', '.join(VARIANTS)}")
    score, results_path = Scorer(args.num), args.runs / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in names:
        path = args.runs / name if args.no_train else train(args.runs, name)
        ckpts = RunDir(path).list_checkpoints()
        if not ckpts:
            continue
        res = results.setdefault(name, {})
        res.update(cost(ckpts[-1]))  # the newest checkpoint's steps and training seconds
        last = res["steps"]
        curve, std0 = res.setdefault("curve", {}), float(args.ema_stds.split(",")[0])
        for step in sorted({*range(args.curve_every, last, args.curve_every), last}):
            if str(step) not in curve:
                write_ema_checkpoint(path, std0, step=step)  # elucidate ema RUN --std S --step K
                curve[str(step)] = score(load_run(RunDir(path).ema_checkpoint(std0, step=step)))
                print(f"  {name:<13} step {step:>5}  {fmt(curve[str(step)])}", flush=True)
                results_path.write_text(json.dumps(results, indent=1))
        run = load_run(path)
        if (run.config.training.ema or {}).get("type") == "power":
            for std in args.ema_stds.split(","):
                key = f"ema {float(std):.3f}"
                if key not in res and float(std) == std0:  # the curve's last point
                    res[key] = curve[str(last)]
                elif key not in res:
                    write_ema_checkpoint(path, float(std))  # elucidate ema RUN --std S
                    res[key] = score(load_run(RunDir(path).ema_checkpoint(float(std))))
                    print(f"  {name:<13} post-hoc EMA std {std}  {fmt(res[key])}", flush=True)
                    results_path.write_text(json.dumps(results, indent=1))
        if name in args.guided.split(",") and str(args.guide_step) in curve:
            final, best = load_run(RunDir(path).ema_checkpoint(std0, step=last)), f"ema {std0:.3f}"  # the curve's
            guide = RunDir(path).ema_checkpoint(std0, step=args.guide_step)  # written for the curve
            for w in args.guidance.split(","):
                key = f"autoguided {float(w):g} by step {args.guide_step}" + (f" ({best})" if best else "")
                if key not in res:
                    cfg = dataclasses.replace(final.config.sampling, guide=str(guide), guidance=float(w))
                    res[key] = score(final, cfg)
                    print(f"  {name:<13} {key}  {fmt(res[key])}", flush=True)
                    results_path.write_text(json.dumps(results, indent=1))

    print(f"\nfd_mnist ({args.num} samples, Heun 18 steps) and recognizable share; target: fd <= {args.target_fd:g} "
          f"and >= 97 % recognizable\n")
    stds = [f"ema {float(s):.3f}" for s in args.ema_stds.split(",")]
    print("| run | steps | training s | " + " | ".join(f"post-hoc EMA {s[4:]}" for s in stds) + " |")
    print("|---" * (3 + len(stds)) + "|")
    for name in names:
        res = results.get(name)
        if not res:
            continue
        cells = [fmt(res[s]) if s in res else "—" for s in stds]
        print(f"| {name} | {res['steps']} | {res['seconds']:.0f} | " + " | ".join(cells) + " |")
    print(f"\nthe curve (post-hoc EMA std {float(args.ema_stds.split(',')[0]):g} at each step): step: fd_mnist "
          f"(recognizable)\n")
    for name in names:
        res = results.get(name)
        if not res:
            continue
        pts = sorted((int(s), r) for s, r in res["curve"].items())
        print(f"- {name}: " + "; ".join(f"{s}: {fmt(r)}" for s, r in pts))
        t = crossing([(s, r["fd"]) for s, r in pts], args.target_fd)
        print(f"  fd {args.target_fd:g} at ~{t:.0f} steps ({t / res['steps']:.1f}x this budget) if log FD stays "
              f"linear in log steps" if t else f"  not approaching fd {args.target_fd:g} on the last points")
        for key, r in res.items():
            if key.startswith("autoguided"):
                print(f"  {key}: {fmt(r)}")
    plot(results, names, args)


def plot(results: dict, names: list[str], args) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        if name in results:
            pts = sorted((int(step), r["fd"]) for step, r in results[name]["curve"].items())
            line, = ax.plot(*zip(*pts), marker="o", label=name)
            guided = {k: r for k, r in results[name].items() if k.startswith("autoguided")}
            if guided:  # the best autoguided final model, at the final step
                key = min(guided, key=lambda k: guided[k]["fd"])
                ax.plot([pts[-1][0]], [guided[key]["fd"]], marker="*", markersize=12, linestyle="none",
                        color=line.get_color(), label=f"{name}, {key.split(' (')[0]}")
    ax.axhline(args.target_fd, color="gray", linestyle="--", label=f"target {args.target_fd:g}")
    ax.set(xlabel="training steps (batch 64; ~0.7 s each on 2 cores)", ylabel=f"fd_mnist ({args.num} samples)",
           xscale="log", yscale="log", title="MNIST: FD against training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.runs / "fd_vs_time.png", dpi=120)
    print(f"\nwrote {args.runs / 'fd_vs_time.png'}")


if __name__ == "__main__":
    main()
