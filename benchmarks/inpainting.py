"""Inpainting against the exact conditional: RePaint's resampling (Lugmayr et al. 2022) on Gaussian mixtures.

The exact denoiser of a mixture stands in for a perfectly trained network, and the distribution of the missing
coordinates given the kept ones is closed-form (``GaussianMixture.conditional``: component weights by Bayes' rule on
the kept coordinates, each component's own spread on the missing ones). Two cases:

* decisive (2-D): components at (-1, -1) and (1, 1), std 0.1; x1 = 0.9 is kept. Exactly all completions belong to
  the component at +1 with x2 ~ N(1, 0.1^2).
* ambiguous (4-D): two components that differ little in the kept coordinates (std 0.5) and much in the missing ones
  (std 0.1); the kept (0.25, 0) gives them weights 0.73 / 0.27.

For resample 1 (plain replacement) / 5 / 10 / 20 it reports the share of completions in the right component (the most
likely one), the total-variation distance of the component shares to the exact weights, and the std of the completed
coordinates within their component against the exact one. Prints a table and writes a figure.

    python benchmarks/inpainting.py [--samples 1000] [--sampler heun] [--steps 18] [--out FILE.png]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from elucidate import GaussianMixture, inpaint
from elucidate.sampling import get_sampler, nfe

RESAMPLES = (1, 5, 10, 20)


def cases() -> dict[str, tuple[GaussianMixture, torch.Tensor, torch.Tensor]]:
    """name -> (mixture, observed point, keep mask)."""
    decisive = GaussianMixture([[-1.0, -1.0], [1.0, 1.0]], [0.1, 0.1], [0.5, 0.5])
    stds = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]])
    ambiguous = GaussianMixture([[0.5, 0.0, 1.0, 1.0], [-0.5, 0.0, -1.0, -1.0]], stds, [0.5, 0.5])
    return {"decisive (2-D)": (decisive, torch.tensor([0.9, 0.0]), torch.tensor([True, False])),
            "ambiguous (4-D)": (ambiguous, torch.tensor([0.25, 0.0, 0.0, 0.0]),
                                torch.tensor([True, True, False, False]))}


def measure(mixture: GaussianMixture, observed: torch.Tensor, keep: torch.Tensor, resample: int, *, samples: int,
            sampler: str, steps: int) -> dict:
    """Completions of ``observed`` against the exact conditional: share right, TV of the shares, std ratio."""
    exact = mixture.conditional(observed, keep)
    known = observed.double().expand(samples, -1)
    x = inpaint(mixture.denoise, known, keep.double(), sampler=sampler, steps=steps, resample=resample,
                seeds=range(samples), dtype=torch.float64)[:, ~keep]
    component = exact.classify(x)
    shares = torch.bincount(component, minlength=len(exact.weights)).double() / samples
    best = int(exact.weights.argmax())
    within = (x - exact.means[component]) / exact.stds[component]  # standardized within the assigned component
    return {"right": shares[best].item(), "exact_right": exact.weights[best].item(),
            "tv": 0.5 * (shares - exact.weights).abs().sum().item(), "std_ratio": within.std().item(),
            "x": x, "exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--sampler", default="heun")
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--out", type=Path, default=Path("docs/images/inpainting_gmm.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    per_pass = nfe(args.sampler, args.steps)
    print(f"RePaint with {args.sampler}, {args.steps} steps ({per_pass} NFE per pass), exact mixture denoisers, "
          f"{args.samples} completions per row")
    print(f"{'case':<16} {'resample':>8} {'NFE':>6} {'right':>7} {'exact':>7} {'TV':>6} {'std/exact':>9} {'time':>6}")
    results = {}
    for name, (mixture, observed, keep) in cases().items():
        for r in RESAMPLES:
            start = time.perf_counter()
            row = measure(mixture, observed, keep, r, samples=args.samples, sampler=args.sampler, steps=args.steps)
            results[name, r] = row
            spec = get_sampler(args.sampler)  # every step but the last into sigma = 0 runs r times
            cost = r * spec.evals_per_step * (args.steps - 1) + spec.final_step_evals
            print(f"{name:<16} {r:>8} {cost:>6} {row['right']:>7.3f} {row['exact_right']:>7.3f} {row['tv']:>6.3f} "
                  f"{row['std_ratio']:>9.2f} {time.perf_counter() - start:>5.1f}s")
    figure(results, args.out)
    print(f"wrote {args.out}")


def figure(results: dict, out: Path) -> None:
    """Top: the decisive case's completed x2 (histograms); bottom: the ambiguous case's completed (x3, x4); one column
    per resample and one of exact draws from the conditional."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(RESAMPLES) + 1
    fig, axes = plt.subplots(2, cols, figsize=(2.8 * cols, 5.6))
    for row, name in enumerate(("decisive (2-D)", "ambiguous (4-D)")):
        exact = results[name, RESAMPLES[0]]["exact"]
        draws = exact.sample(len(results[name, RESAMPLES[0]]["x"]), generator=torch.Generator().manual_seed(0))
        panels = [(f"resample {r}: {results[name, r]['right']:.0%} right", results[name, r]["x"]) for r in RESAMPLES]
        panels.append((f"exact: {exact.weights.max():.0%} right", draws))
        for ax, (title, x) in zip(axes[row], panels):
            if x.shape[1] == 1:
                ax.hist(x[:, 0].numpy(), bins=60, range=(-1.5, 1.5))
                ax.set_xlabel("x2 given x1 = 0.9")
            else:
                ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.4)
                ax.set_xlim(-1.5, 1.5)
                ax.set_ylim(-1.5, 1.5)
                ax.set_xlabel("x3, x4 given (x1, x2) = (0.25, 0)")
            ax.set_title(f"{name.split()[0]}, {title}", fontsize=8)
    fig.suptitle("RePaint completions on exact Gaussian mixtures (heun) against the exact conditional", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
