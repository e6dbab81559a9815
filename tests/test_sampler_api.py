"""The public API against the golden reference: bit for bit on CPU for the eager backend."""

import pytest
import torch

import autoguide_fast
from autoguide_fast import GuidedSampler, edm_sampler, fast_guided_sample, reference, seeded_noise
from autoguide_fast.reference import edm_sampler as reference_sampler
from tests.nets import GaussianDenoiser, PointwiseDenoiser, TinyConvDenoiser, one_hot_labels


def make_randn_like(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


SCHEDULES = [
    {},
    {"num_steps": 7, "sigma_min": 0.01, "sigma_max": 20.0, "rho": 5.0},
    {"num_steps": 6, "S_churn": 40.0, "S_min": 0.05, "S_max": 10.0, "S_noise": 1.007},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("guidance", [1, 2.1, 0.3])
@pytest.mark.parametrize("schedule", range(len(SCHEDULES)))
def test_torch_backend_and_dropin_equal_reference_bit_for_bit(dtype, guidance, schedule):
    kwargs = dict(SCHEDULES[schedule])
    kwargs.setdefault("num_steps", 5)
    net = TinyConvDenoiser(channels=3, label_dim=4, seed=1)
    gnet = TinyConvDenoiser(channels=3, label_dim=4, seed=2, hidden=4)
    noise = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(3))
    labels = one_hot_labels(2, 4)
    expected = reference_sampler(net, noise, labels, gnet, guidance=guidance, dtype=dtype,
                                 randn_like=make_randn_like(9), **kwargs)
    fast = fast_guided_sample(net, noise, labels, gnet, guidance=guidance, dtype=dtype, backend="torch",
                              randn_like=make_randn_like(9), **kwargs)
    assert fast.dtype == expected.dtype == dtype
    assert torch.equal(fast, expected)
    # The drop-in takes the official positional order and runs the default ("auto") backend.
    args = [kwargs.get(k, d) for k, d in (("num_steps", 32), ("sigma_min", 0.002), ("sigma_max", 80), ("rho", 7))]
    dropin = edm_sampler(net, noise, labels, gnet, *args, guidance, kwargs.get("S_churn", 0), kwargs.get("S_min", 0),
                         kwargs.get("S_max", float("inf")), kwargs.get("S_noise", 1), dtype, make_randn_like(9))
    assert torch.equal(dropin, expected)


def test_network_output_dtype_is_cast_like_the_reference():
    net = TinyConvDenoiser(seed=1, out_dtype=torch.float16)
    gnet = TinyConvDenoiser(seed=2, out_dtype=torch.float16)
    noise = torch.randn(2, 3, 6, 6)
    expected = reference_sampler(net, noise, None, gnet, num_steps=4, guidance=2.1)
    assert torch.equal(fast_guided_sample(net, noise, None, gnet, num_steps=4, guidance=2.1, backend="torch"),
                       expected)


def test_guidance_one_never_calls_the_guide():
    net, gnet = GaussianDenoiser(0.5), GaussianDenoiser(0.9)
    fast_guided_sample(net, torch.randn(2, 3), gnet=gnet, num_steps=6, guidance=1)
    assert net.calls == 11 and gnet.calls == 0


@pytest.mark.parametrize("interval", [(0.5, 10.0), (0.0, 1.0), (5.0, 200.0)])
@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_guidance_interval_calls_the_guide_only_inside(interval, solver):
    n = 9
    net, gnet = GaussianDenoiser(0.5), GaussianDenoiser(0.9)
    fast_guided_sample(net, torch.randn(2, 3), gnet=gnet, num_steps=n, guidance=2.0, guidance_interval=interval,
                       solver=solver, backend="torch")
    t = autoguide_fast.reference.edm_time_steps(n, 0.002, 80, 7, torch.float32).tolist()
    lo, hi = interval
    # Each evaluation's sigma: t_i for the Euler evaluation, t_{i+1} for the Heun correction.
    sigmas = list(t[:n]) + (list(t[1:n]) if solver == "heun" else [])
    assert net.calls == len(sigmas)
    assert gnet.calls == sum(lo < s <= hi for s in sigmas)
    assert all(lo < s <= hi for s in gnet.sigmas)
    assert 0 < gnet.calls < net.calls


def test_guidance_interval_matches_manual_weights():
    """Outside the interval the step is the unguided one; inside, the guided one."""
    net, gnet = GaussianDenoiser(0.5), GaussianDenoiser(0.9)
    noise = torch.randn(4, 2, dtype=torch.float64)
    full = fast_guided_sample(net, noise, gnet=gnet, num_steps=8, guidance=2.0, dtype=torch.float64,
                              guidance_interval=(0.0, 1e9))
    ref = reference_sampler(net, noise, None, gnet, num_steps=8, guidance=2.0, dtype=torch.float64)
    assert torch.equal(full, ref)
    none = fast_guided_sample(net, noise, gnet=gnet, num_steps=8, guidance=2.0, dtype=torch.float64,
                              guidance_interval=(1e8, 1e9))
    assert torch.equal(none, reference_sampler(net, noise, None, None, num_steps=8, dtype=torch.float64))


def test_euler_solver_uses_one_evaluation_per_step():
    net, gnet = GaussianDenoiser(0.5), GaussianDenoiser(0.9)
    fast_guided_sample(net, torch.randn(2, 3), gnet=gnet, num_steps=6, guidance=3.0, solver="euler")
    assert net.calls == gnet.calls == 6


def test_callback_receives_k_diffusion_dict():
    seen = []
    net = TinyConvDenoiser(seed=1)
    noise = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    out = fast_guided_sample(net, noise, num_steps=4, callback=seen.append, backend="torch")
    assert [s["i"] for s in seen] == [0, 1, 2, 3]
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert torch.equal(seen[-1]["x"], out)
    assert seen[0]["sigma"] == pytest.approx(80.0) and seen[0]["sigma_hat"] == seen[0]["sigma"]
    # The last step is Euler to 0: x_N = x + (0 - t)(x - D)/t is the denoised estimate at sigma_min,
    # up to the rounding of that update (an ulp for some inputs, e.g. this seed's).
    torch.testing.assert_close(seen[-1]["denoised"], out, rtol=1e-6, atol=1e-7)


class TestSeeds:
    shape = (3, 6, 5)

    def sample(self, seeds, **kwargs):
        noise = seeded_noise(seeds, (len(seeds),) + self.shape)
        net = PointwiseDenoiser()  # batch-invariant, so equality is exact
        return fast_guided_sample(net, noise, num_steps=5, S_churn=30.0, seeds=seeds, backend="torch", **kwargs)

    def test_permuting_the_batch_permutes_the_results(self):
        seeds = [11, 5, 2**40 + 3, -7, 0]
        out = self.sample(seeds)
        perm = [3, 0, 4, 1, 2]
        out_perm = self.sample([seeds[p] for p in perm])
        assert torch.equal(out_perm, out[perm])

    def test_an_image_alone_equals_the_same_seed_in_a_batch(self):
        seeds = [11, 5, 2**40 + 3, -7, 0]
        out = self.sample(seeds)
        alone = self.sample([seeds[2]])
        assert torch.equal(alone[0], out[2])

    def test_churn_noise_depends_on_the_seed(self):
        a, b = self.sample([1]), self.sample([2])
        assert not torch.allclose(a, b)
        # Same initial noise, different churn seeds: different outputs too.
        noise = seeded_noise([1], (1,) + self.shape)
        net = TinyConvDenoiser(seed=1)
        x1 = fast_guided_sample(net, noise, num_steps=5, S_churn=30.0, seeds=[1])
        x2 = fast_guided_sample(net, noise, num_steps=5, S_churn=30.0, seeds=[2])
        assert not torch.allclose(x1, x2)

    def test_seeded_noise_statistics(self):
        z = seeded_noise(range(64), (64, 4, 32, 32))
        assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
        corr = torch.corrcoef(z.reshape(64, -1))
        off_diagonal = corr[~torch.eye(64, dtype=torch.bool)]
        n = z[0].numel()  # correlations of independent images ~ N(0, 1/n)
        assert float(off_diagonal.abs().mean()) < 1.2 * (2 / torch.pi / n) ** 0.5
        assert float(off_diagonal.abs().max()) < 6 / n**0.5

    def test_randn_like_wins_over_seeds(self):
        net = TinyConvDenoiser(seed=1)
        noise = torch.randn(2, 3, 4, 4)
        a = fast_guided_sample(net, noise, num_steps=4, S_churn=20.0, seeds=[1, 2], randn_like=make_randn_like(0))
        b = reference_sampler(net, noise, num_steps=4, S_churn=20.0, randn_like=make_randn_like(0))
        assert torch.equal(a, b)


def test_non_finite_result_raises_and_can_be_allowed():
    def bad_net(x, t, labels):
        return torch.where(t < 1, torch.full_like(x, float("nan")), x)

    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        fast_guided_sample(bad_net, torch.randn(1, 2), num_steps=4)
    out = fast_guided_sample(bad_net, torch.randn(1, 2), num_steps=4, check_finite=False)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("check_finite", [True, False])
def test_non_finite_noise_on_the_cpu_is_refused_either_way(check_finite):
    # On the CPU reading the noise costs no synchronisation: checked whatever check_finite says
    # (on a GPU only with check_finite, tests/test_engine_gpu.py).
    noise = torch.randn(2, 3)
    noise[1, 2] = float("inf")
    with pytest.raises(ValueError, match="noise: contains NaN or Inf"):
        fast_guided_sample(GaussianDenoiser(0.5), noise, num_steps=3, check_finite=check_finite)


def test_entry_points_declare_the_same_sampler_defaults():
    """Each entry point spells out the sampler keywords in its own signature; their defaults are
    SamplerConfig's (edm_sampler, the official signature, has no guidance_interval, solver or sigmas)."""
    import dataclasses
    import inspect

    from autoguide_fast.distributed import guide_parallel_sample
    from autoguide_fast.engine import GuidedSampler
    from autoguide_fast.plan import SamplerConfig

    defaults = {f.name: f.default for f in dataclasses.fields(SamplerConfig)}
    for fn, absent in ((fast_guided_sample, ()), (GuidedSampler.__init__, ()), (guide_parallel_sample, ()),
                       (edm_sampler, ("guidance_interval", "solver", "sigmas"))):
        params = inspect.signature(fn).parameters
        for name, value in defaults.items():
            if name in absent:
                assert name not in params, f"{fn.__qualname__}: {name}"
            else:
                assert params[name].default == value, f"{fn.__qualname__}: {name}"


CHURNY = {"num_steps": 5, "S_churn": 40.0, "S_min": 0.05, "S_max": 50.0}


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_dropin_keeps_the_reference_noise_layout_with_randn_like_churn(layout):
    """randn_like fills in memory order, and the reference keeps the noise's layout: the drop-in
    (default backend) must reproduce that for non-contiguous noise, not only for contiguous."""
    net = TinyConvDenoiser(channels=3, label_dim=0, seed=1)
    base = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    noise = base.to(memory_format=torch.channels_last) if layout == "channels_last" else base.transpose(2, 3)
    torch.manual_seed(21)
    expected = reference_sampler(net, noise, **CHURNY)
    torch.manual_seed(21)
    got = edm_sampler(net, noise, **CHURNY)
    assert torch.equal(got, expected)


def test_custom_randn_like_of_another_dtype_is_promoted_like_the_reference():
    net = TinyConvDenoiser(channels=3, label_dim=0, seed=1)
    noise = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))

    def randn64(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda x: torch.randn(x.shape, generator=g, dtype=torch.float64)

    expected = reference_sampler(net, noise, randn_like=randn64(3), **CHURNY)
    got = fast_guided_sample(net, noise, randn_like=randn64(3), **CHURNY)
    assert got.dtype == expected.dtype == torch.float64 and torch.equal(got, expected)


def test_dropin_returns_non_finite_results_like_the_official_sampler():
    class NaNNet(torch.nn.Module):
        def forward(self, x, t, labels=None):
            return x * float("nan")

    noise = torch.randn(2, 5)
    assert torch.isnan(edm_sampler(NaNNet(), noise, num_steps=3)).all()
    with pytest.raises(FloatingPointError, match="check_finite=False"):
        fast_guided_sample(NaNNet(), noise, num_steps=3)


def test_equal_sigma_min_and_sigma_max_is_a_valid_schedule():
    net = GaussianDenoiser(0.7)
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    expected = reference_sampler(net, noise, num_steps=4, sigma_min=1.0, sigma_max=1.0)
    assert torch.equal(edm_sampler(net, noise, num_steps=4, sigma_min=1.0, sigma_max=1.0), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_guidance_interval_bounds_compare_in_the_state_dtype_like_the_churn_rule(dtype):
    from autoguide_fast.plan import SamplerConfig, build_plan

    # t_0 for sigma_max = 0.1 is 0.10000000149 in float32 (inside (0, 0.1] once 0.1 is rounded like
    # the state, as S_max = 0.1 is for churn) and 0.10000000000000003 in float64 (outside for both).
    config = SamplerConfig(num_steps=4, sigma_max=0.1, guidance=2.0, guidance_interval=(0.0, 0.1), dtype=dtype)
    _, steps = build_plan(config, torch.device("cpu"))
    churn_rule = bool(0 <= torch.tensor(steps[0].t_cur, dtype=dtype) <= 0.1)
    assert churn_rule == (dtype == torch.float32)
    assert (steps[0].w_first == 2.0) == churn_rule


def test_noise_that_requires_grad_gets_the_reference_gradients():
    """Autograd on and noise requiring grad: the plain loop records the graph, like the official
    sampler (same result, same gradients w.r.t. the noise and the networks' parameters)."""
    net = TinyConvDenoiser(channels=3, label_dim=0, seed=1)
    gnet = TinyConvDenoiser(channels=3, label_dim=0, seed=2, hidden=4)
    noise = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(7)).requires_grad_()
    expected = reference_sampler(net, noise, None, gnet, num_steps=4, guidance=2.1)
    got = edm_sampler(net, noise, None, gnet, num_steps=4, guidance=2.1)
    assert got.requires_grad and torch.equal(got, expected)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(8))
    wrt = [noise, net.conv1.weight, gnet.conv2.weight]
    for g_got, g_ref in zip(torch.autograd.grad((got * weights).sum(), wrt),
                            torch.autograd.grad((expected * weights).sum(), wrt)):
        assert g_ref.abs().max() > 0 and torch.equal(g_got, g_ref)


