"""What float64 sampling state costs: `sample()` with x, c_skip·x and the step arithmetic in float64 vs
float32, the network in float32 either way (the Denoiser feeds it in its own dtype, as NVlabs/edm does).

Interleaved repeats, medians, one run; prints the float64/float32 time ratio per network and batch, and
the largest difference between the two results (what float64 buys).

    python benchmarks/sampling_precision.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from elucidate import EDM, Denoiser, build_network, sample

CASES = {
    "digits UNet 1x8x8 (demo)": dict(arch="unet", img_resolution=8, in_channels=1),
    "DDPM++ small 3x32x32": dict(arch="ddpmpp", img_resolution=32, in_channels=3, model_channels=32,
                                 channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(16,), dropout=0.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=18)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"Heun, {args.steps} steps (NFE {2 * args.steps - 1}), torch threads {torch.get_num_threads()}")
    print(f"{'network':<28}{'batch':>6}{'fp32 s':>9}{'fp64 s':>9}{'fp64/fp32':>11}{'max |diff|':>12}")
    for name, spec in CASES.items():
        spec = dict(spec)
        net = build_network(spec.pop("arch"), **spec).eval()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.02 * torch.randn_like(p))
        D = Denoiser(net, EDM())
        shape = (net.in_channels, *net.img_resolution)
        for batch in (16, 64):
            times = {torch.float32: [], torch.float64: []}
            out = {}
            for _ in range(args.repeats):
                for dtype in (torch.float32, torch.float64):
                    t0 = time.perf_counter()
                    out[dtype] = sample(D, (batch, *shape), steps=args.steps, dtype=dtype)
                    times[dtype].append(time.perf_counter() - t0)
            t32, t64 = statistics.median(times[torch.float32]), statistics.median(times[torch.float64])
            diff = (out[torch.float64] - out[torch.float32].double()).abs().max().item()
            print(f"{name:<28}{batch:>6}{t32:>9.3f}{t64:>9.3f}{t64 / t32:>11.3f}{diff:>12.2e}")


if __name__ == "__main__":
    main()
