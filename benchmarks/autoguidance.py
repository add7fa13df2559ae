"""Autoguidance (Karras et al. 2024) and the guidance interval (Kynkäänniemi et al. 2024), measured.

Two parts:

* ``--figure PNG``: the edm2 two-dimensional picture, with exact denoisers only (no training, seconds). A 2-D
  mixture with two classes; the "good" model of class 0 is its exact denoiser, the "bad" one the same mixture with
  inflated component spreads (a blurred, less trained model). Samples of the conditional model, classifier-free
  guidance (class 0 against the unconditional mixture) and autoguidance (good against bad), with their mean
  log-density under the exact class-0 distribution and their spread.
* ``--run RUN --guide CKPT``: a trained unconditional digits model guided by its own early checkpoint, against no
  guidance, at a few weights with and without an interval: FD (bundled digits classifier features, the
  ``fd_digits`` metric) and the recognizable share (:func:`elucidate.evaluation.recognizability`). Markdown table.

    python benchmarks/autoguidance.py --figure docs/images/autoguidance_2d.png
    elucidate train configs/digits-edm.yaml --out /tmp/ag_run --set training.steps=3000 \\
        --set training.keep_checkpoints=0 --set training.checkpoint_every=500
    python benchmarks/autoguidance.py --run /tmp/ag_run --guide /tmp/ag_run/checkpoints/ckpt-00000500.safetensors
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from elucidate import GaussianMixture, Guided, sample

#: class 0 and class 1 of the 2-D mixture: component means (stds below)
MEANS = ([[-1.0, 0.0], [0.0, 1.0], [0.9, 0.3]], [[0.1, -0.9], [1.3, -0.6], [-1.2, 1.1]])
STDS, BLUR = 0.18, 2.5  # the bad model's stds are BLUR times the good one's
WEIGHTS = ([0.5, 0.3, 0.2], [0.4, 0.3, 0.3])


def two_d_models():
    """(class-0 model, unconditional model, blurred class-0 model): exact denoisers."""
    good = GaussianMixture(MEANS[0], [STDS] * 3, WEIGHTS[0])
    uncond = GaussianMixture(MEANS[0] + MEANS[1], [STDS] * 6, [w / 2 for w in WEIGHTS[0] + WEIGHTS[1]])
    bad = GaussianMixture(MEANS[0], [STDS * BLUR] * 3, WEIGHTS[0])
    return good, uncond, bad


class _CFG:
    """Classifier-free guidance between two exact denoisers (class 0 vs the whole mixture)."""

    def __init__(self, cond, uncond, w):
        self.cond, self.uncond, self.w = cond, uncond, w

    def __call__(self, x, sigma):
        u = self.uncond(x, sigma)
        return u + self.w * (self.cond(x, sigma) - u)


def two_d(n: int = 4000, w: float = 3.0, steps: int = 32) -> dict:
    """Samples of the three ways to sample class 0, and their quality numbers."""
    good, uncond, bad = two_d_models()
    samplers = {"conditional model (w = 1)": good, f"classifier-free guidance (w = {w:g})": _CFG(good, uncond, w),
                f"autoguidance (w = {w:g})": Guided(good, w, guide=bad)}
    out = {}
    for name, D in samplers.items():
        x = sample(D, (n, 2), seeds=range(n), steps=steps, sigma_max=10.0)
        logp = good.log_prob(x.double())
        nearest = (x[:, None] - good.means[None]).pow(2).sum(-1).min(1).values.sqrt()
        out[name] = {"x": x, "mean log p(x | class 0)": float(logp.mean()),
                     "outliers (> 3 std from every class-0 mode)": float((nearest > 3 * STDS).float().mean()),
                     "rms distance to nearest mode": float(nearest.pow(2).mean().sqrt())}
    return out


def figure(results: dict, path: Path) -> Path:
    from elucidate.viz import save_figure
    from elucidate.viz.common import new_figure

    good, uncond, _ = two_d_models()
    fig = new_figure(4.0 * len(results), 4.2)
    grid = torch.stack(torch.meshgrid(torch.linspace(-2.2, 2.2, 200), torch.linspace(-2.2, 2.2, 200),
                                      indexing="xy"), -1).reshape(-1, 2).double()
    density = good.log_prob(grid).exp().reshape(200, 200)
    other = uncond.log_prob(grid).exp().reshape(200, 200)
    for i, (name, r) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        ax.contour(torch.linspace(-2.2, 2.2, 200), torch.linspace(-2.2, 2.2, 200), other, levels=6, colors="0.8",
                   linewidths=0.6)
        ax.contour(torch.linspace(-2.2, 2.2, 200), torch.linspace(-2.2, 2.2, 200), density, levels=6,
                   colors="tab:blue", linewidths=0.8)
        x = r["x"][:1500]
        ax.scatter(x[:, 0], x[:, 1], s=1.5, color="black", alpha=0.5)
        ax.set_title(f"{name}\nmean log p = {r['mean log p(x | class 0)']:.2f}, "
                     f"outliers {100 * r['outliers (> 3 std from every class-0 mode)']:.1f} %", fontsize=8)
        ax.set_xlim(-2.2, 2.2), ax.set_ylim(-2.2, 2.2), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("class 0 (blue contours) of a two-class 2-D mixture (grey: both classes); black: samples",
                 fontsize=9)
    return save_figure(fig, path)


def digits_table(run_dir: Path, guide: Path, *, num: int, weights, interval, steps: int | None, device=None) -> str:
    """FD and recognizable share of ``run_dir`` without guidance and autoguided by ``guide``."""
    from elucidate.data.pixels import to_pixels
    from elucidate.evaluation import recognizability
    from elucidate.evaluation.evaluate import compute_metric, feature_name, load_dataset_stats, sampler_nfe
    from elucidate.metrics import FeatureStats
    from elucidate.metrics.features import feature_extractor
    from elucidate.run import load_run

    run = load_run(run_dir, device=device)
    name = feature_name("fd_digits", None, "digits")
    ref = load_dataset_stats("digits", name, device=device)
    extractor = feature_extractor(name, None, device)
    base = run.config.sampling if steps is None else dataclasses.replace(run.config.sampling, steps=steps)
    settings = [("none", 1.0, None)]
    for w in weights:
        settings += [(f"autoguidance w = {w:g}", w, None), (f"autoguidance w = {w:g}, sigma in "
                                                           f"[{interval[0]:g}, {interval[1]:g}]", w, interval)]
    lines = [f"| guidance | FD (fd_digits, {num} samples) | recognizable (conf. >= 0.8) | NFE per sample |",
             "|---|---|---|---|"]
    guide_rows = [0]  # rows the guide network evaluated (it runs only inside the interval)
    run.load_guide(str(guide), device).register_forward_hook(
        lambda module, inputs, output: guide_rows.__setitem__(0, guide_rows[0] + output.shape[0]))
    for name, w, iv in settings:
        cfg = dataclasses.replace(base, guidance=w, guide=None if w == 1 else str(guide),
                                  guidance_interval=None if iv is None else list(iv))
        cfg.validate()
        images = run.images(run.sample(range(num), cfg, device=device, batch_size=250))  # seeds 0..num-1, as eval
        nfe = sampler_nfe(cfg, run.denoiser.formulation) + guide_rows[0] / num  # main + guide network forwards
        stats = FeatureStats(keep_features=True)
        stats.update(extractor(to_pixels(images, run.normalizer)))
        result = compute_metric("fd_digits", stats, ref)
        share = recognizability(images, run.normalizer)["confident_fraction"]
        guide_rows[0] = 0
        lines.append(f"| {name} | {result['value']:.3g} | {100 * share:.1f} % | {nfe:g} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", type=Path, help="write the 2-D picture here (and print its numbers)")
    parser.add_argument("--w", type=float, default=3.0, help="guidance weight of the 2-D picture")
    parser.add_argument("--run", type=Path, help="an unconditional digits run (its newest checkpoint is the model)")
    parser.add_argument("--guide", type=Path, help="the guide: an early checkpoint of the run, or another run")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--weights", default="1.5,2,3")
    parser.add_argument("--interval", default="0.3,5", help="LO,HI of the guidance interval rows")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    args = parser.parse_args()
    if args.figure is None and args.run is None:
        parser.error("give --figure PNG and/or --run RUN --guide CKPT")
    if args.figure is not None:
        results = two_d(w=args.w)
        keys = [k for k in next(iter(results.values())) if k != "x"]
        print("| sampler | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for name, r in results.items():
            print(f"| {name} | " + " | ".join(f"{r[k]:.3g}" for k in keys) + " |")
        print(f"wrote {figure(results, args.figure)}")
    if args.run is not None:
        if args.guide is None:
            parser.error("--run needs --guide")
        lo, hi = (float(v) for v in args.interval.split(","))
        weights = [float(v) for v in args.weights.split(",")]
        print(digits_table(args.run, args.guide, num=args.num, weights=weights, interval=(lo, hi), steps=args.steps))


if __name__ == "__main__":
    main()