def test_labels_that_require_grad_get_the_reference_gradients():
    """Labels requiring grad (soft labels, embeddings being optimised) take the plain loop too: the
    same result and the same gradients w.r.t. the labels as the official sampler."""
    net = TinyConvDenoiser(channels=3, label_dim=4, seed=1)
    gnet = TinyConvDenoiser(channels=3, label_dim=4, seed=2, hidden=4)
    noise = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(7))
    labels = torch.rand(2, 4, generator=torch.Generator().manual_seed(3)).requires_grad_()
    expected = reference_sampler(net, noise, labels, gnet, num_steps=4, guidance=2.1)
    got = fast_guided_sample(net, noise, labels, gnet, num_steps=4, guidance=2.1)
    assert got.requires_grad and torch.equal(got, expected)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(8))
    (g_got,) = torch.autograd.grad((got * weights).sum(), [labels])
    (g_ref,) = torch.autograd.grad((expected * weights).sum(), [labels])
    assert g_ref.abs().min() > 0 and torch.equal(g_got, g_ref)


def test_sampling_is_inference_only_unless_the_noise_requires_grad():
    net = TinyConvDenoiser(channels=3, label_dim=0, seed=1)
    assert net.conv1.weight.requires_grad
    noise = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(7))
    available = autoguide_fast.backends()
    for backend in ("auto", "torch", "cpp"):
        if backend == "auto" or available[backend].available:
            assert not fast_guided_sample(net, noise, num_steps=3, backend=backend).requires_grad
    with torch.no_grad():
        assert not edm_sampler(net, noise.requires_grad_(), num_steps=3).requires_grad


