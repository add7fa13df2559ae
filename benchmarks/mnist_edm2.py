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
   guided by itself as it was at an earlier step (a weaker sibling: the post-hoc EMA there, ``elucidate ema RUN
   --std S --step K``), for each ``--autoguide`` setting STEP:W (guide step, weight) or STEP:W:S_CHURN (EDM's
   stochastic sampler, S_tmin 0.05, S_tmax 50, S_noise 1.003). It costs a second network evaluation per step, no
   training. ``--held-out N`` re-scores the setting with the highest recognized share (chosen on seeds 0..num-1)
   on N new seeds (num..num+N-1): the honest figure for a setting chosen by its score. ``--picture STEP:W`` draws
   seeds 0-63 of the final model unguided and with that setting into RUNS/autoguided.png (and the guided grid
   alone into RUNS/samples.png). STEP may also name a smaller sibling of GUIDES (``xs``: 16 channels, 600 steps,
   trained into RUNS/xs): its final post-hoc EMA of the first std is the guide.
Scores: fd_mnist of ``--num`` samples (seeds 0..num-1; Heun, 18 steps = NFE 35, the configs' sampler) against the
5,000 real digits, and the share the bundled MNIST classifier recognizes (confidence >= 0.8). Both configs train at
about the same cost per step (0.66 and 0.69 s on 2 quiet AVX512-BF16 cores), so equal steps are equal wall-clock;
the seconds each run took are printed next to its scores.

Prints markdown tables and writes RUNS/results.json (and RUNS/fd_vs_time.png if matplotlib is installed).

    python benchmarks/mnist_edm2.py [--runs runs/mnist_bench] [--variants mnist-edm,mnist-edm2] [--num 500]
                                    [--curve-every 800] [--ema-stds 0.05,0.10] [--guided mnist-edm2]
                                    [--autoguide 800:3,400:5,400:5:40] [--held-out 1000] [--picture 400:5]
                                    [--target-fd 112] [--no-train]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distillation import cost, elucidate  # noqa: E402  (a checkpoint's steps and seconds; run the CLI)

#: smaller siblings to guide with (``--autoguide NAME:W``): name -> (config, --set overrides), trained into RUNS/NAME
GUIDES = {"xs": ("configs/mnist-edm2.yaml", ["network.model_channels=16", "training.steps=600",
                                             "training.checkpoint_every=200", "training.sample_every=600",
                                             "training.ema={type: power, stds: [0.05, 0.10], snapshot_every: 200}"])}
#: the autoguidance settings scored by default, STEP:W[:S_CHURN] (docs/edm2.md's table)
AUTOGUIDE = "800:1.5,800:2,800:3,800:5,400:3,400:4,400:5,400:6,400:7,xs:3,xs:5,800:3:40,400:5:40"
INV_SQRT = "training.lr_schedule={kind: inv_sqrt, ref_batches: 600}"
#: name -> (config, --set overrides): each row adds one ingredient to the one before it
VARIANTS = {
    "mnist-edm": ("configs/mnist-edm.yaml", []),
    "+uncertainty": ("configs/mnist-edm.yaml", ["training.loss_weighting=uncertainty"]),
    "+inv_sqrt": ("configs/mnist-edm.yaml", ["training.loss_weighting=uncertainty", INV_SQRT]),
    "mnist-edm2": ("configs/mnist-edm2.yaml", []),
}


def train(runs: Path, name: str) -> Path:
    """RUNS/NAME trained from VARIANTS or GUIDES[name]."""
    config, overrides = {**VARIANTS, **GUIDES}[name]
    return train_run(runs / name, config, overrides)


def train_run(path: Path, config: str, overrides: list[str] = ()) -> Path:
    """``elucidate train CONFIG --out PATH --set ...`` unless PATH has its last checkpoint (resumes a stopped run)."""
    from elucidate.config import load_config
    from elucidate.run import RunDir

    steps = load_config(ROOT / config, list(overrides)).training.steps
    if not RunDir(path).checkpoint(steps).is_file():
        elucidate("train", str(ROOT / config), "--out", str(path), *[a for o in overrides for a in ("--set", o)])
    return path


class Scorer:
    """fd_mnist and the MNIST classifier's recognized share of a run's samples from seeds first..first+num-1."""

    def __init__(self, num: int, first: int = 0):
        from elucidate.evaluation import feature_extractor, load_dataset_stats
        from elucidate.metrics.digits_net import load_mnist_classifier

        self.num, self.first, self.extractor = num, first, feature_extractor("fd_mnist")
        self.ref = load_dataset_stats("mnist", "fd_mnist")
        self.classifier = load_mnist_classifier()

    def __call__(self, run, cfg=None) -> dict:
        import torch

        from elucidate.data.pixels import to_pixels
        from elucidate.evaluation.evaluate import compute_metric, sampler_nfe
        from elucidate.metrics import FeatureStats, classifier_score

        x = run.sample(range(self.first, self.first + self.num), cfg, batch_size=250, precision="bf16")
        pixels = to_pixels(x, run.normalizer)
        stats = FeatureStats(keep_features=True)
        stats.update(self.extractor(pixels))
        with torch.no_grad():
            score = classifier_score(self.classifier.predict_proba(pixels), threshold=0.8)
        return {"fd": compute_metric("fd_mnist", stats, self.ref)["value"],
                "recognizable": float(score.confident_fraction), "classes": int((score.histogram > 0).sum()),
                "nfe": sampler_nfe(cfg or run.config.sampling, run.denoiser.formulation)}


def guide_for(runs: Path, path: Path, std: float, spec: str, train_guides: bool) -> Path:
    """The guide of an autoguide setting (written if missing): the run itself at step ``spec`` or the sibling
    GUIDES[spec]'s final post-hoc EMA of ``std`` (trained into RUNS/spec first if ``train_guides``)."""
    from elucidate.run import RunDir
    from elucidate.training.ema import write_ema_checkpoint

    step = int(spec) if spec.isdigit() else None
    run = path if step is not None else train(runs, spec) if train_guides else runs / spec
    guide = RunDir(run).ema_checkpoint(std, step=step)
    return guide if guide.is_file() else write_ema_checkpoint(run, std, step=step)


def autoguide_settings(text: str, best: str) -> dict[str, tuple[str, float, float]]:
    """``--autoguide`` STEP:W[:S_CHURN],... -> {result key: (guide spec, w, S_churn)}."""
    settings = {}
    for setting in (a.split(":") for a in text.split(",") if a):
        spec, w, churn = setting[0], float(setting[1]), float((setting[2:] or [0])[0])
        by = f"step {spec}" if spec.isdigit() else spec
        settings[f"autoguided {w:g} by {by} ({best})" + (f" S_churn {churn:g}" if churn else "")] = (spec, w, churn)
    return settings


def guided_config(final, guide: Path, w: float, churn: float = 0.0):
    """``final``'s sampling config autoguided by ``guide`` at weight ``w`` (with EDM's churn if ``churn``)."""
    extra = dict(s_churn=churn, s_min=0.05, s_max=50.0, s_noise=1.003) if churn else {}
    return dataclasses.replace(final.config.sampling, guide=str(guide), guidance=w, **extra)


def picture(final, path: Path, std: float, setting: str, res: dict, best: str, runs: Path) -> None:
    """Seeds 0-63 of ``final`` unguided and autoguided by ``setting`` (STEP:W) side by side (RUNS/autoguided.png),
    the guided grid alone (RUNS/samples.png)."""
    from elucidate.viz import image_grid, new_figure, save_figure, save_image_grid

    (key, (spec, w, _)), = autoguide_settings(setting, best).items()
    guided = guided_config(final, guide_for(runs, path, std, spec, False), w)
    fig = new_figure(9.6, 5.0)
    for k, (cfg, title) in enumerate([(None, f"post-hoc EMA {std:g}: {fmt(res[best])} recognized"),
                                      (guided, f"+ autoguidance by {key.split(' by ')[1].split(' (')[0]} "
                                               f"(w = {float(w):g}): "
                                               f"{fmt(res[key]) if key in res else ''}")]):
        images = final.images(final.sample(range(64), cfg, batch_size=64))
        grid = image_grid(images, nrow=8, scale=2)
        if cfg is guided:
            save_image_grid(images, runs / "samples.png", nrow=8, scale=2)
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    save_figure(fig, runs / "autoguided.png")
    print(f"  wrote {runs / 'autoguided.png'} and {runs / 'samples.png'}")


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
    p.add_argument("--autoguide", default=AUTOGUIDE, help="STEP:W[:S_CHURN] settings, comma-separated")
    p.add_argument("--held-out", type=int, default=0, help="re-score the most recognized setting on N new seeds")
    p.add_argument("--picture", default=None, metavar="STEP:W", help="draw the final model unguided and guided")
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
        if name in args.guided.split(","):
            final, best = load_run(RunDir(path).ema_checkpoint(std0, step=last)), f"ema {std0:.3f}"  # the curve's
            settings = autoguide_settings(args.autoguide, best)
            for key, (spec, w, churn) in settings.items():
                if key not in res:
                    guide = guide_for(args.runs, path, std0, spec, not args.no_train)
                    res[key] = score(final, guided_config(final, guide, w, churn))
                    print(f"  {name:<13} {key}  {fmt(res[key])}", flush=True)
                    results_path.write_text(json.dumps(results, indent=1))
            if args.held_out and settings:  # the most recognized of these settings, on new seeds
                chosen = max(settings, key=lambda k: res[k]["recognizable"])
                key = f"{chosen} seeds {args.num}-{args.num + args.held_out - 1}"
                if key not in res:
                    spec, w, churn = settings[chosen]
                    guide = guide_for(args.runs, path, std0, spec, not args.no_train)
                    res[key] = Scorer(args.held_out, first=args.num)(final, guided_config(final, guide, w, churn))
                    results_path.write_text(json.dumps(results, indent=1))
                print(f"  {name:<13} held out: {key}  {fmt(res[key])}", flush=True)
            if args.picture:
                picture(final, path, std0, args.picture, res, best, args.runs)

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
