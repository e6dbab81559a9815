"""The fused Triton step ops against the reference's own tensor ops and a float64 truth.

Precision rule (flash-attention style): the kernel's max error against a float64 truth computed
from the same inputs is at most 2 × PyTorch's own same-dtype error + a small floor. Float32
states must in addition match the reference ops bit for bit (same roundings, no contraction).
Without CUDA the kernels run in Triton's interpreter on CPU tensors (small shapes only).
"""

from __future__ import annotations

import pytest
import torch

# First: skips without Triton, loads the kernels (in the interpreter without CUDA).
from .triton_interpreter import DEVICE, OPS, _triton_common, capture_after_warmup, gpu, needs_cuda, triton_step

SHAPES = [
    (1, 3, 37, 53),                                         # odd image, numel % 4 == 3
    (2, 3, 5, 7),                                           # two small odd images
    (2,),                                                   # 1-D toy: two images of one element
    (2, 4, 6, 6),                                           # numel % 4 == 0: the vectorised path
    (4, 3),                                                 # flat size % 4 == 0, image size % 4 != 0
    pytest.param((5, 4, 64, 64), marks=[gpu, needs_cuda]),  # the benchmark latent batch
]
NET_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=[gpu, needs_cuda])]
STATE_DTYPES = [torch.float32, torch.float64]
T_HAT, T_NEXT, SCALE, STREAM = 3.7, 2.9, 0.37, 6


