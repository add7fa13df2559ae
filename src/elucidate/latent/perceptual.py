"""Perceptual distance between images from the activations of a frozen feature network.

``PerceptualLoss(features)`` is LPIPS (Zhang et al. 2018, eq. 1) with unit layer weights:

    d(x, y) = sum_l mean_{h,w} || n(f_l(x)) - n(f_l(y)) ||^2,   n(v) = v / (||v|| + 1e-10) over channels,

where ``features(x)`` returns the list of activations ``f_l`` ([B, C_l, H_l, W_l] maps or [B, D] vectors)
of images ``x`` in model range [-1, 1]. Feature networks (:func:`load_feature_network`):

* ``"digits"``: the bundled digits classifier (:mod:`elucidate.metrics.digits_net`), its three
  conv activations and its 64-d penultimate features (images area-resized to 8x8, RGB averaged);
* a local ``.safetensors`` file with either the digits classifier's keys (``conv1.weight``, ...) or a
  VGG-style convolution stack in torchvision's naming (``features.<i>.weight``; e.g. VGG16's
  ``features`` converted to safetensors), whose taps are the activations before each max-pool;
* any ``nn.Module`` of your own with that ``features(x) -> list`` call.

Nothing is downloaded. The network is frozen (``requires_grad_(False)``, eval mode); gradients flow
to the images.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

__all__ = ["PerceptualLoss", "DigitsFeatures", "VGGFeatures", "load_feature_network"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_gray(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.shape[1] == 3:
        return x.mean(dim=1, keepdim=True)
    if x.shape[1] != 1:
        raise ValueError(f"{name} features take 1- or 3-channel images, got {x.shape[1]} channels")
    return x


class DigitsFeatures(nn.Module):
    """Activations of a :class:`~elucidate.metrics.DigitsClassifier` for images in [-1, 1]
    (the classifier's own input range after its [0, 255] -> [-1, 1] preprocessing)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.net = classifier

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = _to_gray(x, "digits")
        if x.shape[-2:] != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="area")
        net = self.net
        h1 = F.relu(net.conv1(x))
        h2 = F.relu(net.conv2(h1))
        h3 = F.relu(net.conv3(F.max_pool2d(h2, 2)))
        h4 = F.relu(net.fc1(F.max_pool2d(h3, 2).flatten(1)))
        return [h1, h2, h3, h4]


class VGGFeatures(nn.Module):
    """A VGG-style stack of 3x3 convolutions + ReLU with max-pools, rebuilt from a torchvision-named
    state dict (``features.<i>.weight/bias``): an index gap of 3 between convolutions means a
    max-pool between them. Taps: the ReLU output before each max-pool and the last one. Images in
    [-1, 1] are mapped to ImageNet-normalized RGB (gray repeated to 3 channels)."""

    def __init__(self, state: dict[str, torch.Tensor], source: str = "state dict"):
        super().__init__()
        pattern = re.compile(r"^features\.(\d+)\.(weight|bias)$")
        indices = sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})
        if not indices:
            raise UserError(f"{source}: no 'features.<i>.weight' tensors (not a VGG-style feature network)")
        self.convs = nn.ModuleList()
        self.pool_after: list[bool] = []
        for pos, i in enumerate(indices):
            weight, bias = state.get(f"features.{i}.weight"), state.get(f"features.{i}.bias")
            if weight is None or weight.ndim != 4:
                raise UserError(f"{source}: features.{i}.weight must be a 4-D convolution weight")
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], padding=weight.shape[2] // 2,
                             bias=bias is not None)
            conv.weight.data.copy_(weight)
            if bias is not None:
                conv.bias.data.copy_(bias)
            self.convs.append(conv)
            self.pool_after.append(pos + 1 < len(indices) and indices[pos + 1] - i == 3)
        self.in_channels = int(self.convs[0].in_channels)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.in_channels == 3:
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if x.shape[1] != 3:
                raise ValueError(f"this VGG feature network takes 1- or 3-channel images, got {x.shape[1]}")
            x = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        elif x.shape[1] != self.in_channels:
            raise ValueError(f"this feature network takes {self.in_channels}-channel images, got {x.shape[1]}")
        taps = []
        for conv, pool in zip(self.convs, self.pool_after):
            x = F.relu(conv(x))
            if pool:
                taps.append(x)
                x = F.max_pool2d(x, 2)
        taps.append(x)
        return taps


def _digits_from_state(state: dict[str, torch.Tensor], source: str) -> DigitsFeatures:
    from ..metrics.digits_net import DigitsClassifier

    try:
        channels = tuple(int(state[f"conv{i}.weight"].shape[0]) for i in (1, 2, 3))
        model = DigitsClassifier(feature_dim=int(state["fc1.weight"].shape[0]), channels=channels)
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{source}: not a digits-classifier state dict ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None
    return DigitsFeatures(model)


def load_feature_network(spec: str | os.PathLike | nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """A frozen feature network (see the module docstring) from ``"digits"``, a ``.safetensors`` path
    or a module."""
    if isinstance(spec, nn.Module):
        net = spec
    elif spec == "digits":
        from ..metrics.digits_net import load_digits_classifier
        net = DigitsFeatures(load_digits_classifier())
    else:
        path = Path(spec)
        if path.suffix != ".safetensors":
            raise UserError(f"perceptual network {str(spec)!r}: expected 'digits' or a path to a .safetensors file")
        if not path.is_file():
            raise UserError(f"perceptual network file {path} does not exist")
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"perceptual network file {path} is not a readable safetensors file "
                            f"({type(e).__name__})") from None
        net = _digits_from_state(state, str(path)) if "conv1.weight" in state else VGGFeatures(state, str(path))
    net = net.eval().requires_grad_(False)
    return net.to(device) if device is not None else net


def _normalize(f: torch.Tensor) -> torch.Tensor:
    return f / (f.norm(dim=1, keepdim=True) + 1e-10)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance ``d(x, y) [B]`` (unit layer weights) from a frozen feature network."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:  # the feature network stays in eval mode
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {list(x.shape)} and {list(y.shape)}")
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for f in self.features(torch.cat([x, y])):  # one batched pass for both sides
            a, b = _normalize(f.float()).chunk(2)
            d = (a - b).square().sum(dim=1)
            total = total + (d.flatten(1).mean(dim=1) if d.ndim > 1 else d)
        return total
