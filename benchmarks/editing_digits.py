"""The editing picture of docs/editing.md: real 8x8 digits inpainted (bottom half generated, RePaint) and
black-and-white sketches edited into digits (SDEdit), by a trained digits run, unconditionally (its null condition).

    python benchmarks/editing_digits.py RUN [--out docs/images/editing_digits.png]

Columns: digit, its top half (the rest generated), inpainted; sketch (the digit thresholded to black and white),
edited at strength 0.3 (sigma_start 0.30) and 0.4 (1.09).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from elucidate.data.bundled import load_digits_arrays
from elucidate.run import load_run
from elucidate.viz import save_image_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/images/editing_digits.png"))
    parser.add_argument("--items", default="10,2,3,4,13,7")
    args = parser.parse_args()

    run = load_run(args.run)
    images, _ = load_digits_arrays()
    items = [int(i) for i in args.items.split(",")]
    digits = run.normalizer.to_model(torch.as_tensor(images[items], dtype=torch.float32)[:, None])
    n, seeds = len(items), list(range(len(items)))
    null = run.null_conditions(n)
    mask = torch.zeros(8, 8)
    mask[:4] = 1  # keep the top half
    inpainted = run.sample(seeds, init=digits, mask=mask, resample=10, cond=null)
    sketch = torch.where(digits > 0, 1.0, -1.0)  # a hard black-and-white drawing of the digit
    edited = [run.sample(seeds, init=sketch, strength=s, cond=null) for s in (0.3, 0.4)]
    top = torch.where(mask.bool(), digits, torch.full_like(digits, -1.0))
    columns = [digits, top, inpainted, sketch, *edited]
    print(f"wrote {save_image_grid(torch.stack(columns, 1).flatten(0, 1), args.out, nrow=len(columns), scale=8)}")


if __name__ == "__main__":
    main()
