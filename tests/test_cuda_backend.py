"""The "cuda" backend: fused CUDA C++ ops.

GPU tests (marked ``gpu``; skipped without a CUDA device or a CUDA build): the kernels run the same
sequence of correctly rounded IEEE operations as the C++ CPU kernels, so for the deterministic ops
the CUDA result must equal the CPU reference bit for bit; the seeded noise goes through the
device's float64 log/sin/cos and is checked within 1e-6 of the reference.

CPU tests (wherever a host compiler and the CUDA headers exist): csrc/cuda/emulate_host.cpp runs
the very kernels of csrc/cuda/step_kernels.cu on the CPU, thread by thread, which checks their
indexing, vector accesses, grid-stride loops and noise grouping without a GPU.
"""

from __future__ import annotations

import ctypes
import math
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

import autoguide_fast
from autoguide_fast.backends import resolve_backend
from autoguide_fast.backends.torch_backend import TorchBackend
from autoguide_fast.noise import churn_stream, philox_normal
from autoguide_fast.plan import SamplerConfig
from autoguide_fast.reference import edm_sampler as reference_sampler

from .host_syncs import host_syncs_raise
from .test_cpp_backend import (
    NET_DTYPES,
    OPCHECK_CASES,
    SHAPES,
    STATE_DTYPES,
    WEIGHTS,
    ToyNet,
    _fp64_step,
    _inputs,
    _rel_l2,
    _seeded_randn_like,
    _step,
    assert_within_torch_error,
)


def _has_cuda_kernels() -> bool:
    if autoguide_fast.extension() is None or not torch.cuda.is_available():
        return False
    from autoguide_fast.ops import extension_ops

    return extension_ops.has_kernel("cuda")


def gpu_test(fn):
    """A test that needs a CUDA device and the extension's CUDA kernels."""
    skip = pytest.mark.skipif(not _has_cuda_kernels(), reason="no CUDA device, or the extension has no CUDA kernels")
    return pytest.mark.gpu(skip(fn))


DEV = torch.device("cuda")


def _ops():
    from autoguide_fast.ops import extension_ops

    return extension_ops


