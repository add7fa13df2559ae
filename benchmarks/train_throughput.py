"""Training throughput: elucidate's loop vs a bare hand-written EDM loop on the same network and
batch (target ratio >= 0.95), and what bf16 autocast and channels_last gain on this CPU.

All variants run in one process, interleaved over several rounds; the median images/s is reported.

    python benchmarks/train_throughput.py [--steps 40] [--rounds 5] [--big]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time

import torch

from elucidate.config import parse_config
from elucidate.data import build_dataset
from elucidate.nets import build_network
from elucidate.runtime.precision import native_bf16
from elucidate.training import Trainer


def bare_loop(net: torch.nn.Module, images: torch.Tensor, steps: int, batch: int, *, bf16: bool = False,
              channels_last: bool = False, fused: bool = True) -> float:
    """A minimal EDM training loop written by hand; returns images/s. ``fused`` picks the same
    Adam kernel elucidate uses (the comparison is then about the loop, not the optimizer)."""
    sigma_data, P_mean, P_std = 0.5, -1.2, 1.2
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=fused)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = time.perf_counter()
    for _ in range(steps):
        y = images[torch.randint(0, len(images), (batch,), generator=g)]
        if channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        sigma = (torch.randn(batch, 1, 1, 1, generator=g) * P_std + P_mean).exp()
        n = torch.randn(y.shape, generator=g) * sigma
        c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
        c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
        c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
        with ctx:
            F = net(c_in * (y + n), sigma.flatten().log() / 4)
        D = c_skip * (y + n) + c_out * F.float()
        weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
        loss = (weight * (D - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def elucidate_loop(trainer: Trainer, steps: int) -> float:
    t0 = time.perf_counter()
    start = trainer.step
    for k in range(start, start + steps):
        trainer.train_step(k)
    trainer.step = start + steps
    return steps * trainer.t.batch_size / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--big", action="store_true", help="also measure bf16/channels_last on a 32x32 RGB U-Net")
    args = parser.parse_args()

    raw = {"data": {"dataset": "digits"}, "network": {"arch": "unet"},
           "training": {"batch_size": args.batch, "lr": 1e-4, "lr_rampup": 0, "grad_clip": None, "precision": "fp32"}}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(parse_config(raw), tmp, progress=False, log=lambda *a: None)
        data = build_dataset({"dataset": "digits"})
        images = data.get_batch(torch.arange(len(data)))[0]
        torch.manual_seed(0)
        bare_net = build_network("unet", img_resolution=8, in_channels=1, out_channels=1)
        bf16_net = build_network("unet", img_resolution=8, in_channels=1, out_channels=1)
        cl_net = build_network("unet", img_resolution=8, in_channels=1, out_channels=1)
        default_net = build_network("unet", img_resolution=8, in_channels=1, out_channels=1)
        results: dict[str, list[float]] = {k: [] for k in ("bare fp32", "elucidate fp32", "bare bf16",
                                                         "bare channels_last", "bare, default Adam")}
        bare_loop(bare_net, images, 3, args.batch)
        elucidate_loop(trainer, 3)
        for _ in range(args.rounds):
            results["bare fp32"].append(bare_loop(bare_net, images, args.steps, args.batch))
            results["elucidate fp32"].append(elucidate_loop(trainer, args.steps))
            results["bare bf16"].append(bare_loop(bf16_net, images, args.steps, args.batch, bf16=True))
            results["bare channels_last"].append(bare_loop(cl_net, images, args.steps, args.batch,
                                                           channels_last=True))
            results["bare, default Adam"].append(bare_loop(default_net, images, args.steps, args.batch, fused=False))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"digits U-Net ({sum(p.numel() for p in bare_net.parameters()) / 1e6:.2f} M params), batch {args.batch}, "
          f"{args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"  {k:<22} {v:8.0f} images/s")
    print(f"elucidate loop / bare loop: {med['elucidate fp32'] / med['bare fp32']:.3f}  (target >= 0.95; the loop also "
          f"does EMA, grad-norm, NaN guard, deterministic batches)")
    print(f"fused Adam gain:          {med['bare fp32'] / med['bare, default Adam']:.2f}x (elucidate uses it)")
    print(f"bf16 autocast gain:       {med['bare bf16'] / med['bare fp32']:.2f}x"
          f"{'' if native_bf16('cpu') else '  (no bf16 hardware here: emulated)'}")
    print(f"channels_last gain:       {med['bare channels_last'] / med['bare fp32']:.2f}x")
    if args.big:
        big_gains(args)


def big_gains(args) -> None:
    """bf16 / channels_last on a larger U-Net (32x32 RGB), where matmuls dominate."""
    torch.manual_seed(0)
    images = torch.rand(256, 3, 32, 32) * 2 - 1
    kw = dict(img_resolution=32, in_channels=3, model_channels=64, channel_mult=(1, 2, 2), attn_resolutions=(8,))
    nets = {k: build_network("unet", **kw) for k in ("fp32", "bf16", "channels_last", "bf16+channels_last")}
    batch, steps = 32, max(4, args.steps // 8)
    runs = {"fp32": {}, "bf16": {"bf16": True}, "channels_last": {"channels_last": True},
            "bf16+channels_last": {"bf16": True, "channels_last": True}}
    for k in runs:
        bare_loop(nets[k], images, 2, batch, **runs[k])
    results = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k in runs:
            results[k].append(bare_loop(nets[k], images, steps, batch, **runs[k]))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"32x32 RGB U-Net ({sum(p.numel() for p in nets['fp32'].parameters()) / 1e6:.1f} M params), batch {batch}:")
    for k, v in med.items():
        print(f"  {k:<22} {v:8.1f} images/s  ({v / med['fp32']:.2f}x)")


if __name__ == "__main__":
    main()
