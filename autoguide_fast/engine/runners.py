"""The three ways a prepared sampler runs a trajectory: eagerly, as one CUDA graph, or as one CUDA
graph per step. All three run the same loop (``sampler.run_eager_steps``) with the same backend,
so their results are the same bit for bit.

A runner is called with (noise, labels, seeds) and returns (x, finite): the result and, when
finiteness is checked, a 0-dim device bool computed in the same launch sequence (no extra sync).
Graph runners copy the inputs into static buffers, replay, and return their static output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..plan import SamplerConfig, StepPlan
from ..sampler import run_eager, run_eager_steps

__all__ = ["EagerRunner", "SamplingProgram", "StaticInputs", "StepGraphRunner", "TrajectoryGraphRunner"]

Result = tuple[torch.Tensor, "torch.Tensor | None"]


class SamplingProgram:
    """Everything a trajectory needs besides its inputs: networks, config, backend, plan, streams."""

    def __init__(
        self,
        networks: Callable[[], tuple[Callable, Callable | None]],  # Returns (net, gnet) to call now.
        config: SamplerConfig,
        backend: Any,                                   # StepBackend.
        plan: tuple[torch.Tensor, list[StepPlan]],      # From build_plan on the sampler's device.
        streams: Any,                                   # GuideStream, or None for one stream.
        check_finite: bool,                             # Also compute isfinite(x).all() on the device.
    ) -> None:
        self.networks, self.config, self.backend = networks, config, backend
        self.plan, self.streams, self.check_finite = plan, streams, check_finite

    @property
    def num_steps(self) -> int:
        return len(self.plan[1])

    def _finish(self, x: torch.Tensor) -> Result:
        return x, (torch.isfinite(x).all() if self.check_finite else None)

    def trajectory(self, noise: torch.Tensor, labels: torch.Tensor | None, seeds: torch.Tensor | None) -> Result:
        net, gnet = self.networks()
        x = run_eager(net, gnet, noise, labels, self.config, self.backend, seeds, None, None, self.plan,
                      self.streams)
        return self._finish(x)

    def step(self, k: int, x: torch.Tensor, labels: torch.Tensor | None, seeds: torch.Tensor | None) -> Result:
        """Step k from state x (from the unit noise when k == 0); finiteness on the last step."""
        net, gnet = self.networks()
        if k == 0:
            x = x.to(self.config.dtype) * self.plan[0][0]
        x = run_eager_steps(net, gnet, x, labels, self.config, self.backend, seeds, None, None, self.plan,
                            self.streams, first=k, stop=k + 1)
        return self._finish(x) if k == self.num_steps - 1 else (x, None)


class EagerRunner:
    """The fused path without graphs (also the fallback when capture fails, and the CPU path)."""

    mode = "none"
    signature: tuple | None = None

    def __init__(self, program: SamplingProgram) -> None:
        self.program = program

    def __call__(self, noise, labels, seeds) -> Result:
        return self.program.trajectory(noise, labels, seeds)

    def release(self) -> None:
        pass


class StaticInputs:
    """The buffers a graph reads: unit noise (state dtype), labels, per-image seeds."""

    def __init__(self, noise: torch.Tensor, labels: torch.Tensor | None, seeds: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        # Copies of the example inputs, so warm-up and capture run on real data. The noise buffer
        # has the state dtype whatever the callers' noise dtype is.
        self.noise = noise.to(dtype, copy=True)
        self.labels = None if labels is None else labels.clone()
        self.seeds = None if seeds is None else seeds.clone()

    def load(self, noise: torch.Tensor, labels: torch.Tensor | None, seeds: torch.Tensor | None) -> None:
        # copy_ rounds exactly like noise.to(dtype), so the graph sees what the eager loop would.
        self.noise.copy_(noise)
        if self.labels is not None:
            self.labels.copy_(labels)
        if self.seeds is not None:
            self.seeds.copy_(seeds, non_blocking=True)

    @property
    def args(self) -> tuple:
        return self.noise, self.labels, self.seeds


class _GraphRunner:
    mode = "graph"

    def __init__(self, program: SamplingProgram, capturer: Any, inputs: StaticInputs, warmup_runs: int) -> None:
        self.program, self.capturer, self.inputs = program, capturer, inputs
        self.signature: tuple | None = None  # Parameter pointers at capture (set by the sampler).
        capturer.warmup(lambda: program.trajectory(*inputs.args), warmup_runs)

    def release(self) -> None:
        self.capturer.release()
        self.graphs = []
        self.inputs = None
        self.out = self.finite = None


class TrajectoryGraphRunner(_GraphRunner):
    """The whole trajectory as one graph: every step's scalars are baked in as constants."""

    mode = "trajectory"

    def __init__(self, program, capturer, inputs, warmup_runs: int) -> None:
        super().__init__(program, capturer, inputs, warmup_runs)
        graph, (self.out, self.finite) = capturer.capture(lambda: program.trajectory(*inputs.args))
        self.graphs = [graph]

    def __call__(self, noise, labels, seeds) -> Result:
        self.inputs.load(noise, labels, seeds)
        self.graphs[0].replay()
        return self.out, self.finite


class StepGraphRunner(_GraphRunner):
    """One graph per step, replayed in order. Each step's scalars are baked into its own graph
    (the fused backends take them as Python floats), so this is one graph per step rather than
    one per kind of step; the graphs share one memory pool and chain through static states."""

    mode = "step"

    def __init__(self, program, capturer, inputs, warmup_runs: int) -> None:
        super().__init__(program, capturer, inputs, warmup_runs)
        self.graphs = []
        x, finite = inputs.noise, None
        # State k stays alive while step k+1 is captured (it is that capture's input) and is then
        # returned to the shared pool, where later steps may reuse it: safe because the graphs are
        # always replayed in capture order, one after the other, on one stream.
        for k in range(program.num_steps):
            graph, (x, finite) = capturer.capture(
                lambda k=k, x=x: program.step(k, x, inputs.labels, inputs.seeds))
            self.graphs.append(graph)
        self.out, self.finite = x, finite

    def __call__(self, noise, labels, seeds) -> Result:
        self.inputs.load(noise, labels, seeds)
        for graph in self.graphs:
            graph.replay()
        return self.out, self.finite
