"""Streamed data: (1) the peak RSS of a few training steps from a large memory-mapped .npy vs a 1,000-image array
(target: < 300 MB apart, and not growing with N); (2) training images/s from a PNG folder decoded lazily in
``data.workers`` processes vs the same images as an in-memory array (target >= 0.9x). Both with the demo's network
(configs/digits-edm.yaml, 8x8 gray digits, batch 64).

Memory: each training runs in a fresh process (``ru_maxrss``, workers 0 so the dataset's own memory is measured);
the big array is a sparse file, so creating it is instant. Throughput: both datasets in one process, interleaved
over several rounds, median images/s; the ratio is printed.

    python benchmarks/streaming.py [--big-mb 2048] [--steps 20] [--images 2000] [--rounds 3] [--workers W]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def demo_config(data: dict, steps: int) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "digits-edm.yaml").read_text())
    raw["data"] = data
    raw["training"].update(steps=steps, checkpoint_every=10 ** 9, sample_every=0, log_every=10 ** 9)
    return raw


def digits_uint8(count: int) -> np.ndarray:
    """``count`` real 8x8 digits as uint8 [N, 1, 8, 8] (0..16 -> 0..255), repeated as needed."""
    from elucidate.data.bundled import load_digits_arrays

    images = load_digits_arrays()[0].reshape(-1, 1, 8, 8)
    images = np.round(images * (255 / 16)).astype(np.uint8)
    return images[np.arange(count) % len(images)]


# ---------------------------------------------------------------------------------------------- memory (child)
def child_rss(path: str, steps: int) -> None:
    """Train ``steps`` steps on the array at ``path`` in this process; print its peak RSS (MB) as JSON."""
    from elucidate.config import parse_config
    from elucidate.training import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(demo_config({"dataset": "npz", "path": path, "workers": 0}, steps))
        trainer = Trainer(config, tmp, progress=False, log=lambda *a: None)
        for step in range(steps):
            trainer.train_step(step)
        trainer.close()
        size = trainer.dataset.num_images
    print(json.dumps({"images": size, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss(path: Path, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child-rss", str(path), "--steps", str(steps)],
                         capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(args, tmp: Path) -> None:
    small = tmp / "small.npy"
    np.save(small, digits_uint8(1000))
    rows = []
    for mb in (args.big_mb // 4, args.big_mb):  # two sizes: the difference must not grow with N
        big = tmp / f"big-{mb}.npy"
        count = mb * 2 ** 20 // 64
        array = np.lib.format.open_memmap(big, mode="w+", dtype=np.uint8, shape=(count, 1, 8, 8))  # sparse
        array[:1000] = digits_uint8(1000)
        array.flush()
        del array
        rows.append((mb, peak_rss(big, args.steps)))
    base = peak_rss(small, args.steps)
    print(f"peak RSS of {args.steps} training steps (demo network, batch 64, workers 0):")
    print(f"  1,000-image array in a .npy       : {base['peak_rss_mb']:8.1f} MB")
    for mb, result in rows:
        diff = result["peak_rss_mb"] - base["peak_rss_mb"]
        print(f"  {result['images']:>11,} images ({mb:>5} MB .npy): {result['peak_rss_mb']:8.1f} MB   difference "
              f"{diff:+7.1f} MB (target < 300)")


# ---------------------------------------------------------------------------------------------- throughput
def throughput(args, tmp: Path) -> None:
    from PIL import Image

    from elucidate.config import parse_config
    from elucidate.data import build_dataset
    from elucidate.data.loader import default_workers
    from elucidate.training import Trainer

    images = digits_uint8(args.images)
    folder = tmp / "pngs"
    for i, image in enumerate(images):
        path = folder / f"{i % 10}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(path)
    np.savez_compressed(tmp / "memory.npz", images=images)  # compressed: loaded into memory
    workers = default_workers() if args.workers is None else args.workers
    sections = {"in-memory array": {"dataset": "npz", "path": str(tmp / "memory.npz")},
                f"PNG folder, {workers} workers": {"dataset": "folder", "path": str(folder), "workers": workers}}
    t0 = time.perf_counter()
    streamed = build_dataset(sections[f"PNG folder, {workers} workers"])
    index_s = time.perf_counter() - t0
    total = args.rounds * args.steps + 5
    trainers = {}
    for name, data in sections.items():
        run = tmp / name.replace(" ", "_").replace(",", "")
        trainers[name] = Trainer(parse_config(demo_config(data, total)), run, progress=False, log=lambda *a: None)
    speeds = {name: [] for name in trainers}
    position = {name: 0 for name in trainers}
    for name, trainer in trainers.items():  # warm-up (workers start, first kernels)
        for _ in range(3):
            trainer.train_step(position[name])
            position[name] += 1
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step(position[name])
                position[name] += 1
            speeds[name].append(args.steps * trainer.t.batch_size / (time.perf_counter() - start))
    for trainer in trainers.values():
        trainer.close()
    memory_speed = statistics.median(speeds["in-memory array"])
    print(f"training images/s (demo network, batch 64, {args.images} images, median of {args.rounds} rounds x "
          f"{args.steps} steps; indexing the folder took {index_s:.2f} s):")
    for name, values in speeds.items():
        speed = statistics.median(values)
        print(f"  {name:<26}: {speed:8.0f} img/s   ratio {speed / memory_speed:.2f}x"
              + ("" if name == "in-memory array" else " (target >= 0.9x)"))
    del streamed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mb", type=int, default=2048, help="size of the big .npy (a quarter of it is run too)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    parser.add_argument("--images", type=int, default=2000, help="PNG files of the throughput comparison")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the throughput comparison")
    parser.add_argument("--workers", type=int, default=None, help="data.workers (default: the default)")
    parser.add_argument("--child-rss", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_rss:
        return child_rss(args.child_rss, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        memory(args, Path(tmp))
        throughput(args, Path(tmp))


if __name__ == "__main__":
    main()
