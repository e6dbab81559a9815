"""Fused Triton kernels of the sampler, each registered once as a ``torch.library`` operator.

One op = one file stem: ``triton_philox`` (the per-image counter-based noise of
``autoguide_fast.noise``) and ``triton_step`` (the fused guided Euler/Heun step, with the next
step's churn noise optionally fused in). Nothing here imports Triton until an op module is
loaded, so ``import autoguide_fast`` works without Triton; :func:`load` imports the op modules
and registers the operators under ``torch.ops.autoguide_fast_triton``.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, so to run the kernels on CPU tensors
(tests) set ``TRITON_INTERPRET=1`` before :func:`load` is first called.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["OP_NAMESPACE", "interpreting", "load", "loaded_interpreted", "triton_error"]

OP_NAMESPACE = "autoguide_fast_triton"
_OP_MODULES = ("triton_philox", "triton_step")


def interpreting() -> bool:
    """Whether Triton runs its kernels in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_error() -> str | None:
    """Why Triton is unusable, or None when it is installed (checked without importing it)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def load(*, interpret_without_cuda: bool = False) -> dict[str, ModuleType]:
    """Import every op module (registering the operators); raises ImportError without Triton.

    ``interpret_without_cuda=True`` (tests): when no CUDA device is present, set
    ``TRITON_INTERPRET=1`` for the rest of the process (Triton also reads it while interpreting)
    before the kernels are defined. It decides the mode only on the first load.
    """
    if interpret_without_cuda:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    return {name: importlib.import_module(f".{name}", __name__) for name in _OP_MODULES}


def loaded_interpreted() -> bool | None:
    """Whether the loaded kernels run in the interpreter; None if they are not loaded yet."""
    import sys

    common = sys.modules.get(f"{__name__}._triton_common")
    return None if common is None else bool(common.INTERPRETED)
