"""The eager PyTorch backend: the reference's own tensor ops, so it matches it bit for bit."""

from __future__ import annotations

import math
from typing import cast

import torch

from ..noise import churn_stream, philox_normal
from ..plan import StepPlan

__all__ = ["TorchBackend"]


class TorchBackend:
    name = "torch"
    fuses_churn = False
    device_scalars = True   # Euler/Heun read t_hat, t_next from step.tensors only.

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype

    # Guided denoiser D_w = lerp(D0, D1, w) (autoguidance eq. 2).
    def _denoised(self, D_main: torch.Tensor, D_guide: torch.Tensor | None, w: float | None) -> torch.Tensor:
        Dx = D_main.to(self.dtype)
        if w is None:
            return Dx
        return cast(torch.Tensor, D_guide).to(self.dtype).lerp(Dx, w)  # Given whenever w is.

    # need_d is ignored: x_next is computed from d, which is returned either way.
    def euler(self, x_hat: torch.Tensor, D_main: torch.Tensor, D_guide: torch.Tensor | None, w: float | None,
              step: StepPlan, churn_next: tuple[StepPlan, torch.Tensor] | None = None,
              need_d: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        t_hat, t_next = step.tensors["t_hat"], step.tensors["t_next"]
        d = (x_hat - self._denoised(D_main, D_guide, w)) / t_hat
        return d, x_hat + (t_next - t_hat) * d

    def heun(self, x_hat: torch.Tensor, d: torch.Tensor, x_next: torch.Tensor, D_main: torch.Tensor,
             D_guide: torch.Tensor | None, w: float | None, step: StepPlan,
             churn_next: tuple[StepPlan, torch.Tensor] | None = None) -> torch.Tensor:
        t_hat, t_next = step.tensors["t_hat"], step.tensors["t_next"]
        d_prime = (x_next - self._denoised(D_main, D_guide, w)) / t_next
        return x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)

    def normal(self, seeds: torch.Tensor, numel: int, stream: int, dtype: torch.dtype) -> torch.Tensor:
        return philox_normal(seeds, numel, stream, dtype)

    def churn(self, x: torch.Tensor, step: StepPlan, seeds: torch.Tensor | None,
              eps: torch.Tensor | None) -> torch.Tensor:
        if eps is None:
            numel = math.prod(x.shape[1:])
            seeds = cast(torch.Tensor, seeds)  # Given whenever eps is not (the churn contract, base.py).
            eps = philox_normal(seeds, numel, churn_stream(step.index), self.dtype).reshape(x.shape)
        return x + step.tensors["noise_scale"] * eps
