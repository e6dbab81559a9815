"""The "cpp" backend: fused C++ CPU ops against the reference, bit for bit and within tolerance.

The reference for a single op is the "torch" backend (the reference sampler's own tensor ops);
whole trajectories are compared with ``autoguide_fast.reference.edm_sampler``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import autoguide_fast
from autoguide_fast.backends import resolve_backend
from autoguide_fast.backends.torch_backend import TorchBackend
from autoguide_fast.noise import churn_stream, philox_normal
from autoguide_fast.plan import SamplerConfig, StepPlan, build_plan
from autoguide_fast.reference import edm_sampler as reference_sampler
from tests.benchmark_modules import load_benchmark

_HAS_EXT = autoguide_fast.extension() is not None
if _HAS_EXT:
    from autoguide_fast.ops import extension_ops as E

    _HAS_CPU = E.has_kernel("cpu")
else:
    _HAS_CPU = False

needs_cpp = pytest.mark.skipif(not _HAS_CPU, reason="the compiled extension (CPU kernels) is not loaded")

STATE_DTYPES = (torch.float32, torch.float64)
NET_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SHAPES = ((1, 3, 37, 53), (5, 4, 64, 64), (2,), (7, 2))
# |w| >= 1/2, |w| < 1/2 (both lerp branches), the branch edge (torch: |w| < 1/2 takes the first
# branch; the two differ in float32 on about a third of the elements at w = 1/2), unguided.
# And a weight that is 1/2 in float32 but below it in float64 (the branch is decided in the state dtype).
WEIGHTS = (2.1, 0.3, -0.7, 0.5, -0.5, 0.4999999701976776, 0.49999999, -0.49999999, None)


def _step(t_hat: float, t_next: float, dtype: torch.dtype, index: int = 3,
          noise_scale: float | None = None) -> StepPlan:
    """A plan step whose host floats are exact values of `dtype` (as build_plan makes them)."""
    th = torch.tensor(t_hat, dtype=dtype)
    tn = torch.tensor(t_next, dtype=dtype)
    tensors = {"t_cur": th, "t_hat": th, "t_next": tn}
    ns = None
    if noise_scale is not None:
        tensors["noise_scale"] = torch.tensor(noise_scale, dtype=dtype)
        ns = tensors["noise_scale"].item()
    return StepPlan(index=index, t_cur=th.item(), t_hat=th.item(), t_next=tn.item(), noise_scale=ns, w_first=None,
                    w_second=None, second_order=True, tensors=tensors)


def _inputs(shape, dtype, net_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    D_main = (x.double() * 0.8 + torch.randn(shape, generator=g, dtype=torch.float64)).to(net_dtype)
    D_guide = (x.double() * 0.6 + torch.randn(shape, generator=g, dtype=torch.float64)).to(net_dtype)
    return x, D_main, D_guide


def _fp64_step(x, D_main, D_guide, w, t_hat, t_next):
    """Euler and Heun in float64 from the same (rounded) inputs: the accuracy yardstick."""
    x, D1 = x.double(), D_main.double()
    D = D1 if w is None else D_guide.double() + w * (D1 - D_guide.double())
    d = (x - D) / t_hat
    x_next = x + (t_next - t_hat) * d
    d2 = (x_next - 0.9 * D) / t_next
    return d, x_next, x + (t_next - t_hat) * (0.5 * d + 0.5 * d2)


def assert_within_torch_error(out: torch.Tensor, torch_out: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """Kernel error vs float64 <= 2 x PyTorch's own same-dtype error + a floor of 4 ulp of the data."""
    err = (out.double() - exact).abs().max().item()
    torch_err = (torch_out.double() - exact).abs().max().item()
    floor = 4 * torch.finfo(out.dtype).eps * exact.abs().max().item()
    assert err <= 2 * torch_err + floor, f"{what}: error {err:.3e} > 2 x torch's {torch_err:.3e} + {floor:.3e}"


