"""The Triton backend on the random sampler configurations of tests/random_configs.py, against the
``torch`` backend on the same device (itself checked against the reference on the CPU in
tests/test_random_configurations.py): bit for bit for float32 states without churn noise in
Triton's interpreter, relative L2 error <= 1e-12 for float64 states and <= 1e-6 otherwise (the
noise's float64 ln/sin/cos are another library's, and the interpreter's float64 fma is not a
single rounding). Without CUDA 40
draws run in the interpreter with float32/float16 network outputs (no bfloat16 there); on a card
(part of the GPU check's `-m gpu` run, see conftest) the first 8, bfloat16 included, through the
engine's cached samplers (CUDA graphs) as fast_guided_sample runs on CUDA tensors."""

from __future__ import annotations

import pytest
import torch

import autoguide_fast

from .random_configs import draw, rel_l2
from .triton_interpreter import CUDA, DEVICE

DRAWS = 8 if CUDA else 40  # On a card within the GPU check's test budget (each draw captures its graphs).
NET_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if CUDA else (torch.float32, torch.float16)


def _sample(d, backend):
    net, gnet, noise, labels = d.inputs(DEVICE)
    for n in (net, gnet):
        n.a, n.label_gain = n.a.to(DEVICE), n.label_gain.to(DEVICE)
    with torch.no_grad():
        return autoguide_fast.fast_guided_sample(net, noise, labels, gnet, seeds=d.seeds, backend=backend,
                                                 check_finite=False, **d.kwargs)


@pytest.mark.parametrize("index", range(DRAWS))
def test_triton_equals_the_torch_loop(index):
    d = draw(index, net_dtypes=NET_DTYPES)
    expected, got = _sample(d, "torch"), _sample(d, "triton")
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if not CUDA and d.kwargs["S_churn"] == 0 and d.kwargs["dtype"] == torch.float32:
        assert torch.equal(got, expected), (d, rel_l2(got, expected))
    elif d.kwargs["dtype"] == torch.float64:  # Last-bit differences only (a float32 rounding would be ~1e-7).
        assert rel_l2(got, expected) <= 1e-12, (d, rel_l2(got, expected))
    else:
        assert rel_l2(got, expected) <= 1e-6, (d, rel_l2(got, expected))
