"""Are a run's samples copies of its training images? Samples N images, measures nearest-neighbour
distances to the training set against real vs real (elucidate.metrics.copy_check), prints them as
JSON and draws each of the first samples next to its nearest training image.

    python scripts/copy_check.py runs/faces --num 500 --out docs/images/faces_nearest.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from elucidate.data import build_dataset
    from elucidate.metrics import copy_check, nearest_neighbors
    from elucidate.run import load_run
    from elucidate.viz import save_image_grid

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--show", type=int, default=16, help="samples drawn with their nearest training image")
    p.add_argument("--out", type=Path, default=None, help="PNG: row pairs (samples, their nearest training image)")
    args = p.parse_args()

    run = load_run(args.run)
    data = dict(run.config.data, xflip=False)  # the training images themselves, no mirrored copies
    dataset = build_dataset(data)
    training, _ = dataset.get_batch(torch.arange(len(dataset)))
    samples = run.images(run.sample(range(args.num), batch_size=250))
    samples = samples.clamp(float(training.min()), float(training.max()))  # as written to an image
    report = copy_check(samples, training)
    print(json.dumps(dict(report, run=str(args.run), step=run.step), indent=2))
    if args.out is not None:
        n = min(args.show, args.num)
        _, index = nearest_neighbors(samples[:n], training, k=1)
        rows = []
        for start in range(0, n, 8):
            rows += [samples[start:start + 8], training[index[start:start + 8, 0]]]
        save_image_grid(torch.cat(rows), args.out, nrow=8, pad=2)
        print(f"wrote {args.out} (odd rows: samples; even rows: their nearest training image)")


if __name__ == "__main__":
    main()
