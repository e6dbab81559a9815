"""The engine's graph modes on the random sampler configurations of tests/random_configs.py, on the
CPU with the stand-in graphs (tests/fake_graphs.py; the real ones are checked on a card by
tests/test_engine_gpu.py): a GuidedSampler capturing the whole trajectory, or one graph per kind of
step, equals fast_guided_sample with the same backend bit for bit, call after call with new noise,
labels and seeds. The kinds of steps are where a configuration's mix (churn windows and guidance
intervals switching mid-trajectory, custom schedules, Euler, fused next-step churn) must come out
right."""

from __future__ import annotations

import pytest
import torch

import autoguide_fast
from autoguide_fast import GuidedSampler
from tests.random_configs import draw, rel_l2

DRAWS = 60
BACKEND = "cpp" if autoguide_fast.backends()["cpp"].available else "torch"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("graph", ["trajectory", "step"])
@pytest.mark.parametrize("index", range(DRAWS))
def test_graph_modes_equal_the_plain_loop(fake_graphs, index, graph):
    d = draw(index)
    net, gnet, _, _ = d.inputs()
    batch = d.shape[0]
    s = GuidedSampler(net, gnet, noise_shape=d.shape, label_shape=(batch, d.label_dim) if d.label_dim else None,
                      device="cpu", backend=BACKEND, graph=graph, check_finite=False, **d.kwargs)
    for call in range(2):
        noise = torch.randn(d.shape, generator=torch.Generator().manual_seed(100 * index + call))
        labels = None
        if d.label_dim:
            labels = torch.nn.functional.one_hot(torch.arange(call, call + batch) % d.label_dim, d.label_dim).float()
        seeds = [seed + call for seed in d.seeds]
        expected = autoguide_fast.fast_guided_sample(net, noise, labels, gnet, seeds=seeds, backend=BACKEND,
                                                     check_finite=False, **d.kwargs)
        got = s(noise, labels, seeds)
        assert torch.equal(got, expected), (d, graph, call, rel_l2(got, expected))
    assert s.report["graph"] == graph and s.report["capture_error"] is None
    assert len(fake_graphs.instances) == 1  # Prepared once, replayed for the second call.
