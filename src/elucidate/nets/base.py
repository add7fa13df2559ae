"""The contract every network in this package follows: :class:`DiffusionNet` (configuration checks,
the conditioning inputs, the shared noise/label embedding)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .conditioning import check_concat, check_context, widen_input
from .layers import Checkpointed, Conv2d, UNetBlock, parse_resolution

__all__ = ["DiffusionNet"]


class DiffusionNet(nn.Module):
    """Base class: ``F(x, c_noise, class_labels=None, augment_labels=None, concat=None, context=None)
    -> [B, out_channels, H, W]``.

    Validates the configuration (resolution divisible by ``2**(levels-1)``, channel counts) and, at
    call time, the input shape and conditioning. ``class_labels`` may be int labels ``[B]`` or
    one-hot/soft ``[B, label_dim]`` floats; ``None`` (or an all-zero vector) means unconditional.
    With ``label_dropout > 0`` whole label vectors are zeroed at that rate in training mode only,
    so one network serves classifier-free guidance. With ``cond_channels > 0``, ``concat``
    ``[B, cond_channels, H, W]`` is concatenated to ``x`` (``None`` = zeros = no condition); with
    ``context_dim > 0``, blocks cross-attend to ``context`` ``[B, L, context_dim]`` (``None``, or a
    row of all-zero tokens = no context: the cross-attention adds exactly 0). The layers these add
    start at zero, so a fresh conditional network computes the unconditional one (see
    :mod:`.conditioning`); with both 0 the network's parameters are those it had before they existed.
    """

    cond_keys = ("class_labels", "augment_labels", "concat", "context")

    def __init__(self, img_resolution: int | Sequence[int], in_channels: int, out_channels: int | None,
                 channel_mult: Sequence[int], num_blocks: int, attn_resolutions: Sequence[int],
                 dropout: float, label_dim: int, label_dropout: float, augment_dim: int,
                 cond_channels: int = 0, context_dim: int = 0):
        super().__init__()
        self.img_resolution = parse_resolution(img_resolution)
        out_channels = in_channels if out_channels is None else out_channels
        self.channel_mult = tuple(int(m) for m in channel_mult)
        self.attn_resolutions = tuple(int(r) for r in attn_resolutions)
        for name, value, low in [("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("num_blocks", num_blocks, 1), ("label_dim", label_dim, 0),
                                 ("augment_dim", augment_dim, 0), ("cond_channels", cond_channels, 0),
                                 ("context_dim", context_dim, 0)]:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult!r}")
        if not (0 <= dropout < 1 and 0 <= label_dropout <= 1):
            raise ValueError(f"need 0 <= dropout < 1 and 0 <= label_dropout <= 1, got {dropout}, {label_dropout}")
        factor = 2 ** (len(self.channel_mult) - 1)
        h, w = self.img_resolution
        if h % factor or w % factor:
            raise ValueError(f"img_resolution {h}x{w} is incompatible with channel_mult {self.channel_mult}: "
                             f"H and W must be divisible by 2**(len(channel_mult)-1) = {factor}")
        self.in_channels, self.out_channels, self.num_blocks = in_channels, out_channels, num_blocks
        self.label_dim, self.label_dropout, self.augment_dim = label_dim, float(label_dropout), augment_dim
        self.dropout = float(dropout)
        self.cond_channels, self.context_dim = cond_channels, context_dim

    def use_checkpointing(self, on: bool) -> None:
        """Activation checkpointing of every block (the ``checkpointing`` constructor argument of the networks that
        have blocks): each block's activations are recomputed in the backward pass instead of kept, for the same
        outputs and gradients in less memory (:class:`~.layers.Checkpointed`). Called at the end of ``__init__``."""
        if not isinstance(on, bool):
            raise ValueError(f"checkpointing must be true or false, got {on!r}")
        self.checkpointing = on
        for module in self.modules():
            if isinstance(module, Checkpointed):
                module.checkpointing = on

    def widen_input(self, conv: Conv2d) -> Conv2d:
        """The first convolution, taking ``in_channels + cond_channels`` (zero weights for the condition)."""
        return widen_input(conv, self.cond_channels)

    def add_cross_attention(self, *middle: UNetBlock) -> None:
        """With ``context_dim > 0``: cross-attention in every block with self-attention and in ``middle``.
        Called at the end of ``__init__``, so the other parameters' random draws are unchanged."""
        if self.context_dim:
            blocks = [m for m in self.modules() if isinstance(m, UNetBlock) and (m.attn is not None or m in middle)]
            for block in blocks:
                block.add_cross_attention(self.context_dim)

    def check_conditions(self, x: torch.Tensor, concat, context) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x with concat appended on channels, context or None)``, validated (see :mod:`.conditioning`)."""
        name = type(self).__name__
        return check_concat(name, x, concat, self.cond_channels), check_context(name, x.shape[0], context,
                                                                               self.context_dim)

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        """The conditioning embedding ``[B, model_channels * channel_mult_emb]`` (ADM order: noise,
        augment, MLP, then labels; SongUNet overrides it with its own order)."""
        dtype = self.map_layer0.weight.dtype
        emb = self.map_noise(c_noise).to(dtype)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(labels.to(dtype))
        return F.silu(emb)

    def level_resolution(self, level: int) -> tuple[int, int]:
        """``(H, W)`` of the feature maps at U-Net level ``level`` (0 = input resolution)."""
        return self.img_resolution[0] >> level, self.img_resolution[1] >> level

    def use_attention(self, level: int) -> bool:
        """Whether ``attn_resolutions`` selects ``level``; matched against the *smaller* side."""
        return min(self.level_resolution(level)) in self.attn_resolutions

    def check_inputs(self, x: torch.Tensor, c_noise, class_labels, augment_labels,
                     cond: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Validate a call; returns ``(c_noise [B], labels [B, label_dim] or None, augment or None)``
        with label dropout applied in training mode."""
        name = type(self).__name__
        if cond:
            raise TypeError(f"{name}.forward got unknown conditioning key(s) {sorted(cond)}; "
                            f"accepted: {', '.join(self.cond_keys)}")
        expected = (self.in_channels, *self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{name} expects x of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                             f"(in_channels, img_resolution), got {list(x.shape)}")
        batch = x.shape[0]
        c_noise = torch.as_tensor(c_noise, device=x.device).reshape(-1)
        if c_noise.numel() == 1:
            c_noise = c_noise.expand(batch)
        elif c_noise.numel() != batch:
            raise ValueError(f"c_noise has {c_noise.numel()} values but x has batch size {batch}")
        labels = self.prepare_labels(class_labels, batch, x.device)
        if augment_labels is not None and not self.augment_dim:
            raise ValueError(f"{name} was built with augment_dim=0 but augment_labels were given")
        if augment_labels is not None and tuple(augment_labels.shape) != (batch, self.augment_dim):
            raise ValueError(f"augment_labels must be [{batch}, {self.augment_dim}], got {list(augment_labels.shape)}")
        return c_noise, labels, augment_labels

    def prepare_labels(self, class_labels, batch: int, device: torch.device) -> torch.Tensor | None:
        """Class labels as ``[batch, label_dim]`` float vectors (zeros for ``None``), label dropout
        applied in training mode; ``None`` for an unconditional network."""
        if not self.label_dim:
            if class_labels is not None:
                raise ValueError(f"{type(self).__name__} is unconditional (label_dim=0) but class_labels were given")
            return None
        if class_labels is None:
            return torch.zeros(batch, self.label_dim, device=device)
        labels = torch.as_tensor(class_labels, device=device)
        if not labels.is_floating_point():
            if labels.ndim != 1 or labels.shape[0] != batch:
                raise ValueError(f"integer class_labels must have shape [{batch}], got {list(labels.shape)}")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.label_dim):
                raise ValueError(f"integer class_labels must lie in [0, {self.label_dim}), "
                                 f"got range [{int(labels.min())}, {int(labels.max())}]")
            labels = F.one_hot(labels.long(), self.label_dim).float()
        elif labels.ndim != 2 or labels.shape[1] != self.label_dim or labels.shape[0] not in (1, batch):
            raise ValueError(f"float class_labels must have shape [{batch}, {self.label_dim}], "
                             f"got {list(labels.shape)}")
        labels = labels.expand(batch, -1)
        if self.training and self.label_dropout > 0:
            keep = torch.rand(batch, 1, device=device) >= self.label_dropout
            labels = labels * keep.to(labels.dtype)
        return labels


def read_state_dict(path: str | os.PathLike, *, allow_torch_load: bool = False, origin: str = "network",
                    export: str = "net.state_dict()") -> dict[str, torch.Tensor]:
    """The tensors of an exported network file: safetensors, or with ``allow_torch_load`` a flat state dict read by
    ``torch.load(weights_only=True)`` (never unpickled otherwise); one-line UserErrors naming ``path``. ``origin``
    ("edm", "edm2") and ``export`` (what to save) phrase the hints."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{origin} network file {path} does not exist")
    if not allow_torch_load:
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for bad files
            raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}); export {origin}'s "
                            "tensors with safetensors (docs/edm.md) or pass allow_torch_load=True") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a state dict readable by torch.load(weights_only=True) "
                        f"({type(e).__name__})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a flat state dict of tensors (export {export})")
    return dict(state)
