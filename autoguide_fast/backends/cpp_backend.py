"""Registry entry of the "cpp" backend: the fused C++ CPU kernels of the compiled extension.

Multithreaded with ATen's parallel_for; an AVX2+FMA variant is picked at run time where the CPU
has it. Results equal the reference (and the "torch" backend) bit for bit, but for the seeded noise
at float32 rounding ties (about 1 value in 10^9: its float64 ln/sin/cos are not torch's, and a last
float64 bit can round a tie the other way).
"""

from __future__ import annotations

import torch

from .._extension import extension, extension_error
from ..ops import fused_backend


def status() -> tuple[bool, str]:
    module = extension()
    if module is None:
        return False, f"the compiled extension autoguide_fast._C is not loaded ({extension_error()})"
    isa = dict(module.build_info()).get("cpu_kernels", "?")
    return True, f"fused C++ CPU kernels ({isa}, {torch.get_num_threads()} threads)"


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    return fused_backend.supports("cpu", device, dtype)


def create(dtype: torch.dtype) -> fused_backend.FusedBackend:
    return fused_backend.FusedBackend("cpp", dtype)
