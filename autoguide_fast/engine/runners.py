"""The three ways a prepared sampler runs a trajectory: eagerly, as one CUDA graph, or as one CUDA
graph per kind of step. All three run the same loop (``sampler.run_eager_steps``) with the same
backend, so their results are the same bit for bit.

A runner is called with (noise, labels, seeds) and returns (x, finite): the result and, when
finiteness is checked, a 0-dim device bool computed in the same launch sequence (no extra sync).
Graph runners copy the inputs into static buffers, replay, and return their static output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch

from ..plan import SamplerConfig, StepPlan
from ..sampler import run_eager, run_eager_steps
from .step_kinds import StepTable, step_kinds

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

    def step(self, k: int, x: torch.Tensor, labels: torch.Tensor | None, seeds: torch.Tensor | None,
             steps: list[StepPlan] | None = None) -> Result:
        """Step k from state x (from the unit noise when k == 0); finiteness on the last step.
        ``steps`` replaces the plan's step list (the per-kind graphs pass slot steps)."""
        net, gnet = self.networks()
        if k == 0:
            x = x.to(self.config.dtype) * self.plan[0][0]
        plan = self.plan if steps is None else (self.plan[0], steps)
        x = run_eager_steps(net, gnet, x, labels, self.config, self.backend, seeds, None, None, plan,
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
        self.noise = noise.to(dtype, memory_format=torch.contiguous_format, copy=True)
        self.labels = None if labels is None else labels.clone(memory_format=torch.contiguous_format)
        self.seeds = None if seeds is None else seeds.clone()

    def load(self, noise: torch.Tensor, labels: torch.Tensor | None, seeds: torch.Tensor | None) -> None:
        # copy_ rounds exactly like noise.to(dtype), so the graph sees what the eager loop would.
        # Every call passes labels and seeds exactly when the example did (the buffers exist then).
        self.noise.copy_(noise)
        if self.labels is not None:
            self.labels.copy_(cast(torch.Tensor, labels))
        if self.seeds is not None:
            self.seeds.copy_(cast(torch.Tensor, seeds), non_blocking=True)

    @property
    def args(self) -> tuple:
        return self.noise, self.labels, self.seeds


class _GraphRunner:
    mode = "graph"
    graphs: list[Any]                   # The captured graphs (set by the subclasses).
    out: torch.Tensor                   # Static output and finiteness flag of the last graph.
    finite: torch.Tensor | None

    def __init__(self, program: SamplingProgram, capturer: Any, inputs: StaticInputs, warmup_runs: int) -> None:
        self.program, self.capturer, self.inputs = program, capturer, inputs
        self.signature: tuple | None = None  # Parameter pointers at capture (set by the sampler).
        capturer.warmup(lambda: program.trajectory(*inputs.args), warmup_runs)

    def release(self) -> None:
        self.capturer.release()
        self.graphs = []
        # Dropped for good: a released runner is never called again (the sampler builds a new one).
        self.inputs = None  # type: ignore[assignment]
        self.out = self.finite = None  # type: ignore[assignment]


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
    """One graph per kind of step (see ``step_kinds``), replayed in step order.

    Graphs chain through one static state buffer: each graph reads it and ends by writing its
    result back into it (the last writes the static output instead). A middle kind's graph first
    loads its step's values from the device tables at the step counter and ends by advancing the
    counter; the first graph sets the counter. So a call is: load the inputs, replay N graphs,
    nothing else on the host. The graphs share one memory pool: safe because they are replayed one
    after the other on one stream, and everything that outlives a graph (state, tables, slots,
    output) was allocated before the captures or stays referenced.
    """

    mode = "step"

    def __init__(self, program, capturer, inputs, warmup_runs: int) -> None:
        super().__init__(program, capturer, inputs, warmup_runs)
        steps = program.plan[1]
        fused_churn = getattr(program.backend, "fuses_churn", False) and inputs.seeds is not None
        kinds = step_kinds(steps, fused_churn, getattr(program.backend, "device_scalars", False))
        self.table = StepTable(program.config, steps, inputs.noise.device)
        self.state = torch.empty_like(inputs.noise)
        self.kinds = kinds
        # Each kind's launch sequence, eagerly once in step order (warms up whatever the kinds
        # launch that the trajectory did not, e.g. kernels reading their scalars from memory,
        # before anything is captured); then one capture per kind.
        fns = [self._kind_fn(k) for k in range(len(steps))]
        capturer.warmup(lambda: [fn() for fn in fns], 1)
        graphs: dict[tuple, Any] = {}
        for k, kind in enumerate(kinds):
            if kind not in graphs:
                graph, out = capturer.capture(fns[k])
                graphs[kind] = graph
                if kind == ("last",):
                    self.out, self.finite = out
        self.graphs = list(graphs.values())
        self.sequence = [graphs[kind] for kind in kinds]

    def _kind_fn(self, k: int) -> Callable[[], Result]:
        """The launch sequence of step k's kind, with step k as its representative."""
        program, inputs, table = self.program, self.inputs, self.table
        steps = program.plan[1]
        labels, seeds = inputs.labels, inputs.seeds
        if self.kinds[k] == ("first",):
            def first() -> Result:
                x, _ = program.step(0, inputs.noise, labels, seeds)
                self.state.copy_(x)
                table.start_at(1)
                return self.state, None
            return first
        if self.kinds[k] == ("last",):
            return lambda: program.step(k, self.state, labels, seeds)
        slot_steps = list(steps)
        slot_steps[k] = table.slot_step(steps[k])

        def middle() -> Result:
            table.load_current()
            x, _ = program.step(k, self.state, labels, seeds, slot_steps)
            self.state.copy_(x)
            table.advance()
            return self.state, None
        return middle

    def __call__(self, noise, labels, seeds) -> Result:
        self.inputs.load(noise, labels, seeds)
        for graph in self.sequence:
            graph.replay()
        return self.out, self.finite

    def release(self) -> None:
        super().release()
        self.sequence = []
        self.table = self.state = None  # type: ignore[assignment]  # As in _GraphRunner.release.
