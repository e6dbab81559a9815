"""The "triton" backend: registry entry, StepBackend contract, and whole trajectories against the
reference sampler (deterministic, guided, with a guidance interval, with seeded churn).

Without CUDA the kernels run in Triton's interpreter on CPU tensors: few steps, tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

from autoguide_fast import kernels

if kernels.triton_error() is not None:
    pytest.skip(kernels.triton_error(), allow_module_level=True)
# Before anything imports triton: without CUDA, the kernels run in Triton's interpreter.
kernels.load(interpret_without_cuda=True)

import autoguide_fast as agf  # noqa: E402
from autoguide_fast import noise, reference  # noqa: E402
from autoguide_fast.backends import resolve_backend, triton_backend  # noqa: E402
from autoguide_fast.plan import SamplerConfig, build_plan  # noqa: E402

from .nets import PointwiseDenoiser, TinyConvDenoiser  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _philox_randn_like(seeds: list[int]):
    """randn_like for the reference sampler drawing the same churn noise as the seeded fast path
    (valid when every step churns, S_min = 0 and S_max = inf: the k-th call is step k)."""
    seeds_t = noise.seeds_to_tensor(seeds)
    calls = []

    def randn_like(x: torch.Tensor) -> torch.Tensor:
        step = len(calls)
        calls.append(step)
        eps = noise.philox_normal(seeds_t, x[0].numel(), noise.churn_stream(step), x.dtype)
        return eps.reshape(x.shape).to(x.device)

    randn_like.calls = calls
    return randn_like


def _nets(out_dtype=torch.float32):
    net = TinyConvDenoiser(3, seed=1, out_dtype=out_dtype).to(DEVICE)
    gnet = TinyConvDenoiser(3, seed=2, out_dtype=out_dtype).to(DEVICE)
    return net, gnet


def _noise(shape=(2, 3, 7, 5), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# --- registry -----------------------------------------------------------------------------------


def test_registry_reports_the_backend():
    status = agf.backends()["triton"]
    assert status.available, status.reason
    assert ("interpreter" in status.reason) == (not CUDA)


def test_supports_and_create():
    assert triton_backend.supports(DEVICE, torch.float32) is None
    assert triton_backend.supports(DEVICE, torch.float64) is None
    assert "float32 or float64" in triton_backend.supports(DEVICE, torch.float16)
    assert "CUDA" in triton_backend.supports(torch.device("meta"), torch.float32)
    backend = resolve_backend("triton", DEVICE, torch.float32)
    assert backend.name == "triton" and backend.fuses_churn
    with pytest.raises(TypeError, match="dtype"):
        triton_backend.create(torch.bfloat16)


def test_status_without_cuda_or_interpreter_says_why(monkeypatch):
    monkeypatch.setattr(kernels, "loaded_interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    available, reason = triton_backend.status()
    assert not available and reason == "triton kernels need a CUDA device, or TRITON_INTERPRET=1 for CPU tensors"
    assert "TRITON_INTERPRET=1" in triton_backend.supports(torch.device("cpu"), torch.float32)


def test_status_without_triton_says_why(monkeypatch):
    monkeypatch.setattr(kernels, "triton_error", lambda: "triton is not installed (pip install triton)")
    assert triton_backend.status() == (False, "triton is not installed (pip install triton)")


@gpu
@needs_cuda
def test_gpu_auto_prefers_a_fused_gpu_backend():
    assert resolve_backend("auto", torch.device("cuda"), torch.float32).name in ("cuda", "triton")


# --- StepBackend contract -----------------------------------------------------------------------


def test_backend_methods_match_the_torch_backend_bitwise():
    config = SamplerConfig(num_steps=4, guidance=2.1, S_churn=2.0)
    _, steps = build_plan(config, DEVICE)
    tb = resolve_backend("torch", DEVICE, torch.float32)
    fb = resolve_backend("triton", DEVICE, torch.float32)
    g = torch.Generator().manual_seed(5)
    x, dm, dg, dm2, dg2 = (torch.randn(2, 3, 4, 5, generator=g).to(DEVICE) for _ in range(5))
    seeds = torch.tensor([4, 9], device=DEVICE)
    step, nxt = steps[1], steps[2]
    assert torch.equal(fb.churn(x, step, seeds, None), tb.churn(x, step, seeds, None))
    assert torch.equal(fb.churn(x, step, None, dm), tb.churn(x, step, None, dm))
    d_t, xn_t = tb.euler(x, dm, dg, 2.1, step)
    d_f, xn_f = fb.euler(x, dm, dg, 2.1, step)
    assert torch.equal(d_f, d_t) and torch.equal(xn_f, xn_t)
    fused = fb.heun(x, d_t, xn_t, dm2, dg2, 2.1, step, churn_next=(nxt, seeds))
    separate = tb.churn(tb.heun(x, d_t, xn_t, dm2, dg2, 2.1, step), nxt, seeds, None)
    assert torch.equal(fused, separate)
    d_none, x_last = fb.euler(x, dm, None, None, steps[-1], need_d=False)
    assert d_none is None and torch.equal(x_last, tb.euler(x, dm, None, None, steps[-1])[1])


def test_backend_rejects_bad_calls():
    _, steps = build_plan(SamplerConfig(num_steps=3, S_churn=1.0), DEVICE)
    fb = resolve_backend("triton", DEVICE, torch.float32)
    x = torch.randn(2, 3, device=DEVICE)
    with pytest.raises(TypeError, match="x_hat"):
        fb.euler(x.double(), x, None, None, steps[0])
    with pytest.raises(ValueError, match="churn_next"):
        fb.euler(x, x, None, None, steps[0], churn_next=(steps[1], None))
    _, plain = build_plan(SamplerConfig(num_steps=3), DEVICE)
    with pytest.raises(ValueError, match="churn_next"):
        fb.heun(x, x, x, x, None, None, plain[0], churn_next=(plain[1], torch.tensor([1, 2], device=DEVICE)))
    with pytest.raises(ValueError, match="step"):
        fb.churn(x, plain[0], torch.tensor([1, 2], device=DEVICE), None)
    # Noise from a custom randn_like that is not like the state: refused, naming randn_like.
    with pytest.raises(TypeError, match="randn_like: returned noise torch.float64"):
        fb.churn(x, steps[0], None, x.double())
    with pytest.raises(TypeError, match="randn_like: returned float"):
        fb.churn(x, steps[0], None, 0.5)


# --- whole trajectories -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_guided_trajectory_matches_reference(dtype):
    net, gnet = _nets()
    x0 = _noise()
    kwargs = dict(num_steps=4, guidance=2.1, dtype=dtype)
    with torch.no_grad():
        want = reference.edm_sampler(net, x0, None, gnet, **kwargs)
    got = agf.fast_guided_sample(net, x0, None, gnet, backend="triton", **kwargs)
    assert got.dtype == dtype
    assert _rel_l2(got, want) <= (1e-6 if dtype == torch.float32 else 1e-13)
    if dtype == torch.float32:
        assert torch.equal(got, want)  # same roundings, step by step


def test_unguided_half_precision_network_trajectory_matches_reference():
    net, _ = _nets(out_dtype=torch.float16)
    x0 = _noise(seed=1)
    with torch.no_grad():
        want = reference.edm_sampler(net, x0, num_steps=3)
    got = agf.fast_guided_sample(net, x0, num_steps=3, backend="triton")
    assert _rel_l2(got, want) <= 1e-6


def test_guidance_interval_and_euler_solver_match_the_torch_backend():
    net, gnet = _nets()
    x0 = _noise(seed=2)
    for kwargs in (dict(guidance_interval=(0.5, 20.0)), dict(solver="euler")):
        args = dict(num_steps=5, guidance=2.1, **kwargs)
        want = agf.fast_guided_sample(net, x0, None, gnet, backend="torch", **args)
        got = agf.fast_guided_sample(net, x0, None, gnet, backend="triton", **args)
        assert _rel_l2(got, want) <= 1e-6, kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_churned_trajectory_with_seeds_matches_reference_with_the_same_noise(dtype):
    net = PointwiseDenoiser()
    gnet = PointwiseDenoiser(a=0.9, b=-0.1)
    seeds = [11, 2**40 + 3, -7]
    x0 = noise.seeded_noise(seeds, (3, 2, 3, 5), device=DEVICE)
    kwargs = dict(num_steps=4, guidance=2.1, S_churn=2.0, dtype=dtype)
    randn_like = _philox_randn_like(seeds)
    want = reference.edm_sampler(net, x0, None, gnet, randn_like=randn_like, **kwargs)
    assert randn_like.calls == [0, 1, 2, 3]  # every step churned
    got = agf.fast_guided_sample(net, x0, None, gnet, seeds=seeds, backend="triton", **kwargs)
    assert _rel_l2(got, want) <= (1e-6 if dtype == torch.float32 else 1e-13)
    # The noise matters: a different seed gives a different result.
    other = agf.fast_guided_sample(net, x0, None, gnet, seeds=[12, 2**40 + 3, -7], backend="triton", **kwargs)
    assert _rel_l2(other[0], got[0]) > 1e-3 and torch.equal(other[1:], got[1:])


def test_an_explicit_randn_like_is_used_instead_of_the_seeds_and_outputs_of_two_dtypes():
    """Given both, the churn noise comes from randn_like, as in the official sampler (README); a
    float16 main network with a float32 guide (the kernels read one dtype: both cast to the state's)."""
    net, gnet = _nets(out_dtype=torch.float16)[0], _nets()[1]
    x0 = _noise(shape=(2, 3, 3, 2), seed=3)
    kwargs = dict(num_steps=3, guidance=2.1, S_churn=5.0)
    torch.manual_seed(9)
    want = agf.fast_guided_sample(net, x0, None, gnet, randn_like=torch.randn_like, backend="torch", **kwargs)
    torch.manual_seed(9)
    got = agf.fast_guided_sample(net, x0, None, gnet, seeds=[1, 2], randn_like=torch.randn_like, backend="triton",
                                 **kwargs)
    assert _rel_l2(got, want) <= 1e-6


def test_toy_shape_trajectory_with_churn():
    # The paper's 2-D toy: a batch of points, shape [B, 2].
    net = PointwiseDenoiser()
    gnet = PointwiseDenoiser(a=0.7, b=0.3)
    seeds = list(range(5))
    x0 = noise.seeded_noise(seeds, (5, 2), device=DEVICE)
    kwargs = dict(num_steps=4, guidance=3.0, S_churn=1.0, sigma_max=5.0)
    want = reference.edm_sampler(net, x0, None, gnet, randn_like=_philox_randn_like(seeds), **kwargs)
    got = agf.fast_guided_sample(net, x0, None, gnet, seeds=seeds, backend="triton", **kwargs)
    assert _rel_l2(got, want) <= 1e-6


@gpu
@needs_cuda
def test_gpu_trajectory_latent_batch():
    net = TinyConvDenoiser(4, seed=1, out_dtype=torch.float16).to("cuda")
    gnet = TinyConvDenoiser(4, seed=2, out_dtype=torch.float16).to("cuda")
    seeds = list(range(5))
    x0 = noise.seeded_noise(seeds, (5, 4, 64, 64), device="cuda")
    kwargs = dict(num_steps=8, guidance=2.1, S_churn=2.0)
    with torch.no_grad():
        want = reference.edm_sampler(net, x0, None, gnet, randn_like=_philox_randn_like(seeds), **kwargs)
    got = agf.fast_guided_sample(net, x0, None, gnet, seeds=seeds, backend="triton", **kwargs)
    assert _rel_l2(got, want) <= 1e-6


def test_package_imports_and_reports_without_triton():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # as if Triton were not installed\n"
        "import torch, autoguide_fast as a\n"
        "st = a.backends()['triton']\n"
        "assert not st.available and 'triton is not installed' in st.reason, st\n"
        "try:\n"
        "    a.fast_guided_sample(lambda x, t, l: x * 0.5, torch.randn(2, 3), num_steps=3, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('the triton backend should be unavailable')\n"
        "assert a.fast_guided_sample(lambda x, t, l: x * 0.5, torch.randn(2, 3), num_steps=3).shape == (2, 3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(CUDA, reason="CPU stand-in for graphs; tests/test_engine_gpu.py captures real ones")
def test_step_graphs_per_kind_replay_other_steps_with_the_triton_kernels(monkeypatch):
    """graph="step" with the Triton ops reading their scalars from the slot buffer: one graph per
    kind of step (a CPU stand-in re-runs what each graph captured), equal to the eager backend."""
    from autoguide_fast import GuidedSampler

    from .fake_graphs import RerunCapturer

    RerunCapturer.instances, RerunCapturer.fail_with = [], None
    monkeypatch.setattr(GuidedSampler, "_capturer_type", RerunCapturer)
    net, gnet = _nets()
    kwargs = dict(num_steps=5, guidance=2.1, S_churn=30.0, S_min=0.05, S_max=50.0)
    s = GuidedSampler(net, gnet, noise_shape=(2, 3, 7, 5), device="cpu", backend="triton", graph="step", **kwargs)
    s.prepare(seeded=True)
    # t = 80, 17.5, 2.52, 0.170, 0.002: steps 1-3 churn, fused into the op before; steps 1 and 2 share a kind.
    assert len(RerunCapturer.instances[0].graphs) == 4
    for seed in (1, 2):
        x0 = _noise(seed=seed)
        eager = agf.fast_guided_sample(net, x0, None, gnet, backend="triton", seeds=[seed, 5], **kwargs)
        assert torch.equal(s(x0, seeds=[seed, 5]), eager)
