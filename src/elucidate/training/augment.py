"""EDM's non-leaky augmentation (Karras et al. 2022, appendix): geometric transforms of the clean
training image whose parameters go to the network as ``augment_labels``. At sampling time the labels
are zero (absent), so the model generates non-augmented images: the augmentations do not leak.

Transforms, each applied to an image independently with probability ``min(1, p x multiplier)``:
x-flip, y-flip, rotation by k x 90 degrees (k in {1, 2, 3}), integer translation (reflected at the
borders) -- all exact pixel permutations -- then isotropic scaling (log-normal), rotation by any angle
and anisotropic scaling (log-normal stretch along a random axis), composed into one affine map and
resampled bilinearly with reflection padding (only for the images that got one of them).

The label vector (:data:`~elucidate.config.training.LABEL_LAYOUT`, 12 entries) holds, in order:
xflip flag, yflip flag, the k x 90 degree rotation one-hot over k = 1, 2, 3, translation (x, y) as a fraction
of (W, H), log2 of the scale, (sin, cos - 1) of the rotation angle, and the stretch log2(a) times
(cos, sin) of twice its axis angle. Every entry is 0 when its transform was not applied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config.training import AUGMENT_LABEL_DIM, LABEL_LAYOUT, AugmentSettings
from ..errors import UserError
from ..runtime.rng import derived_generator

__all__ = ["AugmentPipe", "augment_pipe", "augment_batch"]


@dataclass
class AugmentPipe(AugmentSettings):
    """The augmentation pipeline: ``pipe(images, generator) -> (augmented images, labels [B, label_dim])``."""

    @property
    def label_dim(self) -> int:
        """Length of the augment label vector (the network's ``augment_dim``)."""
        return AUGMENT_LABEL_DIM

    def draw(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The random parameters of ``batch`` images (CPU tensors). The number and order of the draws
        do not depend on the settings, so every sample's draw is a pure function of the generator."""
        u = torch.rand(batch, len(LABEL_LAYOUT), generator=generator, dtype=torch.float64)
        r = torch.rand(batch, 5, generator=generator, dtype=torch.float64)
        n = torch.randn(batch, 2, generator=generator, dtype=torch.float64)
        on = {name: u[:, i] < self.probability(name) for i, (name, _) in enumerate(LABEL_LAYOUT)}
        k = 1 + (r[:, 0] * 3).long().clamp(max=2)  # rotate90: k in {1, 2, 3}
        return {"on": torch.stack([on[name] for name, _ in LABEL_LAYOUT], 1), "k": k, "shift": r[:, 1:3],
                "log_scale": n[:, 0] * self.scale_std, "angle": (r[:, 3] * 2 - 1) * math.pi * self.rotate_max,
                "log_aniso": n[:, 1] * self.aniso_std, "axis": r[:, 4] * math.pi}

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` [B, C, H, W] transformed by ``params`` (from :meth:`draw`, sliced like the images)
        and their labels ``[B, label_dim]`` (on the images' device, float32)."""
        B, _, H, W = images.shape
        on = dict(zip([name for name, _ in LABEL_LAYOUT], params["on"].unbind(1)))
        if H != W and bool(on["rotate90"].any()):
            raise ValueError(f"augmentation rotate90 needs square images, got {H}x{W}")
        shift = torch.stack([_shift(params["shift"][:, 0], round(self.translate_max * W)),
                             _shift(params["shift"][:, 1], round(self.translate_max * H))], 1)
        shift = torch.where(on["translate"][:, None], shift, torch.zeros_like(shift))
        k = torch.where(on["rotate90"], params["k"], torch.zeros_like(params["k"]))
        x = _permute_pixels(images, on["xflip"], on["yflip"], k, shift)
        log_scale = torch.where(on["scale"], params["log_scale"], 0.0)
        angle = torch.where(on["rotate"], params["angle"], 0.0)
        log_aniso = torch.where(on["aniso"], params["log_aniso"], 0.0)
        axis = params["axis"]
        resample = on["scale"] | on["rotate"] | on["aniso"]
        if bool(resample.any()):
            idx = resample.nonzero().squeeze(1)
            M = _affine(log_scale[idx], angle[idx], log_aniso[idx], axis[idx])
            x = x.clone()
            x[idx.to(x.device)] = _resample(x[idx.to(x.device)], M)
        quarters = F.one_hot(k, 4)[:, 1:].double()  # k x 90 degrees, one-hot over k = 1, 2, 3
        labels = torch.stack([
            on["xflip"].double(), on["yflip"].double(), *quarters.unbind(1),
            shift[:, 0].double() / W, shift[:, 1].double() / H, log_scale,
            torch.sin(angle), torch.cos(angle) - 1,
            log_aniso * torch.cos(2 * axis), log_aniso * torch.sin(2 * axis)], 1)
        return x, labels.float().to(images.device)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented ``images``, their labels ``[B, label_dim]``), parameters drawn from ``generator``."""
        return self.apply(images, self.draw(images.shape[0], generator))


def _shift(u: torch.Tensor, m: int) -> torch.Tensor:
    """A whole-pixel shift, uniform over {-m, ..., -1, 1, ..., m} (never 0 unless m = 0), from uniform ``u``."""
    s = (u * 2 * m).long().clamp(max=max(2 * m - 1, 0))
    return torch.where(s < m, s - m, s - m + 1) if m else torch.zeros_like(s)


def _permute_pixels(x: torch.Tensor, xflip, yflip, k, shift) -> torch.Tensor:
    """The exact transforms: flips, k x 90 degree rotations and integer translations (reflected)."""
    dev = x.device
    x = torch.where(xflip.to(dev)[:, None, None, None], x.flip(3), x)
    x = torch.where(yflip.to(dev)[:, None, None, None], x.flip(2), x)
    for quarter in (1, 2, 3):
        if bool((k == quarter).any()):
            x = torch.where((k == quarter).to(dev)[:, None, None, None], torch.rot90(x, quarter, (2, 3)), x)
    if bool(shift.any()):
        B, C, H, W = x.shape
        rows = _reflect(torch.arange(H)[None] - shift[:, 1:2], H)  # [B, H]: source row of each output row
        cols = _reflect(torch.arange(W)[None] - shift[:, 0:1], W)
        x = x.gather(2, rows.to(dev)[:, None, :, None].expand(B, C, H, W))
        x = x.gather(3, cols.to(dev)[:, None, None, :].expand(B, C, H, W))
    return x


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into [0, n) (edge pixels not repeated: -1 -> 1, n -> n - 2)."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def _affine(log_scale, angle, log_aniso, axis) -> torch.Tensor:
    """The forward maps [N, 2, 2] (pixel units about the centre): rotate(angle) . scale . stretch, where
    stretch scales by 2**log_aniso along ``axis`` and by its inverse across it."""
    def rot(a):
        c, s = torch.cos(a), torch.sin(a)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)

    a = torch.exp2(log_aniso)
    stretch = torch.diag_embed(torch.stack([a, 1 / a], -1))
    S = torch.exp2(log_scale)[:, None, None] * rot(axis) @ stretch @ rot(-axis)
    return rot(angle) @ S


def _resample(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``x`` [N, C, H, W] with content mapped by M (about the image centre), bilinear, reflection padding."""
    N, _, H, W = x.shape
    P = torch.diag(torch.tensor([W / 2, H / 2], dtype=M.dtype))
    theta = torch.linalg.inv(P) @ torch.linalg.inv(M) @ P  # output (normalized) -> input (normalized)
    theta = torch.cat([theta, torch.zeros(N, 2, 1, dtype=M.dtype)], 2).to(x.device, torch.float32)
    grid = F.affine_grid(theta, [N, x.shape[1], H, W], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False).to(x.dtype)


def augment_pipe(settings: dict | None, resolution: tuple[int, int]) -> AugmentPipe | None:
    """The pipeline of ``training.augment`` (None when it is null), checked against the image size."""
    if settings is None:
        return None
    pipe = AugmentPipe(**settings)
    H, W = resolution
    if H != W and pipe.probability("rotate90") > 0:
        raise UserError(f"training.augment.rotate90 needs square images but the data are {H}x{W}; set it to 0")
    return pipe


def augment_batch(pipe: AugmentPipe | None, augment_dim: int, images: torch.Tensor, seed: int, step: int,
                  batch: int, part: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This process's slice ``part`` of the global batch (size ``batch``) at ``step``, augmented, and the
    conditions to add: ``{"augment_labels": ...}`` whenever the network takes them (zeros when
    augmentation is off, so the embedding is always in the graph, as DDP needs), else ``{}``. The
    parameters are drawn for the global batch from (seed, "augment", step)."""
    if pipe is not None:
        params = pipe.draw(batch, derived_generator(seed, "augment", step))
        images, labels = pipe.apply(images, {key: value[part] for key, value in params.items()})
    elif augment_dim:
        labels = torch.zeros(images.shape[0], augment_dim, device=images.device)
    return images, ({"augment_labels": labels} if augment_dim else {})