def test_guidance_as_a_0_dim_tensor_works_like_the_number():
    net = TinyConvDenoiser(channels=3, label_dim=0, seed=1)
    gnet = TinyConvDenoiser(channels=3, label_dim=0, seed=2, hidden=4)
    noise = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(9))
    expected = reference_sampler(net, noise, None, gnet, num_steps=4, guidance=2.1)
    for w in (torch.tensor(2.1), torch.tensor(2.1, dtype=torch.float64)):
        assert torch.equal(edm_sampler(net, noise, None, gnet, num_steps=4, guidance=w), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("w_dtype", [torch.float16, torch.float32, torch.float64])
def test_guidance_as_a_0_dim_tensor_is_taken_as_the_official_lerp_takes_it(dtype, w_dtype):
    # The official lerp takes a tensor weight in the state dtype: for a float16/bfloat16 state that
    # is not what the same number as a Python float gives (lerp keeps a Python weight in float32).
    net = TinyConvDenoiser(channels=3, label_dim=0, seed=1)
    gnet = TinyConvDenoiser(channels=3, label_dim=0, seed=2, hidden=4)
    noise = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(9))
    w = torch.tensor(2.1, dtype=w_dtype)
    expected = reference_sampler(net, noise, None, gnet, num_steps=4, guidance=w, dtype=dtype)
    got = fast_guided_sample(net, noise, None, gnet, num_steps=4, guidance=w, dtype=dtype)
    assert torch.equal(got, expected)
    sampler = GuidedSampler(net, gnet, noise_shape=noise.shape, device="cpu", num_steps=4, guidance=w, dtype=dtype)
    assert torch.equal(sampler(noise), expected)
    if dtype in (torch.float16, torch.bfloat16) and float(w.to(dtype)) != float(w):  # Then float(w) differs.
        as_number = reference_sampler(net, noise, None, gnet, num_steps=4, guidance=float(w), dtype=dtype)
        assert not torch.equal(as_number, expected)