def test_tolerance_check_can_fail():
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    exact = x * 1.1
    good = exact.float()
    assert_within_torch_error(good, good, exact, "exact")
    with pytest.raises(AssertionError, match="error"):
        assert_within_torch_error(good + 1e-4, good, exact, "perturbed")


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("net_dtype", NET_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_ops_match_reference(dtype, net_dtype, shape):
    x, D_main, D_guide = _inputs(shape, dtype, net_dtype)
    step = _step(3.7, 2.9, dtype)
    ref = TorchBackend(dtype)
    fused = resolve_backend("cpp", torch.device("cpu"), dtype)
    for w in WEIGHTS:
        Dg = None if w is None else D_guide
        d_ref, xn_ref = ref.euler(x, D_main, Dg, w, step)
        d, xn = fused.euler(x, D_main, Dg, w, step)
        assert torch.equal(d, d_ref) and torch.equal(xn, xn_ref), f"euler w={w}"
        # Heun with a different network output at t_next.
        D_main2 = (D_main.double() * 0.9).to(net_dtype)
        Dg2 = None if w is None else (D_guide.double() * 0.9).to(net_dtype)
        h_ref = ref.heun(x, d_ref, xn_ref, D_main2, Dg2, w, step)
        h = fused.heun(x, d, xn, D_main2, Dg2, w, step)
        assert torch.equal(h, h_ref), f"heun w={w}"
        d64, xn64, _ = _fp64_step(x, D_main, Dg, w, step.t_hat, step.t_next)
        assert_within_torch_error(d, d_ref, d64, f"d w={w}")
        assert_within_torch_error(xn, xn_ref, xn64, f"x_next w={w}")


@needs_cpp
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_euler_need_d_false(dtype):
    """need_d=False (no Heun correction follows): the cpp backend returns d as None, the torch
    backend ignores the flag; x_next is the same bit for bit, with and without the fused churn."""
    x, D_main, D_guide = _inputs(SHAPES[0], dtype, dtype)
    step = _step(3.7, 2.9, dtype)
    nxt = _step(2.9, 2.0, dtype, index=4, noise_scale=0.75)
    seeds = torch.tensor([17], dtype=torch.int64)
    ref = TorchBackend(dtype)
    fused = resolve_backend("cpp", torch.device("cpu"), dtype)
    for w in WEIGHTS:
        Dg = None if w is None else D_guide
        d_ref, xn_ref = ref.euler(x, D_main, Dg, w, step)
        d_t, xn_t = ref.euler(x, D_main, Dg, w, step, need_d=False)
        assert torch.equal(d_t, d_ref) and torch.equal(xn_t, xn_ref), f"torch w={w}"
        d, xn = fused.euler(x, D_main, Dg, w, step, need_d=False)
        assert d is None and torch.equal(xn, xn_ref), f"cpp w={w}"
        churned = fused.euler(x, D_main, Dg, w, step, churn_next=(nxt, seeds))[1]
        d, xn = fused.euler(x, D_main, Dg, w, step, churn_next=(nxt, seeds), need_d=False)
        assert d is None and torch.equal(xn, churned), f"cpp churn_next w={w}"


@needs_cpp
@pytest.mark.parametrize("isa", ("avx2+fma", "baseline"))
@pytest.mark.parametrize("net_dtype", NET_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_euler_step_write_d_false(dtype, net_dtype, isa):
    """write_d=False: d comes back with 0 elements (state dtype) and x_next is bit-identical to the
    write_d=True result, guided and unguided, with and without the fused churn, in both ISAs."""
    previous = autoguide_fast.extension_info()["cpu_kernels"]
    if not autoguide_fast.extension().set_cpu_kernels(isa):
        pytest.skip(f"no {isa} kernels on this CPU")
    try:
        x, D_main, D_guide = _inputs((3, 5, 37, 11), dtype, net_dtype, seed=6)
        seeds = torch.tensor([4, -2, 99])
        for w in WEIGHTS:
            Dg = None if w is None else D_guide
            for churn in ((), (seeds, 0.65, 9)):
                d, xn = E.euler_step(x, D_main, Dg, 1.0 if w is None else w, 3.7, 2.9, *churn)
                d0, xn0 = E.euler_step(x, D_main, Dg, 1.0 if w is None else w, 3.7, 2.9, *churn, write_d=False)
                assert d.shape == x.shape and d0.shape == (0,) and d0.dtype == dtype, f"w={w} churn={bool(churn)}"
                assert torch.equal(xn0, xn), f"w={w} churn={bool(churn)}"
    finally:
        autoguide_fast.extension().set_cpu_kernels(previous)


@needs_cpp
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_baseline_kernels_match_reference(dtype):
    """The non-AVX2 variant of the kernels (picked on CPUs without FMA) is exact too."""
    previous = autoguide_fast.extension_info()["cpu_kernels"]
    assert autoguide_fast.extension().set_cpu_kernels("baseline")
    try:
        assert autoguide_fast.extension_info()["cpu_kernels"] == "baseline"
        x, D_main, D_guide = _inputs((3, 5, 7, 11), dtype, torch.float16)
        step = _step(1.3, 0.7, dtype)
        ref, fused = TorchBackend(dtype), resolve_backend("cpp", torch.device("cpu"), dtype)
        for w in WEIGHTS:
            Dg = None if w is None else D_guide
            d_ref, xn_ref = ref.euler(x, D_main, Dg, w, step)
            d, xn = fused.euler(x, D_main, Dg, w, step)
            assert torch.equal(d, d_ref) and torch.equal(xn, xn_ref)
            h_ref = ref.heun(x, d_ref, xn_ref, D_main, Dg, w, step)
            assert torch.equal(fused.heun(x, d, xn, D_main, Dg, w, step), h_ref)
    finally:
        autoguide_fast.extension().set_cpu_kernels(previous)


@needs_cpp
def test_half_conversion_exhaustive():
    """Every float16 bit pattern (subnormals, inf, NaN included) reaches the state as torch's .to()."""
    D_main = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    x = torch.zeros(D_main.shape, dtype=torch.float32)
    d, _ = E.euler_step(x, D_main, None, 1.0, 1.0, 0.5)
    torch.testing.assert_close(d, (x - D_main.float()) / 1.0, rtol=0, atol=0, equal_nan=True)


@needs_cpp
@pytest.mark.parametrize("cast_dtype", NET_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_euler_step_cast(dtype, cast_dtype):
    g = torch.Generator().manual_seed(1)
    # Magnitudes from far below the float16 subnormal range to beyond its maximum, and ties.
    mag = torch.exp(torch.empty(20000, dtype=torch.float64).uniform_(-25, 12, generator=g))
    x = (mag * torch.randn(20000, generator=g, dtype=torch.float64).sign()).to(dtype)
    x[:4] = torch.tensor([65520.0, 65519.0, 2.0**-25, 1 + 2.0**-11 + 2.0**-30], dtype=dtype)
    D = torch.randn(x.shape, generator=g).to(torch.float16)
    d, xn, xc = E.euler_step_cast(x, D, None, 1.0, 1.5, 0.25, cast_dtype)
    d_ref, xn_ref = TorchBackend(dtype).euler(x, D, None, None, _step(1.5, 0.25, dtype))
    assert torch.equal(d, d_ref) and torch.equal(xn, xn_ref)
    assert xc.dtype == cast_dtype and torch.equal(xc, xn_ref.to(cast_dtype))


@needs_cpp
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_fused_churn_matches_separate_ops(dtype):
    shape = (3, 3, 17, 9)  # 459 elements per image: not a multiple of 4 (partial Philox groups).
    x, D_main, D_guide = _inputs(shape, dtype, torch.float32)
    seeds = torch.tensor([11, -3, 2**62 + 5])
    step = _step(2.5, 1.75, dtype)
    nxt = _step(1.75 * 1.2, 1.1, dtype, index=step.index + 1, noise_scale=1.3)
    ref, fused = TorchBackend(dtype), resolve_backend("cpp", torch.device("cpu"), dtype)
    d_ref, xn_ref = ref.euler(x, D_main, D_guide, 2.1, step)
    h_ref = ref.churn(ref.heun(x, d_ref, xn_ref, D_main, D_guide, 2.1, step), nxt, seeds, None)
    e_ref = ref.churn(xn_ref, nxt, seeds, None)
    d, xn = fused.euler(x, D_main, D_guide, 2.1, step)
    h = fused.heun(x, d, xn, D_main, D_guide, 2.1, step, churn_next=(nxt, seeds))
    _, e = fused.euler(x, D_main, D_guide, 2.1, step, churn_next=(nxt, seeds))
    c = fused.churn(x, nxt, seeds, None)
    c_ref = ref.churn(x, nxt, seeds, None)
    if dtype == torch.float32:  # The float64 Box-Muller rounds to the same float32 everywhere.
        for a, b in ((h, h_ref), (e, e_ref), (c, c_ref)):
            assert torch.equal(a, b)
    # In float64, our polynomial ln/sin/cos and torch's vectorised library may differ by an ulp or two.
    for a, b in ((h, h_ref), (e, e_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert not torch.equal(a, xn_ref)
    # The churn really adds noise of the next step's stream with the next step's scale.
    eps = philox_normal(seeds, math.prod(shape[1:]), churn_stream(nxt.index), dtype).reshape(shape)
    torch.testing.assert_close((e - xn_ref) / nxt.noise_scale, eps, rtol=1e-5, atol=1e-5)


@needs_cpp
def test_churn_with_explicit_eps_is_exact():
    x, eps, _ = _inputs((2, 3, 5, 5), torch.float32, torch.float32)
    nxt = _step(2.0, 1.0, torch.float32, noise_scale=0.77)
    fused = resolve_backend("cpp", torch.device("cpu"), torch.float32)
    assert torch.equal(fused.churn(x, nxt, None, eps), x + nxt.tensors["noise_scale"] * eps)
    # An eps of another dtype would promote the state (the reference does): refused, naming randn_like.
    with pytest.raises(TypeError, match="randn_like: returned noise torch.float64"):
        fused.churn(x, nxt, None, eps.double())
    with pytest.raises(TypeError, match="randn_like: returned float, expected a tensor"):
        fused.churn(x, nxt, None, 0.5)


@needs_cpp
def test_non_contiguous_inputs():
    """The backend makes inputs contiguous; the ops themselves reject strided inputs clearly."""
    x, D_main, D_guide = _inputs((2, 6, 9, 5), torch.float32, torch.float16)
    xt, Dmt, Dgt = (t.transpose(1, 3) for t in (x, D_main, D_guide))
    step = _step(1.9, 1.2, torch.float32)
    ref, fused = TorchBackend(torch.float32), resolve_backend("cpp", torch.device("cpu"), torch.float32)
    d_ref, xn_ref = ref.euler(xt, Dmt, Dgt, 2.1, step)
    d, xn = fused.euler(xt, Dmt, Dgt, 2.1, step)
    assert torch.equal(d, d_ref) and torch.equal(xn, xn_ref)
    assert torch.equal(fused.heun(xt, d_ref.transpose(1, 3).contiguous().transpose(1, 3), xn_ref, Dmt, Dgt, 2.1, step),
                       ref.heun(xt, d_ref, xn_ref, Dmt, Dgt, 2.1, step))
    with pytest.raises(RuntimeError, match="x_hat: expected a contiguous tensor"):
        E.euler_step(xt, Dmt.contiguous(), None, 1.0, 1.9, 1.2)
    with pytest.raises(RuntimeError, match="D_guide: expected a contiguous tensor"):
        E.euler_step(x, D_main, D_guide.transpose(2, 3).contiguous().transpose(2, 3), 2.1, 1.9, 1.2)


@needs_cpp
def test_bad_inputs_raise_clear_errors():
    x, D_main, D_guide = _inputs((2, 3, 4, 4), torch.float32, torch.float32)
    seeds = torch.tensor([1, 2])
    cases = [
        (lambda: E.euler_step(x.half(), D_main, None, 1.0, 1.0, 0.5), "x_hat: expected the sampler state dtype"),
        (lambda: E.euler_step(x, D_main[:1], None, 1.0, 1.0, 0.5), "D_main: expected the shape of x_hat"),
        (lambda: E.euler_step(x, D_main.int(), None, 1.0, 1.0, 0.5), "D_main: expected dtype float32"),
        (lambda: E.euler_step(x, D_main, D_guide.half(), 2.0, 1.0, 0.5), "D_guide: expected the dtype of D_main"),
        (lambda: E.heun_step(x, x.double(), x, D_main, None, 1.0, 1.0, 0.5), "d: expected the dtype of x_hat"),
        (lambda: E.heun_step(x, x, x[:, :2], D_main, None, 1.0, 1.0, 0.5), "x_next: expected the shape of x_hat"),
        (lambda: E.euler_step(x, D_main, None, 1.0, 1.0, 0.5, seeds[:1], 1.0, 2), "seeds: expected one seed per image"),
        (lambda: E.euler_step(x, D_main, None, 1.0, 1.0, 0.5, seeds.int(), 1.0, 2), "seeds: expected dtype int64"),
        (lambda: E.euler_step(x, D_main, None, 1.0, 1.0, 0.5, seeds, 1.0, -1), "churn_stream: expected a Philox"),
        (lambda: E.churn(x, 1.0), "churn: expected exactly one noise source"),
        (lambda: E.churn(x, 1.0, seeds=seeds, eps=x), "churn: expected exactly one noise source"),
        (lambda: E.churn(x, 1.0, eps=x.double()), "eps: expected the dtype of x"),
        (lambda: E.philox_normal(seeds, 8, 0, torch.float16), "dtype: expected float32 or float64"),
        (lambda: E.philox_normal(seeds, -1, 0, torch.float32), "numel: expected a non-negative"),
        (lambda: E.philox4x32(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64)),
         "counter: expected an int64 tensor"),
        # Argument checks a mutation survived (each would read out of bounds or the wrong values):
        (lambda: E.euler_step(x, D_main, None, 1.0, 1.5, 1.0, seeds, 0.4, 2**32), "churn_stream: expected a Philox"),
        (lambda: E.churn(x, 0.4, seeds=seeds, stream=2**32), "stream: expected a Philox"),
        (lambda: E.philox_normal(seeds, 8, 2**32, torch.float32), "stream: expected a Philox"),
        (lambda: E.euler_step(x, D_main, None, 1.0, 1.5, 1.0, seeds[:, None], 0.4, 7), "seeds: expected a 1-D"),
        (lambda: E.churn(x, 0.4, seeds=torch.tensor([1, 9, 2, 9])[::2], stream=3), "seeds: expected a contiguous"),
        (lambda: E.philox4x32(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64)),
         "key: expected 3 rows"),
        (lambda: E.euler_step(x, D_main, D_guide[:1], 2.0, 1.5, 1.0), "D_guide: expected the shape of x_hat"),
        (lambda: E.heun_step(x, x, x, D_main, D_guide[:1], 2.0, 1.5, 1.0), "D_guide: expected the shape of x_hat"),
    ]
    # The largest stream is accepted.
    E.euler_step(x, D_main, None, 1.0, 1.5, 1.0, seeds, 0.4, 2**32 - 1)
    for fn, message in cases:
        with pytest.raises(RuntimeError, match=message):
            fn()
    fused = resolve_backend("cpp", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="D_guide: a guided evaluation"):
        fused.euler(x, D_main, None, 2.0, _step(1.0, 0.5, torch.float32))
    # A churn_next the fused op cannot inject (as the triton backend reports it).
    with pytest.raises(ValueError, match="churn_next: seeds are required"):
        fused.euler(x, D_main, None, None, _step(1.0, 0.5, torch.float32),
                    churn_next=(_step(0.5, 0.25, torch.float32, noise_scale=0.1), None))
    with pytest.raises(ValueError, match="churn_next: step 4 has no churn"):
        fused.heun(x, x, x, D_main, None, None, _step(1.0, 0.5, torch.float32),
                   churn_next=(_step(0.5, 0.25, torch.float32, index=4), seeds))


@needs_cpp
def test_empty_and_tiny_inputs():
    x = torch.empty(0, 3)
    d, xn = E.euler_step(x, x, None, 1.0, 1.0, 0.5, torch.empty(0, dtype=torch.int64), 1.0, 1)
    assert d.shape == (0, 3) and xn.shape == (0, 3)
    assert E.philox_normal(torch.tensor([5]), 0, 1, torch.float32).shape == (1, 0)
    one = torch.tensor([0.25])
    d, xn = E.euler_step(one, one * 2, None, 1.0, 0.5, 0.25)
    assert torch.equal(d, (one - one * 2) / 0.5)


OPCHECK_CASES = 13  # len(_opcheck_cases()), known at collection without the extension (checked below).


def _opcheck_cases():
    x, D_main, D_guide = _inputs((2, 3, 5, 7), torch.float32, torch.float16, seed=4)
    x64 = x.double()
    seeds = torch.tensor([3, 9])
    ops = torch.ops.autoguide_fast
    return [
        (ops.euler_step.default, (x, D_main, D_guide, 2.1, 1.5, 1.0)),
        (ops.euler_step.default, (x64, D_main, None, 1.0, 1.5, 1.0, seeds, 0.4, 7)),
        (ops.euler_step.default, (x, D_main, D_guide, 2.1, 1.5, 1.0, None, 0.0, 0, False)),
        (ops.euler_step.default, (x64, D_main, None, 1.0, 1.5, 1.0, seeds, 0.4, 7, False)),
        (ops.euler_step_cast.default, (x, D_main, D_guide, 0.3, 1.5, 1.0, torch.float16)),
        (ops.heun_step.default, (x, x * 0.5, x * 0.9, D_main, D_guide, 2.1, 1.5, 1.0)),
        (ops.heun_step.default, (x64, x64 * 0.5, x64, D_main, None, 1.0, 1.5, 1.0, seeds, 0.4, 7)),
        (ops.churn.default, (x, 0.5, seeds, 3, None)),
        (ops.churn.default, (x, 0.5, None, 0, x * 0.1)),
        (ops.philox_normal.default, (seeds, 37, 2, torch.float64)),
        (ops.philox4x32.default, (torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 6]]))),
        (ops.euler_step.default, (x, D_main, D_guide, 2.1, 1.5, 1.0, seeds, 0.4, 7, False, _scalars(2.1, 1.5, 1.0))),
        (ops.heun_step.default, (x, x * 0.5, x * 0.9, D_main, D_guide, 2.1, 1.5, 1.0, None, 0.0, 0,
                                 _scalars(0.3, 2.5, 1.0))),
    ]


