"""CUDA-graph capture for the engine: warm-up on a side stream, capture into a private memory pool,
and a typed failure that the sampler turns into its eager fallback.

Why not ``torch.cuda.graph``: it synchronises the device and empties the allocator cache on every
capture, which a server capturing while other threads sample does not want. This module calls
``CUDAGraph.capture_begin/capture_end`` directly, with ``capture_error_mode="thread_local"`` so
that other threads' CUDA calls neither break this capture nor are refused during it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CaptureFailed", "CudaGraphCapturer", "describe_failure"]

# One capture at a time in the process: captures are rare (prepare, re-capture) and serialising
# them keeps the allocator's capture bookkeeping simple.
_CAPTURE_LOCK = threading.Lock()


class CaptureFailed(RuntimeError):
    """Capturing failed (a host sync such as ``.item()``, or an op that cannot be captured)."""


def describe_failure(exc: BaseException) -> str:
    """One line: the first error raised, then those it led to (e.g. ``capture_end`` refusing an
    invalidated capture), oldest first."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not e for e in chain) and len(chain) < 4:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    lines = []
    for e in reversed(chain):
        text = str(e).strip()
        lines.append(f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__)
    return "; then ".join(lines)


class CapturedGraph:
    """One captured graph; ``replay()`` launches it on the current stream."""

    def __init__(self, graph: torch.cuda.CUDAGraph) -> None:
        self.graph = graph

    def replay(self) -> None:
        self.graph.replay()


class CudaGraphCapturer:
    """Captures graphs that share one private memory pool and one warm-up/capture stream.

    Graphs sharing the pool must never run concurrently, and one graph may read what another wrote
    only through memory that stays allocated (the temporaries of a capture go back to the pool when
    it ends and may be reused by the next capture). A sampler's step graphs pass the state through a
    buffer allocated before any capture, and its lock serialises calls. Dropping the capturer and its
    graphs returns the pool to the allocator (``torch.cuda.empty_cache()`` then gives it back to
    the device).
    """

    @staticmethod
    def supports(device: torch.device) -> bool:
        return device.type == "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=device)
        self.graphs: list[CapturedGraph] = []

    def warmup(self, fn: Callable[[], Any], runs: int) -> None:
        """Run ``fn`` eagerly ``runs`` times on the capture stream (lazy initialisation of cuBLAS,
        cuDNN, Triton and compiled code must not happen during capture)."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            for _ in range(runs):
                fn()
        current.wait_stream(self.stream)

    def capture(self, fn: Callable[[], Any]) -> tuple[CapturedGraph, Any]:
        """Capture ``fn()``; returns the graph and ``fn``'s outputs (static tensors of the pool).
        Raises ``CaptureFailed`` with the reason when capture is impossible."""
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with _CAPTURE_LOCK, torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            failure: Exception | None = None
            try:
                out = fn()
            except Exception as exc:  # Anything raised while capturing means "cannot capture this".
                failure = exc
            try:
                graph.capture_end()  # Also after a failure: ends the capture so the stream is usable.
            except Exception as exc:  # An invalidated capture, or a bad cross-stream dependency.
                failure = failure if failure is not None else exc
                self._abandon()
            if failure is not None:
                raise CaptureFailed(describe_failure(failure)) from failure
        current.wait_stream(self.stream)
        captured = CapturedGraph(graph)
        self.graphs.append(captured)
        return captured, out

    def _abandon(self) -> None:
        """After ``capture_end`` failed: it threw before telling the allocator the capture is over,
        which would leave the allocator routing to a dead pool and deferring cross-stream frees
        forever. End that routing and drop the failed capture's hold on the pool ourselves."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
            fn = getattr(torch._C, name, None)
            if fn is None:
                continue
            try:
                fn(index, self.pool)
            except RuntimeError:  # Already done by capture_end before it failed.
                pass

    def release(self) -> None:
        self.graphs.clear()
