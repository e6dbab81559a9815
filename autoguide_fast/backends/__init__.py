"""Backend registry: which step backends exist, which are usable here, and why not.

Each backend lives in its own module exposing ``status() -> (available, reason)``,
``supports(device, dtype) -> reason | None`` and ``create(dtype) -> StepBackend``; modules are
imported lazily so that ``import autoguide_fast`` never needs Triton, CUDA or the compiled
extension.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from .base import StepBackend

__all__ = ["BACKEND_NAMES", "BackendStatus", "StepBackend", "backends", "resolve_backend"]

# Preference order for backend="auto" by device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
_MODULES = {
    "torch": ".torch_status",
    "cpp": ".cpp_backend",
    "cuda": ".cuda_backend",
    "triton": ".triton_backend",
}
BACKEND_NAMES = tuple(_MODULES)


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # Why it is unavailable, or a short description of what it runs on.


def _module(name: str):
    try:
        return importlib.import_module(_MODULES[name], __name__), None
    except ImportError as exc:  # A backend module that cannot import is reported, not fatal.
        return None, f"its module failed to import: {exc}"


def _status(name: str) -> BackendStatus:
    module, error = _module(name)
    if module is None:
        return BackendStatus(name, False, error)
    available, reason = module.status()
    return BackendStatus(name, available, reason)


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable in this process and, if not, why."""
    return {name: _status(name) for name in BACKEND_NAMES}


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> StepBackend:
    """The backend object for ``name`` ("auto" picks the best available for device and dtype).

    An explicitly requested backend that cannot run raises ``RuntimeError`` saying why.
    """
    if name == "auto":
        reasons = []
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            module, error = _module(candidate)
            if module is None:
                reasons.append(f"{candidate}: {error}")
                continue
            available, reason = module.status()
            why_not = None if available else reason
            why_not = why_not or module.supports(device, dtype)
            if why_not is None:
                return module.create(dtype)
            reasons.append(f"{candidate}: {why_not}")
        raise RuntimeError("backend='auto': no backend can run here (" + "; ".join(reasons) + ")")
    if name not in _MODULES:
        raise ValueError(f"backend: expected 'auto' or one of {BACKEND_NAMES}, got {name!r}")
    module, error = _module(name)
    if module is None:
        raise RuntimeError(f"backend={name!r} is not available: {error}")
    available, reason = module.status()
    if not available:
        raise RuntimeError(f"backend={name!r} is not available: {reason}")
    why_not = module.supports(device, dtype)
    if why_not is not None:
        raise RuntimeError(f"backend={name!r} cannot run this input: {why_not}")
    return module.create(dtype)
