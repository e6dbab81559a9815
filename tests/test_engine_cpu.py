"""The engine without a GPU: configuration, argument errors, the eager path, the cache, the
fallback and re-capture logic, thread safety.

Graph orchestration is exercised with ``RerunCapturer``, a stand-in for CUDA graphs whose
"replay" re-runs the captured function on the same static buffers and writes into the outputs of
the capture — the contract a real graph fulfils. It checks the plumbing (static inputs, seeds
buffer, chained per-step states, re-capture, fallback); tests/test_engine_gpu.py checks the real
thing on a GPU.
"""

from __future__ import annotations

import functools
import gc
import types
import warnings
import weakref

import pytest
import torch

import autoguide_fast
from autoguide_fast import GuidedSampler, fast_guided_sample, seeded_noise
from autoguide_fast.engine import CaptureFailed, GraphCaptureWarning
from autoguide_fast.engine import cache as engine_cache
from autoguide_fast.engine.cuda_graphs import describe_failure
from autoguide_fast.engine.networks import NetworkRef, network_identity, parameter_signature
from autoguide_fast.sampler import _engine_applies
from tests.nets import TinyConvDenoiser, one_hot_labels
from tests.threads import run_in_threads

SHAPE = (2, 3, 6, 5)
LABEL_DIM = 4
CHURN = {"S_churn": 30.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}


def nets(label_dim: int = LABEL_DIM) -> tuple[TinyConvDenoiser, TinyConvDenoiser]:
    return (TinyConvDenoiser(channels=3, label_dim=label_dim, seed=1),
            TinyConvDenoiser(channels=3, label_dim=label_dim, seed=2, hidden=4))


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sampler(net, gnet, **kwargs) -> GuidedSampler:
    kwargs.setdefault("noise_shape", SHAPE)
    kwargs.setdefault("label_shape", (SHAPE[0], LABEL_DIM))
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("backend", "torch")
    kwargs.setdefault("num_steps", 5)
    kwargs.setdefault("guidance", 2.1)
    return GuidedSampler(net, gnet, **kwargs)


def eager(net, gnet, noise, labels, seeds=None, **kwargs) -> torch.Tensor:
    """The plain loop on CPU (the path tests/test_sampler_api.py pins to the reference)."""
    kwargs.setdefault("num_steps", 5)
    kwargs.setdefault("guidance", 2.1)
    return fast_guided_sample(net, noise, labels, gnet, backend="torch", seeds=seeds, **kwargs)


# ----------------------------------------------------------------------------- a CPU stand-in for graphs

# ----------------------------------------------------------------------------- argument errors

class CountingNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x, t, labels=None):
        self.calls += 1
        return x * 0.5


BAD_CONSTRUCTIONS = [
    ({"net": None}, TypeError, "net"),
    ({"gnet": 3, "guidance": 2.0}, TypeError, "gnet"),
    ({"gnet": None, "guidance": 2.0}, TypeError, "gnet"),
    ({"noise_shape": (0, 3)}, ValueError, "noise_shape"),
    ({"noise_shape": ()}, ValueError, "noise_shape"),
    ({"noise_shape": "2x3"}, TypeError, "noise_shape"),
    ({"noise_shape": (2, 3.5)}, TypeError, "noise_shape"),
    ({"label_shape": (3, 4)}, ValueError, "label_shape"),
    ({"label_shape": 4}, TypeError, "label_shape"),
    ({"label_dtype": "float32"}, TypeError, "label_dtype"),
    ({"dtype": torch.int32}, TypeError, "dtype"),
    ({"num_steps": 1}, ValueError, "num_steps"),
    ({"sigma_max": -1.0}, ValueError, "sigma_max"),
    ({"solver": "rk4"}, ValueError, "solver"),
    ({"backend": "fast"}, ValueError, "backend"),
    ({"streams": "maybe"}, ValueError, "streams"),
    ({"streams": True}, ValueError, "streams"),
    ({"graph": "full"}, ValueError, "graph"),
    ({"graph": "trajectory"}, ValueError, "graph"),  # CPU device: no CUDA graphs.
    ({"graph": "step"}, ValueError, "graph"),
    ({"streams": "on"}, ValueError, "streams"),  # CPU device: no streams.
    ({"compile_networks": 1}, TypeError, "compile_networks"),
    ({"copy_output": "yes"}, TypeError, "copy_output"),
    ({"check_finite": None}, TypeError, "check_finite"),
    ({"device": "meta"}, ValueError, "device: expected a CPU or CUDA device"),
    ({"device": 3}, TypeError, "device"),
    ({"device": "gpu:0"}, ValueError, "device"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD_CONSTRUCTIONS, ids=[str(b[0]) for b in BAD_CONSTRUCTIONS])
def test_bad_constructor_arguments_name_the_argument(kwargs, exc, name):
    net, gnet = CountingNet(), CountingNet()
    kwargs = dict(kwargs)
    net = kwargs.pop("net", net)
    gnet = kwargs.pop("gnet", gnet)
    with pytest.raises(exc, match=f"^{name}"):
        sampler(net, gnet, **kwargs)
    assert getattr(net, "calls", 0) == 0 and getattr(gnet, "calls", 0) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
def test_cuda_device_without_cuda_is_refused():
    with pytest.raises(ValueError, match="^device: .*CUDA is not available"):
        sampler(CountingNet(), CountingNet(), device="cuda")


@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0)], ids=["text", "device"])
def test_an_indexed_cpu_device_is_the_cpu(device):
    """CPU tensors report `cpu` whatever index they were made with: a sampler kept at `cpu:0`
    refused every tensor (torch.randn(..., device="cpu:0") too)."""
    net = TinyConvDenoiser(channels=3, label_dim=LABEL_DIM, seed=1)
    s = GuidedSampler(net, noise_shape=SHAPE, label_shape=LABELS.shape, device=device, num_steps=3)
    assert s.device == torch.device("cpu")
    noise = torch.randn(SHAPE, device=device)
    expected = fast_guided_sample(net, noise, LABELS, num_steps=3)
    assert torch.equal(s(noise, LABELS), expected)
    buckets = autoguide_fast.BucketedSampler(net, image_shape=SHAPE[1:], image_label_shape=LABELS.shape[1:],
                                             batch_sizes=(SHAPE[0],), device=device, num_steps=3)
    assert torch.equal(buckets(noise, LABELS), expected)


def test_default_device_is_cuda_if_available_else_cpu():
    s = GuidedSampler(CountingNet(), noise_shape=(1, 2), backend="torch")
    assert s.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


LABELS = one_hot_labels(SHAPE[0], LABEL_DIM)
BAD_CALLS = [
    ({"noise": randn(3, 3, 6, 5)}, ValueError, "noise: expected shape"),
    ({"noise": torch.ones(SHAPE, dtype=torch.int64)}, TypeError, "noise: expected a floating"),
    ({"noise": [0.0] * 4}, TypeError, "noise"),
    ({"noise": torch.randn(SHAPE, device="meta")}, ValueError, "noise: expected a tensor on cpu"),
    ({"labels": None}, ValueError, "labels: required"),
    ({"labels": LABELS[:1]}, ValueError, "labels: expected shape"),
    ({"labels": LABELS.double()}, TypeError, "labels: expected dtype"),
    ({"labels": LABELS.tolist()}, TypeError, "labels"),
    ({"labels": LABELS.to_sparse()}, ValueError, "labels: expected a dense"),
    ({"noise": randn(*SHAPE).to_sparse()}, ValueError, "noise: expected a dense"),
    ({"seeds": [1, 2, 3]}, ValueError, "seeds: expected one seed per image"),
    ({"seeds": [1.0, 2.0]}, TypeError, "seeds"),
    ({"seeds": "12"}, TypeError, "seeds"),
    ({"seeds": torch.tensor([1.0, 2.0])}, TypeError, "seeds"),
]


