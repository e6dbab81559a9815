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

Random numbers drawn inside graphs need one more precaution. torch (before 2.13) keeps one pair of
device tensors per CUDA generator, the seed and the offset a graph's random draws start from; the
start of every capture writes them (on the capture stream), and every replay of a graph that draws
random numbers writes them and then reads them (on the replay's stream). Two such replays on two
streams (two samplers in two threads), or a capture next to such a replay, could read each other's
values: duplicated or shifted noise, silently. The lock orders only the host side, so the engine
also orders the device side: a per-device fence event that each capture and each replay of a
random-drawing graph waits for before it starts and renews after it (graphs that draw nothing,
e.g. every seeded sampler, stay free to overlap).

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

from .streams import engine_stream

__all__ = ["ENGINE_LOCK", "CaptureFailed", "CudaGraphCapturer", "autocast_state", "capture_autocast",
           "describe_failure", "engine_lock", "preserved_rng", "renew_random_fence", "wait_random_fence"]

# Captures exclude every other CUDA launch of the engine (see the module docstring); re-entrant,
# so a call that holds it may prepare (warm up and capture) without releasing it.
ENGINE_LOCK = threading.RLock()


def engine_lock(device: torch.device):
    """ENGINE_LOCK for a CUDA device; nothing to lock on other devices."""
    return ENGINE_LOCK if device.type == "cuda" else contextlib.nullcontext()


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


_AUTOCAST_DEVICE_TYPES = ("cuda", "cpu")


def autocast_state() -> tuple:
    """The autocast regions the calling thread is in: ((device type, dtype), ...). A graph bakes in
    the precision its networks ran at when it was captured, so this is part of what a graph (and
    the cache's key) was made for."""
    return tuple((kind, torch.get_autocast_dtype(kind)) for kind in _AUTOCAST_DEVICE_TYPES
                 if torch.is_autocast_enabled(kind))


@contextlib.contextmanager
def capture_autocast():
    """The caller's autocast regions with autocast's weight-cast cache off, for warm-up and
    capture: a cached cast lives only until the outermost autocast region exits, and a graph that
    read it would replay on freed memory (torch refuses the cache in make_graphed_callables)."""
    with contextlib.ExitStack() as stack:
        if torch.is_autocast_cache_enabled():
            for kind, dtype in autocast_state():
                stack.enter_context(torch.autocast(kind, dtype=dtype, cache_enabled=False))
        yield


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Restore the device's default generator afterwards: preparing a sampler (warm-up runs, stream
    timing, capture) draws churn noise from torch.randn_like, and must not shift the random
    numbers the caller's own run then draws (the drop-in promises the official sampler's)."""
    if device.type == "cuda":
        index = _device_index(device)
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
    cur: BaseException | None = exc
    while cur is not None and all(cur is not e for e in chain) and len(chain) < 4:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    lines = []
    for e in reversed(chain):
        text = str(e).strip()
        lines.append(f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__)
    return "; then ".join(lines)


# Per device: the event after which the generator's graph seed/offset tensors are free (module
# docstring). Read and renewed under ENGINE_LOCK only.
_RANDOM_FENCES: dict[int, torch.cuda.Event] = {}


def wait_random_fence(device: torch.device, stream: torch.cuda.Stream) -> None:
    """Make ``stream`` wait until the last capture or random-drawing replay on the device is done."""
    event = _RANDOM_FENCES.get(_device_index(device))
    if event is not None:
        stream.wait_event(event)


def renew_random_fence(device: torch.device, stream: torch.cuda.Stream) -> None:
    """The work queued on ``stream`` so far is the last user of the generator's graph tensors."""
    event = torch.cuda.Event()
    event.record(stream)
    _RANDOM_FENCES[_device_index(device)] = event


class CapturedGraph:
    """One captured graph; ``replay()`` launches it on the current stream (under ENGINE_LOCK).

    Whether the graph draws CUDA random numbers is known from what it samples when the capturer is
    told (churn from ``randn_like``: it does); otherwise it is learnt at the first replay (the
    generator's offset advances by what the graph draws, e.g. a network that samples). Until then,
    and whenever it does, the replay is ordered by the device's random fence. The graph is destroyed
    under ENGINE_LOCK however the last reference goes (destroying it edits torch's registry of
    graphs, which a capture in another thread edits too)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, device: torch.device, draws_random: bool | None = None) -> None:
        self.graph = graph
        self.device = device
        self.draws_random = draws_random

    def __del__(self) -> None:
        # The graph goes with the object (no replay after): None only from here.
        graph, self.graph = self.graph, None  # type: ignore[assignment]
        try:
            with ENGINE_LOCK:
                del graph
        except Exception:  # noqa: BLE001  (interpreter shutdown: the lock may be gone; the graph goes anyway)
            pass

    def replay(self) -> None:
        if self.draws_random is False:
            self.graph.replay()
            return
        stream = torch.cuda.current_stream(self.device)
        wait_random_fence(self.device, stream)
        if self.draws_random is None:  # Learnt from this first replay.
            generator = torch.cuda.default_generators[_device_index(self.device)]
            before = generator.get_offset()
            self.graph.replay()
            self.draws_random = generator.get_offset() != before
        else:
            self.graph.replay()
        if self.draws_random:
            renew_random_fence(self.device, stream)


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

    def __init__(self, device: torch.device, draws_random: bool | None = None) -> None:
        self.device = device
        self.draws_random = draws_random  # True: every graph draws CUDA random numbers; None: learn it.
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = engine_stream(device)
        self.graphs: list[CapturedGraph] = []

    def warmup(self, fn: Callable[[], Any], runs: int) -> None:
        """Run ``fn`` eagerly ``runs`` times on the capture stream (lazy initialisation of cuBLAS,
        cuDNN, Triton and compiled code must not happen during capture)."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                for _ in range(runs):
                    fn()
        finally:
            # Also when fn raises (a network's error, out of memory): the buffers the caller frees
            # next (static inputs, step state, allocated on its stream) were used on this stream,
            # and the caching allocator hands them to new work on the caller's stream at once.
            current.wait_stream(self.stream)

    def capture(self, fn: Callable[[], Any]) -> tuple[CapturedGraph, Any]:
        """Capture ``fn()``; returns the graph and ``fn``'s outputs (static tensors of the pool).
        Raises ``CaptureFailed`` with the reason when capture is impossible."""
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with ENGINE_LOCK, torch.cuda.stream(self.stream):
            # capture_begin writes the generator's graph tensors on this stream: after the last
            # random-drawing replay, and before the next (renewed below, once capturing is over).
            wait_random_fence(self.device, self.stream)
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
            finally:
                if not torch.cuda.is_current_stream_capturing():
                    renew_random_fence(self.device, self.stream)
            if failure is not None:
                try:
                    if not isinstance(failure, Exception):
                        raise failure  # An interrupt (e.g. Ctrl-C): the capture is ended, the interrupt goes on.
                    raise CaptureFailed(describe_failure(failure)) from failure
                finally:
                    # Not kept in this frame, which the failure's traceback references: no reference
                    # cycle, so the failed graph and its pool tensors go as soon as the caller is done.
                    failure = None
        current.wait_stream(self.stream)
        captured = CapturedGraph(graph, self.device, self.draws_random)
        self.graphs.append(captured)
        return captured, out

    def _abandon(self) -> None:
        """After ``capture_end`` failed: it threw before telling the allocator the capture is over,
        which would leave the allocator routing to a dead pool and deferring cross-stream frees
        forever. End that routing and drop the failed capture's hold on the pool ourselves."""
        index = _device_index(self.device)
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
