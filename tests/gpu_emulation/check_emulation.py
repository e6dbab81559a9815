"""Checks of the emulation itself (not collected by the CPU suite: run under the plugin by
tests/test_gpu_emulation.py): it maps "cuda" to the CPU, really captures and replays, a host
sync breaks a capture as on a GPU, and a missing wait between two streams is caught as a race."""

import pytest
import torch

from autoguide_fast import GuidedSampler
from autoguide_fast.engine.guided_sampler import GraphCaptureWarning
from autoguide_fast.reference import edm_sampler
from tests.gpu_emulation import stream_order
from tests.gpu_emulation.stream_order import StreamRace

pytestmark = pytest.mark.gpu  # Run with the GPU tests, under the emulation.


def test_cuda_faked_and_mapped():
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1
    x = torch.randn(3, device="cuda")
    assert x.device.type == "cpu" and torch.ones(2).cuda().device.type == "cpu"
    assert torch.device("cuda:0") == torch.device("cpu") and isinstance(torch.device("cpu"), torch.device)


def test_graph_records_and_replays_into_static_outputs():
    x = torch.ones(4, device="cuda")
    out = torch.zeros(4, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = x * 2 + 1
        out.copy_(y)
    # As on a GPU, capturing computes nothing: its buffers hold no result until a replay.
    assert torch.isnan(y).all() and torch.equal(out, torch.zeros(4))
    x.fill_(3.0)
    g.replay()
    assert torch.equal(y, torch.full((4,), 7.0)) and torch.equal(out, y) and g.replays == 1


def test_host_sync_during_capture_fails_the_capture():
    x = torch.ones(2, device="cuda")
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="captur"):
        with torch.cuda.graph(g):
            float(x.sum())


@pytest.mark.parametrize("copy", ["tensor", "cuda", "to"])
def test_a_blocking_copy_from_the_host_during_capture_fails_the_capture(copy):
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="captur"):
        with torch.cuda.graph(g):
            if copy == "tensor":
                torch.tensor([1.0, 3.0], device="cuda")
            elif copy == "cuda":
                torch.ones(2).cuda()
            else:
                torch.ones(2).to("cuda")


def test_sync_debug_mode_reports_the_syncs_torch_reports():
    x = torch.ones(2, device="cuda")
    event = torch.cuda.Event()
    event.record()
    syncs = {"item": lambda: float(x.sum()), "synchronize": torch.cuda.synchronize,
             "stream": lambda: torch.cuda.current_stream().synchronize(),
             "host copy": lambda: torch.tensor([1.0, 2.0], device="cuda"), "to host": x.cpu,
             "tolist": x.tolist}
    try:
        torch.cuda.set_sync_debug_mode("error")
        for name, sync in syncs.items():
            with pytest.raises(RuntimeError, match="called a synchronizing CUDA operation"):
                sync()
                pytest.fail(f"{name}: not reported")
        event.synchronize()  # Not reported by torch either.
        y = (x * 2).to("cuda", non_blocking=True)  # Device work and asynchronous copies: fine.
        torch.cuda.set_sync_debug_mode("warn")
        with pytest.warns(UserWarning, match="called a synchronizing CUDA operation"):
            float(y.sum())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.cuda.get_sync_debug_mode() == 0 and float(y.sum()) == 4.0


def test_engine_really_captures_and_replays():
    net = lambda x, t, labels: x * (0.25 / (0.25 + t**2))  # noqa: E731
    s = GuidedSampler(net, noise_shape=(2, 3), device="cuda", num_steps=4, graph="trajectory", backend="torch")
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    torch.cuda.CUDAGraph.replay = lambda g: replays.append(g) or real_replay(g)
    try:
        for seed in (0, 1):
            noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(s(noise), edm_sampler(net, noise, num_steps=4))
    finally:
        torch.cuda.CUDAGraph.replay = real_replay
    r = s.report
    assert r["graph"] == "trajectory" and r["capture_error"] is None and r["graphs"] == 1 and len(replays) == 2


def test_a_wrong_number_of_seeds_is_caught():
    net = lambda x, t, labels: x * 0.5  # noqa: E731
    s = GuidedSampler(net, noise_shape=(4, 3), device="cuda", num_steps=4, graph="trajectory", S_churn=10.0)
    with pytest.raises(ValueError):
        s(seeds=[1, 2, 3])


