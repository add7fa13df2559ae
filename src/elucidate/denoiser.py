"""The preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM eq. 7).

May import: formulations, errors.
"""
from __future__ import annotations

import torch
from torch import nn

from .formulations import Formulation

__all__ = ["Denoiser", "Guided", "Clipped", "Thresholded", "batch_sigma", "with_null_condition"]


def batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a ``[B]`` tensor in x's dtype and device (a float or 0-d tensor is broadcast)."""
    if not torch.is_tensor(sigma) and x.is_floating_point():  # a Python number: no float32 detour
        sigma = torch.tensor(sigma, dtype=x.dtype, device=x.device)
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.dtype != x.dtype and x.is_floating_point():
        sigma = sigma.to(x.dtype)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    sigma = sigma.reshape(-1)
    if sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma has {sigma.shape[0]} values but x has batch size {x.shape[0]}")
    return sigma


class Denoiser(nn.Module):
    """Wrap a raw network ``F(x_in, c_noise, **cond)`` with a formulation's preconditioning.

    Works for any data shape ``[B, ...]``. ``sigma`` may be a float, a 0-d tensor or a ``[B]`` tensor.
    The network is fed in its own parameter dtype (and runs under whatever autocast context is
    active), while x, c_skip x and the output stay in x's dtype: float64 sampling state works with a
    float32 network, as in NVlabs/edm.
    """

    def __init__(self, net: nn.Module, formulation: Formulation):
        super().__init__()
        self.net = net
        self.formulation = formulation

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = batch_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.formulation.precondition(sigma)
        view = (-1,) + (1,) * (x.ndim - 1)
        x_in = c_in.reshape(view) * x
        F_x = self.net(x_in.to(_param_dtype(self.net, x_in.dtype)), c_noise.reshape(-1), **cond)
        if F_x.shape != x.shape:
            raise ValueError(f"network output shape {tuple(F_x.shape)} does not match input shape {tuple(x.shape)}")
        return c_skip.reshape(view) * x + c_out.reshape(view) * F_x.to(x.dtype)

    @property
    def supported_range(self) -> tuple[float, float]:
        """The noise levels the network is defined on (from the formulation)."""
        return self.formulation.supported_range

    def round_sigma(self, sigma):
        """Noise levels the network knows (iDDPM snaps to its grid; identity otherwise)."""
        return self.formulation.round_sigma(sigma)


