"""``torch.compile`` that never takes a run down: :func:`compiled` wraps a network so its forward goes through
``torch.compile`` and, the first time compiling (or running the compiled code) raises, switches to the eager module
for good with one warning line. Compilation is lazy (on the first call), so a failure shows up there, not here.

The wrapper holds the compiled callable outside its registered submodules: its ``state_dict`` is the network's
under the prefix ``module.``, and a trainer keeps checkpointing and averaging (EMA) the network itself, whose keys
compilation does not change. Attributes the wrapper does not have (``label_dim``, ``img_resolution``, ...) are the
network's.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["CompiledOrEager", "compiled"]


class CompiledOrEager(nn.Module):
    """``module`` run through ``torch.compile`` until that raises once, then eagerly (see the module docstring)."""

    def __init__(self, module: nn.Module, **options):
        super().__init__()
        self.module = module
        try:
            fn = torch.compile(module, **options)
        except Exception as e:  # noqa: BLE001 (torch.compile itself refused: e.g. no backend on this platform)
            fn = None
            _warn(module, e)
        self.__dict__["_compiled"] = fn  # not a submodule: no second copy of the keys in state_dict()

    @property
    def is_compiled(self) -> bool:
        """Whether calls still go through the compiled code (False after a fallback)."""
        return self.__dict__["_compiled"] is not None

    def forward(self, *args, **kwargs):
        fn = self.__dict__["_compiled"]
        if fn is not None:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 (any compiler failure: the eager module computes the same)
                self.__dict__["_compiled"] = None
                _warn(self.module, e)
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)


def _warn(module: nn.Module, error: Exception) -> None:
    first = (str(error).strip().splitlines() or [""])[0][:200]
    warnings.warn(f"torch.compile failed for {type(module).__name__} ({type(error).__name__}: {first}); running it "
                  f"eagerly", RuntimeWarning, stacklevel=3)


def compiled(module: nn.Module, **options) -> CompiledOrEager:
    """``module`` behind :class:`CompiledOrEager` (``options``: those of ``torch.compile``)."""
    return CompiledOrEager(module, **options)
