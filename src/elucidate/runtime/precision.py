"""The arithmetic a run computes in: ``fp32``, ``bf16`` or ``fp16`` autocast, or ``auto`` (bf16 only where the
device has it).

bf16 autocast is the main speed lever on hardware with bf16 units (AVX512-BF16 or AMX CPUs: 1.3-2.8x on a
U-Net; recent GPUs), but where the device lacks them every bf16 matmul and convolution is emulated: on an
AVX2-only CPU the demo trains ~20x *slower* in bf16 than in fp32. ``auto`` picks bf16 where it is native and
fp32 elsewhere; an explicit ``bf16`` is kept (its numerics may be what the user wants) with one warning.

``fp16`` is never picked by ``auto``: it is the choice on GPUs with fp16 but without bf16 units (V100, T4). Its
narrow range needs loss scaling in training (:func:`grad_scaler`, a ``torch.amp.GradScaler`` the trainer saves in
its checkpoints); sampling keeps its solver state in float32 and runs only the network in fp16, as with bf16.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

__all__ = ["PRECISIONS", "native_bf16", "resolve_precision", "autocast_for", "grad_scaler"]

#: The values of ``training.precision`` and ``--precision``.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_warned: set[str] = set()


@functools.cache  # the hardware does not change: probed once, not on every autocast_for
def _cpu_features() -> dict:
    try:  # private, so guarded: without it (another build or architecture) bf16 counts as not native
        return dict(torch._C._cpu._get_cpu_capability())
    except Exception:  # noqa: BLE001
        return {}


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` has bf16 arithmetic in hardware: a CUDA GPU that supports it natively (Ampere or
    later), or a CPU with AVX512-BF16 or AMX-BF16 (elsewhere bf16 autocast is emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        features = _cpu_features()
        return bool(features.get("avx512_bf16") or features.get("amx_bf16"))
    return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16``: what ``precision`` means on ``device`` (``auto``: bf16 where native, else
    fp32, never fp16). An explicit ``bf16`` on a device without bf16 hardware stays bf16 and warns once per device
    type; an explicit ``fp16`` is kept as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    kind = torch.device(device).type
    if precision == "bf16" and kind not in _warned and not native_bf16(device):
        _warned.add(kind)
        name = _cpu_features().get("cpu_name", "this CPU") if kind == "cpu" else kind
        warnings.warn(f"precision bf16 on {name}, which has no bf16 hardware (AVX512-BF16/AMX): autocast emulates "
                      f"it, many times slower than fp32; precision 'auto' picks fp32 here", RuntimeWarning,
                      stacklevel=2)
    return precision


def autocast_for(precision: str, device: str | torch.device):
    """bf16 or fp16 autocast context if ``precision`` resolves to one of them on ``device`` (``auto``: bf16 only
    where the hardware has it), else a no-op."""
    dtype = _DTYPES.get(resolve_precision(precision, device))
    if dtype is not None:
        return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


def grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler:
    """The loss scaler of a training step: enabled for ``fp16`` (whose small gradients would underflow), a
    pass-through otherwise (``scale(loss)`` is ``loss``, ``unscale_``/``update`` do nothing)."""
    fp16 = resolve_precision(precision, device) == "fp16"
    return torch.amp.GradScaler(torch.device(device).type, enabled=fp16)