def _param_dtype(net: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of the network's first floating parameter (``default`` for parameter-free callables)."""
    if isinstance(net, nn.Module):
        for p in net.parameters():
            if p.is_floating_point():
                return p.dtype
    return default


def check_interval(interval) -> tuple[float, float] | None:
    """``Guided``'s ``interval`` checked: None or (lo, hi) with 0 <= lo <= hi (hi may be inf)."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"interval must be (lo, hi), two noise levels, got {interval!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"interval {interval!r}: expected 0 <= lo <= hi")
    return lo, hi


def with_null_condition(net, key: str, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the condition as the network takes it, its "no condition" counterpart) for one conditioning key:
    integer class labels become one-hot vectors and their null is the zero vector; a network may define
    ``null_condition(key, value)`` for its own keys; otherwise the null is zeros."""
    if key == "class_labels" and not value.is_floating_point():
        label_dim = int(getattr(net, "label_dim", 0) or 0)
        if not label_dim:
            raise ValueError("class_labels were given but the network is not class-conditional")
        value = torch.nn.functional.one_hot(value.long(), label_dim).float()
    make_null = getattr(net, "null_condition", None)
    return value, (make_null(key, value) if make_null is not None else torch.zeros_like(value))


class _Wrapper(nn.Module):
    """A denoiser wrapping another one: the formulation, range and sigma grid are the wrapped one's."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    @property
    def formulation(self) -> Formulation:
        return self.denoiser.formulation

    @property
    def supported_range(self) -> tuple[float, float]:
        return self.denoiser.formulation.supported_range

    @property
    def net(self):
        """The wrapped denoiser's network (None for a network-free denoiser): guidance finds conditions on it."""
        return getattr(self.denoiser, "net", None)

    def round_sigma(self, sigma):
        return self.denoiser.round_sigma(sigma)


class Guided(_Wrapper):
    """Classifier-free guidance (Ho & Salimans 2022): D_w(x; sigma, c) = D(x; sigma, none) + w (D(x; sigma, c) -
    D(x; sigma, none)), both halves in one batched forward. w = 1 is the conditional model, 0 the
    unconditional one. Samplers see an ordinary denoiser.

    ``guide``: autoguidance (Karras et al. 2024) instead: D_w = D_guide + w (D - D_guide), where ``guide`` is a
    worse denoiser of the same data and condition (a smaller or shorter-trained model; both get the same
    condition, so it also works unconditionally). ``interval=(lo, hi)``: guidance only where lo <= sigma <= hi
    (Kynkäänniemi et al. 2024), the main model alone (one forward) elsewhere; decided per sample, so a batch
    whose samples sit at different noise levels is split.

    ``null``: a dict of condition tensors used as the unconditional branch (D(x; sigma, null) instead of the
    built-in null of :func:`with_null_condition`, e.g. a "negative" condition), batch 1 (shared) or the batch;
    keys it leaves out keep the built-in null."""

    def __init__(self, denoiser: nn.Module, guidance: float, *, guide=None, interval=None, null=None):
        super().__init__(denoiser)
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
            raise ValueError(f"guidance must be a number >= 0, got {guidance!r}")
        self.guidance = float(guidance)
        if guide is not None and not callable(guide):
            raise ValueError(f"guide must be a denoiser D(x, sigma, **cond), got {type(guide).__name__}")
        self.guide, self.interval = guide, check_interval(interval)
        if null is not None and (not isinstance(null, dict) or not all(torch.is_tensor(v) for v in null.values())):
            raise ValueError(f"null must be a dict of condition tensors, got {type(null).__name__}")
        self.null = dict(null or {})

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        if self.interval is None or self.guidance == 1:
            return self._guided(x, sigma, **cond)
        sigma = batch_sigma(sigma, x)
        inside = (sigma >= self.interval[0]) & (sigma <= self.interval[1])  # Kynkäänniemi et al. 2024, eq. 2
        if bool(inside.all()):
            return self._guided(x, sigma, **cond)
        if not bool(inside.any()):
            return self.denoiser(x, sigma, **cond)
        out = torch.empty_like(x)  # a batch straddling the interval: each part on its own
        for part, fn in ((inside, self._guided), (~inside, self.denoiser)):
            out[part] = fn(x[part], sigma[part], **{key: value[part] for key, value in cond.items()}).to(x.dtype)
        return out

    def _guided(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """The guided denoiser, ignoring the interval."""
        if self.guide is not None and self.guidance != 1:  # Karras et al. 2024, eq. 1 (D_0 = the guide)
            if self.guidance == 0:
                return self.guide(x, sigma, **cond)
            good, bad = self.denoiser(x, sigma, **cond), self.guide(x, sigma, **cond)
            return bad + self.guidance * (good - bad)
        if self.guidance == 1 or not cond:
            return self.denoiser(x, sigma, **cond)
        net = getattr(self.denoiser, "net", None)
        pairs = {key: self._pair(net, key, value) for key, value in cond.items()}
        unknown = sorted(set(self.null) - set(pairs))
        if unknown:
            raise ValueError(f"null has {unknown} but the condition has only {sorted(pairs)}")
        if self.guidance == 0:
            return self.denoiser(x, sigma, **{key: null for key, (_, null) in pairs.items()})
        sigma = batch_sigma(sigma, x)
        both = {key: torch.cat([value, null]) for key, (value, null) in pairs.items()}
        conditional, unconditional = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return unconditional + self.guidance * (conditional - unconditional)

    def _pair(self, net, key: str, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the condition as the network takes it, its null): the given ``null[key]`` (batch 1 broadcast, or the
        condition's batch; integer class labels one-hot like the condition) or :func:`with_null_condition`'s."""
        value, null = with_null_condition(net, key, value)
        if key not in self.null:
            return value, null
        given = with_null_condition(net, key, self.null[key].to(value.device))[0].to(value.dtype)
        if given.shape[0] == 1:
            given = given.expand(value.shape[0], *given.shape[1:])
        if given.shape[0] != value.shape[0] or (key != "context" and given.shape[1:] != value.shape[1:]):
            raise ValueError(f"null {key} has shape {list(given.shape)} but the condition has "
                             f"{list(value.shape)} (the null's batch may be 1)")
        if key == "context" and given.shape[1] != value.shape[1]:  # any number of tokens: pad with zero tokens
            length = max(given.shape[1], value.shape[1])
            value, given = (torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in (value, given))
        return value, given


class Clipped(_Wrapper):
    """x̂0 clipped to ``range`` (latent diffusion's ``clip_denoised``, diffusers' ``clip_sample``): D'(x; sigma) =
    clamp(D(x; sigma), lo, hi). Samplers derive the noise estimate from the clipped x̂0 (diffusers' DDIM with
    ``use_clipped_model_output=True``; its DDPM posterior mean uses the clipped x̂0 too)."""

    def __init__(self, denoiser, range: tuple[float, float] = (-1.0, 1.0)):  # noqa: A002 (diffusers' word)
        super().__init__(denoiser)
        try:
            lo, hi = (float(v) for v in range)
        except (TypeError, ValueError):
            raise ValueError(f"range must be (lo, hi), got {range!r}") from None
        if not lo < hi:
            raise ValueError(f"range {range!r}: expected lo < hi")
        self.range = (lo, hi)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        return self.denoiser(x, sigma, **cond).clamp(*self.range)


class Thresholded(_Wrapper):
    """Dynamic thresholding (Saharia et al. 2022, Imagen sec. 2.3): per sample s = the ``percentile`` quantile of
    |x̂0|, clamped to [1, ``max_value``]; x̂0 -> clamp(x̂0, -s, s) / s. diffusers' ``thresholding=True`` with
    ``dynamic_thresholding_ratio`` = ``percentile`` and ``sample_max_value`` = ``max_value`` (its default 1.0
    makes it plain clipping to [-1, 1]; None = no upper bound, as in the paper)."""

    def __init__(self, denoiser, percentile: float = 0.995, max_value: float | None = None):
        super().__init__(denoiser)
        if not 0 < float(percentile) <= 1:
            raise ValueError(f"percentile must be in (0, 1], got {percentile!r}")
        if max_value is not None and not float(max_value) >= 1:
            raise ValueError(f"max_value must be >= 1 (or None), got {max_value!r}")
        self.percentile, self.max_value = float(percentile), None if max_value is None else float(max_value)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x0 = self.denoiser(x, sigma, **cond)
        flat = x0.reshape(x0.shape[0], -1)
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # quantile needs float32/64
        s = torch.quantile(work.abs(), self.percentile, dim=1).clamp(min=1, max=self.max_value)  # Saharia et al.
        s = s.to(x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))
        return torch.minimum(torch.maximum(x0, -s), s) / s
