"""diffusers UNets as elucidate networks ``F(x_in, c_noise, class_labels=None, context=None)``.

:class:`DiffusersUNet` wraps any diffusers ``UNet2DModel`` / ``UNet2DConditionModel``: it calls
``unet(x_in, c_noise, class_labels=..., encoder_hidden_states=context).sample``. Class labels follow
elucidate's contract (int ``[B]`` or one-hot ``[B, label_dim]`` with an all-zero row meaning "no label")
and are handed to the UNet as class indices; "no label" is the index ``null_class``.

:class:`DiffusersUNet2D` is the ``diffusers_unet2d`` architecture: a fresh ``UNet2DModel`` built from
elucidate's network keys plus UNet2DModel's own keyword arguments, trainable under any formulation
(the positional timestep embedding takes any float ``c_noise``). With ``label_dim = K`` it has
``K + 1`` class embeddings, the last one being "no label" (classifier-free guidance).

diffusers is imported only when one of these is built (``pip install 'elucidate[diffusers]'``).
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UserError
from .layers import parse_resolution

__all__ = ["import_diffusers", "DiffusersUNet", "DiffusersUNet2D"]


def import_diffusers():
    """The ``diffusers`` module, or a one-line UserError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise UserError("this needs the optional dependency diffusers: pip install 'elucidate[diffusers]'") from None
    return diffusers


def _resolution(sample_size) -> tuple[int, int] | None:
    if sample_size is None:
        return None
    if isinstance(sample_size, int):
        return (sample_size, sample_size)
    return tuple(int(v) for v in sample_size)


class DiffusersUNet(nn.Module):
    """A diffusers UNet as ``F(x_in, c_noise, class_labels=None, context=None)``.

    ``label_dim`` (default: the UNet's ``num_class_embeds``, or one less when ``null_class`` is the
    last embedding) is the width of one-hot labels; ``null_class`` the embedding used for "no label"
    (None: the model has none, so unconditional / guided sampling of a class-conditional UNet is an
    error); ``null_context`` the cross-attention states that mean "no condition" (guidance; default
    zeros).
    """

    cond_keys = ("class_labels", "context")

    def __init__(self, unet: nn.Module, *, label_dim: int | None = None, null_class: int | None = None,
                 null_context: torch.Tensor | None = None):
        super().__init__()
        config = unet.config
        if config.get("addition_embed_type") is not None:
            raise UserError(f"{type(unet).__name__} with addition_embed_type={config['addition_embed_type']!r} "
                            f"needs added_cond_kwargs (SDXL-style); not supported")
        self.unet = unet
        self.in_channels = int(config["in_channels"])
        self.out_channels = int(config.get("out_channels") or self.in_channels)
        self.img_resolution = _resolution(config.get("sample_size"))
        self.cross_attention = "encoder_hidden_states" in inspect.signature(unet.forward).parameters
        embeds = config.get("num_class_embeds") if config.get("class_embed_type") is None else None
        embeds = int(embeds or 0)
        if null_class is not None and not 0 <= null_class < embeds:
            raise UserError(f"null_class = {null_class} but the UNet has {embeds} class embeddings")
        if label_dim is None:
            label_dim = embeds - 1 if null_class is not None and null_class == embeds - 1 else embeds
        if not 0 <= label_dim <= embeds:
            raise UserError(f"label_dim = {label_dim} but the UNet has {embeds} class embeddings")
        self.label_dim, self.null_class = int(label_dim), null_class
        self.label_dropout = 0.0
        self.register_buffer("null_context", None if null_context is None else torch.as_tensor(null_context),
                             persistent=False)

    def null_condition(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """The "no condition" value of ``key`` (guidance): ``null_context`` for context, else zeros."""
        if key == "context" and self.null_context is not None:
            return self.null_context.to(value).expand_as(value)
        return torch.zeros_like(value)

    def class_indices(self, class_labels, batch: int, device) -> torch.Tensor | None:
        """Labels as the UNet's class indices ``[B]`` (long); "no label" is ``null_class``."""
        if not self.label_dim:
            if class_labels is not None:
                raise ValueError(f"{type(self.unet).__name__} is not class-conditional but class_labels were given")
            return None
        if class_labels is None:
            labels = torch.full((batch,), -1, dtype=torch.long, device=device)
        else:
            labels = torch.as_tensor(class_labels, device=device)
            if labels.is_floating_point():  # one-hot [B, label_dim]; an all-zero row = no label
                if labels.ndim != 2 or labels.shape[0] not in (1, batch) or labels.shape[1] != self.label_dim:
                    raise ValueError(f"float class_labels must have shape [{batch}, {self.label_dim}], "
                                     f"got {list(labels.shape)}")
                hot = labels != 0
                if not (((labels == 1) | ~hot).all() and (hot.sum(1) <= 1).all()):
                    raise ValueError("class_labels of a diffusers UNet must be one-hot (or all zero for no label); "
                                     "soft labels have no class embedding")
                labels = torch.where(hot.any(1), labels.argmax(1), -1)
            else:
                if labels.ndim != 1 or labels.shape[0] not in (1, batch):
                    raise ValueError(f"integer class_labels must have shape [{batch}], got {list(labels.shape)}")
                if labels.numel() and (labels.min() < 0 or labels.max() >= self.label_dim):
                    raise ValueError(f"integer class_labels must lie in [0, {self.label_dim}), got range "
                                     f"[{int(labels.min())}, {int(labels.max())}]")
            labels = labels.long().expand(batch)
        if self.training and self.label_dropout > 0:
            labels = torch.where(torch.rand(batch, device=device) < self.label_dropout, -1, labels)
        if (labels < 0).any():
            if self.null_class is None:
                raise ValueError("this class-conditional UNet has no 'no label' class: give every sample a label, "
                                 "or name the unconditional embedding with null_class (needed for guidance)")
            labels = torch.where(labels < 0, self.null_class, labels)
        return labels

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None, augment_labels: torch.Tensor | None = None,
                **cond) -> torch.Tensor:
        if cond or augment_labels is not None:
            keys = sorted(cond) + (["augment_labels"] if augment_labels is not None else [])
            raise TypeError(f"{type(self).__name__}.forward got unsupported conditioning key(s) {keys}; "
                            f"accepted: {', '.join(self.cond_keys)}")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self.unet).__name__} expects x of shape [B, {self.in_channels}, H, W], "
                             f"got {list(x.shape)}")
        c_noise = torch.as_tensor(c_noise, device=x.device).reshape(-1).expand(x.shape[0])
        kwargs = {"class_labels": self.class_indices(class_labels, x.shape[0], x.device)}
        if self.cross_attention:
            if context is None:
                raise ValueError(f"{type(self.unet).__name__} needs context (its encoder_hidden_states)")
            kwargs["encoder_hidden_states"] = context.to(x.dtype)
        elif context is not None:
            raise ValueError(f"{type(self.unet).__name__} has no cross-attention but context was given")
        return self.unet(x, c_noise, return_dict=False, **kwargs)[0]


