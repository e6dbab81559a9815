"""CUDA-graph capture for the engine: warm-up on a side stream, capture into a private memory pool,
and a typed failure that the sampler turns into its eager fallback.

Why not ``torch.cuda.graph``: it synchronises the device and empties the allocator cache on every
capture, which a server capturing while other threads sample does not want. This module calls
``CUDAGraph.capture_begin/capture_end`` directly, with ``capture_error_mode="thread_local"`` so
that other threads' CUDA *API* calls neither break this capture nor are refused during it.

That is not enough on its own: while any capture is open, torch's default CUDA generator is in
capture mode for the whole process, and every eager CUDA random draw or ``CUDAGraph.replay()`` in
another thread then raises ("Offset increment outside graph capture encountered unexpectedly").
So the engine takes ``ENGINE_LOCK`` around its captures (exclusive) and around everything else it
launches on CUDA (eager runs, random draws, replays): the engine's own threads never meet a
capture. Code outside the engine that draws CUDA random numbers or replays graphs in other
threads while a sampler prepares must take the lock too (``with autoguide_fast.engine.ENGINE_LOCK``).

A failed capture leaves the generator in capture mode as well (only a successful ``capture_end``
ends it), which would break every later random draw and replay; after a failure this module
therefore captures and drops one empty graph, whose successful end resets the generator.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ENGINE_LOCK", "CaptureFailed", "CudaGraphCapturer", "describe_failure", "engine_lock", "preserved_rng"]

# Captures exclude every other CUDA launch of the engine (see the module docstring); re-entrant,
# so a call that holds it may prepare (warm up and capture) without releasing it.
ENGINE_LOCK = threading.RLock()


def engine_lock(device: torch.device):
    """ENGINE_LOCK for a CUDA device; nothing to lock on other devices."""
    return ENGINE_LOCK if device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Restore the device's default generator afterwards: preparing a sampler (warm-up runs, stream
    timing, capture) draws churn noise from torch.randn_like, and must not shift the random
    numbers the caller's own run then draws (the drop-in promises the official sampler's)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        state = torch.cuda.get_rng_state(index)
        try:
            yield
        finally:
            torch.cuda.set_rng_state(state, index)
    else:
        state = torch.get_rng_state()
        try:
            yield
        finally:
            torch.set_rng_state(state)


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
        with ENGINE_LOCK, torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            failure: BaseException | None = None
            try:
                out = fn()
            except BaseException as exc:  # Anything raised while capturing means "cannot capture this".
                failure = exc
            try:
                graph.capture_end()  # Also after a failure: ends the capture so the stream is usable.
            except Exception as exc:  # An invalidated capture, or a bad cross-stream dependency.
                failure = failure if failure is not None else exc
                self._abandon()
                self._reset_generator_capture_state()
            if failure is not None and not isinstance(failure, Exception):
                raise failure  # An interrupt (e.g. Ctrl-C): the capture is ended, the interrupt goes on.
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
        end = getattr(torch._C, "_cuda_endAllocateToPool", None)
        release = getattr(torch._C, "_cuda_releasePool", None)
        try:
            if end is not None:
                end(index, self.pool)
        except RuntimeError:
            # capture_end got that far before it failed, and then also settled the pool's use count
            # (the graph's destructor releases it): releasing here too would release it twice.
            return
        if release is not None:
            try:
                release(index, self.pool)
            except RuntimeError:
                pass

    def _reset_generator_capture_state(self) -> None:
        """End the CUDA generators' capture mode that the failed capture left on: one empty capture
        (its own pool), whose successful ``capture_end`` runs the generators' capture epilogue
        (torch only warns that the graph is empty)."""
        graph = torch.cuda.CUDAGraph()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph.capture_begin(capture_error_mode="thread_local")
                graph.capture_end()
        except Exception as exc:  # Leave the original failure as the one reported.
            warnings.warn(f"resetting the CUDA generator after a failed capture failed too: {exc}", RuntimeWarning,
                          stacklevel=3)

    def release(self) -> None:
        self.graphs.clear()