def _scalars(w, t_hat, t_next, scale=0.0, stream=0):
    return torch.tensor([w, t_hat, t_next, scale, stream], dtype=torch.float64)


@needs_cpp
@pytest.mark.parametrize("churn", [False, True], ids=["no churn", "fused churn"])
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_ops_read_device_scalars_instead_of_the_floats(dtype, churn):
    """With `scalars`, the ops take w, t_hat, t_next and the churn's scale and stream from the
    tensor: equal to passing those values as floats, whatever the float arguments say."""
    x, D_main, D_guide = _inputs((3, 2, 5, 7), dtype, torch.float16, seed=9)
    d0 = torch.randn(x.shape, dtype=dtype)

    def exact(v):
        return torch.tensor(v, dtype=dtype).item()

    seeds = torch.tensor([4, -1, 2**45]) if churn else None
    for w in (exact(2.1), exact(0.3), None):
        dg = None if w is None else D_guide
        true = (1.0 if w is None else w, exact(2.5), exact(1.75), exact(0.6), 9)
        decoy = (1.7, 7.0, 3.0, 0.2, 2)
        for name in ("euler_step", "heun_step"):
            op = getattr(E, name)
            head = (x, D_main, dg) if name == "euler_step" else (x, d0, x * 0.5, D_main, dg)
            expected = op(*head, *true[:3], seeds, *true[3:])
            got = op(*head, *decoy[:3], seeds, *decoy[3:], scalars=_scalars(*true))
            wrong = op(*head, *decoy[:3], seeds, *decoy[3:])
            for e, g, o in zip(*(t if isinstance(t, tuple) else (t,) for t in (expected, got, wrong))):
                assert torch.equal(g, e), (name, w)
                assert not torch.equal(o, e)


