"""The seeded noise generator (autoguide_fast/noise.py): known answers, statistics, and the same
noise from every backend that implements it (C++, CUDA C++, Triton) as from the torch reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import autoguide_fast
from autoguide_fast import kernels
from autoguide_fast.backends import resolve_backend
from autoguide_fast.noise import churn_stream, philox4x32, philox_normal, seeds_to_tensor
from autoguide_fast.plan import StepPlan
from tests.host_syncs import host_syncs_raise

# Philox4x32-10 known-answer vectors (Random123's kat_vectors): counter, key -> words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
SEEDS = [0, 1, -1, 2**63 - 1, 123456789, -(2**40) + 7]


def _has_cpp() -> bool:
    if autoguide_fast.extension() is None:
        return False
    from autoguide_fast.ops import extension_ops

    return extension_ops.has_kernel("cpu")


def _has_cuda_ops() -> bool:
    if autoguide_fast.extension() is None or not torch.cuda.is_available():
        return False
    from autoguide_fast.ops import extension_ops

    return extension_ops.has_kernel("cuda")


def _noise_backends() -> list:
    """(backend, device) pairs that can run here, among the backends that implement the noise
    (CUDA ones marked ``gpu``, so the GPU check selects them). The Triton kernels are loaded first
    (in Triton's interpreter without CUDA, as in the Triton test files), so that "triton" counts
    as available on CPU whatever the order the test files are collected in."""
    if kernels.triton_error() is None:
        kernels.load(interpret_without_cuda=True)
    pairs = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    status = autoguide_fast.backends()
    for name in ("cpp", "cuda", "triton"):
        if not status[name].available:
            continue
        for device in devices:
            try:
                resolve_backend(name, torch.device(device), torch.float32)
            except RuntimeError:
                continue
            marks = [pytest.mark.gpu] if device == "cuda" else []
            pairs.append(pytest.param((name, device), marks=marks, id=f"{name}-{device}"))
    return pairs


NOISE_BACKENDS = _noise_backends()


def _unit_churn_step(index: int, dtype: torch.dtype, device: str) -> StepPlan:
    one = torch.tensor(1.0, dtype=dtype, device=device)
    return StepPlan(index=index, t_cur=1.0, t_hat=1.0, t_next=0.5, noise_scale=1.0, w_first=None, w_second=None,
                    second_order=True, tensors={"t_cur": one, "t_hat": one, "t_next": one / 2, "noise_scale": one})


def backend_noise(name: str, device: str, seeds, shape, step_index: int, dtype=torch.float32) -> torch.Tensor:
    """A backend's seeded churn noise through the generic interface: 0 + 1·eps = eps exactly."""
    backend = resolve_backend(name, torch.device(device), dtype)
    x = torch.zeros(shape, dtype=dtype, device=device)
    seeds_t = seeds_to_tensor(seeds, device=device)
    return backend.churn(x, _unit_churn_step(step_index, dtype, device), seeds_t, None)


def reference_noise(seeds, shape, step_index: int, dtype=torch.float32) -> torch.Tensor:
    return philox_normal(seeds_to_tensor(seeds), math.prod(shape[1:]), churn_stream(step_index), dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Known answers.
# ---------------------------------------------------------------------------------------------
def test_philox_known_answers_torch_reference():
    for counter, key, expected in KAT:
        c = tuple(torch.tensor([v], dtype=torch.int64) for v in counter)
        k = tuple(torch.tensor([v], dtype=torch.int64) for v in key)
        assert tuple(int(w) for w in philox4x32(c, k)) == expected


@pytest.mark.gpu
def test_seeds_from_the_host_reach_the_gpu_without_making_the_host_wait():
    # Pinned memory and an asynchronous copy (a blocking copy would wait for the GPU's queue).
    given = [1, -2, 2**64 - 1, 2**63, 7]
    on_host = torch.tensor([1, -2, -1, -(2**63), 7])
    with host_syncs_raise():
        got = [seeds_to_tensor(given, device="cuda"), seeds_to_tensor(on_host, device="cuda")]
    for t in got:
        assert t.device == torch.device("cuda", 0) and t.dtype == torch.int64
        assert t.cpu().tolist() == [1, -2, -1, -(2**63), 7]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_philox_known_answers_compiled(device):
    if device == "cpu" and not _has_cpp():
        pytest.skip("the compiled extension (CPU kernels) is not loaded")
    if device == "cuda" and not _has_cuda_ops():
        pytest.skip("no CUDA device or no CUDA kernels in this build")
    from autoguide_fast.ops import extension_ops as E

    counter = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64, device=device)
    key = torch.tensor([k for _, k, _ in KAT], dtype=torch.int64, device=device)
    assert [tuple(r) for r in E.philox4x32(counter, key).cpu().tolist()] == [e for _, _, e in KAT]


# ---------------------------------------------------------------------------------------------
# Statistics: a standard normal, independent across elements, images (seeds) and streams (steps).
# ---------------------------------------------------------------------------------------------
def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).mean() / (a.std() * b.std()))


