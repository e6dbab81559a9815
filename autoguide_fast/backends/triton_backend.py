"""The fused "triton" backend: one Triton kernel per evaluation (guided combination + Euler/Heun
update + the next step's seeded churn), registered as ``torch.ops.autoguide_fast_triton.*``.

Runs on CUDA tensors; on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` when
the kernels are first loaded), which is slow and meant for tests. Triton is imported lazily.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..noise import churn_stream
from ..plan import StepPlan
from .base import check_churn_noise, fused_churn_args

__all__ = ["TritonBackend", "create", "status", "supports"]

_STATE_DTYPES = (torch.float32, torch.float64)
_NEED_DEVICE = "triton kernels need a CUDA device, or TRITON_INTERPRET=1 for CPU tensors"


def _interpreted() -> bool:
    loaded = kernels.loaded_interpreted()
    return kernels.interpreting() if loaded is None else loaded


def status() -> tuple[bool, str]:
    error = kernels.triton_error()
    if error is not None:
        return False, error
    if _interpreted():
        return True, "fused Triton kernels, run by the Triton interpreter (CPU tensors; slow, for tests)"
    if not torch.cuda.is_available():
        return False, _NEED_DEVICE
    return True, "fused Triton kernels on CUDA (guided step + Euler/Heun + seeded churn in one pass)"


def supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in _STATE_DTYPES:
        return f"state dtype must be float32 or float64, got {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreted():
        return None
    return f"{_NEED_DEVICE}; got device {device}"


def create(dtype: torch.dtype) -> TritonBackend:
    return TritonBackend(dtype)


class TritonBackend:
    """StepBackend over the fused Triton ops (see ``autoguide_fast.kernels.triton_step``)."""

    name = "triton"
    fuses_churn = True
    device_scalars = True   # Honours step.scalars (see StepBackend.device_scalars).

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in _STATE_DTYPES:
            raise TypeError(f"dtype: the triton backend runs float32 or float64 states, got {dtype}")
        kernels.load()
        self.dtype = dtype
        self.ops = getattr(torch.ops, kernels.OP_NAMESPACE)

    def _check_state(self, name: str, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dtype != self.dtype:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{name}: expected a {self.dtype} tensor (the backend's state dtype), got {got}")

    @staticmethod
    def _churn_args(churn_next: tuple[StepPlan, torch.Tensor] | None) -> tuple[torch.Tensor | None, float | None, int]:
        args = fused_churn_args(churn_next)
        return (None, None, 0) if args is None else args

    # EDM Algorithm 2, lines 7-8 with D_w = D0 + w (D1 - D0) (autoguidance eq. 2).
    def euler(
        self,
        x_hat: torch.Tensor,
        D_main: torch.Tensor,
        D_guide: torch.Tensor | None,
        w: float | None,
        step: StepPlan,
        churn_next: tuple[StepPlan, torch.Tensor] | None = None,
        need_d: bool = True,            # False: d is not written (returned as None), saving one pass of writes.
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        self._check_state("x_hat", x_hat)
        seeds, scale, stream = self._churn_args(churn_next)
        d, x_next = self.ops.euler_step(
            x_hat, D_main, D_guide if w is not None else None, w, step.t_hat, step.t_next,
            seeds, scale, stream, None, need_d, step.scalars,
        )
        return (d if need_d else None), x_next

    # EDM Algorithm 2, lines 9-11.
    def heun(
        self,
        x_hat: torch.Tensor,
        d: torch.Tensor,
        x_next: torch.Tensor,
        D_main: torch.Tensor,
        D_guide: torch.Tensor | None,
        w: float | None,
        step: StepPlan,
        churn_next: tuple[StepPlan, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        self._check_state("x_hat", x_hat)
        seeds, scale, stream = self._churn_args(churn_next)
        (x_out,) = self.ops.heun_step(
            x_hat, d, x_next, D_main, D_guide if w is not None else None, w, step.t_hat, step.t_next,
            seeds, scale, stream, None, step.scalars,
        )
        return x_out

    def normal(self, seeds: torch.Tensor, numel: int, stream: int, dtype: torch.dtype) -> torch.Tensor:
        return self.ops.philox_normal(seeds, numel, stream, dtype)

    # EDM Algorithm 2, lines 4-6.
    def churn(
        self,
        x: torch.Tensor,
        step: StepPlan,
        seeds: torch.Tensor | None,
        eps: torch.Tensor | None,
    ) -> torch.Tensor:
        self._check_state("x", x)
        if eps is not None:
            check_churn_noise(self.name, eps, x)
        if step.noise_scale is None:
            raise ValueError(f"step: step {step.index} has no churn (noise_scale is None)")
        (x_hat,) = self.ops.churn(
            x, step.noise_scale, seeds if eps is None else None, eps, churn_stream(step.index), None,
        )
        return x_hat
