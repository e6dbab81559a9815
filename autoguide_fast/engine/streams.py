"""Concurrency of the two networks: the guide on a side stream, forked and joined per evaluation.

Per guided evaluation (inside a CUDA graph capture as well as eagerly):

    main:  ──record──► net(x, t) ─────────────── wait ──► fused step
    side:       wait ──► gnet(x, t) ──► record ──┘

The side stream waits on an event recorded on the current stream (so it sees x), runs the guide,
and the current stream waits back before the fused step reads both outputs. During a capture the
same fork/join becomes two parallel branches of the graph. Eagerly, ``record_stream`` tells the
caching allocator which stream still uses a block, so memory is not reused across streams early.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from typing import cast

import torch

__all__ = ["CallOrder", "GuideStream", "device_context", "engine_stream", "time_alternating"]


def engine_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream for the engine's own work (guide branch, warm-up and capture). torch hands streams out
    round-robin from small per-priority pools, so a stream made at the default priority can be the
    very CUDA stream another thread of the process works on: what that thread launches during one of
    our captures would be recorded into the graph (thread-local capture mode does not separate two
    threads on one stream). The engine takes its streams from the high-priority pool, which
    ``torch.cuda.Stream()`` at the default priority never hands out."""
    return torch.cuda.Stream(device=device, priority=-1)


class GuideStream:
    """Runs the guide network on a side stream, concurrently with the main network (CUDA only).

    ``run_eager`` calls ``fork`` before the main network and ``join`` after it.
    """

    def __init__(self, device: torch.device) -> None:
        self.side = engine_stream(device)
        self._main: torch.cuda.Stream | None = None

    def fork(self, gnet: Callable, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None):
        main = torch.cuda.current_stream(x.device)
        if not torch.cuda.is_current_stream_capturing():
            # x (and the labels) were allocated on the main stream and are read on the side one.
            # Recorded before the launch, so that it holds even if gnet raises midway (the
            # allocator waits for the side stream's work queued by the time the tensor is freed).
            x.record_stream(self.side)
            if isinstance(labels, torch.Tensor) and labels.is_cuda:
                labels.record_stream(self.side)
        self._main = main
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            return gnet(x, t, labels)

    def join(self, out) -> None:
        main = cast(torch.cuda.Stream, self._main)  # Set by fork, which run_eager calls first.
        main.wait_stream(self.side)
        if isinstance(out, torch.Tensor) and out.is_cuda and not torch.cuda.is_current_stream_capturing():
            # The guide's output was allocated on the side stream and is read on the main one.
            out.record_stream(main)


class CallOrder:
    """Orders successive calls of one sampler on the GPU even when they come from threads using
    different current streams: each call waits for the previous one's completion event before it
    touches the sampler's static buffers, and, when the previous call ran on another stream, for
    everything queued on that stream until now: the previous caller's own work on its result
    (with ``copy_output=False`` the static buffer itself, valid until the next call). No-op on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._done: torch.cuda.Event | None = None
        self._stream: torch.cuda.Stream | None = None  # The stream of the previous call.

    def begin(self) -> None:
        if not self.cuda or self._done is None:
            return
        current = torch.cuda.current_stream()
        current.wait_event(self._done)
        previous = self._stream
        if previous is not None and previous != current:
            with torch.cuda.stream(previous):
                if not torch.cuda.is_current_stream_capturing():  # (A caller's own capture: left alone.)
                    current.wait_event(previous.record_event())

    def end(self) -> None:
        if self.cuda:
            event = torch.cuda.Event()
            self._stream = torch.cuda.current_stream()
            event.record(self._stream)
            self._done = event

    def drain(self) -> None:
        """Block the host until the last call's GPU work is done (before freeing what it uses)."""
        if self.cuda and self._done is not None:
            self._done.synchronize()


def device_context(device: torch.device):
    """Makes ``device`` current for CUDA work (multi-GPU processes); nothing on other devices."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def time_alternating(candidates: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
    """Median milliseconds of each candidate on the current CUDA stream, measured with CUDA events,
    candidates interleaved round by round after one untimed call each."""
    for fn in candidates.values():
        fn()
    stream = torch.cuda.current_stream()
    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in events.items()}
