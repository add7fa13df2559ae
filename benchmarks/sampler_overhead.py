"""How much time do the samplers add around the denoiser? (Target: < 3 % at batch 64, small net.)

For each solver, times a full sampling run and the same number of bare denoiser calls on the same
shapes, in one process, interleaved and repeated; prints the median overhead ratio.

    python benchmarks/sampler_overhead.py [--batch 64] [--steps 18] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from elucidate import EDM, Denoiser
from elucidate.nets import build_network
from elucidate.sampling import SOLVERS, karras_sigmas, nfe


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
    print(f"{'solver':<16}{'NFE':>5}{'sampler ms':>12}{'denoiser ms':>13}{'overhead':>10}")
    worst = 0.0
    for name, solver in SOLVERS.items():
        calls = nfe(name, args.steps)
        ratios, t_sampler, t_net = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(calls):
                    D(x, s_batch)
            t1 = time.perf_counter()
            solver(D, x, sigmas, generator=torch.Generator().manual_seed(0)) if "generator" in \
                solver.__code__.co_varnames else solver(D, x, sigmas)
            t2 = time.perf_counter()
            t_net.append(t1 - t0)
            t_sampler.append(t2 - t1)
            ratios.append((t2 - t1) / (t1 - t0) - 1)
        overhead = statistics.median(ratios)
        worst = max(worst, overhead)
        print(f"{name:<16}{calls:>5}{1e3 * statistics.median(t_sampler):>12.1f}"
              f"{1e3 * statistics.median(t_net):>13.1f}{overhead:>+10.1%}")
    print(f"worst median overhead: {worst:+.1%} (target < 3%)")


if __name__ == "__main__":
    main()
