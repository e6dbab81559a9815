"""Registry entry of the "cuda" backend: the fused CUDA C++ kernels of the compiled extension.

Launched on the current stream with no host synchronisation and no allocation besides the
outputs, so the ops can be captured in a CUDA graph. Built only where setup.py found a CUDA
toolkit and a CUDA build of torch.
"""

from __future__ import annotations

import torch

from .._extension import extension, extension_error
from ..ops import fused_backend


def status() -> tuple[bool, str]:
    module = extension()
    if module is None:
        return False, f"the compiled extension autoguide_fast._C is not loaded ({extension_error()})"
    info = dict(module.build_info())
    if not info.get("cuda", False):
        return False, "the compiled extension was built without CUDA (no CUDA toolkit or a CPU build of torch)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return True, f"fused CUDA kernels (CUDA runtime {info.get('cuda_runtime', '?')})"


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    return fused_backend.supports("cuda", device, dtype)


def create(dtype: torch.dtype) -> fused_backend.FusedBackend:
    return fused_backend.FusedBackend("cuda", dtype)