@pytest.mark.parametrize("kwargs,exc,message", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_call_arguments_name_the_argument_before_any_network_call(kwargs, exc, message):
    net, gnet = CountingNet(), CountingNet()
    s = sampler(net, gnet)
    call = {"noise": randn(*SHAPE), "labels": LABELS}
    call.update(kwargs)
    with pytest.raises(exc, match=f"^{message}"):
        s(**call)
    assert net.calls == gnet.calls == 0
    assert not s.report["prepared"]


def test_labels_refused_without_label_shape():
    s = sampler(CountingNet(), CountingNet(), label_shape=None)
    with pytest.raises(ValueError, match="^labels: this sampler was built without label_shape"):
        s(randn(*SHAPE), LABELS)


def test_prepare_checks_its_argument():
    with pytest.raises(TypeError, match="^seeded"):
        sampler(CountingNet(), CountingNet()).prepare(seeded="yes")


# ----------------------------------------------------------------------------- the eager path on CPU

CASES = {
    "guided": {},
    "unguided": {"guidance": 1},
    "churn": dict(CHURN),
    "interval+euler": {"guidance_interval": (0.5, 10.0), "solver": "euler", "guidance": 3.0},
    "float64": {"dtype": torch.float64, **CHURN},
}


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_sampler_equals_fast_guided_sample_bit_for_bit(case):
    kwargs = CASES[case]
    net, gnet = nets()
    s = sampler(net, gnet, **kwargs)
    report = s.prepare()
    assert report["graph"] == "none" and report["streams"] == "off" and report["device"] == "cpu"
    for seed in (1, 2):
        noise, seeds = randn(*SHAPE, seed=seed), [seed, 100 + seed]
        expected = eager(net, gnet, noise, LABELS, seeds, **kwargs)
        out = s(noise, LABELS, seeds)
        assert out.dtype == kwargs.get("dtype", torch.float32)
        assert torch.equal(out, expected)


def test_noise_defaults_to_seeded_noise_then_to_torch_randn():
    net, gnet = nets()
    s = sampler(net, gnet, **CHURN)
    seeds = [7, -3]
    assert torch.equal(s(labels=LABELS, seeds=seeds),
                       eager(net, gnet, seeded_noise(seeds, SHAPE), LABELS, seeds, **CHURN))
    s = sampler(net, gnet)
    torch.manual_seed(5)
    out = s(labels=LABELS)
    torch.manual_seed(5)
    assert torch.equal(out, eager(net, gnet, torch.randn(SHAPE), LABELS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_seeded_default_noise_from_the_backend_kernel_is_seeded_noise(backend, dtype):
    if backend == "cpp" and not autoguide_fast.backends()["cpp"].available:
        pytest.skip("the compiled extension is not built")
    s = sampler(*nets(), backend=backend, dtype=dtype)
    seeds = torch.tensor([7, -3])
    # float32 noise (as the official generator and `autoguide-fast generate` draw it), then rounded.
    expected = seeded_noise(seeds, SHAPE).to(dtype)
    got = s._seeded_noise(seeds)
    assert got.dtype == dtype and torch.equal(got, expected)


@pytest.mark.parametrize("graph", ["trajectory", "step"])
def test_preparing_does_not_shift_the_callers_random_numbers(fake_graphs, graph):
    """Warm-up runs and the capture draw churn noise from torch.randn_like: the first call (which
    prepares) must still equal the eager loop run from the same generator state."""
    net, gnet = nets()
    s = sampler(net, gnet, graph=graph, **CHURN)
    noise = randn(*SHAPE)
    torch.manual_seed(11)
    first = s(noise, LABELS)
    after_first = torch.randn(3)
    torch.manual_seed(11)
    expected = eager(net, gnet, noise, LABELS, **CHURN)
    assert torch.equal(first, expected) and torch.equal(after_first, torch.randn(3))


def test_churn_without_seeds_uses_torch_randn_like():
    net, gnet = nets()
    s = sampler(net, gnet, **CHURN)
    noise = randn(*SHAPE)
    torch.manual_seed(11)
    out = s(noise, LABELS)
    torch.manual_seed(11)
    assert torch.equal(out, eager(net, gnet, noise, LABELS, **CHURN))
    assert not torch.equal(out, eager(net, gnet, noise, LABELS, [1, 2], **CHURN))


def test_noise_of_another_dtype_is_converted_like_the_eager_loop():
    net, gnet = nets()
    noise = randn(*SHAPE).half()
    assert torch.equal(sampler(net, gnet)(noise, LABELS), eager(net, gnet, noise, LABELS))


def test_non_finite_result_raises_unless_allowed():
    def bad_net(x, t, labels):
        return torch.where(t < 1, torch.full_like(x, float("nan")), x)

    s = GuidedSampler(bad_net, noise_shape=(2, 3), device="cpu", backend="torch", num_steps=4)
    with pytest.raises(FloatingPointError, match="^GuidedSampler: the result contains NaN"):
        s(randn(2, 3))
    s = GuidedSampler(bad_net, noise_shape=(2, 3), device="cpu", backend="torch", num_steps=4, check_finite=False)
    assert torch.isnan(s(randn(2, 3))).all()


@pytest.mark.parametrize("graph", ["step", "trajectory"])
def test_graph_noise_buffer_has_the_state_dtype_whatever_the_first_noise(fake_graphs, graph):
    """A float64 sampler prepared from float32 noise: a later float64 noise keeps its last bits (the
    static buffer has the state dtype, not the first caller's)."""
    net, gnet = nets()
    s = sampler(net, gnet, graph=graph, dtype=torch.float64)
    s(randn(*SHAPE).float(), LABELS)
    noise = randn(*SHAPE, seed=3).double() + 1e-12  # Not representable in float32.
    assert torch.equal(s(noise, LABELS), eager(net, gnet, noise, LABELS, dtype=torch.float64))


@pytest.mark.parametrize("graph", ["none", "step", "trajectory"])
def test_one_non_finite_element_raises_in_every_mode(fake_graphs, graph):
    """A single NaN in one image is found (not only an all-NaN result), in every graph mode: the
    per-step graphs check the last step's result."""
    def bad_net(x, t, labels):
        out = x * 0.5
        out[0, 1] = torch.where(t < 1, float("nan"), out[0, 1])  # One element of image 0.
        return out

    s = GuidedSampler(bad_net, noise_shape=(2, 3), device="cpu", backend="torch", num_steps=4, graph=graph)
    with pytest.raises(FloatingPointError, match="^GuidedSampler: the result contains NaN"):
        s(randn(2, 3))


def test_compile_networks_compiles_both_without_inductor_cudagraphs(monkeypatch):
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append((fn, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    net, gnet = nets()
    s = sampler(net, gnet, compile_networks=True)
    assert calls == []  # Construction does no work.
    noise = randn(*SHAPE)
    assert torch.equal(s(noise, LABELS), eager(net, gnet, noise, LABELS))
    assert [fn for fn, _ in calls] == [net, gnet]
    assert all(kw["options"] == {"triton.cudagraphs": False} for _, kw in calls)
    assert s.report["compile_networks"] is True


def test_eager_sampler_is_thread_safe():
    net, gnet = nets()
    s = sampler(net, gnet, **CHURN)
    seed_sets = [[i, 1000 + i] for i in range(8)]
    expected = [eager(net, gnet, seeded_noise(seeds, SHAPE), LABELS, seeds, **CHURN) for seeds in seed_sets]
    failures: list[str] = []

    def worker(i: int) -> None:
        for _ in range(4):
            if not torch.equal(s(labels=LABELS, seeds=seed_sets[i]), expected[i]):
                failures.append(f"thread {i}")

    run_in_threads(worker)
    assert failures == []


@pytest.mark.parametrize("graph", ["trajectory", "step", "none"])
def test_first_call_under_inference_mode_then_calls_outside_it(fake_graphs, graph):
    """Servers often warm up under torch.inference_mode(): the static buffers made then must not be
    inference tensors, which a later call outside inference mode could not write. Both orders."""
    net, gnet = nets()
    noise = randn(*SHAPE)
    expected = eager(net, gnet, noise, LABELS, seeds=[1, 2], **CHURN)
    s = sampler(net, gnet, graph=graph, **CHURN)
    with torch.inference_mode():
        first = s(noise, LABELS, seeds=[1, 2])
    assert torch.equal(first, expected) and torch.equal(s(noise, LABELS, seeds=[1, 2]), expected)
    with torch.inference_mode():
        assert torch.equal(s(noise, LABELS, seeds=[1, 2]), expected)


# ----------------------------------------------------------------------------- graph orchestration (fake graphs)

@pytest.mark.parametrize("graph", ["trajectory", "step"])
def test_graph_runners_replay_new_inputs_and_seeds(fake_graphs, graph):
    net, gnet = nets()
    s = sampler(net, gnet, graph=graph, **CHURN)
    report = s.prepare(seeded=True)
    assert report["graph"] == graph and report["variants"] == ["seeded"] and report["warmup_runs"] == 2
    (capturer,) = fake_graphs.instances
    # Step graphs: one more warm-up (the kinds' own launch sequence). Schedule t = 80, 17.5, 2.52,
    # 0.170, 0.002: steps 1-3 churn (S_min <= t <= S_max) with the torch backend's own op, which
    # bakes its step in: each is a kind of its own, as are the first and the last step.
    assert capturer.warmups == (2 if graph == "trajectory" else 3)
    assert len(capturer.graphs) == (1 if graph == "trajectory" else 5)
    # Each call loads new noise, labels and seeds into the static buffers: replay == eager.
    for seed in (3, 4, 5):
        noise, seeds = randn(*SHAPE, seed=seed), [seed, -seed]
        labels = one_hot_labels(SHAPE[0], LABEL_DIM, seed=seed)
        assert torch.equal(s(noise, labels, seeds), eager(net, gnet, noise, labels, seeds, **CHURN))
    assert len(fake_graphs.instances) == 1  # Prepared once.
    replays = [g.replays for g in capturer.graphs]
    assert replays == [3] * len(capturer.graphs)


STEP_KIND_CASES = [
    # (sampler arguments, seeded call, graphs expected, why); the same for both backends unless a
    # dict {backend: graphs}.
    ({"num_steps": 6}, False, 3, "first, 4 x guided Heun, last"),
    ({"num_steps": 6, "solver": "euler"}, False, 3, "first, 4 x guided Euler, last"),
    ({"num_steps": 6, "guidance": 1.0}, False, 3, "first, 4 x unguided Heun, last"),
    # 7 steps: t = 80, 30.2, 9.72, 2.52, 0.470, 0.0515, 0.002; guide only for 0.5 < t <= 10. Guided at
    # (t_hat, t_next): step 1 (no, yes), step 2 (yes, yes), step 3 (yes, no), steps 4 and 5 (no, no).
    ({"num_steps": 7, "guidance_interval": (0.5, 10.0)}, False, 6, "first, 4 kinds of middle steps, last"),
    # 6 steps: t = 80, 24.4, 5.84, 0.965, 0.0851, 0.002: steps 1-4 churn. Seeded with cpp, the churn
    # is fused into the op ending the step before: steps 1-3 (next step churns) share a kind, step 4
    # (next does not) has its own. The torch backend churns with an op of each step's own.
    ({"num_steps": 6, **CHURN}, True, {"cpp": 4, "torch": 6}, "seeded churn"),
    # Churn from randn_like (never fused): every churned middle step is a graph of its own.
    ({"num_steps": 6, **CHURN}, False, 6, "randn_like churn"),
]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("kwargs,seeded,graphs,why", STEP_KIND_CASES, ids=[c[3] for c in STEP_KIND_CASES])
def test_step_graphs_are_one_per_kind_of_step_and_equal_eager(fake_graphs, backend, kwargs, seeded, graphs, why):
    if backend == "cpp" and not autoguide_fast.backends()["cpp"].available:
        pytest.skip("the compiled extension is not built")
    net, gnet = nets()
    s = sampler(net, gnet, graph="step", backend=backend, **kwargs)
    s.prepare(seeded=seeded)
    (capturer,) = fake_graphs.instances
    expected_graphs = graphs[backend] if isinstance(graphs, dict) else graphs
    assert len(capturer.graphs) == expected_graphs == s.report["graphs"]
    eager_kwargs = {k: v for k, v in kwargs.items()}
    for seed in (7, 8):
        noise, labels = randn(*SHAPE, seed=seed), one_hot_labels(SHAPE[0], LABEL_DIM, seed=seed)
        seeds = [seed, seed + 1] if seeded else None
        if kwargs.get("S_churn"):
            torch.manual_seed(seed)
            got = s(noise, labels, seeds)
            torch.manual_seed(seed)
            expected = eager(net, gnet, noise, labels, seeds, **eager_kwargs)
        else:
            got = s(noise, labels, seeds)
            expected = eager(net, gnet, noise, labels, seeds, **eager_kwargs)
        assert torch.equal(got, expected), why


def test_seeded_and_default_variants_are_prepared_on_demand(fake_graphs):
    net, gnet = nets()
    s = sampler(net, gnet, graph="trajectory", **CHURN)
    s.prepare()
    s.prepare()
    assert s.report["variants"] == ["default"] and len(fake_graphs.instances) == 1
    s(randn(*SHAPE), LABELS, [1, 2])
    assert s.report["variants"] == ["default", "seeded"] and len(fake_graphs.instances) == 2
    # Without churn, seeds only choose the initial noise: one variant serves both.
    s = sampler(net, gnet, graph="trajectory")
    s(randn(*SHAPE), LABELS)
    s(labels=LABELS, seeds=[1, 2])
    assert s.report["variants"] == ["default"]


def test_copy_output_false_returns_the_static_buffer(fake_graphs):
    net, gnet = nets()
    s = sampler(net, gnet, graph="trajectory", copy_output=False)
    a = s(randn(*SHAPE, seed=1), LABELS)
    a_values = a.clone()
    b = s(randn(*SHAPE, seed=2), LABELS)
    assert b is a  # Zero-copy: the same buffer, overwritten by the next call.
    assert torch.equal(b, eager(net, gnet, randn(*SHAPE, seed=2), LABELS))
    assert not torch.equal(a_values, b)
    s = sampler(net, gnet, graph="trajectory")
    c, d = s(randn(*SHAPE, seed=1), LABELS), s(randn(*SHAPE, seed=2), LABELS)
    assert c.data_ptr() != d.data_ptr() and torch.equal(c, a_values)


def test_capture_failure_warns_once_and_falls_back_to_eager(fake_graphs):
    fake_graphs.fail_with = "RuntimeError: operation not permitted when stream is capturing"
    net, gnet = nets()
    s = sampler(net, gnet, **CHURN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [s(randn(*SHAPE, seed=i), LABELS, [i, i + 1]) for i in range(2)]
        outs.append(s(randn(*SHAPE, seed=2), LABELS))  # Another variant: no second warning.
    mine = [w for w in caught if issubclass(w.category, GraphCaptureWarning)]
    assert len(mine) == 1 and "operation not permitted when stream is capturing" in str(mine[0].message)
    report = s.report
    assert report["graph"] == "none" and "operation not permitted" in report["capture_error"]
    for i in range(2):
        assert torch.equal(outs[i], eager(net, gnet, randn(*SHAPE, seed=i), LABELS, [i, i + 1], **CHURN))
    assert all(c.released for c in fake_graphs.instances)
    # The fallback sticks (no re-try, no second warning) until release(): a fresh start captures again.
    fake_graphs.fail_with = None
    s(randn(*SHAPE, seed=3), LABELS)
    assert s.report["graph"] == "none" and len(fake_graphs.instances) == 1
    s.release()
    assert s.report["capture_error"] is None
    expected = eager(net, gnet, randn(*SHAPE, seed=3), LABELS, [3, 4], **CHURN)
    assert torch.equal(s(randn(*SHAPE, seed=3), LABELS, [3, 4]), expected)
    assert s.report["graph"] == "trajectory" and s.report["capture_error"] is None


def test_parameter_replacement_is_recaptured_in_place_update_is_not(fake_graphs):
    net, gnet = nets()
    s = sampler(net, gnet, graph="trajectory")
    noise = randn(*SHAPE)
    s(noise, LABELS)
    assert s.report["recaptures"] == 0
    # In place (load_state_dict copies into the same storage): a real graph sees it as is.
    state = {k: v + 0.01 * randn(*v.shape, seed=3) for k, v in gnet.state_dict().items()}
    gnet.load_state_dict(state)
    assert torch.equal(s(noise, LABELS), eager(net, gnet, noise, LABELS))
    assert s.report["recaptures"] == 0 and len(fake_graphs.instances) == 1
    # Replaced: new storage, the graph's pointers are stale -> re-capture.
    net.conv1.weight = torch.nn.Parameter(randn(*net.conv1.weight.shape, seed=4) * 0.3)
    assert torch.equal(s(noise, LABELS), eager(net, gnet, noise, LABELS))
    assert s.report["recaptures"] == 1 and len(fake_graphs.instances) == 2
    assert fake_graphs.instances[0].released
    s(noise, LABELS)
    assert s.report["recaptures"] == 1


def test_release_frees_and_the_next_call_prepares_again(fake_graphs):
    net, gnet = nets()
    s = sampler(net, gnet, graph="step")
    noise = randn(*SHAPE)
    first = s(noise, LABELS)
    s.release()
    assert fake_graphs.instances[0].released and not s.report["prepared"]
    assert torch.equal(s(noise, LABELS), first) and len(fake_graphs.instances) == 2


def test_auto_graph_picks_the_trajectory_graph_when_graphs_are_supported(fake_graphs):
    report = sampler(*nets(), graph="auto").prepare()
    assert report["graph"] == "trajectory" and report["graph_requested"] == "auto"


# ----------------------------------------------------------------------------- helpers

def test_describe_failure_reports_the_first_error_then_the_consequence():
    try:
        try:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        except RuntimeError:
            raise RuntimeError("capture invalidated") from None
    except RuntimeError as exc:
        outer = exc
    # `from None` suppresses the display but keeps __context__; the chain is still walked.
    assert describe_failure(outer) == ("RuntimeError: operation not permitted when stream is capturing; "
                                       "then RuntimeError: capture invalidated")


def test_parameter_signature_sees_replacement_not_in_place_updates():
    net = TinyConvDenoiser(seed=1)
    before = parameter_signature(net)
    assert len(before) == 4 and parameter_signature(net.forward) == before
    with torch.no_grad():
        net.conv2.bias.add_(1.0)
    assert parameter_signature(net) == before
    net.conv2.bias = torch.nn.Parameter(net.conv2.bias.detach().clone())
    assert parameter_signature(net) != before
    assert parameter_signature(lambda x, t, labels: x) == ()
    # A replaced submodule (its parent's children change) and a dtype conversion (new storages).
    replaced = parameter_signature(net)
    net.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert parameter_signature(net) != replaced
    converted = parameter_signature(net)
    net.double()
    assert parameter_signature(net) != converted
    # A replacement at the same address with another dtype or layout (a view of the same storage;
    # the allocator may also hand a freed address to a tensor of another dtype): still a change.
    weight = net.conv2.weight
    before = parameter_signature(net)
    net.conv2.weight = torch.nn.Parameter(weight.detach().view(torch.int64).view(torch.float64))  # Same all.
    assert parameter_signature(net) == before
    net.conv2.weight = torch.nn.Parameter(weight.detach().view(torch.float32))
    assert parameter_signature(net) != before  # Same address, float32.
    net.conv2.weight = torch.nn.Parameter(weight.detach().flatten()[: weight.numel() // 2])
    assert parameter_signature(net) != before  # Same address, other shape.


def test_parameter_signature_keeps_no_network_alive():
    """The signature's cached module list refers to modules weakly: the graph engine calls it on
    every replay, and a strong list (it holds the root module itself) kept every network sampled
    on a GPU alive, weights included."""
    net = TinyConvDenoiser(seed=1)
    parameter_signature(net)
    parameter_signature(net.forward)
    probe = weakref.ref(net)
    del net
    gc.collect()
    assert probe() is None
    # After a child died and was replaced (a new object), the list is rebuilt, not reused.
    net = TinyConvDenoiser(seed=1)
    first = parameter_signature(net)
    net.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
    gc.collect()
    assert parameter_signature(net) != first and len(parameter_signature(net)) == len(first)


def test_network_identity_of_bound_methods_is_stable():
    net = TinyConvDenoiser(seed=1)
    assert network_identity(net.forward) == network_identity(net.forward)
    assert network_identity(net) != network_identity(net.forward)
    assert network_identity(None) is None


def test_weak_network_ref_does_not_keep_the_network_alive():
    net = TinyConvDenoiser(seed=1)
    refs = [NetworkRef(net, weak=True), NetworkRef(net.forward, weak=True)]
    assert all(r.alive and r.refers_to(net if i == 0 else net.forward) for i, r in enumerate(refs))
    assert not refs[0].refers_to(TinyConvDenoiser(seed=1))
    probe = weakref.ref(net)
    del net
    gc.collect()
    assert probe() is None and not any(r.alive for r in refs)
    with pytest.raises(ReferenceError):
        refs[0].get()
    strong = NetworkRef(len, weak=True)  # Builtins cannot be weakly referenced: held strongly.
    assert strong.alive and strong.get() is len


def test_engine_route_applies_to_cuda_tensors_without_callback_or_custom_noise():
    cpu = torch.zeros(1)
    assert not _engine_applies(cpu, None, None, None)
    fake_cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    assert _engine_applies(fake_cuda, None, None, None)
    assert _engine_applies(fake_cuda, None, torch.randn_like, None)
    assert not _engine_applies(fake_cuda, None, lambda x: x, None)
    assert not _engine_applies(fake_cuda, None, None, print)
    assert not _engine_applies(fake_cuda, cpu, None, None)  # Labels on another device: the plain loop.


# ----------------------------------------------------------------------------- the cache

def cached(cache, net, gnet, noise, labels=None, seeds=None, **kwargs):
    kwargs.setdefault("num_steps", 4)
    kwargs.setdefault("guidance", 2.1)
    config = autoguide_fast.sampler.make_config(
        num_steps=kwargs["num_steps"], sigma_min=0.002, sigma_max=80, rho=7, guidance=kwargs["guidance"], gnet=gnet,
        S_churn=kwargs.get("S_churn", 0), S_min=kwargs.get("S_min", 0), S_max=kwargs.get("S_max", float("inf")),
        S_noise=kwargs.get("S_noise", 1), dtype=kwargs.get("dtype", torch.float32), guidance_interval=None,
        solver="heun",
    )
    seeds_t = None if seeds is None else torch.tensor(seeds)
    return engine_cache.sample_cached(net, gnet, noise, labels, config, "torch", seeds_t, True, cache=cache)


def test_cache_hits_on_same_key_and_misses_on_any_key_part():
    cache = engine_cache.SamplerCache(size=16)
    net, gnet = nets(label_dim=0)
    other_guide = TinyConvDenoiser(seed=3)  # Kept alive: entries of dead networks are dropped.
    noise = randn(*SHAPE)
    out = cached(cache, net, gnet, noise, seeds=[1, 2], **CHURN)
    assert torch.equal(out, eager(net, gnet, noise, None, [1, 2], num_steps=4, **CHURN))
    cached(cache, net, gnet, noise, seeds=[3, 4], **CHURN)
    assert cache.info()["hits"] == 1 and cache.info()["misses"] == 1
    variations = [
        lambda: cached(cache, net, gnet, noise),  # Other config (no churn).
        lambda: cached(cache, net, gnet, noise, num_steps=5),
        lambda: cached(cache, net, gnet, noise, dtype=torch.float64),
        lambda: cached(cache, net, gnet, randn(1, 3, 6, 5)),  # Other shape.
        lambda: cached(cache, net, other_guide, noise),  # Other guide.
        lambda: cached(cache, net.forward, gnet, noise),  # Other callable (bound method).
    ]
    for i, call in enumerate(variations):
        call()
        assert cache.info()["misses"] == 2 + i, i
    cached(cache, net.forward, gnet, noise)  # A fresh bound-method object, same identity.
    assert cache.info()["misses"] == 1 + len(variations) and len(cache) == 1 + len(variations)


def test_a_numpy_float32_sigma_max_is_another_schedule_than_the_same_python_float():
    # np.float32(80) == 80.0 and both hash alike, but the official formula computes
    # sigma_max ** (1 / rho) in float32 for the one: the cache must not serve one for the other.
    np = pytest.importorskip("numpy")
    from autoguide_fast.reference import edm_sampler

    cache = engine_cache.SamplerCache(size=4)
    net, gnet = nets(label_dim=0)
    noise = randn(*SHAPE)

    def with_sigma_max(value):
        config = autoguide_fast.sampler.make_config(
            num_steps=4, sigma_min=0.002, sigma_max=value, rho=7, guidance=2.1, gnet=gnet, S_churn=0, S_min=0,
            S_max=float("inf"), S_noise=1, dtype=torch.float32, guidance_interval=None, solver="heun")
        return engine_cache.sample_cached(net, gnet, noise, None, config, "torch", None, True, cache=cache)

    with_sigma_max(80.0)
    got = with_sigma_max(np.float32(80))
    expected = edm_sampler(net, noise, None, gnet, num_steps=4, sigma_max=np.float32(80), guidance=2.1)
    assert not torch.equal(expected, edm_sampler(net, noise, None, gnet, num_steps=4, sigma_max=80.0, guidance=2.1))
    assert torch.equal(got, expected) and cache.info()["misses"] == 2


def test_cache_key_includes_labels_shape_and_dtype():
    cache = engine_cache.SamplerCache(size=4)
    net, gnet = nets()
    noise = randn(*SHAPE)
    out = cached(cache, net, gnet, noise, LABELS)
    assert torch.equal(out, eager(net, gnet, noise, LABELS, num_steps=4))
    cached(cache, net, gnet, noise, LABELS.double())
    assert cache.info()["misses"] == 2


def test_cache_evicts_least_recently_used_and_releases_it():
    cache = engine_cache.SamplerCache(size=2)
    net, gnet = nets(label_dim=0)
    noise = randn(*SHAPE)
    for steps in (3, 4, 3, 5):  # 3 is used again before 5 arrives, so 4 is the one evicted.
        cached(cache, net, gnet, noise, num_steps=steps)
    kept = sorted(s.config.num_steps for s in cache._entries.values())
    assert kept == [3, 5] and cache.info()["evictions"] == 1
    released = [s for s in cache._entries.values()]
    cache.set_size(1)
    assert len(cache) == 1 and not released[0].report["prepared"] and released[1].report["prepared"]
    cache.clear()
    assert len(cache) == 0 and not released[1].report["prepared"]


def test_cache_size_zero_caches_nothing_and_releases_after_use():
    cache = engine_cache.SamplerCache(size=0)
    net, gnet = nets(label_dim=0)
    noise = randn(*SHAPE)
    assert torch.equal(cached(cache, net, gnet, noise), eager(net, gnet, noise, None, num_steps=4))
    assert len(cache) == 0 and cache.info()["misses"] == 1


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("4", TypeError)])
def test_set_cache_size_rejects_bad_sizes(bad, exc):
    with pytest.raises(exc, match="^n: expected a non-negative integer"):
        autoguide_fast.set_cache_size(bad)


def test_global_cache_controls():
    autoguide_fast.set_cache_size(3)
    try:
        assert engine_cache.cache_info()["size"] == 3
        autoguide_fast.clear_cache()
        assert engine_cache.cache_info()["entries"] == 0
    finally:
        autoguide_fast.set_cache_size(engine_cache.DEFAULT_CACHE_SIZE)


def test_cache_holds_networks_weakly_and_drops_dead_entries():
    cache = engine_cache.SamplerCache(size=4)
    net, gnet = nets(label_dim=0)
    noise = randn(*SHAPE)
    cached(cache, net, gnet, noise)
    probe = weakref.ref(net)
    del net
    gc.collect()
    assert probe() is None  # The cache did not keep the main network alive.
    other = TinyConvDenoiser(seed=5)
    cached(cache, other, gnet, noise)  # Any cache operation drops entries whose network died.
    assert len(cache) == 1 and cache.info()["misses"] == 2


def test_cache_is_thread_safe_and_shares_one_sampler():
    cache = engine_cache.SamplerCache(size=4)
    net, gnet = nets(label_dim=0)
    seed_sets = [[i, 50 + i] for i in range(6)]
    expected = [eager(net, gnet, seeded_noise(s, SHAPE), None, s, num_steps=4, **CHURN) for s in seed_sets]
    failures: list[int] = []

    def worker(i: int) -> None:
        for _ in range(3):
            out = cached(cache, net, gnet, seeded_noise(seed_sets[i], SHAPE), seeds=seed_sets[i], **CHURN)
            if not torch.equal(out, expected[i]):
                failures.append(i)

    run_in_threads(worker, 6)
    assert failures == [] and len(cache) == 1


# ----------------------------------------------------------------------------- CUDA plumbing with fakes

class RecordingGuideStream:
    """Stands in for GuideStream: runs the guide at once, records the fork/join protocol."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def fork(self, gnet, x, t, labels):
        self.events.append("fork")
        return gnet(x, t, labels)

    def join(self, out) -> None:
        self.events.append("join")


@pytest.mark.parametrize("interval", [None, (0.5, 10.0)])
def test_run_eager_forks_and_joins_the_guide_once_per_guided_evaluation(interval):
    from autoguide_fast.backends.torch_backend import TorchBackend
    from autoguide_fast.plan import build_plan
    from autoguide_fast.sampler import make_config, run_eager

    net, gnet = nets()
    config = make_config(num_steps=6, sigma_min=0.002, sigma_max=80, rho=7, guidance=2.1, gnet=gnet, S_churn=0,
                         S_min=0, S_max=float("inf"), S_noise=1, dtype=torch.float32, guidance_interval=interval,
                         solver="heun")
    noise = randn(*SHAPE)
    streams = RecordingGuideStream()
    with torch.no_grad():
        forked = run_eager(net, gnet, noise, LABELS, config, TorchBackend(), streams=streams)
        plain = run_eager(net, gnet, noise, LABELS, config, TorchBackend())
    assert torch.equal(forked, plain)
    _, steps = build_plan(config, noise.device)
    guided = sum(s.w_first is not None for s in steps) + sum(s.w_second is not None for s in steps)
    assert 0 < guided and streams.events == ["fork", "join"] * guided


class FakeStream:
    log: list = []  # (stream name, "wait"/"record", event id) of every event operation

    def __init__(self, device=None, priority: int = 0, name: str = "stream") -> None:
        self.name = name

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        FakeStream.log.append((self.name, "wait", event.id))


class FakeEvent:
    count = 0

    def __init__(self, *args, **kwargs) -> None:
        FakeEvent.count += 1
        self.id = FakeEvent.count

    def record(self, stream) -> None:
        FakeStream.log.append((stream.name, "record", self.id))


class FakeCUDAGraph:
    end_error: str | None = None
    instances: list[FakeCUDAGraph] = []

    def __init__(self) -> None:
        self.calls: list = []
        FakeCUDAGraph.instances.append(self)

    def capture_begin(self, pool=None, capture_error_mode="global") -> None:
        self.calls.append(("begin", pool, capture_error_mode))

    def capture_end(self) -> None:
        self.calls.append("end")
        # A capture into the sampler's pool fails as told; the capturer's reset capture (no pool) does not.
        if FakeCUDAGraph.end_error is not None and self.calls[0][1] is not None:
            raise RuntimeError(FakeCUDAGraph.end_error)


@pytest.fixture
def fake_cuda(monkeypatch):
    import contextlib

    allocator_calls: list = []
    FakeCUDAGraph.end_error = None
    FakeCUDAGraph.instances = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 7))
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(name="current"))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    from autoguide_fast.engine import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "_RANDOM_FENCES", {})
    FakeStream.log = []
    FakeEvent.count = 0
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda d, p: allocator_calls.append(("end", d, p)),
                        raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda d, p: allocator_calls.append(("release", d, p)),
                        raising=False)
    yield allocator_calls
    FakeCUDAGraph.end_error = None


def test_capturer_captures_into_its_pool_in_thread_local_mode(fake_cuda):
    from autoguide_fast.engine.cuda_graphs import CudaGraphCapturer

    capturer = CudaGraphCapturer(torch.device("cuda", 0))
    marker = torch.ones(1)
    graph, out = capturer.capture(lambda: (marker, None))
    assert out[0] is marker and capturer.graphs == [graph]
    assert graph.graph.calls == [("begin", (0, 7), "thread_local"), "end"]
    assert fake_cuda == []


@pytest.mark.parametrize("fn_error,end_error,expected,abandoned", [
    ("cudaErrorStreamCaptureUnsupported: operation not permitted when stream is capturing", None,
     "RuntimeError: cudaErrorStreamCaptureUnsupported", False),
    ("operation not permitted when stream is capturing", "capture invalidated",
     "RuntimeError: operation not permitted when stream is capturing", True),
    (None, "unjoined work on a side stream", "RuntimeError: unjoined work on a side stream", True),
])
def test_capturer_reports_failures_and_cleans_up_after_capture_end(fake_cuda, fn_error, end_error, expected,
                                                                    abandoned):
    from autoguide_fast.engine.cuda_graphs import CudaGraphCapturer

    def fn():
        if fn_error is not None:
            raise RuntimeError(fn_error)
        return (torch.ones(1),)

    FakeCUDAGraph.end_error = end_error
    capturer = CudaGraphCapturer(torch.device("cuda", 0))
    with pytest.raises(CaptureFailed, match=f"^{expected}"):
        capturer.capture(fn)
    assert capturer.graphs == []
    # capture_end threw before telling the allocator the capture was over: the capturer does it.
    assert fake_cuda == ([("end", 0, (0, 7)), ("release", 0, (0, 7))] if abandoned else [])
    # ... and before the CUDA generator left capture mode: one empty capture (own pool) ends it.
    resets = [g.calls for g in FakeCUDAGraph.instances[1:]]
    assert resets == ([[("begin", None, "thread_local"), "end"]] if abandoned else [])


def test_warmup_orders_the_callers_stream_after_its_own_even_when_it_raises(fake_cuda, monkeypatch):
    """The caller frees the runner's buffers (allocated on its stream, used by the warm-up on the
    capture stream) after a failed warm-up: its stream must wait for the capture stream first."""
    from autoguide_fast.engine.cuda_graphs import CudaGraphCapturer

    waits: list[tuple[str, str]] = []
    monkeypatch.setattr(FakeStream, "wait_stream", lambda self, other: waits.append((self.name, other.name)))
    capturer = CudaGraphCapturer(torch.device("cuda", 0))
    capturer.stream.name = "capture"
    runs: list[int] = []

    def fn():
        runs.append(1)
        if len(runs) == 2:
            raise RuntimeError("network failed in the second warm-up run")

    with pytest.raises(RuntimeError, match="second warm-up run"):
        capturer.warmup(fn, 3)
    assert waits == [("capture", "current"), ("current", "capture")]


def test_a_sampler_dropped_unreleased_waits_for_its_last_call_before_its_buffers_go(fake_graphs, monkeypatch):
    """A sampler's buffers come from the stream that prepared it and are used by every call, on
    the caller's stream: dropped without release() while a call may still run (no host sync with
    check_finite=False), the sampler first waits for its last call's work, then frees them."""
    from autoguide_fast.engine.streams import CallOrder

    events: list[str] = []
    monkeypatch.setattr(CallOrder, "drain", lambda self: events.append("drain"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    net, gnet = nets()
    for graph in ("trajectory", "none"):
        events.clear()
        s = sampler(net, gnet, graph=graph)
        s(randn(*SHAPE), LABELS)
        s._order.cuda = True  # As on a CUDA device (the drain itself is faked above).
        assert s._plan is not None
        weakref.finalize(s._plan[0], events.append, "plan freed")
        freed = {"plan freed"}
        if graph == "trajectory":
            weakref.finalize(s._runners[False].inputs.noise, events.append, "static noise freed")
            freed.add("static noise freed")
        fake_graphs.instances.clear()  # The stand-in's registry would keep the graphs' buffers alive.
        del s
        assert events[0] == "drain" and set(events[1:]) == freed, (graph, events)


def test_an_interrupt_during_capture_ends_the_capture_and_goes_on(fake_cuda):
    from autoguide_fast.engine.cuda_graphs import CudaGraphCapturer

    def fn():
        raise KeyboardInterrupt

    FakeCUDAGraph.end_error = None
    capturer = CudaGraphCapturer(torch.device("cuda", 0))
    with pytest.raises(KeyboardInterrupt):
        capturer.capture(fn)
    assert FakeCUDAGraph.instances[0].calls == [("begin", (0, 7), "thread_local"), "end"]
    assert capturer.graphs == []


def test_captures_and_random_drawing_replays_are_ordered_by_the_random_fence(fake_cuda, monkeypatch):
    """torch < 2.13 shares one seed/offset tensor pair per CUDA generator between every capture's
    start and every random-drawing replay: the engine orders them on the device with a fence event,
    and leaves graphs that draw nothing free to overlap."""
    from autoguide_fast.engine.cuda_graphs import CudaGraphCapturer

    class Generator:
        offset = 0

        def get_offset(self) -> int:
            return self.offset

    generator = Generator()
    monkeypatch.setattr(torch.cuda, "default_generators", (generator,), raising=False)

    class DrawingGraph(FakeCUDAGraph):
        def replay(self) -> None:
            generator.offset += self.draws

    capturer = CudaGraphCapturer(torch.device("cuda", 0))
    capturer.stream.name = "capture"
    graphs = {}
    for draws in (4, 0):
        monkeypatch.setattr(torch.cuda, "CUDAGraph", type("G", (DrawingGraph,), {"draws": draws}))
        graphs[draws], _ = capturer.capture(lambda: (torch.ones(1),))
    # The first capture renews the fence; the second waits for it first.
    assert FakeStream.log == [("capture", "record", 1), ("capture", "wait", 1), ("capture", "record", 2)]
    FakeStream.log = []
    for _ in range(2):
        graphs[4].replay()
    assert graphs[4].draws_random is True
    assert FakeStream.log == [("current", "wait", 2), ("current", "record", 3),
                              ("current", "wait", 3), ("current", "record", 4)]
    FakeStream.log = []
    for _ in range(2):
        graphs[0].replay()  # Learns at its first replay that it draws nothing: no more fence after.
    assert graphs[0].draws_random is False and FakeStream.log == [("current", "wait", 4)]


def test_graphs_told_they_draw_are_always_fenced_and_are_destroyed_under_the_engine_lock(fake_cuda, monkeypatch):
    from autoguide_fast.engine import cuda_graphs
    from autoguide_fast.engine.cuda_graphs import CudaGraphCapturer

    class Generator:
        def get_offset(self) -> int:
            return 0  # A concurrent manual_seed could hide a draw: the hint does not rely on it.

    monkeypatch.setattr(torch.cuda, "default_generators", (Generator(),), raising=False)
    owned: list[bool] = []

    class Graph(FakeCUDAGraph):
        def replay(self) -> None:
            pass

        def __del__(self) -> None:
            owned.append(cuda_graphs.ENGINE_LOCK._is_owned())

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    capturer = CudaGraphCapturer(torch.device("cuda", 0), draws_random=True)
    graph, _ = capturer.capture(lambda: (torch.ones(1),))
    FakeStream.log = []
    for _ in range(2):
        graph.replay()
    assert [op for _, op, _ in FakeStream.log] == ["wait", "record", "wait", "record"]
    capturer.release()
    FakeCUDAGraph.instances = []
    del graph  # The last reference, dropped outside any lock (as when a sampler is dropped unreleased).
    assert owned == [True]


def test_sampler_tells_the_capturer_which_graphs_draw_random_numbers(fake_graphs):
    from tests.fake_graphs import RerunCapturer

    net, gnet = nets()
    for churn, seeds, expected in ((10.0, None, True), (10.0, [1, 2], None), (0.0, None, None)):
        RerunCapturer.instances = []
        s = sampler(net, gnet, graph="trajectory", S_churn=churn, streams="off")
        s(randn(*SHAPE), LABELS, seeds=seeds)
        assert {c.draws_random for c in RerunCapturer.instances} == {expected}, (churn, seeds)


def test_a_failed_capture_is_freed_without_the_cycle_collector(fake_cuda):
    from autoguide_fast.engine.cuda_graphs import CudaGraphCapturer

    class Payload:
        pass

    def fn():
        payload = Payload()  # noqa: F841  (held by the frame the failure's traceback references)
        probes.append(weakref.ref(payload))
        raise RuntimeError("operation not permitted when stream is capturing")

    probes: list = []
    capturer = CudaGraphCapturer(torch.device("cuda", 0))
    gc.disable()
    try:
        with pytest.raises(CaptureFailed):
            capturer.capture(fn)
        assert probes[0]() is None
    finally:
        gc.enable()


def test_capturer_does_not_release_the_pool_twice(fake_cuda, monkeypatch):
    """If capture_end already ended the pool routing before failing (endAllocateToPool refuses), it
    also settled the pool's use count: the capturer must not release the pool again."""
    from autoguide_fast.engine.cuda_graphs import CudaGraphCapturer

    def refuse(device, pool):
        fake_cuda.append(("end refused", device, pool))
        raise RuntimeError("not allocating to this pool")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", refuse, raising=False)
    FakeCUDAGraph.end_error = "instantiation failed"
    with pytest.raises(CaptureFailed, match="instantiation failed"):
        CudaGraphCapturer(torch.device("cuda", 0)).capture(lambda: (torch.ones(1),))
    assert fake_cuda == [("end refused", 0, (0, 7))]


def test_a_dropped_sampler_is_freed_without_the_cycle_collector(fake_graphs):
    """Runners hold the sampling program, the program reaches the sampler only weakly: dropping
    the last reference frees the sampler (and its graphs) by reference counting alone."""
    net, gnet = nets()
    s = sampler(net, gnet, graph="trajectory")
    s(randn(*SHAPE), LABELS)
    probe = weakref.ref(s)
    gc.disable()
    try:
        del s
        assert probe() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("graph", ["none", "trajectory"])
def test_non_contiguous_noise_equals_the_reference_given_contiguous_noise(fake_graphs, graph):
    """Whatever the mode, and even when the first call prepares the sampler with it, channels-last
    noise gives the official sampler's result for noise.contiguous() (randn_like churn included)."""
    from autoguide_fast.reference import edm_sampler as reference_sampler

    net, gnet = nets(label_dim=0)
    s = sampler(net, gnet, label_shape=None, graph=graph, **CHURN)
    noise = randn(*SHAPE, seed=3).to(memory_format=torch.channels_last)
    for seed in (5, 6):  # The first call prepares, the second replays.
        torch.manual_seed(seed)
        out = s(noise)
        torch.manual_seed(seed)
        expected = reference_sampler(net, noise.contiguous(), None, gnet, num_steps=5, guidance=2.1, **CHURN)
        assert torch.equal(out, expected), (graph, seed)


# ----------------------------------------------------------------------------- from a stress audit

def test_shrinking_the_cache_drops_samplers_of_dead_networks_first():
    """set_cache_size evicted live samplers and kept those whose network had died (never to serve
    again, still holding their buffers); info() and len() counted them."""
    cache = engine_cache.SamplerCache(size=4)
    live = [TinyConvDenoiser(channels=3, label_dim=0, seed=i) for i in (1, 2)]
    dead = [TinyConvDenoiser(channels=3, label_dim=0, seed=i) for i in (3, 4)]
    noise = randn(*SHAPE)
    for net in (*live, *dead):
        cached(cache, net, None, noise, guidance=1)
    released = []
    for sampler in cache._entries.values():
        sampler.release = functools.partial(lambda s: released.append(s), sampler)
    dead_samplers = [s for s in cache._entries.values() if s._nets[0].refers_to(dead[0]) or
                     s._nets[0].refers_to(dead[1])]
    del dead, net
    gc.collect()
    assert cache.info()["entries"] == 2 and len(cache) == 2  # The dead ones are gone (and released).
    assert sorted(map(id, released)) == sorted(map(id, dead_samplers))
    cache = engine_cache.SamplerCache(size=4)
    for net in live:
        cached(cache, net, None, noise, guidance=1)
    gone = TinyConvDenoiser(channels=3, label_dim=0, seed=9)
    cached(cache, gone, None, noise, guidance=1)
    del gone, net
    gc.collect()
    cache.set_size(2)
    assert all(s._nets[0].alive for s in cache._entries.values()) and len(cache._entries) == 2
    assert cache.info()["evictions"] == 0  # Dropping a dead entry is not an eviction of a live one.


def test_labels_reach_the_networks_contiguous_whatever_layout_an_earlier_call_had(fake_graphs):
    """The graph modes copied labels into a buffer of the first call's layout, so a later call's
    result depended on an earlier call; every mode now gives the networks contiguous labels."""

    class LayoutSensitive(torch.nn.Module):  # Rounds differently for a transposed-layout input.
        def forward(self, x, t, labels=None):
            bias = labels.sum(dim=1) if labels.is_contiguous() else labels.sum(dim=1) * (1 + 2**-20)
            return x * 0.5 + bias.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)

    net = LayoutSensitive()
    noise = randn(*SHAPE)
    labels = torch.rand(SHAPE[0], LABEL_DIM, generator=torch.Generator().manual_seed(3))
    transposed = labels.t().contiguous().t()  # Same values, column-major.
    expected = fast_guided_sample(net, noise, labels, num_steps=5, backend="torch")
    assert not torch.equal(expected, fast_guided_sample(net, noise, transposed, num_steps=5, backend="torch"))
    for graph in ("none", "step", "trajectory"):
        s = GuidedSampler(net, noise_shape=SHAPE, label_shape=(SHAPE[0], LABEL_DIM), device="cpu", graph=graph,
                          num_steps=5, backend="torch")
        assert torch.equal(s(noise, transposed), expected), graph  # First call: column-major labels.
        assert torch.equal(s(noise, labels), expected), graph
    fake_cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cpu"), shape=SHAPE)
    assert not _engine_applies(fake_cuda, transposed, None, None)  # The drop-in passes them on as given.


def test_bucketed_calls_that_pad_or_chunk_work_under_inference_mode():
    net, gnet = nets(label_dim=0)
    s = autoguide_fast.BucketedSampler(net, gnet, image_shape=SHAPE[1:], batch_sizes=(2, 4), device="cpu",
                                       backend="torch", num_steps=3, guidance=2.1)
    for batch in (2, 3, 6):  # Exact bucket, padded, chunked.
        seeds = list(range(batch))
        expected = s(seeds=seeds)
        with torch.inference_mode():
            got = s(seeds=seeds)
        assert torch.equal(got, expected) and not got.is_inference(), batch


def test_preparing_eagerly_on_the_cpu_does_not_rewind_other_threads_draws(monkeypatch):
    """Preparing restored the global generator it had saved, so numbers another thread drew in the
    meantime were drawn again. Eagerly on the CPU the compile warm-up runs seeded and nothing is
    restored (the other thread's draw is simulated inside the warm-up, where it could fall)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    net, gnet = nets()
    drawn = []

    class DrawsOnce(torch.nn.Module):
        def forward(self, x, t, labels=None):
            if not drawn:
                drawn.append(torch.rand(4))  # "Another thread" draws while the sampler prepares.
            return net(x, t, labels)

    s = sampler(DrawsOnce(), gnet, compile_networks=True, **CHURN)
    before = torch.get_rng_state()
    s.prepare()
    assert s.report["warmup_runs"] == 1 and len(drawn) == 1
    assert not torch.equal(torch.rand(4), drawn[0])  # Not drawn a second time.
    torch.set_rng_state(before)
    torch.rand(4)  # The simulated thread's draw: the warm-up itself drew nothing more.
    after_prepare = torch.rand(4)
    torch.set_rng_state(before)
    torch.rand(4)
    assert torch.equal(torch.rand(4), after_prepare)


def test_an_explicit_torch_backend_keeps_the_noise_layout_off_the_engine(monkeypatch):
    """backend="torch" keeps the reference's layout; through the engine (on CUDA tensors) the noise
    became contiguous and randn_like churn drew other noise than the official sampler."""
    import autoguide_fast.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "_engine_applies", lambda *args: True)  # As for CUDA noise.
    monkeypatch.setattr("autoguide_fast.engine.cache.sample_cached",
                        lambda *args, **kwargs: pytest.fail("the engine served a layout-sensitive call"))
    net, gnet = nets(label_dim=0)
    noise = randn(2, 6, 5, 3).permute(0, 3, 1, 2)  # Channels-last view of shape SHAPE.
    torch.manual_seed(5)
    expected = autoguide_fast.reference.edm_sampler(net, noise, None, gnet, num_steps=5, guidance=2.1, **CHURN)
    torch.manual_seed(5)
    got = fast_guided_sample(net, noise, None, gnet, num_steps=5, guidance=2.1, backend="torch", **CHURN)
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- from mutation testing

def test_parameter_signature_sees_buffers_dtype_only_changes_and_kept_alive_replaced_children():
    net = TinyConvDenoiser(seed=1)
    net.register_buffer("scale", torch.ones(6))
    base = parameter_signature(net)
    net.scale = torch.ones(6)  # A buffer replaced by a new tensor.
    assert parameter_signature(net) != base
    # Only the dtype differs: the same storage, shape and strides (a replacement landing at the old
    # address with another dtype).
    before = parameter_signature(net)
    net.scale = net.scale.view(torch.int32)
    assert parameter_signature(net) != before
    # A replaced child that stays alive elsewhere (the parent's children changed, the old child did not die).
    before = parameter_signature(net)
    kept = net.conv1
    net.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert parameter_signature(net) != before and kept is not None


def test_two_bound_methods_of_one_object_are_two_networks():
    class TwoHeads(torch.nn.Module):
        def main(self, x, t, labels=None):
            return x * 0.5

        def guide(self, x, t, labels=None):
            return x * 0.25

    model = TwoHeads()
    assert network_identity(model.main) != network_identity(model.guide)
    assert not NetworkRef(model.main, weak=True).refers_to(model.guide)
    assert not NetworkRef(model, weak=True).refers_to(None)
    assert NetworkRef(None, weak=True).refers_to(None)
