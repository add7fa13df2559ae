"""``training.augment``: the settings of EDM's non-leaky augmentation (appendix of the EDM paper) and
their validation. The pipeline itself is :mod:`elucidate.training.augment`; this module is separate
so the config and the network builder can use it without importing the training package."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import ConfigError
from .params import check_value, describe, param, unknown_key

__all__ = ["AugmentSettings", "LABEL_LAYOUT", "AUGMENT_LABEL_DIM", "check_augment"]

#: The augment label vector, in order: (transform, its entries). Every entry is 0 when the transform
#: was not applied, so an all-zero vector means "not augmented" (what sampling uses).
LABEL_LAYOUT = (("xflip", 1), ("yflip", 1), ("rotate90", 3), ("translate", 2), ("scale", 1), ("rotate", 2),
                ("aniso", 2))
#: length of the augment label vector (the network's ``augment_dim`` when augmentation is on).
AUGMENT_LABEL_DIM = sum(n for _, n in LABEL_LAYOUT)


@dataclass
class AugmentSettings:
    """Per-transform probability multipliers and strengths. Each transform is applied to an image
    independently with probability ``min(1, p x multiplier)`` (a multiplier of 0 turns it off)."""

    p: float = param(0.12, "base probability of each transform", minimum=0, maximum=1)
    xflip: float = param(1.0, "multiplier for a horizontal flip", minimum=0)
    yflip: float = param(0.0, "multiplier for a vertical flip", minimum=0)
    rotate90: float = param(0.0, "multiplier for a rotation by 90, 180 or 270 degrees (square images)", minimum=0)
    translate: float = param(1.0, "multiplier for an integer translation (reflected at the borders)", minimum=0)
    scale: float = param(1.0, "multiplier for an isotropic scaling", minimum=0)
    rotate: float = param(1.0, "multiplier for a rotation by an arbitrary angle", minimum=0)
    aniso: float = param(1.0, "multiplier for an anisotropic scaling along a random axis", minimum=0)
    translate_max: float = param(0.125, "largest translation, as a fraction of the image size", minimum=0, maximum=1)
    scale_std: float = param(0.2, "std of log2 of the isotropic scale factor", minimum=0)
    rotate_max: float = param(1.0, "largest rotation as a fraction of a half turn (1 = any angle)", minimum=0,
                              maximum=1)
    aniso_std: float = param(0.2, "std of log2 of the anisotropic stretch", minimum=0)

    def probability(self, name: str) -> float:
        """The probability that transform ``name`` (a key of :data:`LABEL_LAYOUT`) is applied to an image."""
        return min(1.0, self.p * getattr(self, name))


def check_augment(raw: Any) -> dict:
    """``training.augment`` validated and completed with the defaults (every key present)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"training.augment = {raw!r}: expected a mapping such as {{p: 0.12, xflip: 1, "
                          f"rotate: 1}} (or null = off)")
    names = [f.name for f in fields(AugmentSettings)]
    for key in raw:
        if key not in names:
            raise unknown_key("training.augment", key, names)
    docs = {p.name: p for p in describe(AugmentSettings)}
    out = {}
    for name in names:
        value = raw.get(name, docs[name].default)
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            out[name] = float(check_value(f"training.augment.{name}", value, docs[name]))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return asdict(AugmentSettings(**out))
