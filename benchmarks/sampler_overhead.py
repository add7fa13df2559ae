"""How much time do the samplers add around the denoiser? (Target: < 3 % at batch 64, small net.)

For each solver, a full sampling run where the denoiser is wrapped by a stopwatch: the time spent
outside the denoiser calls divided by the time inside them is the samplers' own overhead (measured
in the same run, so machine noise cancels). Repeated; the median is printed.

    python benchmarks/sampler_overhead.py [--batch 64] [--steps 18] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from elucidate import EDM, Denoiser
from elucidate.nets import build_network
from elucidate.sampling import SAMPLERS, karras_sigmas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--resolution", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    net = build_network("unet", img_resolution=args.resolution, in_channels=1, out_channels=1)
    D = Denoiser(net, EDM()).eval().requires_grad_(False)
    shape = (args.batch, 1, args.resolution, args.resolution)
    sigmas = karras_sigmas(args.steps)
    x = torch.randn(shape) * 80
    s_batch = torch.full((args.batch,), 1.0)
    with torch.no_grad():
        for _ in range(3):
            D(x, s_batch)  # warm-up

    print(f"small U-Net ({sum(p.numel() for p in net.parameters()) / 1e6:.2f} M params), batch {args.batch}, "
          f"{args.resolution}x{args.resolution}, {args.steps} steps, torch threads {torch.get_num_threads()}")
    print(f"{'solver':<16}{'NFE':>5}{'total ms':>10}{'in D ms':>9}{'overhead':>10}")
    worst = 0.0
    for name, solver in SAMPLERS.items():
        inside = [0.0]

        def timed(x, sigma, inside=inside):
            t0 = time.perf_counter()
            out = D(x, sigma)
            inside[0] += time.perf_counter() - t0
            return out

        kwargs = {"generator": torch.Generator().manual_seed(0)} if solver.takes("generator") else {}
        ratios, totals, ins = [], [], []
        for _ in range(args.repeats):
            inside[0] = 0.0
            t0 = time.perf_counter()
            solver(timed, x, sigmas, **kwargs)
            total = time.perf_counter() - t0
            ratios.append((total - inside[0]) / inside[0])
            totals.append(total)
            ins.append(inside[0])
        overhead = statistics.median(ratios)
        worst = max(worst, overhead)
        print(f"{name:<16}{solver.nfe(args.steps):>5}{1e3 * statistics.median(totals):>10.1f}"
              f"{1e3 * statistics.median(ins):>9.1f}{overhead:>10.2%}")
    print(f"worst median overhead: {worst:.2%} of the denoiser's time (target < 3%)")


if __name__ == "__main__":
    main()