@needs_cpp
def test_bad_device_scalars_raise_naming_scalars():
    x, D_main, D_guide = _inputs((2, 3), torch.float32, torch.float32, seed=2)
    good = _scalars(2.1, 1.5, 1.0)
    bad = [good.float(), good[:4], good.reshape(1, 5), torch.zeros(10, dtype=torch.float64)[::2],
           torch.empty(5, dtype=torch.float64, device="meta")]
    for scalars in bad:
        with pytest.raises(RuntimeError, match="scalars: expected"):
            E.euler_step(x, D_main, D_guide, 2.1, 1.5, 1.0, scalars=scalars)
        with pytest.raises(RuntimeError, match="scalars: expected"):
            E.heun_step(x, x, x, D_main, D_guide, 2.1, 1.5, 1.0, scalars=scalars)


@needs_cpp
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_heun_average_rounds_each_half_at_the_extremes(dtype):
    """x_out uses 0.5·d + 0.5·d' (each half rounded, as the reference), not (d + d')·0.5: they differ
    where a half underflows (the smallest subnormal) or the sum overflows."""
    info = torch.finfo(dtype)
    tiny, big = info.smallest_normal * info.eps, info.max * 0.9
    extremes = torch.tensor([tiny, -tiny, big, -big, info.smallest_normal], dtype=dtype)
    d = torch.cat([extremes, torch.randn(7, generator=torch.Generator().manual_seed(1), dtype=dtype)]).reshape(1, -1)
    x_hat, D = torch.zeros_like(d), torch.zeros_like(d)
    one, two = torch.tensor(1.0, dtype=dtype), torch.tensor(2.0, dtype=dtype)
    ref = x_hat + (one - two) * (0.5 * d + 0.5 * ((d - D) / one))
    assert torch.equal(E.heun_step(x_hat, d, d.clone(), D, None, 1.0, 2.0, 1.0), ref)
    assert ref[0, 0] == 0 and ref[0, 2] == -big  # Not -tiny, not -inf: the check can fail.