# ----------------------------------------------------------------------------------- stream order
def _fork(x):
    """x on the current stream, then 2x on a side stream that waited for it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = x * 2
    return side, y


def test_reading_across_streams_needs_a_wait():
    x = torch.randn(8, device="cuda") + 1
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), pytest.raises(StreamRace, match="read after write"):
        x * 2  # side never waited for the stream that wrote x.
    side, y = _fork(x)
    with pytest.raises(StreamRace, match="read after write"):
        y + 1  # The current stream has not waited back for y.
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y + 1, x * 2 + 1)
    side, y = _fork(x)
    with pytest.raises(StreamRace, match="write after read"):
        x.add_(1)  # side read x; overwriting it without waiting for side is a race too.
    torch.cuda.current_stream().wait_stream(side)  # Before x is freed (see the next test).


def test_freeing_memory_another_stream_still_uses_is_a_race():
    # torch's caching allocator hands a freed block out again at once to new work on the stream that
    # allocated it: another stream's use must be ordered before the free, or declared to the allocator.
    def forked_then_freed(order) -> None:
        x = torch.randn(8, device="cuda") + 1  # Allocated on the current stream.
        side, y = _fork(x)  # side reads x.
        order(x, side)
        del x, y  # y: allocated and used on side only.

    with pytest.raises(StreamRace, match="unsafe free"):
        forked_then_freed(lambda x, side: None)
        stream_order.check_frees()
    forked_then_freed(lambda x, side: x.record_stream(side))
    forked_then_freed(lambda x, side: torch.cuda.current_stream().wait_stream(side))
    forked_then_freed(lambda x, side: side.synchronize())
    stream_order.check_frees()  # None of those three raced.
    # A tensor a capture allocated lives in the graph's private pool: nothing else reuses it.
    x = torch.randn(8, device="cuda") + 1
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        side, y = _fork(x)
        torch.cuda.current_stream().wait_stream(side)
        out = y + 1  # Allocated on the capture stream.
    with torch.cuda.stream(side):
        side.wait_stream(torch.cuda.current_stream())
        g.replay()  # On another stream than the capture's: it writes out there.
    torch.cuda.current_stream().wait_stream(side)  # For x, allocated on the current stream.
    del g, y, out, x
    stream_order.check_frees()


def test_a_capture_keeps_the_rules_of_stream_capture():
    x = torch.randn(8, device="cuda") + 1
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="not joined"):  # A fork never joined back.
        with torch.cuda.graph(g):
            _fork(x)
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="not part of the capture"):  # Work on a stream outside it.
        with torch.cuda.graph(g):
            with torch.cuda.stream(torch.cuda.Stream()):
                x * 2
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # Forked and joined: a valid capture, and its replay computes.
        side, y = _fork(x)
        torch.cuda.current_stream().wait_stream(side)
        out = y + 1
    g.replay()
    assert torch.equal(out, x * 2 + 1)


@pytest.mark.parametrize("graph", ["none", "trajectory"])
def test_the_engine_without_its_join_would_race(monkeypatch, graph):
    from autoguide_fast.engine import streams

    net = lambda x, t, labels: x * (0.25 / (0.25 + t**2))  # noqa: E731
    gnet = lambda x, t, labels: x * (0.5 / (0.5 + t**2))  # noqa: E731
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    expected = edm_sampler(net, noise, gnet=gnet, num_steps=4, guidance=2.0)

    def sampler():
        return GuidedSampler(net, gnet, noise_shape=(2, 3), device="cuda", num_steps=4, guidance=2.0,
                             graph=graph, streams="on", backend="torch")

    assert torch.equal(sampler()(noise), expected)
    join = streams.GuideStream.join
    # Without the main stream's wait for the guide, eagerly (and in the warm-up before a capture):
    monkeypatch.setattr(streams.GuideStream, "join", lambda self, out: None)
    with pytest.raises(StreamRace):
        sampler()(noise)
    # ... and what the guide read (unordered) is freed unordered too.
    with pytest.raises(StreamRace, match="unsafe free"):
        stream_order.check_frees()
    if graph == "trajectory":
        # Only inside the capture: the step reads the guide's output unordered, the capture fails,
        # the engine falls back to the eager path (which joins) with a warning, and the result is
        # still right.
        monkeypatch.setattr(streams.GuideStream, "join", lambda self, out: (
            None if torch.cuda.is_current_stream_capturing() else join(self, out)))
        s = sampler()
        with pytest.warns(GraphCaptureWarning, match="StreamRace"):
            out = s(noise)
        assert torch.equal(out, expected) and s.report["graph"] == "none", s.report
