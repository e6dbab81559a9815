"""Registry entry of the fused "triton" backend (its kernels arrive with the fused-kernels work)."""

from __future__ import annotations

import torch


def status() -> tuple[bool, str]:
    return False, "not implemented yet: the fused triton kernels are not part of this build"


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    return "not implemented yet"


def create(dtype: torch.dtype):
    raise RuntimeError("the triton backend is not implemented yet")