@needs_cpp
def test_the_fake_implementations_check_as_the_kernels_do():
    """On meta tensors (torch.compile's tracing) the ops refuse what the kernels refuse: a network
    output (main or guide) of another shape, device scalars that are not float64 [5]."""
    x = torch.empty(2, 3, device="meta")
    wrong = torch.empty(2, 4, device="meta")
    good, bad = torch.empty(5, dtype=torch.float64, device="meta"), torch.empty(5, device="meta")
    assert E.euler_step(x, x, x, 2.1, 1.5, 1.0, scalars=good)[1].shape == x.shape
    assert E.heun_step(x, x, x, x, x, 2.1, 1.5, 1.0, scalars=good).shape == x.shape
    for op, head in ((E.euler_step, (x,)), (E.heun_step, (x, x, x))):
        with pytest.raises(RuntimeError, match="D_main: expected shape"):
            op(*head, wrong, wrong, 2.1, 1.5, 1.0)
        with pytest.raises(RuntimeError, match="D_guide: expected shape"):
            op(*head, x, wrong, 2.1, 1.5, 1.0)
        with pytest.raises(RuntimeError, match="scalars: expected a float64"):
            op(*head, x, x, 2.1, 1.5, 1.0, scalars=bad)


@needs_cpp
@pytest.mark.parametrize("stream", [-1.0, 0.5, 2.0**32, 1e20, float("nan"), float("inf")])
def test_a_device_scalars_stream_outside_its_range_is_refused(stream):
    # (Converting it to an integer was undefined behaviour; it ran as some other stream.)
    x, D_main, _ = _inputs((2, 64), torch.float32, torch.float32, seed=3)
    seeds = torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="scalars\\[4\\]: expected a Philox stream"):
        E.euler_step(x, D_main, None, 1.0, 3.7, 2.9, seeds, 0.5, 0, True,
                     _scalars(1.0, 3.7, 2.9, 0.5, stream))
    E.euler_step(x, D_main, None, 1.0, 3.7, 2.9, seeds, 0.5, 0, True, _scalars(1.0, 3.7, 2.9, 0.5, 2.0**32 - 1))


@needs_cpp
@pytest.mark.parametrize("case", range(OPCHECK_CASES))
def test_opcheck(case):
    cases = _opcheck_cases()
    assert len(cases) == OPCHECK_CASES
    op, args = cases[case]
    torch.library.opcheck(op, args)


@needs_cpp
def test_torch_compile_fullgraph():
    x, D_main, D_guide = _inputs((2, 3, 8, 8), torch.float32, torch.float32, seed=5)
    seeds = torch.tensor([1, 2])

    def step(x, D_main, D_guide):
        d, xn = torch.ops.autoguide_fast.euler_step(x, D_main, D_guide, 2.1, 1.5, 1.0)
        _, last = torch.ops.autoguide_fast.euler_step(x, D_main, None, 1.0, 1.5, 0.0, write_d=False)
        return torch.ops.autoguide_fast.heun_step(x, d, xn, D_main, D_guide, 2.1, 1.5, 1.0, seeds, 0.3, 4), last

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got, want = compiled(x, D_main, D_guide), step(x, D_main, D_guide)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_cpp
def test_whole_sampler_runs_inside_a_callers_torch_compile():
    """fast_guided_sample inside a caller's torch.compile (Inductor) works; the fused ops are opaque,
    but Inductor computes the schedule (the official formula's ** rho) with its own rounding, so the
    result agrees with eager to rounding, not bit for bit (README)."""
    import torch._dynamo

    net, gnet = torch.compiler.disable(ToyNet(1)), torch.compiler.disable(ToyNet(2))
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))

    def sample(noise):
        return autoguide_fast.fast_guided_sample(net, noise, None, gnet, num_steps=5, guidance=2.1, S_churn=30.0,
                                                 seeds=[3, -7], backend="cpp")

    eager = sample(noise)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(sample)(noise)
    finally:
        torch._dynamo.reset()
    assert compiled.shape == eager.shape and _rel_l2(compiled, eager) < 1e-5, _rel_l2(compiled, eager)


# ---------------------------------------------------------------------------------------------
# Whole trajectories.
# ---------------------------------------------------------------------------------------------
class ToyNet:
    """A cheap, nonlinear, t-dependent denoiser (float32 body, output in `out_dtype`)."""

    def __init__(self, seed: int, out_dtype: torch.dtype = torch.float32) -> None:
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(3, generator=g)
        self.out_dtype = out_dtype
        self.calls = 0

    def __call__(self, x, t, labels=None):
        self.calls += 1
        xf, tf = x.float(), t.float()
        out = xf / (1 + tf * tf) + self.a[0] * torch.tanh(self.a[1] * xf + self.a[2]) * tf / (1 + tf)
        return out.to(self.out_dtype)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _seeded_randn_like(seeds: torch.Tensor, config: SamplerConfig):
    """randn_like for the reference sampler that draws the seeded churn noise of each churn step."""
    _, steps = build_plan(config, torch.device("cpu"))
    churn_steps = iter([s.index for s in steps if s.noise_scale is not None])

    def randn_like(x):
        return philox_normal(seeds, math.prod(x.shape[1:]), churn_stream(next(churn_steps)), x.dtype).reshape(x.shape)

    return randn_like


