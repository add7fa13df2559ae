"""GPU smoke test, for a user with a CUDA GPU: in each precision (fp32; bf16 where the GPU has it; fp16 with loss
scaling) train the digits U-Net for a few hundred steps, stop half-way and resume, then sample and evaluate
(fd_digits) through the command line, and print training images/s and the fd per precision. Optionally
``--compile`` (training.compile and ``sample --compile``) and ``--checkpointing`` (network.checkpointing).

    python benchmarks/gpu_smoke.py [--steps 400] [--batch 256] [--num 2000] [--compile] [--checkpointing]

Without CUDA it says so in one line and exits (status 0: nothing to check here).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def precisions() -> list[str]:
    from elucidate.runtime.precision import native_bf16
    return ["fp32"] + (["bf16"] if native_bf16("cuda") else []) + ["fp16"]


def cli(*argv) -> str:
    """``elucidate ARGV`` in a fresh process (as a user runs it); its stdout, or exit with its stderr."""
    done = subprocess.run([sys.executable, "-m", "elucidate", *map(str, argv)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"elucidate {' '.join(map(str, argv))} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout + done.stderr


def train(raw: dict, run: Path, steps: int) -> dict:
    """Train ``run`` to ``steps`` in this process; the summary with images/s of the steps it trained."""
    from elucidate.config import parse_config
    from elucidate.training import Trainer

    raw = json.loads(json.dumps(raw))
    raw["training"]["steps"] = steps
    trainer = Trainer(parse_config(raw), run, device="cuda", progress=False, log=lambda *a: None)
    first = trainer.step
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    summary = trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    summary["images_per_s"] = (summary["step"] - first) * raw["training"]["batch_size"] / seconds
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400, help="training steps per precision (resumed at half)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--num", type=int, default=2000, help="samples for fd_digits")
    ap.add_argument("--compile", action="store_true", help="training.compile and sample/eval through torch.compile")
    ap.add_argument("--checkpointing", action="store_true", help="network.checkpointing (activation checkpointing)")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here (torch.cuda.is_available() is False); nothing to check")
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    raw = yaml.safe_load((ROOT / "configs" / "digits-edm.yaml").read_text())
    raw["training"].update(batch_size=args.batch, checkpoint_every=max(1, args.steps // 4), sample_every=0,
                           log_every=max(1, args.steps // 8), compile=args.compile)
    if args.checkpointing:
        raw["network"]["checkpointing"] = True
    print(f"{torch.cuda.get_device_name()}: {args.steps} steps x {args.batch} images per precision -> {out}")
    rows = []
    for precision in precisions():
        raw["training"]["precision"] = precision
        run = out / precision
        first = train(raw, run, args.steps // 2)
        second = train(raw, run, args.steps)  # resumed from the half-way checkpoint
        assert second["step"] == args.steps and not second["interrupted"], second
        flags = ["--device", "cuda", "--precision", precision, "--no-progress"]
        cli("sample", run, "--seeds", "0-63", "--out", run / "samples.png", *flags,
            *(["--compile"] if args.compile else []))
        report = cli("eval", run, "--metric", "fd_digits", "--num", args.num, *flags)
        fd = report.strip().splitlines()[-1] if report.strip() else "?"
        speed = (first["images_per_s"] + second["images_per_s"]) / 2
        rows.append((precision, speed, second["skipped_steps"], fd))
        print(f"{precision}: {speed:,.0f} images/s training, {second['skipped_steps']} skipped steps; eval: {fd}")
    print("\nprecision  images/s  skipped  eval")
    for precision, speed, skipped, fd in rows:
        print(f"{precision:9s}  {speed:8,.0f}  {skipped:7d}  {fd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
