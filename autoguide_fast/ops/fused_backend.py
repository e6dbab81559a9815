"""The step backend of the compiled fused ops, shared by the "cpp" (CPU) and "cuda" backends.

One op per evaluation: the guided combination D_w = D0 + w (D1 - D0), the Euler/Heun update and,
when the loop asks for it (``fuses_churn``), the next step's seeded churn noise. On CPU the
results equal the reference's separately rounded tensor ops bit for bit.
"""

from __future__ import annotations

from typing import cast

import torch

from ..backends.base import check_churn_noise, fused_churn_args
from ..noise import churn_stream
from ..plan import StepPlan

__all__ = ["FusedBackend", "supports"]

_NET_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_STATE_DTYPES = (torch.float32, torch.float64)
_DEVICE_NAMES = {"cpu": "CPU", "cuda": "CUDA"}


def supports(device_type: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the fused ops of ``device_type`` ("cpu" or "cuda") cannot run a ``dtype`` state on
    ``device``, or None: the ``supports`` of the "cpp" and "cuda" registry entries."""
    if torch.device(device).type != device_type:
        return f"runs on {_DEVICE_NAMES[device_type]} tensors only, got device {device}"
    if dtype not in _STATE_DTYPES:
        return f"state dtype must be float32 or float64, got {dtype}"
    return None


class FusedBackend:
    fuses_churn = True
    device_scalars = True   # Honours step.scalars (see StepBackend.device_scalars).

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        from . import extension_ops  # Needs the compiled extension: imported only when one is used.

        if dtype not in _STATE_DTYPES:
            raise ValueError(f"dtype: the {name} backend supports float32 and float64 states, got {dtype}")
        self.name = name
        self.dtype = dtype
        self._ops = extension_ops

    # Network outputs as the kernels take them: contiguous, one dtype the kernels read. A dtype
    # they do not read, or two different dtypes, is cast to the state dtype first, which is the
    # reference's own `.to(dtype)` and therefore changes no value.
    def _net_outputs(
        self, D_main: torch.Tensor, D_guide: torch.Tensor | None, w: float | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if w is None:
            D_guide = None  # Unguided: the guide output is never read.
        elif D_guide is None:
            raise ValueError(f"D_guide: a guided evaluation (w = {w}) needs the guide network's output, got None")
        if D_main.dtype not in _NET_DTYPES or (D_guide is not None and D_guide.dtype != D_main.dtype):
            D_main = D_main.to(self.dtype)
            D_guide = D_guide.to(self.dtype) if D_guide is not None else None
        return D_main.contiguous(), D_guide.contiguous() if D_guide is not None else None

    @staticmethod
    def _churn_args(churn_next: tuple[StepPlan, torch.Tensor] | None) -> tuple[torch.Tensor | None, float, int]:
        args = fused_churn_args(churn_next)
        if args is None:
            return None, 0.0, 0
        seeds, scale, stream = args
        return seeds.contiguous(), scale, stream

    def euler(
        self,
        x_hat: torch.Tensor,
        D_main: torch.Tensor,
        D_guide: torch.Tensor | None,
        w: float | None,
        step: StepPlan,
        churn_next: tuple[StepPlan, torch.Tensor] | None = None,
        need_d: bool = True,            # False: d is not written (returned as None), one write pass less.
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        D_main, D_guide = self._net_outputs(D_main, D_guide, w)
        seeds, scale, stream = self._churn_args(churn_next)
        d, x_next = self._ops.euler_step(x_hat.contiguous(), D_main, D_guide, 1.0 if w is None else w, step.t_hat,
                                         step.t_next, seeds, scale, stream, need_d, step.scalars)
        return (d if need_d else None), x_next

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
        D_main, D_guide = self._net_outputs(D_main, D_guide, w)
        seeds, scale, stream = self._churn_args(churn_next)
        return self._ops.heun_step(x_hat.contiguous(), d.contiguous(), x_next.contiguous(), D_main, D_guide,
                                   1.0 if w is None else w, step.t_hat, step.t_next, seeds, scale, stream,
                                   step.scalars)

    def normal(self, seeds: torch.Tensor, numel: int, stream: int, dtype: torch.dtype) -> torch.Tensor:
        return self._ops.philox_normal(seeds.contiguous(), numel, stream, dtype)

    def churn(
        self, x: torch.Tensor, step: StepPlan, seeds: torch.Tensor | None, eps: torch.Tensor | None
    ) -> torch.Tensor:
        x = x.contiguous()
        noise_scale = cast(float, step.noise_scale)  # Called for churning steps only.
        if eps is None:
            seeds = cast(torch.Tensor, seeds)  # Given when eps is not.
            return self._ops.churn(x, noise_scale, seeds=seeds.contiguous(), stream=churn_stream(step.index))
        check_churn_noise(self.name, eps, x)
        return self._ops.churn(x, noise_scale, eps=eps.contiguous())