@needs_cpp
@pytest.mark.parametrize(
    "dtype,net_dtype,guidance,churn",
    [
        (torch.float32, torch.float32, 2.1, 0),
        (torch.float32, torch.float16, 1.0, 0),
        (torch.float32, torch.bfloat16, 0.3, 30),
        (torch.float64, torch.float32, 2.1, 30),
        (torch.float64, torch.float16, 2.1, 0),
        (torch.float32, torch.float32, 2.1, 30),
    ],
)
def test_trajectory_matches_reference(dtype, net_dtype, guidance, churn):
    shape = (3, 2, 9, 7)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    net, gnet = ToyNet(1, net_dtype), ToyNet(2, net_dtype)
    kwargs = dict(num_steps=9, sigma_max=20.0, guidance=guidance, S_churn=churn, S_min=0.05, S_max=10.0, dtype=dtype)
    seeds = torch.tensor([5, 6, 7])
    config = SamplerConfig(num_steps=9, sigma_max=20.0, guidance=guidance, S_churn=churn, S_min=0.05, S_max=10.0,
                           dtype=dtype)
    ref = reference_sampler(net, noise, None, gnet, randn_like=_seeded_randn_like(seeds, config), **kwargs)
    out = autoguide_fast.fast_guided_sample(net, noise, None, gnet, seeds=seeds if churn else None, backend="cpp",
                                            **kwargs)
    assert out.dtype == dtype
    assert _rel_l2(out, ref) <= 1e-6
    # Bit for bit, except float64 with seeded noise (our ln/sin/cos vs torch's: an ulp or two), which
    # is within float64 rounding (a float32 rounding anywhere, e.g. of the churn scale, is ~1e-7).
    if dtype == torch.float32 or not churn:
        assert torch.equal(out, ref)
    else:
        assert _rel_l2(out, ref) <= 1e-12


@needs_cpp
@pytest.mark.parametrize("solver,interval", [("euler", None), ("heun", (0.5, 5.0))])
def test_trajectory_euler_solver_and_interval_match_torch_backend(solver, interval):
    noise = torch.randn((2, 3, 6, 6), generator=torch.Generator().manual_seed(3))
    net, gnet = ToyNet(1), ToyNet(2)
    kwargs = dict(num_steps=8, guidance=2.5, S_churn=20, dtype=torch.float32, seeds=[1, 2], solver=solver,
                  guidance_interval=interval)
    ref = autoguide_fast.fast_guided_sample(net, noise, None, gnet, backend="torch", **kwargs)
    out = autoguide_fast.fast_guided_sample(net, noise, None, gnet, backend="cpp", **kwargs)
    assert torch.equal(out, ref)


@needs_cpp
@pytest.mark.parametrize("main_dtype,guide_dtype", [(torch.float16, torch.bfloat16), (torch.float16, torch.float32),
                                                    (torch.float32, torch.float64)], ids=str)
def test_trajectory_with_network_outputs_of_two_dtypes_matches_torch_backend(main_dtype, guide_dtype):
    """Main and guide networks returning different dtypes (e.g. an fp16 main and a bf16 guide): the
    kernels read one dtype, so both are cast to the state dtype, as the reference's .to(dtype)."""
    noise = torch.randn((2, 3, 5, 7), generator=torch.Generator().manual_seed(4))
    net, gnet = ToyNet(1, main_dtype), ToyNet(2, guide_dtype)
    kwargs = dict(num_steps=6, guidance=2.1, S_churn=20, seeds=[3, 4], dtype=torch.float32)
    ref = autoguide_fast.fast_guided_sample(net, noise, None, gnet, backend="torch", **kwargs)
    out = autoguide_fast.fast_guided_sample(net, noise, None, gnet, backend="cpp", **kwargs)
    assert torch.equal(out, ref)


@needs_cpp
def test_an_explicit_randn_like_is_used_instead_of_the_seeds():
    """Given both, the churn noise comes from randn_like, as in the official sampler (README)."""
    noise = torch.randn((2, 3, 5, 7), generator=torch.Generator().manual_seed(5))
    net, gnet = ToyNet(1), ToyNet(2)
    kwargs = dict(num_steps=5, guidance=2.1, S_churn=20)
    torch.manual_seed(9)
    ref = reference_sampler(net, noise, None, gnet, randn_like=torch.randn_like, **kwargs)
    torch.manual_seed(9)
    out = autoguide_fast.fast_guided_sample(net, noise, None, gnet, seeds=[1, 2], randn_like=torch.randn_like,
                                            backend="cpp", **kwargs)
    assert torch.equal(out, ref)


@needs_cpp
def test_drop_in_edm_sampler_is_exact_on_cpu(monkeypatch):
    """autoguide_fast.edm_sampler (backend "auto" -> "cpp" on CPU) == the reference, with churn from
    torch.randn_like (the global RNG, reseeded before each run). A custom randn_like would route
    "auto" to the torch loop (see test_sampler_api), so it is not used here; the spy checks which
    backend ran."""
    from autoguide_fast import sampler as sampler_module

    used = []

    def spy(name, device, dtype):
        backend = resolve_backend(name, device, dtype)
        used.append(backend.name)
        return backend

    monkeypatch.setattr(sampler_module, "resolve_backend", spy)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    net, gnet = ToyNet(3), ToyNet(4)
    kwargs = dict(num_steps=7, guidance=1.7, S_churn=40, S_min=0.01, S_max=50)
    torch.manual_seed(9)
    ref = reference_sampler(net, noise, None, gnet, **kwargs)
    torch.manual_seed(9)
    out = autoguide_fast.edm_sampler(net, noise, None, gnet, **kwargs)
    assert used == ["cpp"]
    assert torch.equal(out, ref)
    torch.manual_seed(10)
    assert not torch.equal(autoguide_fast.edm_sampler(net, noise, None, gnet, **kwargs), ref)  # Churn drew.