def assert_standard_normal(z: torch.Tensor) -> None:
    """Moments, Kolmogorov-Smirnov distance and lag correlations at ~5 standard errors."""
    z = z.double().flatten().cpu()
    n = z.numel()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se, f"mean {z.mean():.4g}"
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se, f"variance {z.var():.4g}"
    skew = ((z - z.mean()) ** 3).mean() / z.std() ** 3
    kurt = ((z - z.mean()) ** 4).mean() / z.var() ** 2
    assert abs(skew) < 5 * math.sqrt(6) * se, f"skewness {skew:.4g}"
    assert abs(kurt - 3) < 5 * math.sqrt(24) * se, f"kurtosis {kurt:.4g}"
    s = torch.sort(z).values
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((grid - _normal_cdf(s)).abs(), (grid - 1 / n - _normal_cdf(s)).abs()).max()
    assert ks < 1.95 / math.sqrt(n), f"Kolmogorov-Smirnov distance {ks:.4g}"  # 0.1% level.
    m = (n // 4) * 4
    quads = z[:m].reshape(-1, 4)
    lim = 5 / math.sqrt(quads.shape[0])
    for i, j in ((0, 1), (0, 2), (1, 3), (2, 3), (3, 0)):  # Within and across Box-Muller pairs.
        a, b = quads[:, i], quads[:, j] if (i, j) != (3, 0) else quads[1:, 0]
        a = a[: b.numel()]
        assert abs(_corr(a, b)) < lim, f"lanes {i},{j} correlated"
        assert abs(_corr(a * a, b * b)) < lim, f"lanes {i},{j}: squares correlated"


def test_statistics_checker_can_fail():
    g = torch.Generator().manual_seed(0)
    u = (torch.rand(1 << 16, generator=g, dtype=torch.float64) - 0.5) * math.sqrt(12)  # Mean 0, var 1.
    with pytest.raises(AssertionError, match="Kolmogorov|kurtosis"):
        assert_standard_normal(u)
    z = torch.randn(1 << 16, generator=g, dtype=torch.float64)
    assert_standard_normal(z)
    with pytest.raises(AssertionError, match="correlated"):
        assert_standard_normal(torch.stack([z, z], -1).flatten())


def _draw(source, seeds, shape, step_index):
    name, device = source
    if name == "torch":
        return reference_noise(seeds, shape, step_index)
    return backend_noise(name, device, seeds, shape, step_index).cpu()


@pytest.mark.parametrize("source", [pytest.param(("torch", "cpu"), id="torch-cpu"), *NOISE_BACKENDS])
def test_noise_statistics(source):
    shape = (4, 3, 129, 127)  # 49149 per image, not a multiple of 4.
    z = _draw(source, [17, 18, 19, 20], shape, 5)
    assert z.shape == shape and z.dtype == torch.float32
    assert_standard_normal(z)
    # Independent across images (seeds) and across steps (streams).
    lim = 5 / math.sqrt(z[0].numel())
    other_step = _draw(source, [17], (1, *shape[1:]), 6)
    assert abs(_corr(z[0].flatten().double(), z[1].flatten().double())) < lim
    assert abs(_corr(z[0].flatten().double(), other_step.flatten().double())) < lim
    assert not torch.equal(z[0], other_step[0])


# ---------------------------------------------------------------------------------------------
# Same noise everywhere.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", NOISE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3, 1), (3, 5), (6, 3, 37, 53), (2,)], ids=lambda s: "x".join(map(str, s)))
def test_backend_noise_equals_reference(source, dtype, shape):
    seeds = SEEDS[: shape[0]] if shape[0] <= len(SEEDS) else list(range(shape[0]))
    for step_index in (0, 7):
        ref = reference_noise(seeds, shape, step_index, dtype)
        out = backend_noise(*source, seeds, shape, step_index, dtype).cpu()
        assert out.dtype == dtype and out.shape == ref.shape
        assert (out.double() - ref.double()).abs().max() <= 1e-6
        if source[0] == "cpp" and dtype == torch.float32:
            assert torch.equal(out, ref)  # Same float64 Box-Muller, rounded to the same float32.


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_philox_normal_op_equals_reference(device):
    if device == "cpu" and not _has_cpp():
        pytest.skip("the compiled extension (CPU kernels) is not loaded")
    if device == "cuda" and not _has_cuda_ops():
        pytest.skip("no CUDA device or no CUDA kernels in this build")
    from autoguide_fast.ops import extension_ops as E

    seeds = seeds_to_tensor(SEEDS)
    for numel in (1, 3, 4, 5, 4097):
        for stream in (0, 1, 0xFFFFFFFF):
            for dtype in (torch.float32, torch.float64):
                ref = philox_normal(seeds, numel, stream, dtype)
                out = E.philox_normal(seeds.to(device), numel, stream, dtype).cpu()
                assert (out.double() - ref.double()).abs().max() <= 1e-6
                if device == "cpu" and dtype == torch.float32:
                    assert torch.equal(out, ref)
    # An image's noise depends on its seed only, never on the batch it is drawn in.
    full = E.philox_normal(seeds.to(device), 999, 4, torch.float32)
    part = E.philox_normal(seeds[[4, 1]].to(device), 999, 4, torch.float32)
    assert torch.equal(part, full[[4, 1]])


def test_seeds_are_taken_modulo_2_to_the_64():
    """Seeds beyond [0, 2^64), negative ones included, are their value modulo 2^64 (no test passed
    any such seed)."""
    from autoguide_fast import seeded_labels, seeded_noise

    shape = (4, 8)
    base = [5, 2**64 - 1, 0, 2**63]
    wrapped = [3 * 2**64 + 5, -1, -(2**64), 2**63 - 5 * 2**64]
    assert torch.equal(seeded_noise(wrapped, shape), seeded_noise(base, shape))
    assert torch.equal(seeded_labels(wrapped, 10), seeded_labels(base, 10))


def test_churn_noise_uses_stream_one_plus_step():
    """The specification's churn_stream(i) = 1 + i, pinned end to end against the reference sampler
    fed the seeded noise of streams 1..N (every other test takes churn_stream as its own oracle:
    a churn_stream(i) = i, reusing the initial noise's stream for step 0, went unnoticed)."""
    import itertools

    from autoguide_fast import fast_guided_sample, seeded_noise
    from autoguide_fast.reference import edm_sampler
    from tests.nets import TinyConvDenoiser

    assert [churn_stream(i) for i in range(4)] == [1, 2, 3, 4]
    seeds, shape = [11, 12], (2, 3, 5, 5)
    net = TinyConvDenoiser(seed=1)
    noise = seeded_noise(seeds, shape)
    streams = itertools.count(1)  # Every step churns (S_min = 0, S_max = inf): streams 1, 2, ..., N.
    expected = edm_sampler(net, noise, None, None, num_steps=4, S_churn=20.0,
                           randn_like=lambda x: seeded_noise(seeds, x.shape, stream=next(streams)))
    for backend in [b for b in ("torch", "cpp") if autoguide_fast.backends()[b].available]:
        got = fast_guided_sample(net, noise, None, None, num_steps=4, S_churn=20.0, seeds=seeds, backend=backend)
        assert torch.equal(got, expected), backend


def _philox_python(seed: int, counter: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 on Python integers, written from the specification in noise.py (an oracle
    independent of the tensor implementation)."""
    m = 0xFFFFFFFF
    k0, k1 = seed & m, (seed >> 32) & m
    c0, c1, c2, c3 = counter
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & m, (p0 >> 32) ^ c3 ^ k1, p0 & m
    return c0, c1, c2, c3


@pytest.mark.parametrize("num_classes", [1000, 10, 7, 2**40 + 3])
def test_seeded_labels_follow_the_specification(num_classes):
    """Class = ((r1 << 32) | r0) with the top bit cleared, modulo C, from the words r0, r1 of group 0
    of the labels stream: from an independent Philox, for seeds with the high bit set too (where a
    dropped mask changes the class of any C that is not a power of two)."""
    from autoguide_fast import seeded_labels
    from autoguide_fast.noise import STREAM_LABELS

    seeds = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x8123456789ABCDEF, 77]
    expected = []
    for seed in seeds:
        r0, r1, _, _ = _philox_python(seed, (0, 0, STREAM_LABELS, 0))
        expected.append((((r1 << 32) | r0) & (2**63 - 1)) % num_classes)
    assert seeded_labels(seeds, num_classes).tolist() == expected


@pytest.mark.parametrize("device, message", [
    ("tpu", "^device: not a valid device"),
    ("meta", "^device: expected a device that holds values"),
    (3.5, "^device: expected a torch.device"),
] + ([] if torch.cuda.is_available() else [("cuda", "^device: cuda requested but CUDA is not available")]))
def test_seeded_noise_and_labels_name_a_bad_device(device, message):
    error = TypeError if not isinstance(device, str) else ValueError
    with pytest.raises(error, match=message):
        autoguide_fast.seeded_noise([1, 2], (2, 3), device=device)
    with pytest.raises(error, match=message):
        autoguide_fast.seeded_labels([1, 2], 10, device=device)
