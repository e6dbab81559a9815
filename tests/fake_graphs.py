"""A CPU stand-in for CUDA graphs: ``RerunCapturer`` "replays" by re-running the captured function
on the same static buffers and writing into the outputs of the capture, the contract a real graph
fulfils (tests/test_engine_gpu.py checks the real thing). The ``fake_graphs`` fixture (conftest.py)
makes ``GuidedSampler`` use it."""

from __future__ import annotations

import torch

from autoguide_fast.engine import CaptureFailed


class FakeGraph:
    def __init__(self, fn, out) -> None:
        self.fn, self.out = fn, out
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        new = self.fn()
        for dst, src in zip(self.out, new):
            if dst is not None:
                dst.copy_(src)


class RerunCapturer:
    instances: list[RerunCapturer] = []
    fail_with: str | None = None

    @staticmethod
    def supports(device: torch.device) -> bool:
        return True

    def __init__(self, device: torch.device, draws_random: bool | None = None) -> None:
        self.draws_random = draws_random
        self.graphs: list[FakeGraph] = []
        self.warmups = 0
        self.released = False
        RerunCapturer.instances.append(self)

    def warmup(self, fn, runs: int) -> None:
        for _ in range(runs):
            fn()
            self.warmups += 1

    def capture(self, fn):
        if RerunCapturer.fail_with is not None:
            raise CaptureFailed(RerunCapturer.fail_with)
        out = fn()
        graph = FakeGraph(fn, out)
        self.graphs.append(graph)
        return graph, out

    def release(self) -> None:
        self.released = True
        self.graphs.clear()