def _as(dtype: torch.dtype, value: float) -> float:
    """The value the plan would hold: a Python float exactly representable in dtype."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def _inputs(shape, state, net, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(dtype, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.1).to(DEVICE, dtype)

    return {
        "x": rand(state, 3.0), "dm": rand(net), "dg": rand(net), "dm2": rand(net), "dg2": rand(net),
        "seeds": torch.tensor([7, -3, 2**40 + 1, 5, 11][: shape[0]], dtype=torch.int64, device=DEVICE),
    }


def _eps(seeds, shape, dtype):
    """The churn noise from the plain-torch generator (noise.philox_normal), not from a Triton op:
    the fused kernels share their noise code with the Triton philox op."""
    from autoguide_fast import noise

    numel = torch.Size(shape[1:]).numel()
    return noise.philox_normal(seeds.cpu(), numel, STREAM, dtype).reshape(shape).to(DEVICE)


def _reference(inp, state, compute, w, w2, churn_op):
    """(d, x_next, x_out) with the reference's ops in dtype ``compute`` (state: the reference itself;
    float64: the truth of the same inputs, with w exact)."""
    t_hat, t_next = _as(state, T_HAT), _as(state, T_NEXT)
    c = {k: v.to(compute) for k, v in inp.items() if k != "seeds"}
    th = torch.tensor(t_hat, dtype=compute, device=DEVICE)
    tn = torch.tensor(t_next, dtype=compute, device=DEVICE)

    def den(dm, dg, weight):
        return dm if weight is None else dg.lerp(dm, weight)

    d = (c["x"] - den(c["dm"], c["dg"], w)) / th
    x_next = c["x"] + (tn - th) * d
    d_prime = (x_next - den(c["dm2"], c["dg2"], w2)) / tn
    x_out = c["x"] + (tn - th) * (0.5 * d + 0.5 * d_prime)
    if churn_op is not None:
        eps = _eps(inp["seeds"], c["x"].shape, state).to(compute)
        scale = torch.tensor(_as(state, SCALE), dtype=compute, device=DEVICE)
        if churn_op == "euler":
            x_next = x_next + scale * eps
        else:
            x_out = x_out + scale * eps
    return d, x_next, x_out


def _check(name, got, ref_state, truth, state):
    assert got.dtype == state and got.shape == truth.shape, name
    err = (got.to(torch.float64) - truth).abs().max().item()
    torch_err = (ref_state.to(torch.float64) - truth).abs().max().item()
    floor = 8 * torch.finfo(state).eps * (1 + truth.abs().max().item())
    assert err <= 2 * torch_err + floor, f"{name}: error {err:.3g} > 2 x torch {torch_err:.3g} + {floor:.3g}"
    if state == torch.float32:
        mismatches = (got != ref_state).sum().item()
        assert mismatches == 0, f"{name}: {mismatches} elements differ from the reference ops"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("net", NET_DTYPES, ids=str)
@pytest.mark.parametrize("state", STATE_DTYPES, ids=str)
def test_step_matches_reference(state, net, shape):
    inp = _inputs(shape, state, net)
    t_hat, t_next, scale = _as(state, T_HAT), _as(state, T_NEXT), _as(state, SCALE)
    # (w, w2, churn fused into): unguided, both lerp branches, a negative weight, fused churn.
    # The lerp branch edge too: |w| < 1/2 takes the first branch, 1/2 itself the second (as torch),
    # decided on the weight in the state dtype (0.49999999 is 1/2 in float32, below it in float64).
    for w, w2, churn_op in ((None, None, None), (0.3, 2.1, None), (2.1, -0.7, "heun"), (None, 1.7, "euler"),
                            (0.5, -0.5, None), (0.4999999701976776, 0.5000000596046448, None),
                            (0.49999999, -0.49999999, None)):  # Rounded to +-1/2 in float32: branch 2.
        ref = _reference(inp, state, state, w, w2, churn_op)
        truth = _reference(inp, state, torch.float64, w, w2, churn_op)
        seeds = inp["seeds"] if churn_op == "euler" else None
        d, x_next = OPS.euler_step(
            inp["x"], inp["dm"], inp["dg"] if w is not None else None, w, t_hat, t_next,
            seeds, scale if seeds is not None else None, STREAM, None, True,
        )
        tag = f"w={w}, w2={w2}, churn={churn_op}"
        _check(f"d ({tag})", d, ref[0], truth[0], state)
        _check(f"x_next ({tag})", x_next, ref[1], truth[1], state)
        if churn_op == "euler":
            continue  # x_next already churned: not the Heun input.
        seeds = inp["seeds"] if churn_op == "heun" else None
        (x_out,) = OPS.heun_step(
            inp["x"], d, x_next, inp["dm2"], inp["dg2"] if w2 is not None else None, w2, t_hat, t_next,
            seeds, scale if seeds is not None else None, STREAM, None,
        )
        _check(f"x_out ({tag})", x_out, ref[2], truth[2], state)


@pytest.mark.parametrize("state", STATE_DTYPES, ids=str)
def test_churn_op_matches_reference(state):
    shape = (2, 3, 5, 7)
    inp = _inputs(shape, state, state)
    scale = _as(state, SCALE)
    scale_t = torch.tensor(scale, dtype=state, device=DEVICE)
    (from_seeds,) = OPS.churn(inp["x"], scale, inp["seeds"], None, STREAM, None)
    ref = inp["x"] + scale_t * _eps(inp["seeds"], shape, state)
    assert torch.equal(from_seeds, ref) if state == torch.float32 else torch.allclose(from_seeds, ref, 0, 1e-14)
    eps = inp["dm"]
    (from_eps,) = OPS.churn(inp["x"], scale, None, eps, STREAM, None)
    ref = inp["x"] + scale_t * eps
    assert torch.equal(from_eps, ref) if state == torch.float32 else torch.allclose(from_eps, ref, 0, 1e-14)


def test_fused_noise_is_the_reference_generator():
    from autoguide_fast import noise

    shape = (3, 2, 3, 5)
    x = torch.zeros(shape, dtype=torch.float64, device=DEVICE)
    seeds = torch.tensor([1, 2**63 - 1, -5], device=DEVICE)
    (out,) = OPS.churn(x, 1.0, seeds, None, noise.churn_stream(4), None)
    want = noise.philox_normal(seeds.cpu(), 30, noise.churn_stream(4), torch.float64).reshape(shape)
    assert (out.cpu() - want).abs().max().item() <= 1e-12


@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16, torch.float32])
def test_cast_output_is_the_rounded_state(cast):
    shape = (2, 3, 5, 7)
    inp = _inputs(shape, torch.float64, torch.float16)
    d, x_next, x_cast = OPS.euler_step(inp["x"], inp["dm"], inp["dg"], 2.1, T_HAT, T_NEXT,
                                       inp["seeds"], 0.2, STREAM, cast, True)
    assert x_cast.dtype == cast and torch.equal(x_cast, x_next.to(cast))
    x_out, x_out_cast = OPS.heun_step(inp["x"], d, x_next, inp["dm2"], None, None, T_HAT, T_NEXT,
                                      None, None, 0, cast)
    assert torch.equal(x_out_cast, x_out.to(cast))
    x_hat, x_hat_cast = OPS.churn(inp["x"], 0.5, inp["seeds"], None, STREAM, cast)
    assert torch.equal(x_hat_cast, x_hat.to(cast))


def test_heun_average_rounds_each_half_at_the_extremes():
    """x_out uses 0.5·d + 0.5·d' (each half rounded, as the reference), not (d + d')·0.5: they differ
    where a half underflows (the smallest subnormal) or the sum overflows (3e38 + 3e38)."""
    extremes = torch.tensor([2.0**-149, -(2.0**-149), 3e38, -3e38, 2.0**-126])
    d = torch.cat([extremes, torch.randn(7, generator=torch.Generator().manual_seed(1))]).reshape(1, -1).to(DEVICE)
    x_hat, D = torch.zeros_like(d), torch.zeros_like(d)
    (x_out,) = OPS.heun_step(x_hat, d, d.clone(), D, None, None, 2.0, 1.0, None, None, 0, None)
    one, two = torch.tensor(1.0, device=DEVICE), torch.tensor(2.0, device=DEVICE)
    ref = x_hat + (one - two) * (0.5 * d + 0.5 * ((d - D) / one))
    assert torch.equal(x_out, ref)
    assert x_out[0, 0] == 0 and x_out[0, 2] == -3e38  # Not -2^-149, not -inf: the check can fail.


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 3, 37, 53), (4, 3), (3,)], ids=str)
def test_no_write_past_the_outputs(shape, monkeypatch):
    """Every output is allocated here with a guard region after it (filled with a sentinel): the
    kernels' tail masks (per image with seeds, flat without) write nothing past the last element.
    A write past it would otherwise go unnoticed, or crash a later, unrelated call."""
    guard, sentinel, outputs = 64, -12345.0, []
    empty_like = torch.empty_like

    def guarded_empty_like(t, *args, **kwargs):
        dtype = kwargs.get("dtype") or t.dtype
        buf = torch.full((t.numel() + guard,), sentinel, dtype=dtype, device=t.device)
        outputs.append(buf)
        return buf[: t.numel()].view(t.shape)

    inp = _inputs(shape, torch.float32, torch.float32)
    monkeypatch.setattr(torch, "empty_like", guarded_empty_like)
    for seeds in (inp["seeds"], None):  # Per-image tiles (fused churn) and flat tiles.
        scale = SCALE if seeds is not None else None
        d, x_next, _ = OPS.euler_step(inp["x"], inp["dm"], inp["dg"], 2.1, T_HAT, T_NEXT, seeds, scale, STREAM,
                                      torch.float16, True)
        OPS.heun_step(inp["x"], d, x_next, inp["dm2"], inp["dg2"], 2.1, T_HAT, T_NEXT, seeds, scale, STREAM,
                      torch.float16)
    OPS.churn(inp["x"], SCALE, inp["seeds"], None, STREAM, None)
    OPS.churn(inp["x"], SCALE, None, inp["dm"], STREAM, None)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    assert len(outputs) == 12
    for buf in outputs:
        assert (buf[-guard:] == sentinel).all() and not (buf[:-guard] == sentinel).any()


def test_launch_geometry_flags_follow_the_shape():
    """The host's choice of kernel variant (the interpreter gives the same numbers with any, so only
    this check sees a wrong one): vector accesses when the rows are a multiple of 4 elements, 64-bit
    indices once 4 x groups could pass 2^31, the noise tile size for per-image (seeded) launches."""
    def flags(shape, per_image):
        return triton_step._geometry(torch.empty(shape, device="meta"), per_image)[2]

    C = _triton_common
    # An index past int32 is possible from 2^31 - 4 x GROUPS elements on (a tile's rounding): 64-bit there.
    assert flags((1, 2**31 - 4 * C.GROUPS), False)["WIDE"] and flags((3, 2**30), True)["WIDE"]
    assert not flags((1, 2**31 - 8 * C.GROUPS), False)["WIDE"]
    assert not flags((2, 3, 64, 64), False)["WIDE"]
    assert flags((2, 3, 4, 4), True)["ALIGNED"] and flags((4, 3), False)["ALIGNED"]
    assert not flags((4, 3), True)["ALIGNED"] and not flags((1, 3, 37, 53), True)["ALIGNED"]
    assert flags((2, 3, 64, 64), True)["GROUPS"] == C.GROUPS_NOISE != C.GROUPS
    assert flags((2, 3, 64, 64), False)["GROUPS"] == C.GROUPS


def test_write_d_false_returns_an_empty_d_and_the_same_x_next():
    inp = _inputs((2, 3, 5, 7), torch.float32, torch.float32)
    d, x_next = OPS.euler_step(inp["x"], inp["dm"], None, None, T_HAT, T_NEXT, None, None, 0, None, True)
    d_empty, x_next2 = OPS.euler_step(inp["x"], inp["dm"], None, None, T_HAT, T_NEXT, None, None, 0, None, False)
    assert d_empty.numel() == 0 and torch.equal(x_next, x_next2)


def test_non_contiguous_inputs_give_the_contiguous_result():
    shape = (2, 3, 7, 5)
    inp = _inputs(shape, torch.float32, torch.float16)
    # Same values, other memory layouts: a transposed view and a strided slice.
    x_t = inp["x"].transpose(-1, -2).contiguous().transpose(-1, -2)
    dm_s = torch.stack([inp["dm"], inp["dm"]], dim=-1)[..., 0]
    assert not x_t.is_contiguous() and not dm_s.is_contiguous()
    want = OPS.euler_step(inp["x"], inp["dm"], inp["dg"], 2.1, T_HAT, T_NEXT, inp["seeds"], 0.3, STREAM, None, True)
    got = OPS.euler_step(x_t, dm_s, inp["dg"], 2.1, T_HAT, T_NEXT, inp["seeds"], 0.3, STREAM, None, True)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    (want_h,) = OPS.heun_step(inp["x"], want[0], want[1], inp["dm"], None, None, T_HAT, T_NEXT, None, None, 0, None)
    (got_h,) = OPS.heun_step(x_t, want[0].transpose(-1, -2).contiguous().transpose(-1, -2), want[1], dm_s,
                             None, None, T_HAT, T_NEXT, None, None, 0, None)
    assert torch.equal(want_h, got_h)


def test_empty_batch():
    x = torch.zeros(0, 3, 4, device=DEVICE)
    d, x_next = OPS.euler_step(x, x, None, None, T_HAT, T_NEXT, None, None, 0, None, True)
    assert d.shape == x_next.shape == (0, 3, 4)


def _bad_calls():
    x = torch.randn(2, 3, 5, device=DEVICE)
    s = torch.tensor([1, 2], device=DEVICE)
    e = OPS.euler_step
    h = OPS.heun_step
    return [
        ("x_hat", TypeError, lambda: e(x.half(), x, None, None, 1.0, 0.5, None, None, 0, None, True)),
        ("x_hat", TypeError, lambda: e(x.long(), x, None, None, 1.0, 0.5, None, None, 0, None, True)),
        ("D_main", ValueError, lambda: e(x, x[:, :2], None, None, 1.0, 0.5, None, None, 0, None, True)),
        ("D_main", TypeError, lambda: e(x, x.int(), None, None, 1.0, 0.5, None, None, 0, None, True)),
        ("D_guide", ValueError, lambda: e(x, x, None, 2.0, 1.0, 0.5, None, None, 0, None, True)),
        ("D_guide", ValueError, lambda: e(x, x, x[:1], 2.0, 1.0, 0.5, None, None, 0, None, True)),
        ("w", ValueError, lambda: e(x, x, x, float("nan"), 1.0, 0.5, None, None, 0, None, True)),
        ("seeds", ValueError, lambda: e(x, x, None, None, 1.0, 0.5, s[:1], 0.3, 1, None, True)),
        ("seeds", TypeError, lambda: e(x, x, None, None, 1.0, 0.5, s.int(), 0.3, 1, None, True)),
        ("seeds, noise_scale", ValueError, lambda: e(x, x, None, None, 1.0, 0.5, s, None, 1, None, True)),
        ("stream", ValueError, lambda: e(x, x, None, None, 1.0, 0.5, s, 0.3, -1, None, True)),
        ("cast_dtype", TypeError, lambda: e(x, x, None, None, 1.0, 0.5, None, None, 0, torch.int8, True)),
        ("d", TypeError, lambda: h(x, x.double(), x, x, None, None, 1.0, 0.5, None, None, 0, None)),
        ("x_next", ValueError, lambda: h(x, x, x[0], x, None, None, 1.0, 0.5, None, None, 0, None)),
        ("eps", TypeError, lambda: OPS.churn(x, 0.5, None, x.double(), 0, None)),
        ("seeds, eps", ValueError, lambda: OPS.churn(x, 0.5, None, None, 0, None)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_arguments_raise_naming_the_argument(index):
    name, error, call = _bad_calls()[index]
    with pytest.raises(error, match=f"^{name}:"):
        call()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(_triton_common, "INTERPRETED", False)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="x_hat: triton kernels need a CUDA device, or TRITON_INTERPRET=1"):
        OPS.euler_step(x, x, None, None, 1.0, 0.5, None, None, 0, None, True)


def _opcheck_cases():
    x = torch.randn(2, 3, 5, device=DEVICE)
    dm = torch.randn(2, 3, 5, device=DEVICE).half()
    s = torch.tensor([3, -4], device=DEVICE)
    return {
        "euler_guided": (OPS.euler_step.default, (x, dm, x + 1, 2.1, 3.0, 2.0, None, None, 0, None, True)),
        "euler_churn_cast": (OPS.euler_step.default, (x, dm, None, None, 3.0, 2.0, s, 0.5, 4, torch.float16, False)),
        "heun_churn": (OPS.heun_step.default, (x, x * 2, x * 3, dm, dm, 0.3, 3.0, 2.0, s, 0.5, 4, None)),
        "churn_seeds": (OPS.churn.default, (x, 0.5, s, None, 3, None)),
        "churn_eps": (OPS.churn.default, (x, 0.5, None, x * 0.5, 3, torch.float16)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_ops_trace_into_one_graph_with_torch_compile():
    inp = _inputs((2, 3, 5, 7), torch.float32, torch.float16)

    def step(x, dm, dg, seeds):
        d, x_next = OPS.euler_step(x, dm, dg, 2.1, T_HAT, T_NEXT, None, None, 0, None, True)
        (x_out,) = OPS.heun_step(x, d, x_next, dm, dg, 2.1, T_HAT, T_NEXT, seeds, 0.3, 5, None)
        return x_out

    args = (inp["x"], inp["dm"], inp["dg"], inp["seeds"])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*args), step(*args))


@gpu
@needs_cuda
def test_gpu_ops_replay_in_a_cuda_graph():
    inp = _inputs((4, 4, 64, 64), torch.float32, torch.float16)
    static = {k: v.clone() for k, v in inp.items()}

    def step():
        d, x_next = OPS.euler_step(static["x"], static["dm"], static["dg"], 2.1, T_HAT, T_NEXT,
                                   None, None, 0, None, True)
        (x_out,) = OPS.heun_step(static["x"], d, x_next, static["dm2"], static["dg2"], 2.1, T_HAT, T_NEXT,
                                 static["seeds"], 0.3, 5, torch.float16)[:1]
        return x_out

    graph, out = capture_after_warmup(step)
    new = _inputs((4, 4, 64, 64), torch.float32, torch.float16, seed=1)
    for k in static:
        static[k].copy_(new[k])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())


@gpu
@needs_cuda
def test_gpu_inductor_compiles_around_the_ops():
    inp = _inputs((2, 4, 64, 64), torch.float32, torch.float16)

    def step(x, dm, dg, seeds):
        d, x_next = OPS.euler_step(x * 1.0, dm, dg, 2.1, T_HAT, T_NEXT, None, None, 0, None, True)
        (x_out,) = OPS.heun_step(x, d, x_next, dm, dg, 2.1, T_HAT, T_NEXT, seeds, 0.3, 5, None)
        return x_out

    args = (inp["x"], inp["dm"], inp["dg"], inp["seeds"])
    assert torch.equal(torch.compile(step, fullgraph=True)(*args), step(*args))


@gpu
@needs_cuda
def test_gpu_benchmark_helper_runs():
    for op in ("euler", "heun"):
        r = triton_step.benchmark((4, 4, 64, 64), op=op, churn_next=op == "heun", warmup=2, iters=5)
        assert r["ms"] > 0 and r["gbps"] > 0
