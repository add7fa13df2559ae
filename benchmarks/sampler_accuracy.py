"""Sampler accuracy study (the EDM paper's Fig. 2 analogue, without any network).

The exact denoiser of a 10-component Gaussian mixture fitted to the real 8x8 digits defines the
probability-flow ODE exactly; every deterministic solver x discretization integrates it from the
same noise over the same sigma range [0.002, 80], and we report the RMSE (per pixel, data range
[-1, 1]) to a converged 1000-step Heun solution. Prints a table and the winner at NFE ~10/20/35,
and writes two log-log PNGs.

    python benchmarks/sampler_accuracy.py [--out sampler_accuracy.png] [--samples 256]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from elucidate.sampling import sweep_samplers
from elucidate.tuning.sandbox import sandbox_sweep
from elucidate.viz import plot_quality_vs_nfe, save_figure

NFES = (5, 7, 10, 14, 20, 27, 35, 50, 70, 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("sampler_accuracy.png"),
                        help="writes <stem>_solvers.png and <stem>_schedules.png")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--schedules", default="karras,exponential,vp,karras:rho=3,linear")
    args = parser.parse_args()

    schedules = args.schedules.split(",")
    rows = sandbox_sweep(schedules=schedules, nfes=NFES, num_samples=args.samples, progress=True)
    by = {(r["sampler"], r["schedule"], r["target_nfe"]): r["rmse"] for r in rows}
    print(f"RMSE to the converged ODE solution (digits mixture, {args.samples} samples, sigma in [0.002, 80]);")
    print("columns are NFE budgets (Heun's NFE is 2N - 1, so it uses one less on even budgets)")
    header = f"{'solver/schedule':<24}" + "".join(f"{n:>9}" for n in NFES)
    print(header)
    print("-" * len(header))
    for solver in sweep_samplers(deterministic=True):
        for schedule in schedules:
            cells = [by.get((solver, schedule, n)) for n in NFES]
            text = "".join(f"{c:>9.2e}" if c is not None else f"{'':>9}" for c in cells)
            print(f"{solver + '/' + schedule:<24}" + text)
    print()
    for target in (10, 20, 35):
        ranked = sorted((r for r in rows if r["target_nfe"] == target), key=lambda r: r["rmse"])[:3]
        text = ", ".join(f"{r['sampler']}/{r['schedule']} {r['rmse']:.2e} (NFE {r['nfe']})" for r in ranked)
        print(f"best at NFE {target}: {text}")
    karras = [{"sampler": r["sampler"], "nfe": r["nfe"], "value": r["rmse"]} for r in rows if r["schedule"] == "karras"]
    fig = plot_quality_vs_nfe(karras, "RMSE to converged solution",
                              title="Exact digits-mixture ODE: solvers (Karras rho=7)")
    print(f"wrote {save_figure(fig, args.out.with_name(args.out.stem + '_solvers.png'))}")
    scheds = [{"sampler": f"{r['sampler']}/{r['schedule']}", "nfe": r["nfe"], "value": r["rmse"]} for r in rows
              if r["sampler"] in ("heun", "dpmpp_2m") and r["schedule"] in ("karras", "exponential", "vp", "linear")]
    fig = plot_quality_vs_nfe(scheds, "RMSE to converged solution", title="Exact digits-mixture ODE: discretizations")
    print(f"wrote {save_figure(fig, args.out.with_name(args.out.stem + '_schedules.png'))}")


if __name__ == "__main__":
    main()
