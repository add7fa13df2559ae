"""Inception-v3 as used for FID (the TensorFlow 2015-12-05 graph ported to PyTorch).

The architecture is the FID variant of Inception-v3 (Szegedy et al. 2016) that pytorch-fid
uses: relative to the ImageNet torchvision model, the 3x3 average pools inside the A, C and E
blocks ignore padded zeros (TensorFlow's ``count_include_pad=False``), and the last E block
(``Mixed_7c``) max-pools its pooling branch. Parameter and buffer names equal the keys of
pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` so that file loads with
``strict=True``. Weights are never downloaded: the user passes a local file to
:func:`load_inception` (see ``docs/metrics.md``).

Output: the 2048-d ``pool3`` features (global average pool after ``Mixed_7c``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .frechet import MissingFileError
from .inputs import check_images

__all__ = ["FID_WEIGHTS_FILENAME", "FID_WEIGHTS_SHA256_PREFIX", "FID_WEIGHTS_URL", "FIDInceptionV3",
           "file_sha256", "load_inception", "preprocess_inception"]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILENAME)
# torch.hub naming convention: the suffix of the file name is the start of its SHA-256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
INCEPTION_RESOLUTION = 299


class ConvBN(nn.Module):
    """Bias-free convolution, batch norm (eps 1e-3, as in TensorFlow) and ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    """3x3/stride-1 average pool that averages over valid (non-padded) pixels only."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double-3x3 and pooled branches (``Mixed_5b``..``Mixed_5d``)."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (``Mixed_6a``)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (``Mixed_6b``..``Mixed_6e``)."""

    def __init__(self, c_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (``Mixed_7a``)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded 1x3/3x1 outputs (``Mixed_7b``: average pool; ``Mixed_7c``: the
    FID graph's max pool)."""

    def __init__(self, c_in: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def preprocess_inception(images: Tensor) -> Tensor:
    """``[B, C, H, W]`` images in [0, 255] (float or uint8, C = 1 or 3) -> float32
    ``[B, 3, 299, 299]`` in [-1, 1]: gray is repeated to RGB, resizing is bilinear
    (``align_corners=False``, no antialiasing), as in pytorch-fid."""
    x = check_images(images)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INCEPTION_RESOLUTION, INCEPTION_RESOLUTION):
        x = F.interpolate(x, size=(INCEPTION_RESOLUTION, INCEPTION_RESOLUTION),
                          mode="bilinear", align_corners=False)
    return x / 127.5 - 1.0


class FIDInceptionV3(nn.Module):
    """FID Inception-v3. ``forward(images)`` returns the 2048-d pool3 features ``[B, 2048]``
    of raw images in [0, 255]; ``logits(images)`` the 1008-way classifier output (used by the
    Inception Score). Build it with :func:`load_inception` to get the real weights."""

    feature_dim = 2048

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def pool3(self, x: Tensor) -> Tensor:
        """pool3 features of an already preprocessed ``[B, 3, 299, 299]`` batch in [-1, 1]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, images: Tensor) -> Tensor:
        """pool3 features ``[B, 2048]`` of raw images (see :func:`preprocess_inception`)."""
        return self.pool3(preprocess_inception(images))

    def logits(self, images: Tensor) -> Tensor:
        """1008-way logits ``[B, 1008]`` of raw images."""
        return self.fc(self(images))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (to check a downloaded weights file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read Inception weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return dict(state)


def load_inception(path: str | os.PathLike[str], *, device: str | torch.device | None = None,
                   verify_hash: bool = False) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` with weights from a LOCAL file (never downloads).

    ``path`` is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (read with
    ``torch.load(weights_only=True)``) or a ``.safetensors`` file with the same keys. Keys must
    match exactly (``strict=True``; absent BatchNorm ``num_batches_tracked`` counters are
    tolerated). With ``verify_hash=True`` the file's SHA-256 must start with
    :data:`FID_WEIGHTS_SHA256_PREFIX`. Returns the model in eval mode without gradients.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"Inception weights file not found: {path}. Download {FID_WEIGHTS_FILENAME} yourself "
            f"from {FID_WEIGHTS_URL} (see docs/metrics.md); elucidate never downloads weights.")
    if verify_hash:
        digest = file_sha256(path)
        if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
            raise ValueError(f"{path}: SHA-256 {digest} does not start with "
                             f"{FID_WEIGHTS_SHA256_PREFIX} ({FID_WEIGHTS_FILENAME})")
    state = _read_state_dict(path)
    with torch.device("meta"):  # no wasted random init: every tensor comes from the file
        model = FIDInceptionV3()
    expected = model.state_dict()
    for key in expected:  # counters absent from some exports; they do not affect eval
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{path}: keys do not match the FID Inception-v3 ({len(missing)} missing, "
            f"{len(unexpected)} unexpected); first missing: {missing[:5]}, "
            f"first unexpected: {unexpected[:5]}")
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
           if state[k].shape != v.shape]
    if bad:
        k, got, want = bad[0]
        raise ValueError(f"{path}: {len(bad)} tensors have the wrong shape; first: {k} is {got}, "
                         f"expected {want}")
    state = {k: v.to(expected[k].dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model
