"""Common set-up of the Triton test files: skip the module when Triton is unusable, and load the
kernels before anything imports triton, so that without CUDA they run in Triton's interpreter on
CPU tensors (tiny shapes only)."""

from __future__ import annotations

import pytest
import torch

from autoguide_fast import kernels

if kernels.triton_error() is not None:
    pytest.skip(kernels.triton_error(), allow_module_level=True)
kernels.load(interpret_without_cuda=True)
from autoguide_fast.kernels import _triton_common, triton_step  # noqa: E402  (after the load)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
OPS = torch.ops.autoguide_fast_triton
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

__all__ = ["CUDA", "DEVICE", "OPS", "capture_after_warmup", "gpu", "needs_cuda", "_triton_common", "triton_step"]


def capture_after_warmup(step):
    """(graph, output) of ``step()`` captured in a CUDA graph, after one eager run on a side stream
    (which compiles the kernels: compilation must not happen during capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
