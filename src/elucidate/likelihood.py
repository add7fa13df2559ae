"""Exact log-likelihood by the probability-flow ODE, and bits per dimension for 8-bit images.

With sigma(t) = t and s(t) = 1 the probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma
(EDM eq. 1 with eq. 3). Along a solution the density obeys the instantaneous change of variables
(Chen et al. 2018; Song et al. 2021, eq. 39):

    log p(x(sigma_min); sigma_min) = log p(x(sigma_max); sigma_max) + int_{sigma_min}^{sigma_max} div f dsigma,

where f = (x - D) / sigma. We integrate in tau = log sigma, where both parts are well scaled:

    dx/dtau = x - D(x; sigma),      d(delta)/dtau = d - tr(dD/dx),      d = values per sample,

and take p(.; sigma_max) = N(0, sigma_max^2 I). The trace is exact (autograd, one vector-Jacobian
product per dimension) or Hutchinson's estimate E_v[v^T (dD/dx) v] with a fixed probe per sample.

May import: data, runtime, errors.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .errors import UserError
from .runtime.rng import derived_generator

__all__ = ["log_likelihood", "bits_per_dim", "run_likelihood", "METHODS", "TRACES", "PROBES"]

DenoiserFn = Callable[..., torch.Tensor]

#: Explicit Runge-Kutta tableaux (a, b, c) for the fixed-step integrator in log sigma.
METHODS: dict[str, tuple[list[list[float]], list[float], list[float]]] = {
    "heun": ([[1.0]], [0.5, 0.5], [0.0, 1.0]),
    "rk4": ([[0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6], [0.0, 0.5, 0.5, 1.0]),
}
TRACES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
#: Default steps per method: ~1e-3 nats or better on the test mixtures (measured in docs/likelihood.md).
DEFAULT_STEPS = {"heun": 512, "rk4": 64}


def _repeat_cond(cond: dict, batch: int, times: int) -> dict:
    """Conditioning with every per-sample tensor (first dim == batch) tiled ``times`` along dim 0."""
    out = {}
    for key, value in cond.items():
        if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == batch:
            value = value.repeat(times, *([1] * (value.ndim - 1)))
        out[key] = value
    return out


def _tile(x: torch.Tensor, times: int) -> torch.Tensor:
    return x.repeat(times, *([1] * (x.ndim - 1)))


def _trace_passes(D: DenoiserFn, x: torch.Tensor, sigma: float, cond: dict,
                  vectors: Callable[[int, int], torch.Tensor], count: int,
                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Denoised x and the sum over ``count`` vectors of v_i^T (dD/dx) v_i per sample, float64 ``[B]``.

    ``vectors(start, stop)`` gives v_start..v_{stop-1} as ``[k, B, d]``. Each pass tiles x k times
    along the batch (at most ``chunk_size`` samples), so one forward and one backward cover k vectors.
    """
    B, d = x.shape[0], x[0].numel()
    per_pass = max(1, chunk_size // B)
    total = torch.zeros(B, dtype=torch.float64, device=x.device)
    denoised = None
    with torch.enable_grad():
        for start in range(0, count, per_pass):
            stop = min(start + per_pass, count)
            k = stop - start
            xr = _tile(x.detach(), k).requires_grad_(True)
            out = D(xr, xr.new_full((k * B,), sigma), **_repeat_cond(cond, B, k))
            if denoised is None:
                denoised = out[:B].detach()
            v = vectors(start, stop)
            if out.requires_grad:  # v^T J: the gradient of <D(x), v> with respect to x
                (grad,) = torch.autograd.grad((out.reshape(k, B, d) * v).sum(), xr, allow_unused=True)
                if grad is not None:
                    total += (grad.reshape(k, B, d) * v).to(torch.float64).sum(dim=(0, 2))
    return denoised, total


def _exact_trace(D, x, sigma, cond, chunk_size):
    B, d = x.shape[0], x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device)

    def basis(start, stop):  # v_i = e_i for every sample: sum_i e_i^T J e_i = tr J
        return eye[start:stop, None, :].expand(stop - start, B, d)
    return _trace_passes(D, x, sigma, cond, basis, d, chunk_size)