# ---------------------------------------------------------------------------------------------
# Registry and the absent extension.
# ---------------------------------------------------------------------------------------------
def test_registry_reports_cpp_and_cuda():
    status = autoguide_fast.backends()
    assert status["cpp"].available == _HAS_EXT
    if _HAS_EXT:
        from autoguide_fast.backends import cpp_backend, cuda_backend

        assert cpp_backend.supports(torch.device("cpu"), torch.float32) is None
        assert "CPU tensors only" in cpp_backend.supports(torch.device("cuda"), torch.float32)
        assert "float32 or float64" in cpp_backend.supports(torch.device("cpu"), torch.float16)
        assert "CUDA tensors only" in cuda_backend.supports(torch.device("cpu"), torch.float32)
        assert resolve_backend("auto", torch.device("cpu"), torch.float64).name == "cpp"
        if not autoguide_fast.extension_info()["cuda"]:
            assert not status["cuda"].available and "without CUDA" in status["cuda"].reason
    else:
        assert "not loaded" in status["cpp"].reason
    # The kernel probe that gates this file's tests agrees with the build (were it wrong, the tests
    # would skip silently): CPU kernels in every build, CUDA kernels exactly in a CUDA build.
    if _HAS_EXT:
        assert _HAS_CPU and status["cpp"].available
        assert E.has_kernel("cuda") == bool(autoguide_fast.extension_info()["cuda"])
        assert not E.has_kernel("mps")


@pytest.mark.skipif(os.environ.get("AUTOGUIDE_FAST_DISABLE_EXTENSION") == "1", reason="already simulating")
def test_without_extension_import_and_suite_pass():
    """With the extension disabled: the package imports, "auto" falls back, this suite passes."""
    env = dict(os.environ, AUTOGUIDE_FAST_DISABLE_EXTENSION="1")
    script = (
        "import torch, autoguide_fast as a\n"
        "s = a.backends()\n"
        "assert not s['cpp'].available and 'AUTOGUIDE_FAST_DISABLE_EXTENSION' in s['cpp'].reason, s['cpp']\n"
        "assert not s['cuda'].available\n"
        "net = lambda x, t, labels: x / (1 + t * t)\n"
        "x = a.fast_guided_sample(net, torch.randn(2, 3, 4, 4), num_steps=4)\n"
        "assert x.shape == (2, 3, 4, 4)\n"
        "try:\n"
        "    a.fast_guided_sample(net, torch.randn(2, 3), num_steps=4, backend='cpp')\n"
        "    raise SystemExit('backend=cpp should have raised')\n"
        "except RuntimeError as e:\n"
        "    assert 'not available' in str(e), e\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr
    here = os.path.dirname(os.path.abspath(__file__))
    # The files that choose or name backends (the rest of the suite does not depend on the extension;
    # the whole suite without it was checked by hand: it passes).
    files = ("test_cpp_backend.py", "test_noise.py", "test_sampler_api.py", "test_validation.py",
             "test_engine_cpu.py", "test_buckets.py", "test_random_configurations.py")
    tests = [os.path.join(here, name) for name in files]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_bench_step_runs(tmp_path):
    """benchmarks/bench_step.py keeps working (tiny sizes; its numbers mean nothing here)."""
    bench = load_benchmark("bench_step")
    out = tmp_path / "step.csv"
    backends = "cpp,torch" if _HAS_CPU else "torch"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--device", "cpu", "--backends", backends, "--sizes", "4K", "--samples", "2",
                           "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = bench.common.read_rows(out)
    assert {r["backend"] for r in rows} == set(backends.split(",")) | {"randn_like"}
    assert {r["op"] for r in rows if r["backend"] == "randn_like"} == {"seeded_noise"}
    assert {r["op"] for r in rows} == set(bench.OPS)
    for r in rows:
        assert r["status"] == "ok" and float(r["p50_ms"]) > 0 and float(r["gbps"]) > 0 and int(r["bytes"]) > 0
    # The step-op targets: judged from the rows they apply to (never asserted by the benchmark).
    gpu = [{**r, "device_type": "cuda", "numel": str(16 << 20), "backend": "cuda", "frac_of_copy": frac,
            "speedup_vs_torch": speedup} for r, frac, speedup in zip(rows[:2], ("0.91", "0.80"), ("3.5", "4.0"))]
    verdicts = [(t, m, v) for _, _, _, t, m, v in bench.step_targets(gpu)]
    assert verdicts == [
        (">= 85% of copy bandwidth", "91.0%", "MET"), (">= 3x the unfused torch sequence", "3.50x", "MET"),
        (">= 85% of copy bandwidth", "80.0%", "not met"), (">= 3x the unfused torch sequence", "4.00x", "MET"),
    ]
    assert bench.step_targets([{**gpu[0], "numel": str(1 << 20)}]) == []  # Below 16M: no GPU target.
    assert "none applies" in bench.format_step_targets(rows)  # 4K elements on a CPU: no target either.


def test_bench_step_keeps_the_ops_measured_before_an_interrupt(tmp_path, monkeypatch):
    """The GPU check stops the step stage with SIGINT at its limit: the finished ops are in the CSV."""
    bench = load_benchmark("bench_step")
    call = bench.Workload.call

    def interrupting(self, backend, op):
        if op == "heun_guided":
            raise KeyboardInterrupt
        return call(self, backend, op)

    monkeypatch.setattr(bench.Workload, "call", interrupting)
    out = tmp_path / "step.csv"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--device", "cpu", "--backends", "torch", "--sizes", "4K", "--samples", "2",
                           "--threads", "1", "--out", str(out)]) == 130
    finally:
        torch.set_num_threads(threads)
    assert [r["op"] for r in bench.common.read_rows(out)] == ["euler_unguided", "euler_guided", "euler_guided_last"]


_NOISE_MATH_HARNESS = r"""
#include "cpu_noise.h"
#include <cmath>
#include <cstdio>
// Every input the noise specification can give: u = m 2^-24 (m = 1 .. 2^24) for ln, and
// θ = 2π u (rounded) for sin and cos; errors in ulps of float64 against long double references.
static double ulps(double ours, long double ref) {
  const double r = static_cast<double>(ref);
  const double ulp = std::nextafter(std::fabs(r), INFINITY) - std::fabs(r);
  return static_cast<double>(std::fabs(static_cast<long double>(ours) - ref)) / ulp;
}
int main() {
  double worst_log = 0, worst_sin = 0, worst_cos = 0;
  for (unsigned m = 1; m <= (1u << 24); ++m) {
    const double u = m * 0x1p-24;
    const long double ln = logl(static_cast<long double>(u));
    const double ours = agf::noise_log(u);
    if (ln == 0) {
      if (ours != 0) { std::printf("ln(1) = %a\n", ours); return 1; }
    } else if (ulps(ours, ln) > worst_log) {
      worst_log = ulps(ours, ln);
    }
    const double theta = 6.283185307179586 * u;
    double s, c;
    agf::noise_sincos(theta, s, c);
    const double es = ulps(s, sinl(static_cast<long double>(theta)));
    const double ec = ulps(c, cosl(static_cast<long double>(theta)));
    if (es > worst_sin) worst_sin = es;
    if (ec > worst_cos) worst_cos = ec;
  }
  std::printf("%.6f %.6f %.6f\n", worst_log, worst_sin, worst_cos);
  return 0;
}
"""


