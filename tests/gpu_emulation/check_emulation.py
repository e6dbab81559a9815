"""Checks of the emulation itself (not collected by the CPU suite: run under the plugin by
tests/test_gpu_emulation.py): it maps "cuda" to the CPU, really captures and replays, and a host
sync breaks a capture as on a GPU."""

import pytest
import torch

from autoguide_fast import GuidedSampler
from autoguide_fast.reference import edm_sampler

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