def _hutchinson_trace(D, x, sigma, cond, probes, chunk_size):
    B, d = x.shape[0], x[0].numel()
    flat = probes.reshape(probes.shape[0], B, d)
    denoised, total = _trace_passes(D, x, sigma, cond, lambda a, b: flat[a:b], probes.shape[0], chunk_size)
    return denoised, total / probes.shape[0]


def _draw_probes(x: torch.Tensor, num: int, dist: str, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    shape = (num, *x.shape)
    if dist == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=device).to(x.dtype) * 2 - 1
    else:
        v = torch.randn(shape, generator=generator, device=device, dtype=x.dtype)
    return v.to(x.device)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name}={value!r} must be a positive integer")
    return value


def _check_options(trace: str, method: str, steps: int | None, probe: str, num_probes: int,
                   chunk_size: int) -> int:
    """Validate the integrator and trace options; returns the number of steps."""
    for name, value, choices in (("trace", trace, TRACES), ("method", method, METHODS), ("probe", probe, PROBES)):
        if value not in choices:
            raise UserError(f"{name}={value!r} is not one of {', '.join(choices)}")
    _positive_int(num_probes, "num_probes")
    _positive_int(chunk_size, "chunk_size")
    return _positive_int(DEFAULT_STEPS[method] if steps is None else steps, "steps")