def _host_program(tmp_path, name: str, source: str, flags: list[str]) -> str:
    """``source`` (a C++ program including csrc/ headers) compiled for the host: the binary's path."""
    import shutil

    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    path, binary = tmp_path / f"{name}.cpp", tmp_path / name
    path.write_text(source)
    subprocess.run([compiler, *flags, "-I", csrc, str(path), "-o", str(binary)], check=True, capture_output=True,
                   timeout=120)
    return str(binary)


def test_noise_log_sin_cos_are_within_an_ulp_and_a_half_on_every_input(tmp_path):
    """The CPU kernels' branch-free ln/sin/cos (csrc/cpu_noise.h), checked exhaustively: all 2^24
    uniforms of the noise specification and their angles, against long double references."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("long double is the 80-bit x87 format only on x86-64 (elsewhere it may be float64)")
    binary = _host_program(tmp_path, "noise_math", _NOISE_MATH_HARNESS, ["-O2", "-ffp-contract=off", "-fno-math-errno"])
    run = subprocess.run([binary], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    worst_log, worst_sin, worst_cos = map(float, run.stdout.split())
    assert worst_log <= 1.5 and worst_sin <= 1.5 and worst_cos <= 1.5, run.stdout


_PHILOX_GROUP_HARNESS = r"""
#include <cinttypes>
#include <cstdio>
#include "step_math.h"
int main() {
  const int64_t seeds[] = {7, -3, (int64_t{1} << 40) + 1};
  const uint64_t groups[] = {5, (uint64_t{1} << 32) + 5, (uint64_t{3} << 32) + 0xFFFFFFFFu};
  for (int64_t seed : seeds)
    for (uint64_t g : groups) {
      const agf::Words4 w = agf::philox_group(seed, g, 9u);
      std::printf("%" PRId64 " %" PRIu64 " %u %u %u %u\n", seed, g, w.r[0], w.r[1], w.r[2], w.r[3]);
    }
  return 0;
}
"""


def test_philox_group_counter_holds_the_high_word_of_the_group(tmp_path):
    """The header's counter for group g is (g mod 2^32, g >> 32, stream, 0), as the specification
    (autoguide_fast/noise.py) says: groups past 2^32 (images over 2^34 elements, which no test can
    allocate) are checked on the header function itself, compiled for the host."""
    from autoguide_fast.noise import philox4x32

    binary = _host_program(tmp_path, "philox_group", _PHILOX_GROUP_HARNESS, ["-O1", "-std=c++17"])
    lines = subprocess.run([binary], capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
    rows = [list(map(int, line.split())) for line in lines if line]
    assert len(rows) == 9
    for seed, g, *words in rows:
        key = seed % 2**64
        t = [torch.tensor(v, dtype=torch.int64) for v in (g % 2**32, g >> 32, 9, 0, key % 2**32, key >> 32)]
        want = [int(v) for v in philox4x32(tuple(t[:4]), tuple(t[4:]))]
        assert words == want, (seed, g)


@needs_cpp
@pytest.mark.parametrize("isa", ["avx2+fma", "baseline"])
def test_noise_with_thread_chunks_starting_inside_a_philox_group(isa):
    """The threads' chunks can start mid-image at an element that is not a multiple of 4 (inside a
    Philox group of 4 normals): the noise is the same for every thread count, including the counts
    and image sizes that put such a start at element % 4 = 1, 2 and 3."""
    previous, threads = autoguide_fast.extension_info()["cpu_kernels"], torch.get_num_threads()
    if not autoguide_fast.extension().set_cpu_kernels(isa):
        pytest.skip(f"no {isa} kernels on this CPU")
    try:
        seeds = torch.tensor([7, -3])
        for numel in (6145, 6147, 10007):
            want = philox_normal(seeds, numel, 5, torch.float64).float()
            for n in (1, 3, 5):
                torch.set_num_threads(n)
                assert torch.equal(E.philox_normal(seeds, numel, 5, torch.float32), want), (numel, n)
    finally:
        torch.set_num_threads(threads)
        autoguide_fast.extension().set_cpu_kernels(previous)


@needs_cpp
@pytest.mark.parametrize("isa", ("avx2+fma", "baseline"))  # AVX2: Philox words by intrinsics, 8 groups at once.
def test_cpu_noise_equals_the_specification_in_float32_on_millions_of_values(isa):
    """The vectorised CPU noise against the torch reference of autoguide_fast/noise.py: the same
    float32 values (the ~1-ulp float64 differences of ln/sin/cos cross a float32 rounding boundary
    only at a tie, about 1 value in 10^9 measured, none among these), and float64 within a few ulps.
    An image size that is not a multiple of 32 elements leaves partial vectors of Philox groups at
    the ends of the blocks."""
    previous = autoguide_fast.extension_info()["cpu_kernels"]
    if not autoguide_fast.extension().set_cpu_kernels(isa):
        pytest.skip(f"no {isa} kernels on this CPU")
    try:
        seeds = torch.tensor([0, 1, 123456789, (1 << 40) + 7, -5])
        numel = (1 << 19) + 13
        for stream in (0, 0xFFFFFFFF):
            ref = philox_normal(seeds, numel, stream, torch.float64)
            out64 = E.philox_normal(seeds, numel, stream, torch.float64)
            assert (out64 - ref).abs().max().item() <= 4 * torch.finfo(torch.float64).eps * ref.abs().max().item()
            assert torch.equal(E.philox_normal(seeds, numel, stream, torch.float32), ref.float())
    finally:
        autoguide_fast.extension().set_cpu_kernels(previous)
