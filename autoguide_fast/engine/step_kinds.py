"""One CUDA graph per kind of step (``graph="step"``): which steps share a graph, and the device
buffers that let one graph serve all of them.

Two steps are of the same kind when they launch the same sequence of kernels: the same guidance
decisions (guide called or not at t_hat and at t_next), the same order (Heun or Euler) and the same
churn handling. What differs between them is only values: t_cur, t_hat, t_next, and the scale and
Philox stream of the next step's churn that the step's last op injects. Those values live in two
device tables, one row per step; a graph of a middle kind starts by copying the row of the step
counter (a device int64) into slot buffers and ends by advancing the counter, so replaying the
kinds' graphs in step order runs the whole trajectory without any host work between replays.

* the networks read t from the slot (``StepPlan.tensors`` of the slot step are views of it);
* the backend reads w, t_hat, t_next and the fused churn's scale and stream from
  ``StepPlan.scalars`` (a float64 [5] view of the slot), which the fused kernels load on the
  device; the torch backend reads ``tensors`` only.

The first step (which scales the noise and may churn with its own op) and the last step (which
writes the static result) are kinds of their own. A step whose churn is a separate op (no fused
churn: the default randn_like variant, or a backend that does not fuse) also gets its own graph,
since that op bakes its values in; so does every step of a backend without ``device_scalars``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import cast

import torch

from ..noise import churn_stream
from ..plan import SamplerConfig, StepPlan

__all__ = ["StepTable", "step_kinds"]

_VALUE_NAMES = ("t_cur", "t_hat", "t_next", "noise_scale")


def step_kinds(steps: Sequence[StepPlan], fused_churn: bool, device_scalars: bool) -> list[tuple]:
    """The kind of each step (equal tuples share a graph). ``fused_churn``: each step's churn is
    injected by the op ending the previous step (seeded variant of a backend that fuses churn)."""
    n = len(steps)
    kinds: list[tuple] = []
    for k, step in enumerate(steps):
        if k == 0:
            kinds.append(("first",))
            continue
        if k == n - 1:
            kinds.append(("last",))
            continue
        churn_here = step.noise_scale is not None and not fused_churn
        churn_next = fused_churn and steps[k + 1].noise_scale is not None
        kind: tuple = ("middle", step.w_first is None, step.w_second is None, step.second_order, churn_here, churn_next)
        if churn_here or not device_scalars:
            kind += (k,)  # Values baked into the launch: a graph for this step alone.
        kinds.append(kind)
    return kinds


class StepTable:
    """Per-step values on the device, the slot buffers the graphs read, and the step counter."""

    def __init__(self, config: SamplerConfig, steps: Sequence[StepPlan], device: torch.device) -> None:
        dtype = config.dtype
        zero = torch.zeros((), dtype=dtype, device=device)
        # [N, 4] in the state dtype: the very tensors of the plan, so the networks see equal values.
        self.values = torch.stack([
            torch.stack([step.tensors.get(name, zero) for name in _VALUE_NAMES]) for step in steps
        ])
        # [N, 5] float64: w, t_hat, t_next, next step's churn scale and Philox stream (exact in float64).
        rows = []
        for k, step in enumerate(steps):
            nxt = steps[k + 1] if k + 1 < len(steps) else None
            churn_next = nxt is not None and nxt.noise_scale is not None
            rows.append([
                float(config.guidance),  # Read only by guided evaluations.
                step.t_hat,
                step.t_next,
                cast(StepPlan, nxt).noise_scale if churn_next else 0.0,
                float(churn_stream(cast(StepPlan, nxt).index)) if churn_next else 0.0,
            ])
        self.scalars = torch.tensor(rows, dtype=torch.float64, device=device)
        self.slot_values = torch.empty((1, len(_VALUE_NAMES)), dtype=dtype, device=device)
        self.slot_scalars = torch.empty((1, 5), dtype=torch.float64, device=device)
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)

    def slot_step(self, step: StepPlan) -> StepPlan:
        """``step`` reading its values from the slot buffers (its floats still decide branches)."""
        tensors = {name: self.slot_values[0, j] for j, name in enumerate(_VALUE_NAMES)}
        return dataclasses.replace(step, tensors=tensors, scalars=self.slot_scalars[0])

    def load_current(self) -> None:
        """Slots <- the counter's row (device-side copies: capturable, no host sync)."""
        torch.index_select(self.values, 0, self.counter, out=self.slot_values)
        torch.index_select(self.scalars, 0, self.counter, out=self.slot_scalars)

    def advance(self) -> None:
        self.counter.add_(1)

    def start_at(self, k: int) -> None:
        self.counter.fill_(k)