def test_noise_that_requires_grad_never_takes_the_engine(monkeypatch):
    """On CUDA tensors the cached engine (inference only) would serve the call: with noise that
    requires grad the plain loop must run instead, whatever the backend asked for."""
    import autoguide_fast.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "_engine_applies", lambda *args: True)  # As for CUDA noise.
    monkeypatch.setattr("autoguide_fast.engine.cache.sample_cached",
                        lambda *args, **kwargs: pytest.fail("the engine served a differentiable call"))
    net = TinyConvDenoiser(channels=3, label_dim=0, seed=1)
    noise = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(7)).requires_grad_()
    for backend in ("auto", "torch"):
        out = fast_guided_sample(net, noise, num_steps=3, backend=backend)
        assert out.requires_grad and torch.equal(out, reference_sampler(net, noise, num_steps=3))


def _karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """k-diffusion's get_sigmas_karras, in float64, with its final 0."""
    ramp = [i / (n - 1) for i in range(n)]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in ramp] + [0.0]


def test_sigmas_of_the_official_schedule_give_the_default_results_bit_for_bit():
    net = TinyConvDenoiser(channels=3, label_dim=0, seed=1)
    gnet = TinyConvDenoiser(channels=3, label_dim=0, seed=2, hidden=4)
    noise = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(9))
    t = reference.edm_time_steps(8, 0.002, 80, 7, torch.float32)
    for backend in ("torch", "auto"):
        default = fast_guided_sample(net, noise, None, gnet, num_steps=8, guidance=2.1, backend=backend)
        for sigmas in (t, t[:-1], t.tolist()):  # With or without the final 0; a tensor or a list.
            assert torch.equal(fast_guided_sample(net, noise, None, gnet, sigmas=sigmas, guidance=2.1,
                                                  backend=backend), default)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_custom_schedule_samples_as_the_official_sampler_would_with_it(monkeypatch, backend):
    # The official sampler with its schedule replaced by k-diffusion's Karras schedule (another rho,
    # float64 values rounded to the state dtype), churn from torch.randn_like.
    net = TinyConvDenoiser(channels=3, label_dim=4, seed=1)
    gnet = TinyConvDenoiser(channels=3, label_dim=4, seed=2, hidden=4)
    noise = torch.randn(3, 3, 5, 6, generator=torch.Generator().manual_seed(4))
    labels = one_hot_labels(3, 4, seed=2)
    sigmas = _karras(6, sigma_max=60.0, rho=5.0)
    kwargs = dict(guidance=2.3, S_churn=20.0, S_min=0.05, S_max=30.0)
    torch.manual_seed(11)
    got = fast_guided_sample(net, noise, labels, gnet, sigmas=sigmas, randn_like=torch.randn_like, backend=backend,
                             **kwargs)
    torch.manual_seed(11)
    default = fast_guided_sample(net, noise, labels, gnet, num_steps=6, randn_like=torch.randn_like, backend=backend,
                                 **kwargs)
    monkeypatch.setattr(reference, "edm_time_steps",
                        lambda n, lo, hi, rho, dtype, device=None: torch.tensor(sigmas, dtype=dtype, device=device))
    torch.manual_seed(11)
    expected = reference_sampler(net, noise, labels, gnet, num_steps=6, **kwargs)
    monkeypatch.undo()
    assert torch.equal(got, expected) and not torch.equal(got, default)
    sampler = GuidedSampler(net, gnet, noise_shape=noise.shape, label_shape=labels.shape, device="cpu",
                            sigmas=sigmas, backend=backend, guidance_interval=(0.2, 40.0), **kwargs)
    interval = fast_guided_sample(net, noise, labels, gnet, sigmas=sigmas, seeds=[5, 6, 7], backend=backend,
                                  guidance_interval=(0.2, 40.0), **kwargs)
    assert torch.equal(sampler(noise, labels, [5, 6, 7]), interval)


