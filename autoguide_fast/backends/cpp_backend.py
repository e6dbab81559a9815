"""Registry entry of the fused "cpp" backend (its kernels arrive with the fused-kernels work)."""

from __future__ import annotations

import torch


def status() -> tuple[bool, str]:
    return False, "not implemented yet: the fused cpp kernels are not part of this build"


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    return "not implemented yet"


def create(dtype: torch.dtype):
    raise RuntimeError("the cpp backend is not implemented yet")