def log_likelihood(D: DenoiserFn, x: torch.Tensor, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   trace: str = "exact", generator: torch.Generator | None = None, num_probes: int = 1,
                   probe: str = "rademacher", probes: torch.Tensor | None = None, steps: int | None = None,
                   method: str = "rk4", cond: dict | None = None, chunk_size: int = 4096,
                   progress: bool = False, return_latent: bool = False):
    """log p(x; sigma_min) in nats per sample ``[B]`` by the probability-flow ODE from sigma_min to sigma_max.

    ``x`` ``[B, ...]`` is data at noise level sigma_min (its density is that of data + N(0, sigma_min^2)).
    ``trace``: ``exact`` (d vector-Jacobian products per evaluation) or ``hutchinson`` (``num_probes``
    ``probe`` vectors per sample, drawn once from ``generator`` and held fixed along the path, or the
    given ``probes [P, B, ...]``). ``method`` (rk4 | heun) takes ``steps`` equal steps in
    log sigma (default: ``DEFAULT_STEPS[method]``). ``cond`` goes to ``D`` as keyword arguments;
    at most ``chunk_size`` samples go through D at once. Works in x's dtype and device; no gradient
    reaches D's parameters. With ``return_latent`` also returns x at sigma_max.
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] < 1:
        raise UserError(f"x must be a floating-point tensor [B, ...] with B >= 1, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise UserError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    steps = _check_options(trace, method, steps, probe, num_probes, chunk_size)
    cond = dict(cond or {})
    d = x[0].numel()
    if trace == "hutchinson":
        if probes is None:
            probes = _draw_probes(x, num_probes, probe, generator)
        elif probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape:
            raise UserError(f"probes must have shape [P, {', '.join(map(str, x.shape))}], got {tuple(probes.shape)}")
        probes = probes.to(device=x.device, dtype=x.dtype)

    def rate(x_now: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        # d x / d log sigma = x - D (eq. 1 times sigma); d delta / d log sigma = d - tr dD/dx
        if trace == "exact":
            denoised, tr = _exact_trace(D, x_now, sigma, cond, chunk_size)
        else:
            denoised, tr = _hutchinson_trace(D, x_now, sigma, cond, probes, chunk_size)
        return x_now - denoised.to(x_now.dtype), d - tr

    a, b, c = METHODS[method]
    taus = torch.linspace(math.log(sigma_min), math.log(sigma_max), steps + 1, dtype=torch.float64).tolist()
    x = x.detach()
    delta = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"likelihood ({method}, {trace})", unit="step", leave=False)
    try:
        for i in range(steps):
            tau, h = taus[i], taus[i + 1] - taus[i]
            ks: list[tuple[torch.Tensor, torch.Tensor]] = []
            for j, c_j in enumerate(c):  # explicit Runge-Kutta stages in tau = log sigma
                x_j = x
                for a_jl, (kx, _) in zip(a[j - 1] if j else [], ks):
                    if a_jl:
                        x_j = x_j + (h * a_jl) * kx
                ks.append(rate(x_j, math.exp(tau + c_j * h)))
            x = x + sum((h * b_j) * kx for b_j, (kx, _) in zip(b, ks))
            delta = delta + sum((h * b_j) * kl for b_j, (_, kl) in zip(b, ks))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    log_prior = -0.5 * (flat.square().sum(1) / sigma_max ** 2 + d * math.log(2 * math.pi * sigma_max ** 2))
    log_p = (log_prior + delta).to(x.dtype)
    return (log_p, x) if return_latent else log_p


def bits_per_dim(log_p_nats: torch.Tensor, num_dims: int, *, scale: float | Sequence[float] = 1.0) -> torch.Tensor:
    """Bits per dimension of pixel-unit data from log-densities in model units.

    ``scale`` is d(model units)/d(pixel units) of the affine normalization, one number or one per
    channel (channels split ``num_dims`` equally): log p_pixels = log p_model + sum log|scale|, and
    bits/dim = -log p_pixels / (num_dims ln 2). For 8-bit images dequantized as pixel + U[0, 1) this
    bounds -log2 P(pixels) / num_dims from above.
    """
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise UserError(f"num_dims={num_dims!r} must be a positive integer")
    scales = [float(scale)] if isinstance(scale, (int, float)) else [float(s) for s in scale]
    if not scales or num_dims % len(scales) or not all(math.isfinite(s) and s != 0 for s in scales):
        raise UserError(f"scale must be finite non-zero numbers, one or one per channel dividing num_dims="
                        f"{num_dims}, got {scale!r}")
    log_jacobian = num_dims // len(scales) * sum(math.log(abs(s)) for s in scales)
    log_p = torch.as_tensor(log_p_nats)
    return -(log_p.to(torch.promote_types(log_p.dtype, torch.float32)) + log_jacobian) / (num_dims * math.log(2))


def _affine(normalizer, channels: int) -> tuple[list[float], list[float]]:
    """(scale, bias) per channel of stored units -> model units (identity without a normalizer)."""
    if normalizer is None:
        return [1.0] * channels, [0.0] * channels
    if normalizer.channels != channels:
        raise UserError(f"the run's normalizer has {normalizer.channels} channels but the data has {channels}")
    return [float(s) for s in normalizer.scale], [float(b) for b in normalizer.bias]


def _inputs(images: torch.Tensor, indices: list[int], seed: int, dequantize: bool, scale, bias,
            probes: tuple[int, str] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model-unit inputs ``[B, C, H, W]`` (stored + U[0, 1) when dequantizing) and probes ``[P, B, ...]``.

    Image i's draws come from its own generator (seed, i), so they do not depend on the batch.
    """
    raw = images[indices].to(torch.float64)
    noise, vectors = [], []
    for i in indices:
        g = derived_generator(seed, "likelihood", int(i))
        noise.append(torch.rand(raw.shape[1:], generator=g, dtype=torch.float64))
        if probes is not None:
            vectors.append(_draw_probes(raw[:1].float(), probes[0], probes[1], g)[:, 0])
    if dequantize:
        raw = raw + torch.stack(noise)
    view = (1, -1, 1, 1)
    x = raw * torch.tensor(scale, dtype=torch.float64).view(view) + torch.tensor(bias, dtype=torch.float64).view(view)
    return x.float(), torch.stack(vectors, 1) if vectors else None