BAD_SIGMAS = [
    (dict(sigmas=[1.0]), ValueError, "sigmas: .* got 1 level"),
    (dict(sigmas=[2.0, 3.0, 0.0]), ValueError, r"sigmas: .*sigmas\[1\] = 3.0 is not below"),
    (dict(sigmas=[2.0, 2.0]), ValueError, r"sigmas\[1\] = 2.0 is not below"),
    (dict(sigmas=[2.0, -1.0]), ValueError, r"sigmas\[1\] = -1.0 is not a finite level"),
    (dict(sigmas=[80.0, 0.0, 0.0]), ValueError, r"sigmas\[1\] = 0.0 is not a finite level"),
    (dict(sigmas=[float("nan"), 1.0]), ValueError, r"sigmas\[0\]: expected a number, got NaN"),
    (dict(sigmas=[1e39, 1.0]), ValueError, r"sigmas\[0\] = 1e\+39 is not a finite level > 0 in dtype torch.float32"),
    (dict(sigmas=[1.0, 1.0 - 1e-9]), ValueError, "is not below .* in dtype torch.float32"),
    (dict(sigmas=torch.ones(2, 2)), TypeError, "sigmas: .* got a tensor of shape"),
    (dict(sigmas="80,1"), TypeError, "sigmas: .* got str"),
    (dict(sigmas=[80.0, True]), TypeError, r"sigmas\[1\]: expected a real number"),
    (dict(sigmas=[80.0, 1.0], num_steps=10), ValueError, "num_steps: not used with a custom schedule"),
    (dict(sigmas=[80.0, 1.0], rho=5), ValueError, "rho: not used with a custom schedule"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_SIGMAS, ids=[str(i) for i in range(len(BAD_SIGMAS))])
def test_bad_sigmas_are_named_before_any_network_call(kwargs, error, message):
    calls = []
    net = lambda x, t, labels: calls.append(1) or x * 0.5  # noqa: E731
    with pytest.raises(error, match=message):
        fast_guided_sample(net, torch.randn(2, 3), **kwargs)
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("w", [1e300, -1e300, 3.5e38])
def test_guidance_beyond_float32_follows_the_official_lerp_and_is_named_before_any_network_call(dtype, w):
    """torch.lerp takes a number weight in float32 for every state dtype but float64 and raises
    beyond its range, after the networks ran; we refuse it first, naming it (the fused kernels
    would return inf). A float64 state keeps the weight in float64: no error, the reference's result."""
    calls = []
    net = lambda x, t, labels: calls.append(1) or x * 0.5  # noqa: E731
    gnet = lambda x, t, labels: x * 0.25  # noqa: E731
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
    kwargs = dict(gnet=gnet, num_steps=3, guidance=w, dtype=dtype, sigma_max=2.0)
    backends = [name for name in ("torch", "cpp") if autoguide_fast.backends()[name].available]
    if dtype == torch.float64:
        expected = reference_sampler(net, noise, **kwargs)
        for backend in backends:
            torch.testing.assert_close(fast_guided_sample(net, noise, backend=backend, check_finite=False, **kwargs),
                                       expected, rtol=1e-12, atol=0, equal_nan=True)
        return
    with pytest.raises(RuntimeError, match="overflow"):  # The official rule, as the reference shows it.
        reference_sampler(net, noise, **kwargs)
    calls.clear()
    for backend in backends:
        with pytest.raises(ValueError, match=r"^guidance: .*float32's range"):
            fast_guided_sample(net, noise, backend=backend, **kwargs)
        with pytest.raises(ValueError, match=r"^guidance: .*float32's range"):
            GuidedSampler(net, gnet, noise_shape=noise.shape, device="cpu", backend=backend,
                          **{k: v for k, v in kwargs.items() if k != "gnet"})
    assert calls == []
    f32_max = torch.finfo(torch.float32).max  # The largest weight lerp takes is allowed.
    reference_sampler(net, noise, **{**kwargs, "guidance": -f32_max})
    fast_guided_sample(net, noise, check_finite=False, **{**kwargs, "guidance": -f32_max})


def _counting_randn(seed):
    g, calls = torch.Generator().manual_seed(seed), []

    def randn_like(x):
        calls.append(1)
        return torch.randn(x.shape, generator=g, dtype=x.dtype)

    return randn_like, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_churn_window_includes_its_bounds_like_the_reference(dtype):
    """S_min <= t <= S_max, bounds included, as the official rule: with S_min and S_max set to
    levels of the schedule exactly, steps 1..3 churn (no test had a bound on a level)."""
    t = reference.edm_time_steps(5, 0.002, 80, 7, dtype)
    kwargs = dict(num_steps=5, S_churn=30.0, S_min=float(t[3]), S_max=float(t[1]), dtype=dtype)
    net, gnet = TinyConvDenoiser(seed=1), TinyConvDenoiser(seed=2, hidden=4)
    noise = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    (r1, ref_calls), (r2, fast_calls) = _counting_randn(9), _counting_randn(9)
    expected = reference_sampler(net, noise, None, gnet, guidance=2.1, randn_like=r1, **kwargs)
    got = fast_guided_sample(net, noise, None, gnet, guidance=2.1, backend="torch", randn_like=r2, **kwargs)
    assert len(ref_calls) == len(fast_calls) == 3
    assert torch.equal(got, expected)


@pytest.mark.parametrize("guidance", [1, 2.1])
def test_callback_denoised_is_the_guided_denoiser(guidance):
    """The callback's ``denoised`` is D_w = lerp(D_guide, D_main, w) (the callback test before
    ran unguided only)."""
    seen = []
    net, gnet = TinyConvDenoiser(seed=1), TinyConvDenoiser(seed=2, hidden=4)
    noise = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    out = fast_guided_sample(net, noise, None, gnet, guidance=guidance, num_steps=4, callback=seen.append,
                             backend="torch")
    # The last step is Euler to 0: its x is the guided denoised estimate (up to an ulp).
    torch.testing.assert_close(seen[-1]["denoised"], out, rtol=1e-6, atol=1e-6)
    # Step 0's denoised is D_w at (noise * t_0, t_0).
    t0 = torch.tensor(seen[0]["sigma_hat"], dtype=torch.float32)
    x0 = noise * reference.edm_time_steps(4, 0.002, 80, 7, torch.float32)[0]
    want = net(x0, t0, None) if guidance == 1 else gnet(x0, t0, None).lerp(net(x0, t0, None), guidance)
    torch.testing.assert_close(seen[0]["denoised"], want)


def test_a_guidance_tensor_that_requires_grad_is_refused_not_detached():
    """The official sampler differentiates through lerp's weight; the samplers here read its value
    once, so its gradient would be None, silently: refused while autograd is on, before any call."""
    net, gnet = GaussianDenoiser(0.5), GaussianDenoiser(0.9)
    w = torch.tensor(2.0, requires_grad=True)
    noise = torch.randn(2, 3)
    for call in (lambda: fast_guided_sample(net, noise, None, gnet, num_steps=3, guidance=w),
                 lambda: edm_sampler(net, noise, None, gnet, num_steps=3, guidance=w),
                 lambda: GuidedSampler(net, gnet, noise_shape=(2, 3), device="cpu", num_steps=3, guidance=w)):
        with pytest.raises(TypeError, match="^guidance: a tensor that requires grad"):
            call()
    assert net.calls == gnet.calls == 0
    with torch.no_grad():  # No gradient wanted: its value is the weight.
        got = fast_guided_sample(net, noise, None, gnet, num_steps=3, guidance=w)
    assert torch.equal(got, reference_sampler(net, noise, None, gnet, num_steps=3, guidance=2.0))


def test_a_meta_guidance_tensor_is_named():
    net, gnet = GaussianDenoiser(0.5), GaussianDenoiser(0.9)
    with pytest.raises(ValueError, match="^guidance: .*meta"):
        fast_guided_sample(net, torch.randn(2, 3), None, gnet, num_steps=3, guidance=torch.tensor(2.0, device="meta"))
    assert net.calls == 0


def test_sparse_noise_is_named():
    net = GaussianDenoiser(0.5)
    noise = torch.randn(2, 3).to_sparse()
    with pytest.raises(ValueError, match="^noise: expected a dense"):
        fast_guided_sample(net, noise, num_steps=3)
    sampler = GuidedSampler(net, noise_shape=(2, 3), device="cpu", num_steps=3)
    with pytest.raises(ValueError, match="^noise: expected a dense"):
        sampler(noise)
    labelled = GuidedSampler(net, noise_shape=(2, 3), label_shape=(2, 4), device="cpu", num_steps=3)
    with pytest.raises(ValueError, match="^labels: expected a dense"):
        labelled(torch.randn(2, 3), one_hot_labels(2, 4).to_sparse())
    assert net.calls == 0


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_labels_are_passed_on_as_the_official_sampler_does(backend):
    """The official sampler hands labels to the networks unread: a batch of 1 that the networks
    broadcast (EDM2's Precond does), or any object, e.g. a dict for a custom network."""
    net = TinyConvDenoiser(channels=3, label_dim=4, seed=1)
    gnet = TinyConvDenoiser(channels=3, label_dim=4, seed=2, hidden=4)
    noise = torch.randn(3, 3, 5, 6, generator=torch.Generator().manual_seed(11))
    one = one_hot_labels(1, 4)
    kwargs = dict(num_steps=4, guidance=2.1, S_churn=3.0, randn_like=make_randn_like(5))
    expected = reference_sampler(net, noise, one, gnet, **kwargs)
    other = one.roll(1, dims=1)  # Another class: the labels count.
    assert not torch.equal(expected, reference_sampler(net, noise, other, gnet,
                                                       **{**kwargs, "randn_like": make_randn_like(5)}))
    got = fast_guided_sample(net, noise, one, gnet, backend=backend, **{**kwargs, "randn_like": make_randn_like(5)})
    assert torch.equal(got, expected)
    assert torch.equal(edm_sampler(net, noise, one, gnet, 4, guidance=2.1, S_churn=3.0,
                                   randn_like=make_randn_like(5)), expected)

    def keyed(model):
        return lambda x, t, labels: model(x, t, labels["class"])

    got = fast_guided_sample(keyed(net), noise, {"class": one}, keyed(gnet), backend=backend,
                             **{**kwargs, "randn_like": make_randn_like(5)})
    assert torch.equal(got, expected)


def test_labels_of_another_batch_size_are_refused_before_any_network_call():
    net = GaussianDenoiser(0.5)
    for labels in (one_hot_labels(2, 4), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"^labels: expected batch size 3 \(that of noise\) or 1"):
            fast_guided_sample(net, torch.randn(3, 2), labels, num_steps=3)
    assert net.calls == 0


def test_only_a_batch_of_labels_on_the_noise_device_takes_the_engine():
    """The engine copies labels into a static buffer of the batch's shape: other labels run eagerly."""
    from autoguide_fast.sampler import _engine_applies

    class CudaNoise:  # What _engine_applies reads of a CUDA tensor.
        is_cuda, device, shape = True, torch.device("cpu"), torch.Size([3, 2])

    noise = CudaNoise()
    assert _engine_applies(noise, None, None, None)
    assert _engine_applies(noise, torch.zeros(3, 4), None, None)
    assert not _engine_applies(noise, torch.zeros(1, 4), None, None)
    assert not _engine_applies(noise, {"class": torch.zeros(3, 4)}, None, None)
    assert not _engine_applies(noise, torch.zeros(3, 4, device="meta"), None, None)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_guidance_interval_bounds_that_are_noise_levels_lo_excluded_hi_included(backend):
    """lo < sigma <= hi with both bounds exactly schedule levels: the level equal to lo is unguided,
    the level equal to hi guided (a <= at lo would guide it)."""
    if backend == "cpp" and not autoguide_fast.backends()["cpp"].available:
        pytest.skip("the compiled extension is not loaded")
    n = 9
    t = autoguide_fast.reference.edm_time_steps(n, 0.002, 80, 7, torch.float32).tolist()
    lo, hi = t[6], t[2]
    net, gnet = GaussianDenoiser(0.5), GaussianDenoiser(0.9)
    fast_guided_sample(net, torch.randn(2, 3), gnet=gnet, num_steps=n, guidance=2.0, guidance_interval=(lo, hi),
                       backend=backend)
    sigmas = [float(s) for s in gnet.sigmas]
    assert lo not in sigmas and hi in sigmas
    assert sorted(set(sigmas)) == sorted(s for s in t[:n] if lo < s <= hi)


def test_churn_at_the_last_level_only_is_churn():
    """S_min = S_max = t_{N-1}: only the last step churns. The plan must see it (the seeded
    variant of the engine, the randn_like layout rule), and every backend must inject it."""
    from autoguide_fast.plan import has_churn

    n = 6
    t = autoguide_fast.reference.edm_time_steps(n, 0.002, 80, 7, torch.float32).tolist()
    kwargs = dict(num_steps=n, S_churn=3.0, S_min=t[n - 1], S_max=t[n - 1])
    config = autoguide_fast.sampler.make_config(
        sigma_min=0.002, sigma_max=80, rho=7, guidance=1, gnet=None, S_noise=1, dtype=torch.float32,
        guidance_interval=None, solver="heun", **kwargs)
    assert has_churn(config, torch.device("cpu"))
    net = GaussianDenoiser(0.5)
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(4))
    quiet = fast_guided_sample(net, noise, num_steps=n)
    for backend in ("torch", "cpp") if autoguide_fast.backends()["cpp"].available else ("torch",):
        seeded = fast_guided_sample(net, noise, num_steps=n, seeds=[1, 2], backend=backend,
                                    **{k: v for k, v in kwargs.items() if k != "num_steps"})
        assert not torch.equal(seeded, quiet), backend
    s = GuidedSampler(net, noise_shape=(2, 3), device="cpu", **kwargs)
    assert torch.equal(s(noise, seeds=[1, 2]), fast_guided_sample(net, noise, seeds=[1, 2], backend="torch", **kwargs))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_small_churn_below_the_cap_follows_the_official_gamma(backend):
    """gamma = S_churn / N below its sqrt(2) - 1 cap (the other churn tests hit the cap): the
    official sampler's t_hat, and the noise it scales, with the same randn_like draws."""
    if backend == "cpp" and not autoguide_fast.backends()["cpp"].available:
        pytest.skip("the compiled extension is not loaded")
    net = TinyConvDenoiser(channels=3, label_dim=0, seed=1)
    noise = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(6))
    kwargs = dict(num_steps=8, S_churn=0.5, S_min=0.01, S_max=50.0)  # gamma = 0.0625.
    expected = reference_sampler(net, noise, randn_like=make_randn_like(3), **kwargs)
    got = fast_guided_sample(net, noise, backend=backend, randn_like=make_randn_like(3), **kwargs)
    assert torch.equal(got, expected)
    assert not torch.equal(expected, reference_sampler(net, noise, randn_like=make_randn_like(3), **{
        **kwargs, "S_churn": 0.5 * 8 / 7}))  # S_churn / (N - 1) would be another sampler.