@gpu_test
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("net_dtype", NET_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_ops_match_reference(dtype, net_dtype, shape):
    x, D_main, D_guide = _inputs(shape, dtype, net_dtype)
    step = _step(3.7, 2.9, dtype)
    ref_cpu = TorchBackend(dtype)
    ref_gpu = TorchBackend(dtype)
    fused = resolve_backend("cuda", DEV, dtype)
    xg, Dmg, Dgg = x.to(DEV), D_main.to(DEV), D_guide.to(DEV)
    step_gpu = _step(3.7, 2.9, dtype)
    step_gpu.tensors.update({k: v.to(DEV) for k, v in step_gpu.tensors.items()})
    for w in WEIGHTS:
        Dg, Dgg_w = (None, None) if w is None else (D_guide, Dgg)
        d_ref, xn_ref = ref_cpu.euler(x, D_main, Dg, w, step)
        d, xn = fused.euler(xg, Dmg, Dgg_w, w, step_gpu)
        assert d.device == xg.device and d.dtype == dtype
        assert torch.equal(d.cpu(), d_ref) and torch.equal(xn.cpu(), xn_ref), f"euler w={w}"
        D_main2 = (D_main.double() * 0.9).to(net_dtype)
        Dg2 = None if w is None else (D_guide.double() * 0.9).to(net_dtype)
        h_ref = ref_cpu.heun(x, d_ref, xn_ref, D_main2, Dg2, w, step)
        h = fused.heun(xg, d, xn, D_main2.to(DEV), None if Dg2 is None else Dg2.to(DEV), w, step_gpu)
        assert torch.equal(h.cpu(), h_ref), f"heun w={w}"
        # PyTorch's own CUDA ops as the same-dtype yardstick.
        d_torch, xn_torch = ref_gpu.euler(xg, Dmg, Dgg_w, w, step_gpu)
        d64, xn64, _ = _fp64_step(x, D_main, Dg, w, step.t_hat, step.t_next)
        assert_within_torch_error(d.cpu(), d_torch.cpu(), d64, f"d w={w}")
        assert_within_torch_error(xn.cpu(), xn_torch.cpu(), xn64, f"x_next w={w}")


@gpu_test
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_misaligned_and_ragged_inputs(dtype):
    """Views at an odd element offset take the scalar path; sizes not a multiple of 4 the tail."""
    n = 4099
    x, D_main, D_guide = _inputs((n,), dtype, torch.float16, seed=2)
    step = _step(1.25, 0.5, dtype)
    d_ref, xn_ref = TorchBackend(dtype).euler(x, D_main, D_guide, 2.1, step)
    for offset in (0, 1, 3):
        buf_x = torch.zeros(n + offset, dtype=dtype, device=DEV)
        buf_m = torch.zeros(n + offset, dtype=torch.float16, device=DEV)
        buf_g = torch.zeros(n + offset, dtype=torch.float16, device=DEV)
        xg, Dm, Dg = buf_x[offset:], buf_m[offset:], buf_g[offset:]
        xg.copy_(x)
        Dm.copy_(D_main)
        Dg.copy_(D_guide)
        d, xn = _ops().euler_step(xg, Dm, Dg, 2.1, step.t_hat, step.t_next)
        assert torch.equal(d.cpu(), d_ref) and torch.equal(xn.cpu(), xn_ref), f"offset {offset}"


@gpu_test
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_backend_takes_non_contiguous_inputs(dtype):
    """The backend (not the raw ops, which refuse them) takes channels-last and transposed views
    of the state and of the network outputs, and gives the contiguous inputs' results bit for bit."""
    shape = (2, 3, 5, 7)
    x, D_main, D_guide = _inputs(shape, dtype, torch.float16, seed=4)
    step = _step(3.7, 2.9, dtype)
    step.tensors.update({k: v.to(DEV) for k, v in step.tensors.items()})
    fused = resolve_backend("cuda", DEV, dtype)
    xg, Dm, Dg = x.to(DEV), D_main.to(DEV), D_guide.to(DEV)
    d_ref, xn_ref = fused.euler(xg, Dm, Dg, 2.1, step)
    h_ref = fused.heun(xg, d_ref, xn_ref, Dm, Dg, 2.1, step)
    views = (lambda t: t.to(memory_format=torch.channels_last),
             lambda t: t.transpose(2, 3).contiguous().transpose(2, 3))
    for view in views:
        xv, Dmv, Dgv = view(xg), view(Dm), view(Dg)
        assert not xv.is_contiguous() and torch.equal(xv, xg)
        d, xn = fused.euler(xv, Dmv, Dgv, 2.1, step)
        assert torch.equal(d, d_ref) and torch.equal(xn, xn_ref)
        assert torch.equal(fused.heun(xv, view(d_ref), view(xn_ref), Dmv, Dgv, 2.1, step), h_ref)


@gpu_test
@pytest.mark.parametrize("cast_dtype", NET_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_euler_step_cast(dtype, cast_dtype):
    g = torch.Generator().manual_seed(1)
    mag = torch.exp(torch.empty(20001, dtype=torch.float64).uniform_(-25, 12, generator=g))
    x = (mag * torch.randn(20001, generator=g, dtype=torch.float64).sign()).to(dtype).to(DEV)
    D = torch.randn(x.shape, generator=g).to(torch.float16).to(DEV)
    d, xn, xc = _ops().euler_step_cast(x, D, None, 1.0, 1.5, 0.25, cast_dtype)
    assert xc.dtype == cast_dtype and torch.equal(xc, xn.to(cast_dtype))


@gpu_test
@pytest.mark.parametrize("image_shape", [(3, 17, 9), (4, 16, 16), (1,)], ids=str)
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_fused_churn(dtype, image_shape):
    shape = (3, *image_shape)
    x, D_main, D_guide = _inputs(shape, dtype, torch.float32, seed=6)
    seeds = torch.tensor([11, -3, 2**62 + 5])
    step = _step(2.5, 1.75, dtype)
    nxt = _step(2.1, 1.1, dtype, index=step.index + 1, noise_scale=1.3)
    ref = TorchBackend(dtype)
    d_ref, xn_ref = ref.euler(x, D_main, D_guide, 2.1, step)
    h_ref = ref.churn(ref.heun(x, d_ref, xn_ref, D_main, D_guide, 2.1, step), nxt, seeds, None)
    e_ref = ref.churn(xn_ref, nxt, seeds, None)
    fused = resolve_backend("cuda", DEV, dtype)
    xg, Dm, Dg, sg = x.to(DEV), D_main.to(DEV), D_guide.to(DEV), seeds.to(DEV)
    d, xn = fused.euler(xg, Dm, Dg, 2.1, step)
    h = fused.heun(xg, d, xn, Dm, Dg, 2.1, step, churn_next=(nxt, sg))
    _, e = fused.euler(xg, Dm, Dg, 2.1, step, churn_next=(nxt, sg))
    c = fused.churn(xg, nxt, sg, None)
    c_ref = ref.churn(x, nxt, seeds, None)
    for out, expected in ((h, h_ref), (e, e_ref), (c, c_ref)):
        err = (out.cpu().double() - expected.double()).abs().max().item()
        assert err <= 1e-6 * nxt.noise_scale + 4 * torch.finfo(dtype).eps * expected.abs().max().item()
    eps = philox_normal(seeds, math.prod(image_shape), churn_stream(nxt.index), dtype).reshape(shape)
    torch.testing.assert_close((e.cpu() - xn_ref) / nxt.noise_scale, eps, rtol=1e-5, atol=1e-5)


@gpu_test
def test_bad_inputs_raise_before_any_launch():
    E = _ops()
    x, D_main, _ = _inputs((2, 3, 4, 4), torch.float32, torch.float32)
    xg = x.to(DEV)
    with pytest.raises(RuntimeError, match="D_main: expected the device of x_hat"):
        E.euler_step(xg, D_main, None, 1.0, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="seeds: expected the device of x_hat"):
        E.euler_step(xg, D_main.to(DEV), None, 1.0, 1.0, 0.5, torch.tensor([1, 2]), 1.0, 1)
    with pytest.raises(RuntimeError, match="x_hat: expected a contiguous tensor"):
        E.euler_step(xg.transpose(1, 2), D_main.to(DEV).transpose(1, 2), None, 1.0, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="x_hat: expected a CUDA tensor"):
        E.heun_step(x, xg, xg, D_main.to(DEV), None, 1.0, 1.0, 0.5)


@gpu_test
def test_no_host_sync_and_cuda_graph_capture():
    E = _ops()
    shape = (2, 4, 32, 32)
    x, D_main, D_guide = (t.to(DEV) for t in _inputs(shape, torch.float32, torch.float16, seed=8))
    seeds = torch.tensor([3, 4], device=DEV)

    def step(x, D_main, D_guide):
        d, xn = E.euler_step(x, D_main, D_guide, 2.1, 1.5, 1.0)
        return E.heun_step(x, d, xn, D_main, D_guide, 2.1, 1.5, 1.0, seeds, 0.3, 4)

    with host_syncs_raise():
        eager = step(x, D_main, D_guide)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(x, D_main, D_guide)  # Warm-up on a side stream, as capture requires.
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_in = [t.clone() for t in (x, D_main, D_guide)]
    with torch.cuda.graph(graph):
        static_out = step(*static_in)
    graph.replay()
    assert torch.equal(static_out, eager)
    x2 = x * 0.5
    static_in[0].copy_(x2)
    graph.replay()
    assert torch.equal(static_out, step(x2, D_main, D_guide))


@gpu_test
@pytest.mark.parametrize("case", range(OPCHECK_CASES))
def test_opcheck(case):
    from .test_cpp_backend import _opcheck_cases

    op, args = _opcheck_cases()[case]
    args = tuple(a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    "dtype,net_dtype,guidance,churn",
    [
        (torch.float32, torch.float32, 2.1, 0),
        (torch.float32, torch.float16, 1.0, 0),
        (torch.float32, torch.bfloat16, 0.3, 30),
        (torch.float64, torch.float32, 2.1, 30),
    ],
)
@gpu_test
def test_trajectory_matches_reference(dtype, net_dtype, guidance, churn):
    shape = (3, 2, 9, 7)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(DEV)
    net, gnet = ToyNet(1, net_dtype), ToyNet(2, net_dtype)
    for m in (net, gnet):
        m.a = m.a.to(DEV)
    kwargs = dict(num_steps=9, sigma_max=20.0, guidance=guidance, S_churn=churn, S_min=0.05, S_max=10.0, dtype=dtype)
    seeds = torch.tensor([5, 6, 7])
    config = SamplerConfig(num_steps=9, sigma_max=20.0, guidance=guidance, S_churn=churn, S_min=0.05, S_max=10.0,
                           dtype=dtype)
    randn_like = _seeded_randn_like(seeds.to(DEV), config)
    ref = reference_sampler(net, noise, None, gnet, randn_like=randn_like, **kwargs)
    out = autoguide_fast.fast_guided_sample(net, noise, None, gnet, seeds=seeds if churn else None, backend="cuda",
                                            **kwargs)
    assert out.device == noise.device and out.dtype == dtype
    assert _rel_l2(out, ref) <= 1e-6


@gpu_test
def test_auto_prefers_cuda_on_cuda_tensors():
    assert autoguide_fast.backends()["cuda"].available
    assert resolve_backend("auto", DEV, torch.float32).name == "cuda"


# ---------------------------------------------------------------------------------------------
# The CUDA kernels emulated on the CPU (no GPU needed).
# ---------------------------------------------------------------------------------------------
_ROOT = pathlib.Path(__file__).resolve().parent.parent
_KIND = {"euler": 0, "heun": 1, "churn": 2, "normal": 3}
_DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _cuda_include() -> pathlib.Path | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "include" / "cuda_runtime.h").is_file():
            return pathlib.Path(home) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc:
        inc = pathlib.Path(os.path.realpath(nvcc)).parent.parent / "include"
        if (inc / "cuda_runtime.h").is_file():
            return inc
    return None


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """csrc/cuda/emulate_host.cpp built with the host compiler (ctypes handle)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    include = _cuda_include()
    if cxx is None or include is None:
        pytest.skip("needs a host C++ compiler and the CUDA headers (cuda_runtime.h)")
    lib = tmp_path_factory.mktemp("emu") / "agf_emulate.so"
    cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-Wno-unknown-pragmas",
           "-I", str(_ROOT / "csrc"), "-I", str(include), str(_ROOT / "csrc" / "cuda" / "emulate_host.cpp"),
           "-o", str(lib)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    handle = ctypes.CDLL(str(lib))
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    handle.agf_emu_step.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, vp, vp, vp, vp, vp, vp, vp,
                                    vp, vp, vp, ctypes.c_int, ctypes.c_double, ctypes.c_double, ctypes.c_double,
                                    ctypes.c_double, ctypes.c_uint32, vp]
    handle.agf_emu_step.restype = ctypes.c_int
    handle.agf_emu_philox.argtypes = [vp, vp, vp, i64]
    handle.agf_emu_philox.restype = ctypes.c_int
    handle.agf_emu_set_index32_limit.argtypes = [i64]
    handle.agf_emu_set_index32_limit.restype = None
    return handle


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


_GUARD = 64  # Elements of guard region after each emulated output.


def _emu_step(emu, kind, x=None, D_main=None, D_guide=None, d=None, x_next=None, eps=None, seeds=None, w=1.0,
              t_hat=1.0, t_next=0.5, scale=0.0, stream=0, cast_dtype=None, shape=None, dtype=None, write_d=True,
              scalars=None):
    """One emulated launch; returns the outputs the op allocates (like the ATen op would; with
    write_d=False the euler kernel gets no d buffer, a null pointer, and d comes back as None). A
    write past an output's end fails here (a guard region follows each one)."""
    ref = x if x is not None else torch.empty(shape, dtype=dtype)
    guards = []  # Each output has a guard region after it: a write past its end is an error.

    def output(fill, dtype):
        buf = torch.full((ref.numel() + _GUARD,), -12345.0, dtype=dtype)
        buf[: ref.numel()] = fill
        guards.append((buf[ref.numel():], buf[ref.numel():].clone()))
        return buf[: ref.numel()].view(ref.shape)

    out_x = output(float("nan"), ref.dtype)
    out_d = output(float("nan"), ref.dtype) if kind == "euler" and write_d else None
    out_c = output(0.0, cast_dtype) if cast_dtype is not None else None
    numel = ref.numel()
    image_numel = max(1, numel // ref.shape[0]) if ref.dim() > 0 and ref.shape[0] > 0 else 1
    net = _DT[D_main.dtype] if D_main is not None else 0
    rc = emu.agf_emu_step(_KIND[kind], _DT[ref.dtype], net, numel, image_numel, _ptr(x), _ptr(D_main), _ptr(D_guide),
                          _ptr(d), _ptr(x_next), _ptr(eps), _ptr(seeds), _ptr(out_d), _ptr(out_x), _ptr(out_c),
                          _DT.get(cast_dtype, 0), w, t_hat, t_next, scale, stream, _ptr(scalars))
    assert rc == 0
    for guard, before in guards:
        assert torch.equal(guard, before), f"{kind}: a write past the end of an output"
    return out_d, out_x, out_c


def _offset_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of t whose data starts `offset` elements into its storage (misaligned)."""
    buf = torch.zeros(t.numel() + offset, dtype=t.dtype)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


EMU_SHAPES = ((3, 4, 61, 67), (3, 5, 55, 61), (7, 2), (2,))  # > 32768 elements: grid-stride loops.


@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("net_dtype", NET_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_emulated_kernels_match_reference(emu, dtype, net_dtype, shape):
    x, D_main, D_guide = _inputs(shape, dtype, net_dtype, seed=3)
    step = _step(3.7, 2.9, dtype)
    ref = TorchBackend(dtype)
    for offset in (0, 1):  # Vector accesses, then the scalar path of misaligned pointers.
        xo, Dmo, Dgo = (_offset_copy(t, offset) for t in (x, D_main, D_guide))
        for w in (2.1, 0.3, None):
            Dg = None if w is None else Dgo
            d_ref, xn_ref = ref.euler(x, D_main, None if w is None else D_guide, w, step)
            d, xn, _ = _emu_step(emu, "euler", x=xo, D_main=Dmo, D_guide=Dg, w=1.0 if w is None else w,
                                 t_hat=step.t_hat, t_next=step.t_next)
            assert torch.equal(d, d_ref) and torch.equal(xn, xn_ref), f"euler w={w} offset={offset}"
            _, xn0, _ = _emu_step(emu, "euler", x=xo, D_main=Dmo, D_guide=Dg, w=1.0 if w is None else w,
                                  t_hat=step.t_hat, t_next=step.t_next, write_d=False)
            assert torch.equal(xn0, xn_ref), f"euler write_d=False w={w} offset={offset}"
            h_ref = ref.heun(x, d_ref, xn_ref, D_main, None if w is None else D_guide, w, step)
            _, h, _ = _emu_step(emu, "heun", x=xo, d=_offset_copy(d_ref, offset), x_next=_offset_copy(xn_ref, offset),
                                D_main=Dmo, D_guide=Dg, w=1.0 if w is None else w, t_hat=step.t_hat,
                                t_next=step.t_next)
            assert torch.equal(h, h_ref), f"heun w={w} offset={offset}"


@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_emulated_noise_kernels(emu, dtype, shape):
    x, D_main, D_guide = _inputs(shape, dtype, torch.float16, seed=4)
    seeds = torch.tensor([5, -9, 2**63 - 1, 17, 0, 1, 2][: shape[0]])
    step = _step(2.5, 1.75, dtype)
    nxt = _step(2.1, 1.1, dtype, index=6, noise_scale=1.3)
    stream = churn_stream(nxt.index)
    ref = TorchBackend(dtype)
    d_ref, xn_ref = ref.euler(x, D_main, D_guide, 2.1, step)
    expected = {
        "euler": ref.churn(xn_ref, nxt, seeds, None),
        "euler, no d": ref.churn(xn_ref, nxt, seeds, None),
        "heun": ref.churn(ref.heun(x, d_ref, xn_ref, D_main, D_guide, 2.1, step), nxt, seeds, None),
        "churn": ref.churn(x, nxt, seeds, None),
        "normal": philox_normal(seeds, math.prod(shape[1:]), stream, dtype).reshape(shape),
    }
    common = dict(seeds=seeds, scale=nxt.noise_scale, stream=stream, t_hat=step.t_hat, t_next=step.t_next, w=2.1)
    got = {
        "euler": _emu_step(emu, "euler", x=x, D_main=D_main, D_guide=D_guide, **common)[1],
        "euler, no d": _emu_step(emu, "euler", x=x, D_main=D_main, D_guide=D_guide, write_d=False, **common)[1],
        "heun": _emu_step(emu, "heun", x=x, d=d_ref, x_next=xn_ref, D_main=D_main, D_guide=D_guide, **common)[1],
        "churn": _emu_step(emu, "churn", x=x, **common)[1],
        "normal": _emu_step(emu, "normal", shape=shape, dtype=dtype, **common)[1],
    }
    for name, out in got.items():
        if dtype == torch.float32:
            assert torch.equal(out, expected[name]), name
        torch.testing.assert_close(out, expected[name], rtol=0, atol=1e-12, msg=name)
    # Explicit eps, and the cast copy of x_next.
    eps = expected["normal"]
    _, c, _ = _emu_step(emu, "churn", x=_offset_copy(x, 1), eps=_offset_copy(eps, 1), scale=nxt.noise_scale)
    assert torch.equal(c, ref.churn(x, nxt, None, eps))
    for cast in NET_DTYPES:
        _, xn, xc = _emu_step(emu, "euler", x=x, D_main=D_main, D_guide=D_guide, w=2.1, t_hat=step.t_hat,
                              t_next=step.t_next, cast_dtype=cast)
        assert torch.equal(xn, xn_ref) and torch.equal(xc, xn_ref.to(cast)), cast


@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_emulated_64bit_index_path(emu, dtype):
    """Beyond 2^32 elements the kernels find an element's image with 64-bit division. No test can
    allocate such a tensor, so the emulator lowers the 32-bit limit to 0: every launch then takes
    the 64-bit path, which must give the 32-bit path's results bit for bit (noise included, whose
    per-image index is what the division computes)."""
    for shape in ((3, 5, 55, 61), (3, 4, 61, 67), (7, 2)):  # Image sizes 4k + 3, 4k and 2.
        x, D_main, D_guide = _inputs(shape, dtype, torch.bfloat16, seed=9)
        seeds = torch.tensor([5, -9, 2**63 - 1, 17, 0, 1, 2][: shape[0]])
        d, xn = (torch.randn(shape, dtype=dtype) for _ in range(2))
        common = dict(seeds=seeds, scale=1.3, stream=7, t_hat=2.5, t_next=1.75, w=2.1)
        launches = {
            "euler": dict(x=x, D_main=D_main, D_guide=D_guide),
            "heun": dict(x=x, d=d, x_next=xn, D_main=D_main, D_guide=D_guide),
            "churn": dict(x=_offset_copy(x, 1)),
            "normal": dict(shape=shape, dtype=dtype),
        }
        narrow = {kind: _emu_step(emu, kind, **args, **common) for kind, args in launches.items()}
        emu.agf_emu_set_index32_limit(0)
        try:
            wide = {kind: _emu_step(emu, kind, **args, **common) for kind, args in launches.items()}
        finally:
            emu.agf_emu_set_index32_limit(2**32 - 1)
        for kind in launches:
            for a, b in zip(narrow[kind], wide[kind]):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (kind, shape)


@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_emulated_kernels_read_device_scalars(emu, dtype):
    """With a scalars buffer the kernels take w, t_hat, t_next, scale and stream from it: the
    result equals the launch with those values as arguments, whatever the arguments say."""
    shape = (3, 5, 7)
    x, D_main, D_guide = _inputs(shape, dtype, torch.float16, seed=6)
    seeds = torch.tensor([11, -3, 2**40])
    d = torch.randn(shape, dtype=dtype)
    def exact(v):  # A value of the state dtype, as the plan holds them.
        return torch.tensor(v, dtype=dtype).item()

    values = dict(w=exact(0.3), t_hat=exact(2.5), t_next=exact(1.75), scale=exact(0.9), stream=7)
    scalars = torch.tensor([values["w"], values["t_hat"], values["t_next"], values["scale"], values["stream"]],
                           dtype=torch.float64)
    decoy = dict(w=2.1, t_hat=9.0, t_next=4.0, scale=3.0, stream=1)
    for kind, extra in (("euler", {}), ("heun", dict(d=d, x_next=x))):
        for churn_seeds in (None, seeds):
            common = dict(x=x, D_main=D_main, D_guide=D_guide, seeds=churn_seeds, **extra)
            expected = _emu_step(emu, kind, **common, **values)
            got = _emu_step(emu, kind, **common, **decoy, scalars=scalars)
            other = _emu_step(emu, kind, **common, **decoy)
            for e, g, o in zip(expected, got, other):
                if e is not None:
                    assert torch.equal(g, e), (kind, churn_seeds is not None)
                    assert not torch.equal(o, e), "the decoy values must change the result"


def test_emulated_philox_known_answers(emu):
    counter = torch.tensor([[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]])
    key = torch.tensor([[0, 0], [0xFFFFFFFF] * 2, [0xA4093822, 0x299F31D0]])
    out = torch.zeros_like(counter)
    assert emu.agf_emu_philox(counter.data_ptr(), key.data_ptr(), out.data_ptr(), 3) == 0
    assert out.tolist() == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
                            [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
                            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]
