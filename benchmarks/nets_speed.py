"""Training throughput of a network on CPU: forward + backward + Adam step per second.

Defaults measure the digits U-Net preset, ``build_network("unet", img_resolution=8, in_channels=1,
out_channels=1)``, next to a DiT of about the same size (``SIZED``: DiT-S/2 is 33M parameters) at
batch 64, in fp32 and under bf16 autocast. The machine may be shared, so the step time is measured
over several rounds and the fastest round's median is reported (with the overall median alongside).

    python benchmarks/nets_speed.py [--arch unet,dit] [--batch 64] [--resolution 8] [--channels 1]
                                    [--kwargs '{"hidden_size": 192}']
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from elucidate.nets import NETWORKS, build_network, count_parameters

#: keyword arguments that size an architecture like the 1.8M-parameter digits U-Net (default: its preset)
SIZED = {"dit": dict(patch_size=2, hidden_size=128, depth=6, num_heads=4)}


def steps_per_second(net: torch.nn.Module, x: torch.Tensor, *, bf16: bool, steps: int, rounds: int,
                     warmup: int = 5) -> tuple[float, float]:
    """(best-round median, overall median) training steps per second on the batch ``x``."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        sigma = (torch.randn(x.shape[0], generator=gen) * 1.2 - 1.2).exp()  # EDM's training sigmas
        noisy = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=gen)
        c_in = 1 / (sigma ** 2 + 0.25).sqrt()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(c_in[:, None, None, None] * noisy, sigma.log() / 4)
        loss = (out.float() - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    medians, all_times = [], []
    for _ in range(rounds):
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
        all_times += times
    return 1 / min(medians), 1 / statistics.median(all_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="unet,dit", help=f"comma-separated, from {', '.join(NETWORKS)}")
    parser.add_argument("--kwargs", default=None, help="JSON network keyword arguments (replace SIZED's)")
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in NETWORKS]
    if unknown:
        parser.error(f"unknown arch {unknown[0]!r}; choose from {', '.join(NETWORKS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for arch in archs:
        torch.manual_seed(args.seed)
        kwargs = json.loads(args.kwargs) if args.kwargs else SIZED.get(arch, {})
        net = build_network(arch, img_resolution=args.resolution, in_channels=args.channels,
                            out_channels=args.channels, **kwargs).train()
        x = torch.rand(args.batch, args.channels, args.resolution, args.resolution) * 2 - 1
        result = dict(arch=arch, kwargs=kwargs, parameters=count_parameters(net), batch=args.batch,
                      resolution=args.resolution, channels=args.channels, threads=torch.get_num_threads())
        for name, bf16 in [("fp32", False), ("bf16_autocast", True)]:
            best, median = steps_per_second(net, x, bf16=bf16, steps=args.steps, rounds=args.rounds)
            result[f"{name}_steps_per_s"] = round(best, 2)
            result[f"{name}_steps_per_s_median"] = round(median, 2)
        results.append(result)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
