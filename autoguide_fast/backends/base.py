"""The interface every sampling backend implements: the element-wise work of one step.

A backend never calls a network: the sampler loop evaluates the networks and hands their
outputs to the backend, which performs the guided combination, the Euler/Heun update and the
churn noise injection. Guidance weights ``w`` are Python floats, or ``None`` for an unguided
evaluation (the guide output is then not read and may be ``None``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..noise import churn_stream
from ..plan import StepPlan

__all__ = ["StepBackend", "fused_churn_args"]


class StepBackend(Protocol):
    name: str
    # True if euler()/heun() can also inject the NEXT step's seeded churn noise in the same pass
    # (x_hat' = x_out + next.noise_scale · eps(seeds, churn_stream(next.index))). The loop then
    # passes ``churn_next=(next_step, seeds)``; otherwise it is always None.
    fuses_churn: bool
    # True if euler()/heun() take every per-step value from device memory: step.tensors, and
    # step.scalars when it is set (w, t_hat, t_next and the fused churn's scale and stream).
    # Then one CUDA graph captured for a step replays correctly for any step of the same kind
    # once those buffers hold the new step's values (engine/step_kinds.py). Python floats of the
    # step may still decide branches (guided or not, churn or not), never values.
    device_scalars: bool

    def euler(
        self,
        x_hat: torch.Tensor,            # State at t_hat (state dtype).
        D_main: torch.Tensor,           # Main network output at (x_hat, t_hat), any float dtype.
        D_guide: torch.Tensor | None,   # Guide output, or None when w is None.
        w: float | None,                # Guidance weight; None = unguided.
        step: StepPlan,
        churn_next: tuple[StepPlan, torch.Tensor] | None = None,  # Fuse next step's churn into x_next.
        need_d: bool = True,            # False: the caller does not use d (no Heun correction follows).
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """D = lerp(D_guide, D_main, w); d = (x_hat - D)/t_hat; x_next = x_hat + (t_next - t_hat) d.
        Returns (d, x_next); with ``need_d=False`` the backend may skip writing d and return None
        for it (x_next is the same either way)."""
        ...

    def heun(
        self,
        x_hat: torch.Tensor,
        d: torch.Tensor,                # Euler slope of this step.
        x_next: torch.Tensor,           # Euler prediction at t_next.
        D_main: torch.Tensor,           # Main output at (x_next, t_next).
        D_guide: torch.Tensor | None,
        w: float | None,
        step: StepPlan,
        churn_next: tuple[StepPlan, torch.Tensor] | None = None,  # Fuse next step's churn into x_out.
    ) -> torch.Tensor:
        """d' = (x_next - D')/t_next; x_out = x_hat + (t_next - t_hat)(d/2 + d'/2)."""
        ...

    def churn(
        self,
        x: torch.Tensor,                # State at t_cur.
        step: StepPlan,                 # step.noise_scale is not None.
        seeds: torch.Tensor | None,     # int64 [B] per-image seeds, or None when eps is given.
        eps: torch.Tensor | None,       # Explicit noise (randn_like path), or None.
    ) -> torch.Tensor:
        """x_hat = x + sqrt(t_hat² - t_cur²)·S_noise·eps."""
        ...


def fused_churn_args(churn_next: tuple[StepPlan, torch.Tensor] | None) -> tuple[torch.Tensor, float, int] | None:
    """(seeds, scale, Philox stream) of the next step's churn that a fused op injects, or None
    when there is none; for the backends with ``fuses_churn``."""
    if churn_next is None:
        return None
    nxt, seeds = churn_next
    if nxt.noise_scale is None:
        raise ValueError(f"churn_next: step {nxt.index} has no churn (noise_scale is None)")
    if seeds is None:
        raise ValueError("churn_next: seeds are required to fuse the churn noise")
    return seeds, nxt.noise_scale, churn_stream(nxt.index)
