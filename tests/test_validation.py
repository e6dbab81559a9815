"""Every bad input raises a clear error naming the argument, before any network is called."""

import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

import autoguide_fast
from autoguide_fast import fast_guided_sample, seeded_noise


class NeverCalled(torch.nn.Module):
    def forward(self, x, t, labels=None):
        raise AssertionError("a network was called before the arguments were validated")


NET = NeverCalled()
NOISE = torch.randn(2, 3, 4, 4)
# The fused CPU backend where the compiled extension is loaded (the suite also runs without it).
CPP = pytest.param("cpp", marks=pytest.mark.skipif(not autoguide_fast.backends()["cpp"].available,
                                                   reason="the compiled extension (CPU kernels) is not loaded"))

BAD_CALLS = [
    ({"net": 3}, TypeError, "net"),
    ({"gnet": "not a net", "guidance": 2.0}, TypeError, "gnet"),
    ({"guidance": 2.0}, TypeError, "gnet"),
    ({"guidance": float("nan"), "gnet": NET}, ValueError, "guidance"),
    ({"guidance": float("inf"), "gnet": NET}, ValueError, "guidance: expected a finite number"),
    ({"guidance": "2", "gnet": NET}, TypeError, "guidance"),
    ({"num_steps": 1}, ValueError, "num_steps"),
    ({"num_steps": 2.5}, TypeError, "num_steps"),
    ({"sigma_min": 0.0}, ValueError, "sigma_min"),
    ({"sigma_min": -1.0}, ValueError, "sigma_min"),
    ({"sigma_max": 0.001}, ValueError, "sigma_max"),
    ({"sigma_max": math.inf}, ValueError, "sigma_max"),
    ({"rho": 0}, ValueError, "rho"),
    ({"S_noise": -0.1}, ValueError, "S_noise"),
    ({"S_churn": -1}, ValueError, "S_churn"),
    ({"noise": [1.0, 2.0]}, TypeError, "noise"),
    ({"noise": torch.ones(2, 3, dtype=torch.int64)}, TypeError, "noise"),
    ({"noise": torch.empty(0, 3)}, ValueError, "noise"),
    ({"noise": torch.tensor([[1.0, float("nan")]])}, ValueError, "noise"),
    ({"noise": torch.tensor([[1.0, float("inf")]])}, ValueError, "noise"),
    ({"labels": torch.zeros(3, 10)}, ValueError, "labels"),
    ({"labels": torch.zeros(0, 10)}, ValueError, "labels"),  # (Any other object goes to the networks, as given.)
    ({"seeds": [1, 2, 3]}, ValueError, "seeds"),
    ({"seeds": [1.5, 2.0]}, TypeError, "seeds"),
    ({"seeds": 7}, TypeError, "seeds"),
    ({"seeds": torch.tensor([1.0, 2.0])}, TypeError, "seeds"),
    ({"seeds": torch.tensor([[1], [2]])}, ValueError, "seeds: expected a 1-D sequence"),
    ({"guidance_interval": (1.0,), "guidance": 2.0, "gnet": NET}, ValueError, "guidance_interval"),
    ({"guidance_interval": (5.0, 1.0), "guidance": 2.0, "gnet": NET}, ValueError, "guidance_interval"),
    ({"guidance_interval": (1.0, 1.0), "guidance": 2.0, "gnet": NET}, ValueError, "guidance_interval"),  # Empty.
    ({"guidance_interval": (-1.0, 1.0), "guidance": 2.0, "gnet": NET}, ValueError, "guidance_interval"),
    ({"guidance_interval": "0-1", "guidance": 2.0, "gnet": NET}, ValueError, "guidance_interval"),
    ({"solver": "dpm"}, ValueError, "solver"),
    ({"backend": "vulkan"}, ValueError, "backend"),
    ({"dtype": torch.int32}, TypeError, "dtype"),
    ({"callback": 5}, TypeError, "callback"),
    ({"randn_like": 5}, TypeError, "randn_like"),
    ({"guidance": torch.tensor([2.0, 1.0]), "gnet": NET}, TypeError, "guidance"),
    ({"rho": torch.tensor(7.0)}, TypeError, "rho: expected a real number, got a tensor"),
    ({"sigma_max": torch.tensor(80.0)}, TypeError, "sigma_max"),
    ({"S_churn": torch.tensor(1.0)}, TypeError, "S_churn"),
    ({"guidance": torch.tensor(True), "gnet": NET}, TypeError, "guidance"),
    ({"guidance": Fraction(21, 10), "gnet": NET}, TypeError, r"guidance: expected a real number \(int, float"),
    ({"S_noise": Fraction(1, 2), "S_churn": 3.0}, TypeError, "S_noise: expected a real number"),
    ({"sigma_min": math.inf}, ValueError, "sigma_min: expected a finite value"),
    ({"S_noise": math.inf, "S_churn": 3.0}, ValueError, "S_noise: expected a finite value"),
    ({"dtype": torch.float8_e4m3fn}, TypeError, "dtype: expected one of"),
    ({"check_finite": "no"}, TypeError, "check_finite: expected True or False"),
    ({"check_finite": None}, TypeError, "check_finite: expected True or False"),
    ({"noise": torch.randn(2, 3, device="meta")}, ValueError, "noise: .* got a meta tensor"),
    ({"seeds": torch.tensor(5)}, ValueError, "seeds: expected a 1-D sequence"),
    ({"seeds": {1, 2}}, TypeError, "seeds: expected a sequence"),
    ({"seeds": {1: 0, 2: 0}}, TypeError, "seeds: expected a sequence"),
    ({"seeds": np.array(3)}, TypeError, "seeds: expected a sequence"),
    ({"seeds": np.array([[1], [2]])}, TypeError, "seeds: expected integers"),
    ({"noise": NOISE.clone().requires_grad_(), "backend": "cpp"}, ValueError, "backend: 'cpp' is not differentiable"),
    ({"noise": NOISE.to(memory_format=torch.channels_last), "backend": "cpp", "S_churn": 10.0}, ValueError,
     "noise: not contiguous"),
    ({"seeds": torch.tensor([1, 2], device="meta"), "S_churn": 3.0}, ValueError, "seeds: .* got a meta tensor"),
    # Schedules the official formula cannot give in the state dtype (it would divide by 0 or carry NaN).
    ({"rho": math.inf}, ValueError, "rho: expected a finite value"),
    ({"rho": 1e-5}, ValueError, r"rho: 1e-05 is too small .* overflows"),
    ({"rho": 0.02}, ValueError, r"rho: with rho = 0.02.* gives t_0 = nan in dtype torch.float32"),
    ({"rho": 1, "sigma_min": 1e-4, "sigma_max": 1e4}, ValueError, r"rho: .* gives t_31 = 0.0 in dtype torch.float32"),
    ({"sigma_max": 1e39}, ValueError, "sigma_max: 1e[+]39 is not a usable noise level in dtype torch.float32"),
    ({"sigma_max": 1e5, "dtype": torch.float16}, ValueError, r"sigma_max: .* rounds to inf"),
    ({"sigma_min": 1e-46}, ValueError, r"sigma_min: .* rounds to 0.0"),
]


