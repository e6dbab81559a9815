"""Registry entry of the eager PyTorch backend (always available)."""

from __future__ import annotations

import torch

from .torch_backend import TorchBackend


def status() -> tuple[bool, str]:
    return True, "eager PyTorch ops; runs on every device"


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def create(dtype: torch.dtype) -> TorchBackend:
    return TorchBackend(dtype)
