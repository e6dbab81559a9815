"""Device-resident scalars of the fused Triton step ops (``scalars=``, float64 [w, t_hat, t_next,
noise_scale, stream]): bit-identical to the same call with Python floats, read by the kernel (the
Python values only select the compiled variant), validated without reading the values.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (tiny shapes only).
"""

from __future__ import annotations

import pytest
import torch

from .triton_interpreter import CUDA, DEVICE, OPS, capture_after_warmup, gpu, needs_cuda  # First: loads the kernels.

SHAPES = [(2, 3, 5), (1, 7)]                # odd image sizes: the unaligned layout, ragged last group
STATE_DTYPES = [torch.float32, torch.float64]
STREAM = 5


def _as(dtype: torch.dtype, value: float) -> float:
    """The value the plan would hold: a Python float exactly representable in dtype."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def _inputs(shape, state, seed=0):
    """Random non-zero inputs, and step values (t_hat, t_next, noise_scale) exact in the state dtype."""
    g = torch.Generator().manual_seed(seed)

    def rand(scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.1).to(DEVICE, state)

    u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
    t_hat = _as(state, 1.0 + 9.0 * u[0])
    inp = {
        "x": rand(3.0), "d": rand(), "xn": rand(2.0), "dm": rand(), "dg": rand(),
        "seeds": torch.tensor([7, -3, 2**40 + 1, 5][: shape[0]], dtype=torch.int64, device=DEVICE),
    }
    return inp, (t_hat, _as(state, t_hat * (0.2 + 0.7 * u[1])), _as(state, 0.1 + u[2]))


def _scalars(w, t_hat, t_next, noise_scale, stream):
    """The device tensor of one step (w and noise_scale stored as 0 where the step has none)."""
    values = [0.0 if w is None else w, t_hat, t_next, 0.0 if noise_scale is None else noise_scale, float(stream)]
    return torch.tensor(values, dtype=torch.float64, device=DEVICE)


def _call(op, inp, w, t_hat, t_next, noise_scale, stream, churn, write_d=True, scalars=None):
    """One op call; churn fuses the Philox churn with noise_scale and stream."""
    dg = inp["dg"] if w is not None else None
    seeds = inp["seeds"] if churn else None
    ns = noise_scale if churn else None
    if op == "euler":
        return OPS.euler_step(inp["x"], inp["dm"], dg, w, t_hat, t_next, seeds, ns, stream, None, write_d,
                              scalars=scalars)
    return OPS.heun_step(inp["x"], inp["d"], inp["xn"], inp["dm"], dg, w, t_hat, t_next, seeds, ns, stream, None,
                         scalars=scalars)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("state", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("op", ["euler", "heun"])
def test_scalars_are_bit_identical_to_python_floats(op, state, shape):
    inp, (t_hat, t_next, ns) = _inputs(shape, state)
    # Both lerp branches (|w| >= 0.5 and < 0.5) and unguided; with and without the fused churn.
    for w in (_as(state, 2.1), _as(state, 0.3), None):
        for churn in (False, True):
            for write_d in (True, False) if op == "euler" else (True,):
                want = _call(op, inp, w, t_hat, t_next, ns, STREAM, churn, write_d)
                got = _call(op, inp, w, t_hat, t_next, ns, STREAM, churn, write_d,
                            scalars=_scalars(w, t_hat, t_next, ns, STREAM))
                assert _same(got, want), f"{op}: w={w}, churn={churn}, write_d={write_d}"


@pytest.mark.parametrize("state", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("op", ["euler", "heun"])
def test_kernel_reads_the_tensor_not_the_python_values(op, state):
    inp, (t_hat, t_next, ns) = _inputs((2, 3, 5), state, seed=1)
    python = [_as(state, 2.1), t_hat, t_next, ns, STREAM]
    # Other values of each scalar, one at a time: w in the same lerp branch (the Python w picks it),
    # a stream >= 2^31 (the float64 -> uint32 conversion of the Philox counter word).
    other = [_as(state, 1.7), _as(state, t_hat * 1.25), _as(state, t_next * 0.5), _as(state, ns * 3.0), 2**32 - 3]
    original = _call(op, inp, *python, churn=True)
    for index in range(5):
        values = list(python)
        values[index] = other[index]
        want = _call(op, inp, *values, churn=True)
        got = _call(op, inp, *python, churn=True, scalars=_scalars(*values))
        name = ["w", "t_hat", "t_next", "noise_scale", "stream"][index]
        assert _same(got, want), f"{op}: {name} from the tensor"
        assert not _same(got, original), f"{op}: {name} of the tensor changed nothing"


def _bad_scalars():
    good = torch.zeros(5, dtype=torch.float64, device=DEVICE)
    cases = {
        "float32": (TypeError, good.float()),
        "4 elements": (ValueError, good[:4]),
        "2-D": (ValueError, good.reshape(1, 5)),
        "non-contiguous": (ValueError, torch.zeros(10, dtype=torch.float64, device=DEVICE)[::2]),
        "meta device": (ValueError, torch.zeros(5, dtype=torch.float64, device="meta")),
    }
    if CUDA:
        cases["cpu device"] = (ValueError, good.cpu())
    return cases


@pytest.mark.parametrize("case", list(_bad_scalars()))
@pytest.mark.parametrize("op", ["euler", "heun"])
def test_bad_scalars_raise(op, case):
    error, scalars = _bad_scalars()[case]
    x = torch.randn(2, 3, 5, device=DEVICE)
    with pytest.raises(error, match="^scalars: expected a contiguous float64 tensor of shape \\[5\\]"):
        _call(op, {"x": x, "d": x, "xn": x, "dm": x}, None, 1.0, 0.5, None, 0, False, scalars=scalars)


@pytest.mark.parametrize("stream", [-1.0, 2.0**32, 2.0**32 + 3, float("nan")])
def test_a_stream_outside_its_range_is_refused_on_the_host_and_reads_as_0_on_a_gpu(stream):
    # (It used to wrap: 2^32 + 3 drew stream 3's noise, -1 the labels stream's.)
    x = torch.randn(2, 3, 5, device=DEVICE)
    inp = {"x": x, "d": x, "xn": x, "dm": x, "seeds": torch.tensor([1, 2], device=DEVICE)}
    bad = _scalars(None, 1.0, 0.5, 0.3, stream)
    if bad.device.type == "cpu":  # Host memory (also under the GPU emulation): checked as the cpp ops check it.
        with pytest.raises(RuntimeError, match="scalars\\[4\\]: expected a Philox stream"):
            _call("euler", inp, None, 1.0, 0.5, 0.3, 0, True, scalars=bad)
        return
    zero = _call("euler", inp, None, 1.0, 0.5, 0.3, 0, True, scalars=_scalars(None, 1.0, 0.5, 0.3, 0))
    three = _call("euler", inp, None, 1.0, 0.5, 0.3, 0, True, scalars=_scalars(None, 1.0, 0.5, 0.3, 3))
    got = _call("euler", inp, None, 1.0, 0.5, 0.3, 0, True, scalars=bad)
    assert _same(got, zero) and not _same(got, three)


def test_fake_implementation_checks_the_scalars_too():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 5, device=DEVICE)
        bad = torch.empty(4, dtype=torch.float64, device=DEVICE)
        with pytest.raises(ValueError, match="^scalars:"):
            OPS.euler_step(x, x, None, None, 1.0, 0.5, None, None, 0, None, True, bad)
        with pytest.raises(ValueError, match="^scalars:"):
            OPS.heun_step(x, x, x, x, None, None, 1.0, 0.5, None, None, 0, None, bad)


def _opcheck_cases():
    x = torch.randn(2, 3, 5, device=DEVICE)
    dm = torch.randn(2, 3, 5, device=DEVICE).half()
    s = torch.tensor([3, -4], device=DEVICE)
    sc = _scalars(2.25, 3.0, 2.0, 0.5, 4)
    return {
        "euler_guided_churn": (OPS.euler_step.default, (x, dm, x + 1, 2.25, 3.0, 2.0, s, 0.5, 4, None, True, sc)),
        "euler_unguided_cast": (OPS.euler_step.default,
                                (x, dm, None, None, 3.0, 2.0, None, None, 0, torch.float16, False, sc)),
        "heun_churn": (OPS.heun_step.default, (x, x * 2, x * 3, dm, dm, 2.25, 3.0, 2.0, s, 0.5, 4, None, sc)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck_with_scalars(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@gpu
@needs_cuda
def test_gpu_one_captured_graph_replays_other_steps():
    inp, (t_hat, t_next, ns) = _inputs((4, 4, 64, 64), torch.float32)
    w = _as(torch.float32, 2.1)
    scalars = _scalars(w, t_hat, t_next, ns, STREAM)

    def step():
        d, x_next = OPS.euler_step(inp["x"], inp["dm"], inp["dg"], w, t_hat, t_next, None, None, 0, None, True,
                                   scalars)
        return OPS.heun_step(inp["x"], d, x_next, inp["dm"], inp["dg"], w, t_hat, t_next, inp["seeds"], ns, STREAM,
                             None, scalars)[0]

    graph, out = capture_after_warmup(step)
    for t_h, t_n, scale, stream in ((t_hat, t_next, ns, STREAM), (_as(torch.float32, 0.7), 0.5, 0.25, 2**31 + 9)):
        w2 = _as(torch.float32, 3.3)  # same lerp branch as the captured w
        scalars.copy_(_scalars(w2, t_h, t_n, scale, stream))
        graph.replay()
        d, x_next = OPS.euler_step(inp["x"], inp["dm"], inp["dg"], w2, t_h, t_n, None, None, 0, None, True)
        (want,) = OPS.heun_step(inp["x"], d, x_next, inp["dm"], inp["dg"], w2, t_h, t_n, inp["seeds"], scale, stream,
                                None)
        torch.cuda.synchronize()
        assert torch.equal(out, want)