@pytest.mark.parametrize("kwargs,error,name", BAD_CALLS, ids=[f"{c[2]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_bad_input_raises_naming_the_argument(kwargs, error, name):
    kwargs = dict(kwargs)
    net = kwargs.pop("net", NET)
    noise = kwargs.pop("noise", NOISE)
    with pytest.raises(error, match=name):
        fast_guided_sample(net, noise, **kwargs)


def test_fused_backend_takes_non_contiguous_noise_when_no_step_churns():
    """S_churn > 0 but the churn window [S_min, S_max] holds no step: nothing is drawn, so the
    explicit fused backend need not refuse channels-last noise (and equals the reference)."""
    from autoguide_fast.reference import edm_sampler as reference_sampler

    if not autoguide_fast.backends()["cpp"].available:
        pytest.skip("the compiled extension (CPU kernels) is not loaded")

    net = lambda x, t, labels: x * (0.25 / (0.25 + t**2))  # noqa: E731
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).to(memory_format=torch.channels_last)
    window = {"num_steps": 4, "S_churn": 10.0, "S_min": 1000.0, "S_max": 2000.0}
    assert torch.equal(fast_guided_sample(net, noise, backend="cpp", **window), reference_sampler(net, noise, **window))
    with pytest.raises(ValueError, match="noise: not contiguous"):  # A window that does hold steps.
        fast_guided_sample(net, noise, backend="cpp", **{**window, "S_min": 0.0})


def test_unused_arguments_are_taken_as_the_official_sampler_takes_them():
    """S_noise only scales churn noise: with S_churn = 0 even inf is unused (and accepted, as by the
    official sampler); a NumPy bool is a flag."""
    from autoguide_fast.reference import edm_sampler as reference_sampler

    net = lambda x, t, labels: x * (0.25 / (0.25 + t**2))  # noqa: E731
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    out = fast_guided_sample(net, noise, num_steps=4, S_noise=math.inf, check_finite=np.bool_(True))
    assert torch.equal(out, reference_sampler(net, noise, num_steps=4, S_noise=math.inf))


def test_missing_guide_names_why_it_is_needed():
    with pytest.raises(TypeError, match=r"gnet: a guide network is required when guidance != 1 \(guidance=2.0\)"):
        fast_guided_sample(NET, NOISE, guidance=2.0)


BAD_SEEDED = [
    (lambda: seeded_noise([1], (1, 2.7)), TypeError, "shape"),
    (lambda: seeded_noise([1], "14"), TypeError, "shape"),
    (lambda: seeded_noise([1, 2], (1, 4)), ValueError, "shape"),
    (lambda: seeded_noise([1], (1, -4)), ValueError, "shape"),
    (lambda: seeded_noise([1], (1, 4), dtype="float32"), TypeError, "dtype"),
    (lambda: seeded_noise([1], (1, 4), dtype=torch.int32), TypeError, "dtype"),
    (lambda: autoguide_fast.seeded_labels(range(3), 2.5), TypeError, "num_classes"),
    (lambda: autoguide_fast.seeded_labels(range(3), True), TypeError, "num_classes"),
    (lambda: autoguide_fast.seeded_labels(range(3), 0), ValueError, "num_classes"),
    (lambda: autoguide_fast.seeded_labels(range(3), 1 << 64), ValueError, "num_classes: .* below 2"),
    (lambda: seeded_noise(5, (1, 3)), TypeError, "seeds: expected a sequence"),
    (lambda: seeded_noise([1], (1, 3), stream=1.5), TypeError, "stream: expected an integer"),
    (lambda: seeded_noise([1], (1, 3), stream=1 << 32), ValueError, r"stream: expected an integer in \[0, 2\^32\)"),
    (lambda: seeded_noise([1], (1, 3), stream=-1), ValueError, "stream"),
]


@pytest.mark.parametrize("call,error,name", BAD_SEEDED, ids=[f"{c[2]}-{i}" for i, c in enumerate(BAD_SEEDED)])
def test_seeded_noise_and_labels_check_their_arguments(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_unavailable_backend_raises_with_reason():
    unavailable = [s for s in autoguide_fast.backends().values() if not s.available]
    for status in unavailable:
        with pytest.raises(RuntimeError, match=f"backend={status.name!r} is not available"):
            fast_guided_sample(NET, NOISE, backend=status.name)


BAD_OUTPUTS = {
    "shape": (lambda x: x[:, :1] * 0.5, ValueError, "returned shape"),
    "not a tensor": (lambda x: (x * 0.5).tolist(), TypeError, "returned list, expected a tensor"),
    "integer dtype": (lambda x: (x * 0.5).round().long(), TypeError, "returned dtype torch.int64"),
}


@pytest.mark.parametrize("which,name", [("main", "net"), ("guide", "gnet")])
@pytest.mark.parametrize("bad_output", list(BAD_OUTPUTS))
def test_network_output_is_checked_at_first_evaluation(which, name, bad_output):
    make, error, message = BAD_OUTPUTS[bad_output]
    good = lambda x, t, labels: x * 0.5  # noqa: E731
    bad = lambda x, t, labels: make(x)  # noqa: E731
    net, gnet = (bad, good) if which == "main" else (good, bad)
    for backend in ("torch", "auto"):
        with pytest.raises(error, match=f"{name} \\(the {which} network\\) {message}"):
            fast_guided_sample(net, NOISE, gnet=gnet, guidance=2.0, num_steps=3, backend=backend)


@pytest.mark.parametrize("which,name", [("main", "net"), ("guide", "gnet")])
def test_network_output_on_another_device_is_named(which, name):
    good = lambda x, t, labels: x * 0.5  # noqa: E731
    elsewhere = lambda x, t, labels: (x * 0.5).to("meta")  # noqa: E731
    net, gnet = (elsewhere, good) if which == "main" else (good, elsewhere)
    with pytest.raises(ValueError, match=f"{name} \\(the {which} network\\) returned a tensor on meta"):
        fast_guided_sample(net, NOISE, gnet=gnet, guidance=2.0, num_steps=3, backend="torch")


@pytest.mark.parametrize("backend", ["torch", CPP, "auto"])
def test_network_output_is_checked_at_every_evaluation(backend):
    # A guide whose output moves to another device late in the trajectory: the fused ops would
    # dispatch a meta tensor to their shape-only fake kernels and return uninitialised memory.
    good = lambda x, t, labels: x * 0.5  # noqa: E731
    late = lambda x, t, labels: x.to("meta") * 0.3 if t < 1 else x * 0.3  # noqa: E731
    with pytest.raises(ValueError, match="gnet \\(the guide network\\) returned a tensor on meta"):
        fast_guided_sample(good, NOISE, gnet=late, guidance=2.0, num_steps=4, backend=backend)


@pytest.mark.parametrize("returned", [None, "noise"])
@pytest.mark.parametrize("backend", ["torch", CPP, "auto"])
def test_randn_like_returning_no_tensor_is_named(returned, backend):
    with pytest.raises(TypeError, match=f"randn_like: returned {type(returned).__name__}, expected a tensor"):
        fast_guided_sample(lambda x, t, labels: x * 0.5, NOISE, num_steps=4, S_churn=3.0,
                           randn_like=lambda x: returned, backend=backend)


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_fused_backends_name_randn_like_noise_unlike_the_state(bad):
    """The fused kernels read noise exactly like the state: a broadcastable shape (which the torch
    loop follows, as the reference) or another dtype is refused, naming randn_like."""
    if not autoguide_fast.backends()["cpp"].available:
        pytest.skip("the compiled extension (CPU kernels) is not loaded")

    def randn_like(x):
        return torch.randn(x.shape[1:], dtype=x.dtype) if bad == "shape" else torch.randn_like(x, dtype=torch.float64)

    net = lambda x, t, labels: x * 0.5  # noqa: E731
    with pytest.raises(TypeError, match=r"randn_like: returned noise .* the cpp backend needs noise like the state"):
        fast_guided_sample(net, NOISE, num_steps=4, S_churn=3.0, randn_like=randn_like, backend="cpp")
    if bad == "shape":  # The torch loop broadcasts it, as the reference.
        fast_guided_sample(net, NOISE, num_steps=4, S_churn=3.0, randn_like=randn_like, backend="torch")


def test_seeded_noise_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        seeded_noise([1, 2], (3, 4))
    with pytest.raises(TypeError, match="seeds"):
        seeded_noise(["a"], (1, 4))
    with pytest.raises(TypeError, match="dtype"):
        seeded_noise([1], (1, 4), dtype=torch.int32)


def test_import_and_sampling_work_without_the_extension():
    code = (
        "import logging, torch\n"
        "import autoguide_fast as a\n"
        "st = a.backends()\n"
        "assert st['torch'].available\n"
        "assert not st['cpp'].available and 'AUTOGUIDE_FAST_DISABLE_EXTENSION' in st['cpp'].reason, st['cpp']\n"
        "assert not st['cuda'].available\n"
        "x = a.fast_guided_sample(lambda x, t, l: x * 0.5, torch.randn(2, 3), num_steps=4)\n"
        "assert x.shape == (2, 3)\n"
        "try:\n"
        "    a.fast_guided_sample(lambda x, t, l: x, torch.randn(2, 3), backend='cpp')\n"
        "except RuntimeError as e:\n"
        "    assert 'not available' in str(e)\n"
        "else:\n"
        "    raise AssertionError('cpp backend should be unavailable')\n"
        "print('OK')\n"
    )
    env = dict(os.environ, AUTOGUIDE_FAST_DISABLE_EXTENSION="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"
    # Exactly one warning about the missing extension.
    assert proc.stderr.count("compiled extension autoguide_fast._C not loaded") == 1, proc.stderr


@pytest.mark.parametrize("backend", [CPP, "triton"])
def test_an_explicit_backend_that_cannot_run_the_input_says_why(backend):
    """resolve_backend's documented error for a backend that exists but cannot run this input (a
    float16 state): a RuntimeError saying so, not the backend constructor's own error."""
    from autoguide_fast.backends import resolve_backend

    if not autoguide_fast.backends()[backend].available:
        pytest.skip(f"{backend} is not available here")
    with pytest.raises(RuntimeError, match=f"backend='{backend}' cannot run this input: .*float16"):
        resolve_backend(backend, torch.device("cpu"), torch.float16)


def test_auto_on_another_device_type_takes_the_torch_loop():
    from autoguide_fast.backends import resolve_backend

    for device in ("meta", "mps", "xpu"):  # No fused backend is built for these: the plain loop.
        assert resolve_backend("auto", torch.device(device), torch.float32).name == "torch"