def run_likelihood(run, num: int, *, batch_size: int = 64, trace: str = "hutchinson", seed: int = 0,
                   device=None, progress: bool = False, steps: int | None = None, method: str = "rk4",
                   num_probes: int = 1, probe: str = "rademacher", sigma_min: float | None = None,
                   sigma_max: float | None = None, dequantize: bool | None = None, chunk_size: int = 4096) -> dict:
    """Bits/dim of a loaded run (``model.LoadedRun``) on ``num`` images of its training data.

    The images are a seeded random subset (all of them if ``num`` >= the dataset size; no x-flips).
    Integer-valued data (uint8 images; float data whose values are all integers, like the digits'
    0..16) is dequantized as stored + u, u ~ U[0, 1) per value (``dequantize=None``: automatic), then
    mapped to model units by the run's normalizer, whose Jacobian enters the bits/dim; other data is
    a continuous density in stored units. Image i's dequantization noise and Hutchinson probes
    depend on (seed, i) only, so results do not depend on ``batch_size``. A class-conditional
    model is evaluated at each image's own label (log p(x | label)). ``sigma_min``/``sigma_max``
    default to the run's formulation's range. Returns mean/std/sem of bits/dim and the settings.
    """
    from .data import build_dataset

    _positive_int(num, "num")
    _positive_int(batch_size, "batch_size")
    steps = _check_options(trace, method, steps, probe, num_probes, chunk_size)
    denoiser = run.denoiser
    if device is None:
        device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
    denoiser.to(device)
    formulation = denoiser.formulation
    # default: the paper's sampling range clipped to what the network supports (as named schedules do)
    sigma_min, sigma_max = (float(s) for s in formulation.schedule_range(sigma_min, sigma_max))

    dataset = build_dataset(run.config.data)
    images = dataset.images
    if dequantize is None:
        dequantize = images.dtype == torch.uint8 or bool((images == images.round()).all())
    scale, bias = _affine(run.normalizer if run.normalizer is not None else dataset.normalizer, images.shape[1])
    indices = torch.randperm(images.shape[0], generator=derived_generator(seed, "likelihood", "subset"))[:num]
    conditional = bool(getattr(getattr(denoiser, "net", None), "label_dim", 0)) and dataset.labels is not None
    num_dims = images[0].numel()
    probes = (num_probes, probe) if trace == "hutchinson" else None

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(indices), desc="likelihood", unit="img")
    bpd = []
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size].tolist()
            x, v = _inputs(images, chunk, seed, dequantize, scale, bias, probes)
            cond = {"class_labels": dataset.labels[chunk].to(device)} if conditional else {}
            log_p = log_likelihood(denoiser, x.to(device), sigma_min=sigma_min, sigma_max=sigma_max, trace=trace,
                                   probes=v, steps=steps, method=method, cond=cond, chunk_size=chunk_size)
            bpd.append(bits_per_dim(log_p.double().cpu(), num_dims, scale=scale))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    values = torch.cat(bpd)
    std = float(values.std()) if len(values) > 1 else 0.0
    hutchinson = trace == "hutchinson"
    return {"metric": "bits_per_dim", "mean": float(values.mean()), "std": std, "sem": std / math.sqrt(len(values)),
            "num": len(values), "num_dims": num_dims,
            "settings": {"trace": trace, "num_probes": num_probes if hutchinson else None,
                         "probe": probe if hutchinson else None, "method": method, "steps": steps,
                         "sigma_min": sigma_min, "sigma_max": sigma_max, "seed": seed,
                         "dequantization": "uniform" if dequantize else None, "conditional": conditional,
                         "scale": scale, "checkpoint": str(run.checkpoint), "step": run.step}}