class DiffusersUNet2D(DiffusersUNet):
    """The ``diffusers_unet2d`` architecture: a new ``UNet2DModel`` (its keyword arguments, with
    elucidate's ``img_resolution``, ``in_channels``, ``out_channels`` and ``label_dim``). Without
    ``down_block_types`` / ``up_block_types`` the first level is a ``DownBlock2D`` / ``UpBlock2D`` and
    the others have attention."""

    def __init__(self, img_resolution: int | Sequence[int], in_channels: int, out_channels: int | None = None,
                 label_dim: int = 0, label_dropout: float = 0.0, augment_dim: int = 0,
                 block_out_channels: Sequence[int] = (32, 64), layers_per_block: int = 2,
                 down_block_types: Sequence[str] | None = None, up_block_types: Sequence[str] | None = None,
                 mid_block_type: str | None = "UNetMidBlock2D", attention_head_dim: int | None = 8,
                 norm_num_groups: int = 8, attn_norm_num_groups: int | None = None, norm_eps: float = 1e-5,
                 dropout: float = 0.0, act_fn: str = "silu", time_embedding_dim: int | None = None,
                 flip_sin_to_cos: bool = True, freq_shift: int = 0, resnet_time_scale_shift: str = "default",
                 downsample_type: str = "conv", upsample_type: str = "conv", downsample_padding: int = 1,
                 mid_block_scale_factor: float = 1.0, add_attention: bool = True):
        diffusers = import_diffusers()
        H, W = parse_resolution(img_resolution)
        out_channels = in_channels if out_channels is None else out_channels
        for name, value, low in [("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("label_dim", label_dim, 0)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if augment_dim:
            raise ValueError("diffusers_unet2d has no augmentation input: augment_dim must be 0")
        if not 0 <= label_dropout <= 1:
            raise ValueError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        channels = tuple(int(c) for c in block_out_channels)
        levels = len(channels)
        if not levels:
            raise ValueError("block_out_channels must list at least one level")
        factor = 2 ** (levels - 1)
        if H % factor or W % factor:
            raise ValueError(f"img_resolution {H}x{W} is incompatible with {levels} levels (block_out_channels): "
                             f"H and W must be divisible by {factor}")
        down = tuple(down_block_types or ("DownBlock2D",) + ("AttnDownBlock2D",) * (levels - 1))
        up = tuple(up_block_types or ("AttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",))
        unet = diffusers.UNet2DModel(
            sample_size=H if H == W else (H, W), in_channels=in_channels, out_channels=out_channels,
            down_block_types=down, up_block_types=up, block_out_channels=channels, layers_per_block=layers_per_block,
            mid_block_type=mid_block_type, attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
            attn_norm_num_groups=attn_norm_num_groups, norm_eps=norm_eps, dropout=dropout, act_fn=act_fn,
            time_embedding_type="positional", time_embedding_dim=time_embedding_dim, flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift, resnet_time_scale_shift=resnet_time_scale_shift, downsample_type=downsample_type,
            upsample_type=upsample_type, downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor, add_attention=add_attention,
            num_class_embeds=label_dim + 1 if label_dim else None)
        super().__init__(unet, label_dim=label_dim, null_class=label_dim if label_dim else None)
        self.label_dropout, self.augment_dim = float(label_dropout), 0
