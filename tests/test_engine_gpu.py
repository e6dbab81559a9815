"""The engine on a GPU: CUDA-graph replay, the guide on a side stream, re-capture, threads,
fallback, memory. Every comparison is bit for bit against the same backend run eagerly
(``run_eager`` on one stream), except where a test says otherwise."""

from __future__ import annotations

import gc
import random
import threading
import warnings
import weakref

import pytest
import torch

import autoguide_fast
from autoguide_fast import GuidedSampler, fast_guided_sample, seeded_noise
from autoguide_fast.backends import resolve_backend
from autoguide_fast.engine import GraphCaptureWarning
from autoguide_fast.engine import cache as engine_cache
from autoguide_fast.noise import seeds_to_tensor
from autoguide_fast.sampler import make_config, run_eager
from tests.host_syncs import host_syncs_raise
from tests.nets import GaussianDenoiser, TinyConvDenoiser, one_hot_labels
from tests.threads import run_in_threads

pytestmark = pytest.mark.gpu

SHAPE = (4, 3, 16, 16)
LABEL_DIM = 5
BASE = {"num_steps": 6, "guidance": 2.1}
CHURN = {"S_churn": 30.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}
BACKENDS = ["torch", "triton", "cuda"]


def cuda_nets(label_dim: int = LABEL_DIM, **kwargs) -> tuple[TinyConvDenoiser, TinyConvDenoiser]:
    return (TinyConvDenoiser(channels=3, label_dim=label_dim, seed=1, hidden=16, **kwargs).cuda(),
            TinyConvDenoiser(channels=3, label_dim=label_dim, seed=2, hidden=8, **kwargs).cuda())


def noise_of(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).cuda()


def labels_of(seed: int = 0) -> torch.Tensor:
    return one_hot_labels(SHAPE[0], LABEL_DIM, seed=seed).cuda()


def backend_or_skip(name: str):
    try:
        return resolve_backend(name, torch.device("cuda"), torch.float32)
    except RuntimeError as exc:
        pytest.skip(f"backend {name!r} unavailable here: {exc}")


def eager(net, gnet, noise, labels, seeds=None, backend="auto", **kwargs) -> torch.Tensor:
    """The same backend, eagerly, on one stream: the reference for every graph and stream mode
    (default "auto": the backend a sampler made without ``backend=`` resolves to)."""
    args = {"num_steps": 32, "sigma_min": 0.002, "sigma_max": 80, "rho": 7, "guidance": 1, "S_churn": 0,
            "S_min": 0, "S_max": float("inf"), "S_noise": 1, "dtype": torch.float32, "guidance_interval": None,
            "solver": "heun"}
    args.update(kwargs)
    config = make_config(gnet=gnet, **args)
    seeds_t = None if seeds is None else seeds_to_tensor(seeds, device=noise.device)
    with torch.no_grad():
        out = run_eager(net, gnet, noise, labels, config, resolve_backend(backend, noise.device, config.dtype), seeds_t)
    torch.cuda.synchronize()
    return out


def make(net, gnet, **kwargs) -> GuidedSampler:
    kwargs.setdefault("noise_shape", SHAPE)
    kwargs.setdefault("label_shape", (SHAPE[0], LABEL_DIM))
    kwargs.setdefault("device", "cuda")
    for k, v in BASE.items():
        kwargs.setdefault(k, v)
    return GuidedSampler(net, gnet, **kwargs)


@pytest.mark.parametrize("churn", [False, True], ids=["deterministic", "churn"])
@pytest.mark.parametrize("graph", ["trajectory", "step", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_replay_is_bit_identical_to_the_same_backend_eagerly(backend, graph, churn):
    backend_or_skip(backend)
    net, gnet = cuda_nets()
    extra = CHURN if churn else {}
    s = make(net, gnet, backend=backend, graph=graph, streams="off", **extra)
    report = s.prepare(seeded=churn)
    assert report["graph"] == graph and report["capture_error"] is None and report["backend"] == backend
    # New noise, labels and seeds on each call, replayed without re-capture.
    for seed in (1, 2, 3):
        noise, labels, seeds = noise_of(seed), labels_of(seed), [seed, 10 + seed, -seed, 2**40 + seed]
        out = s(noise, labels, seeds if churn else None)
        expected = eager(net, gnet, noise, labels, seeds if churn else None, backend=backend, **BASE, **extra)
        assert torch.equal(out, expected), (backend, graph, seed)
    assert s.report["recaptures"] == 0


def _random_config(rng: random.Random) -> dict:
    return dict(
        num_steps=rng.choice([2, 3, 4, 6]), sigma_min=rng.choice([0.002, 0.3]), sigma_max=rng.choice([80.0, 3.0]),
        rho=rng.choice([7.0, 2.0]), guidance=rng.choice([1, 2.1, 0.3]), S_churn=rng.choice([0.0, 30.0, 1000.0]),
        S_min=rng.choice([0.0, 0.5]), S_max=rng.choice([float("inf"), 5.0]), S_noise=rng.choice([1.0, 1.007]),
        dtype=rng.choice([torch.float32, torch.float64]), solver=rng.choice(["heun", "euler"]),
        guidance_interval=rng.choice([None, (0.5, 5.0), (0.0, 1.0), (10.0, 100.0)]),
    )


@pytest.mark.parametrize("draw", range(8))
def test_random_configurations_replay_like_eager_in_every_mode(draw):
    """Configurations drawn at random (guidance and churn intervals that switch mid-trajectory,
    solvers, state dtypes, backends, seeded or torch-RNG churn): every graph x streams mode equals
    the same backend run eagerly, bit for bit, on two calls."""
    rng = random.Random(draw)
    kwargs, backend = _random_config(rng), rng.choice(BACKENDS)
    backend_or_skip(backend)
    shape = rng.choice([(2, 3, 5, 7), (3, 3, 4, 4), (1, 3, 6, 6)])
    seeded = rng.random() < 0.7
    net, gnet = cuda_nets(label_dim=0)
    for graph in ("trajectory", "step", "none"):
        for streams in ("on", "off"):
            s = GuidedSampler(net, gnet, noise_shape=shape, device="cuda", backend=backend, graph=graph,
                              streams=streams, check_finite=False, **kwargs)
            for call in range(2):
                noise = noise_of(100 * draw + call, shape)
                seeds = [rng.randrange(2**40) for _ in range(shape[0])] if seeded else None
                torch.manual_seed(7 + call)  # The churn noise's source when unseeded.
                out = s(noise, None, seeds)
                torch.manual_seed(7 + call)
                expected = eager(net, gnet, noise, None, seeds, backend=backend, **kwargs)
                assert torch.equal(out, expected), (graph, streams, call, kwargs, backend)
            assert s.report["graph"] == graph and s.report["capture_error"] is None


@pytest.mark.parametrize("graph", ["trajectory", "step", "none"])
def test_streams_on_is_bit_identical_to_streams_off(graph):
    net, gnet = cuda_nets()
    on = make(net, gnet, graph=graph, streams="on", **CHURN)
    off = make(net, gnet, graph=graph, streams="off", **CHURN)
    assert on.prepare(seeded=True)["streams"] == "on" and off.prepare(seeded=True)["streams"] == "off"
    for seed in (4, 5):
        noise, seeds = noise_of(seed), [seed, seed + 1, seed + 2, seed + 3]
        a, b = on(noise, labels_of(seed), seeds), off(noise, labels_of(seed), seeds)
        assert torch.equal(a, b)
        assert torch.equal(a, eager(net, gnet, noise, labels_of(seed), seeds, **BASE, **CHURN))


def test_replay_with_new_seeds_equals_eager_with_those_seeds():
    net, gnet = cuda_nets()
    s = make(net, gnet, graph="trajectory", **CHURN)
    noise, labels = noise_of(7), labels_of(7)
    seeds_a, seeds_b = [1, 2, 3, 4], [5, 6, 7, 8]
    a = s(noise, labels, seeds_a)
    b = s(noise, labels, torch.tensor(seeds_b, device="cuda"))  # Seeds already on the device.
    assert not torch.equal(a, b)  # Only the churn seeds changed.
    assert torch.equal(b, eager(net, gnet, noise, labels, seeds_b, **BASE, **CHURN))
    # Noise defaults to seeded_noise(seeds).
    c = s(labels=labels, seeds=seeds_a)
    assert torch.equal(c, eager(net, gnet, seeded_noise(seeds_a, SHAPE, device="cuda"), labels, seeds_a,
                                **BASE, **CHURN))


def test_seeds_in_a_pinned_buffer_refilled_right_after_the_call_are_the_call_s_seeds():
    # A server reusing one pinned seeds buffer per request: the call must have read (copied) it
    # before returning, since pin_memory() of a pinned tensor is the tensor itself.
    net, gnet = cuda_nets()
    s = make(net, gnet, graph="trajectory", check_finite=False, **CHURN)
    noise, labels = noise_of(8), labels_of(8)
    buffer = torch.tensor([1, 2, 3, 4], dtype=torch.int64).pin_memory()
    torch.cuda._sleep(200_000_000)  # The call's copy of the seeds queues behind this.
    out = s(noise, labels, buffer)
    buffer.copy_(torch.tensor([9, 9, 9, 9]))  # The next request's seeds, while the call may still be queued.
    torch.cuda.synchronize()
    assert torch.equal(out, eager(net, gnet, noise, labels, [1, 2, 3, 4], **BASE, **CHURN))


def test_parameter_replacement_recaptures_and_in_place_updates_are_seen():
    net, gnet = cuda_nets()
    s = make(net, gnet, graph="trajectory", streams="on")
    noise, labels = noise_of(8), labels_of(8)
    s(noise, labels)
    # In place: same storage, the captured graph reads the new values with no re-capture.
    with torch.no_grad():
        state = {k: v * 1.1 for k, v in gnet.state_dict().items()}
    gnet.load_state_dict(state)
    assert torch.equal(s(noise, labels), eager(net, gnet, noise, labels, **BASE))
    assert s.report["recaptures"] == 0
    # Replaced: new storage; the old graph would read freed memory, so the sampler re-captures.
    net.conv2.weight = torch.nn.Parameter(net.conv2.weight.detach() * -0.7)
    assert torch.equal(s(noise, labels), eager(net, gnet, noise, labels, **BASE))
    assert s.report["recaptures"] == 1
    net.cuda()  # Moving to the device it is already on changes nothing.
    s(noise, labels)
    assert s.report["recaptures"] == 1


def test_eight_threads_twenty_calls_each_all_correct():
    net, gnet = cuda_nets()
    s = make(net, gnet, graph="trajectory", **CHURN)
    seed_sets = [[100 * i + j for j in range(SHAPE[0])] for i in range(8)]
    labels = labels_of(9)
    expected = [eager(net, gnet, seeded_noise(seeds, SHAPE, device="cuda"), labels, seeds, **BASE, **CHURN)
                for seeds in seed_sets]
    s.prepare(seeded=True)
    failures: list[str] = []

    def worker(i: int) -> None:
        try:
            # Half the threads run on their own current stream: the sampler must order its calls.
            stream = torch.cuda.Stream() if i % 2 else torch.cuda.current_stream()
            with torch.cuda.stream(stream):
                for k in range(20):
                    out = s(labels=labels, seeds=seed_sets[i])
                    if not torch.equal(out, expected[i]):
                        failures.append(f"thread {i} call {k}")
        except Exception as exc:  # Reported by the main thread.
            failures.append(f"thread {i}: {exc!r}")

    run_in_threads(worker)
    assert failures == []


def test_fast_guided_sample_from_threads_shares_one_cached_sampler():
    autoguide_fast.clear_cache()
    start = engine_cache.cache_info()
    net, gnet = cuda_nets()
    labels = labels_of(3)
    seed_sets = [[10 * i + j for j in range(SHAPE[0])] for i in range(4)]
    expected = [eager(net, gnet, seeded_noise(s, SHAPE, device="cuda"), labels, s, **BASE, **CHURN)
                for s in seed_sets]
    failures: list[str] = []

    def worker(i: int) -> None:
        for _ in range(5):
            out = fast_guided_sample(net, seeded_noise(seed_sets[i], SHAPE, device="cuda"), labels, gnet,
                                     seeds=seed_sets[i], **BASE, **CHURN)
            if not torch.equal(out, expected[i]):
                failures.append(f"thread {i}")

    run_in_threads(worker, 4)
    assert failures == []
    info = engine_cache.cache_info()
    # Threads racing on the first call may each miss, but they end up sharing one entry.
    assert info["entries"] == 1 and (info["misses"] - start["misses"]) + (info["hits"] - start["hits"]) == 20
    assert info["hits"] - start["hits"] >= 16
    autoguide_fast.clear_cache()


def test_memory_does_not_grow_over_100_calls():
    net, gnet = cuda_nets()
    s = make(net, gnet, graph="trajectory", **CHURN)
    labels = labels_of(1)
    for i in range(10):
        s(noise_of(i), labels, [i, i + 1, i + 2, i + 3])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(100):
        out = s(labels=labels, seeds=[i, i + 1, i + 2, i + 3])
        del out
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


@pytest.mark.parametrize("graph", ["trajectory", "step", "none"])
def test_a_sampler_dropped_unreleased_lets_its_last_call_finish_before_its_memory_is_reused(graph):
    """The sampler's plan and static buffers are allocated on the stream that prepared it and used
    by every call, on the caller's stream. Dropped without release() while a call that did not sync
    (check_finite=False) still waits on another stream, the sampler must not let the caching
    allocator hand that memory to new work on the preparing stream before the call has run: that
    work would overwrite the call's inputs and the call would write into memory now someone else's."""
    net, gnet = cuda_nets()
    noise, labels = noise_of(11), labels_of(11)
    expected = eager(net, gnet, noise, labels, **BASE)
    s = make(net, gnet, graph=graph, streams="off", check_finite=False)
    s.prepare()  # On the default stream.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(1_000_000_000)  # About half a second: the call's work queues behind it.
        out = s(noise, labels)
    del s
    gc.collect()
    # New work on the default stream, on memory the caching allocator has (or would have) handed
    # back: many tensors of the sizes of the sampler's buffers, filled with NaN.
    fillers = [torch.full(shape, float("nan"), device="cuda") for shape in [(128,)] * 1024 + [SHAPE] * 64]
    torch.cuda.synchronize()
    assert all(bool(torch.isnan(f).all()) for f in fillers)  # The call wrote into none of them ...
    assert torch.equal(out, expected)  # ... and read none of them.


@pytest.mark.parametrize("graph", ["trajectory", "step", "none"])
def test_a_network_error_with_the_guide_on_its_stream_leaves_the_sampler_usable(graph):
    """The guide raising on its side stream (here after launching its work, mid warm-up or mid
    call): the error propagates, the work already queued on the engine's streams is ordered before
    the caller's stream frees what that work uses, and the next call prepares and samples right."""
    net, inner = cuda_nets()
    calls = [0]
    fail_at: list[int | None] = [3]

    def gnet(x, t, labels):
        out = inner(x, t, labels)
        calls[0] += 1
        if calls[0] == fail_at[0]:
            raise RuntimeError("guide network failed (test)")
        return out

    s = make(net, gnet, graph=graph, streams="on", check_finite=False)
    noise, labels = noise_of(12), labels_of(12)
    with pytest.raises(RuntimeError, match="guide network failed"):
        s(noise, labels)
    gc.collect()
    fail_at[0] = None
    out = s(noise, labels)
    assert s.report["graph"] == graph and s.report["capture_error"] is None
    assert torch.equal(out, eager(net, gnet, noise, labels, **BASE))


@pytest.mark.parametrize("graph", ["trajectory", "step", "none"])
def test_first_call_under_inference_mode_then_outside_it(graph):
    """A sampler first called (prepared) under torch.inference_mode() keeps working outside it: its
    static buffers are not inference tensors. Also through the cached fast_guided_sample route."""
    net, gnet = cuda_nets(label_dim=0)
    noise = noise_of(0, (2, 3, 8, 8))
    s = GuidedSampler(net, gnet, noise_shape=noise.shape, device="cuda", graph=graph, **BASE)
    with torch.inference_mode():
        first = s(noise)
    assert torch.equal(s(noise), first)
    if graph == "trajectory":
        autoguide_fast.clear_cache()
        with torch.inference_mode():
            cached_first = fast_guided_sample(net, noise, None, gnet, **BASE)
        assert torch.equal(fast_guided_sample(net, noise, None, gnet, **BASE), cached_first)
        autoguide_fast.clear_cache()


def test_autocast_state_is_part_of_what_a_graph_was_captured_for():
    """A graph bakes in the precision its networks ran at. A call under another autocast state than
    the capture's gets what the plain loop gives under that state: GuidedSampler re-captures, the
    cache keeps one entry per state. (Capture runs with autocast's weight-cast cache off.)"""
    autoguide_fast.clear_cache()
    net, gnet = cuda_nets(label_dim=0)
    noise = noise_of(0, (2, 3, 8, 8))
    kind = noise.device.type  # "cuda"; the CPU under the emulation.
    low = torch.float16 if kind == "cuda" else torch.bfloat16

    def plain(autocast: bool) -> torch.Tensor:
        with torch.autocast(kind, dtype=low, enabled=autocast):
            return fast_guided_sample(net, noise, None, gnet, callback=lambda info: None, **BASE)  # The plain loop.

    full, reduced = plain(False), plain(True)
    assert not torch.equal(full, reduced)
    s = GuidedSampler(net, gnet, noise_shape=noise.shape, device="cuda", **BASE)
    for autocast, expected in ((True, reduced), (False, full), (True, reduced)):
        with torch.autocast(kind, dtype=low, enabled=autocast):
            assert torch.equal(s(noise), expected), autocast
            assert torch.equal(fast_guided_sample(net, noise, None, gnet, **BASE), expected), autocast
    assert s.report["recaptures"] == 2
    assert engine_cache.cache_info()["entries"] == 2
    autoguide_fast.clear_cache()


def test_cached_graph_route_keeps_no_network_alive():
    """fast_guided_sample on CUDA (a cached, captured GuidedSampler) holds its networks weakly: a
    model deleted by its owner is freed, weights and all, without clear_cache()."""
    autoguide_fast.clear_cache()
    net, gnet = cuda_nets(label_dim=0)
    out = fast_guided_sample(net, noise_of(0, (2, 3, 8, 8)), None, gnet, **BASE)
    assert engine_cache.cache_info()["entries"] == 1
    probes = [weakref.ref(net), weakref.ref(gnet)]
    del net, gnet, out
    gc.collect()
    assert [p() for p in probes] == [None, None]
    autoguide_fast.clear_cache()


def test_cache_eviction_and_clear_free_memory():
    autoguide_fast.clear_cache()
    net, gnet = cuda_nets(label_dim=0)
    big, small = (64, 3, 64, 64), (1, 3, 8, 8)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base_alloc, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    autoguide_fast.set_cache_size(1)
    start = engine_cache.cache_info()
    try:
        fast_guided_sample(net, noise_of(0, big), None, gnet, **BASE)
        torch.cuda.synchronize()
        held_big = torch.cuda.memory_allocated() - base_alloc
        assert held_big >= 2 * 64 * 3 * 64 * 64 * 4  # At least the static noise and output buffers.
        held_reserved = torch.cuda.memory_reserved() - base_reserved
        fast_guided_sample(net, noise_of(1, small), None, gnet, **BASE)  # Evicts the big sampler.
        torch.cuda.synchronize()
        assert engine_cache.cache_info()["evictions"] - start["evictions"] == 1
        assert torch.cuda.memory_allocated() - base_alloc < held_big / 4
        autoguide_fast.clear_cache()  # Releases everything and empties the allocator cache.
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - base_alloc < held_big / 8
        # The graph's private pool (its activations) went back to the device too.
        assert held_reserved > (16 << 20)
        assert torch.cuda.memory_reserved() - base_reserved < (8 << 20)
    finally:
        autoguide_fast.set_cache_size(engine_cache.DEFAULT_CACHE_SIZE)
        autoguide_fast.clear_cache()


def test_fast_guided_sample_on_cuda_goes_through_the_cache_and_matches_eager():
    autoguide_fast.clear_cache()
    start = engine_cache.cache_info()
    net, gnet = cuda_nets()
    noise, labels = noise_of(2), labels_of(2)
    out = fast_guided_sample(net, noise, labels, gnet, **BASE)
    again = fast_guided_sample(net, noise, labels, gnet, **BASE)
    info = engine_cache.cache_info()
    assert info["misses"] - start["misses"] == 1 and info["hits"] - start["hits"] == 1
    assert torch.equal(out, again) and out.data_ptr() != again.data_ptr()
    expected = eager(net, gnet, noise, labels, backend=_auto_backend_name(), **BASE)
    assert torch.equal(out, expected)
    # A callback needs the plain loop: no cache use, same result.
    seen = []
    fast_guided_sample(net, noise, labels, gnet, callback=seen.append, **BASE)
    assert engine_cache.cache_info()["misses"] - start["misses"] == 1 and len(seen) == BASE["num_steps"]
    autoguide_fast.clear_cache()


@pytest.mark.parametrize("streams", ["on", "off"])
@pytest.mark.parametrize("graph", ["trajectory", "step", "none"])
def test_calls_never_make_the_host_wait_for_the_gpu(graph, streams):
    # A serving loop queues call after call: a host sync inside one (a .item(), a blocking copy)
    # would drain the GPU's queue at every call. With check_finite=False nothing syncs, seeds given
    # as a list included (pinned, asynchronous copy).
    net, gnet = cuda_nets()
    s = make(net, gnet, graph=graph, streams=streams, check_finite=False, **CHURN)
    s.prepare(seeded=True)
    inputs = [(noise_of(seed), labels_of(seed), [seed, seed + 1, seed + 2, seed + 3]) for seed in (1, 2)]
    device_seeds = torch.tensor(inputs[0][2], device="cuda")
    first = s(*inputs[0])  # First use of every path (lazy set-up may sync; calls after it must not).
    with host_syncs_raise():
        out = [s(noise, labels, seeds) for noise, labels, seeds in inputs]
        out.append(s(labels=inputs[0][1], seeds=device_seeds))  # Noise defaults to seeded_noise(seeds).
    assert torch.equal(out[0], first)
    for (noise, labels, seeds), got in zip(inputs, out):
        assert torch.equal(got, eager(net, gnet, noise, labels, seeds, **BASE, **CHURN))
    expected = eager(net, gnet, seeded_noise(inputs[0][2], SHAPE, device="cuda"), inputs[0][1], inputs[0][2],
                     **BASE, **CHURN)
    assert torch.equal(out[2], expected)


def test_fast_guided_sample_on_cuda_never_makes_the_host_wait_for_the_gpu():
    autoguide_fast.clear_cache()
    net, gnet = cuda_nets()
    noise, labels, seeds = noise_of(3), labels_of(3), [7, 8, 9, 10]
    first = fast_guided_sample(net, noise, labels, gnet, seeds=seeds, check_finite=False, **BASE, **CHURN)
    seeds_on_host = torch.tensor(seeds)  # A CPU tensor of seeds goes the same asynchronous way as a list.
    with host_syncs_raise():
        again = [fast_guided_sample(net, noise, labels, gnet, seeds=given, check_finite=False, **BASE, **CHURN)
                 for given in (seeds, seeds_on_host)]
    assert all(torch.equal(first, a) for a in again)
    assert torch.equal(first, eager(net, gnet, noise, labels, seeds, backend=_auto_backend_name(), **BASE, **CHURN))
    autoguide_fast.clear_cache()


def test_bucketed_calls_never_make_the_host_wait_for_the_gpu():
    # Padded (3 of a bucket of 4) and chunked (4 + 2) calls, seeds as a list.
    net, gnet = cuda_nets()
    s = autoguide_fast.BucketedSampler(net, gnet, image_shape=SHAPE[1:], batch_sizes=(2, 4),
                                       image_label_shape=(LABEL_DIM,), device="cuda", check_finite=False,
                                       **BASE, **CHURN)
    labels = one_hot_labels(6, LABEL_DIM, seed=3).cuda()
    seeds = [7, 8, 9, 10, 11, 12]
    first = [s(labels=labels[:n], seeds=seeds[:n]) for n in (3, 6)]
    with host_syncs_raise():
        again = [s(labels=labels[:n], seeds=seeds[:n]) for n in (3, 6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_nan_noise_on_cuda_is_refused_unless_check_finite_is_off():
    # Checking the noise's values makes the host wait for the GPU: done with check_finite only.
    net, gnet = cuda_nets()
    noise = noise_of(4)
    noise[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="noise: contains NaN or Inf"):
        fast_guided_sample(net, noise, labels_of(4), gnet, **BASE)
    out = fast_guided_sample(net, noise, labels_of(4), gnet, check_finite=False, **BASE)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()
    autoguide_fast.clear_cache()


def _auto_backend_name() -> str:
    return resolve_backend("auto", torch.device("cuda"), torch.float32).name


def test_streams_auto_times_both_and_keeps_the_faster():
    net, gnet = cuda_nets()
    report = make(net, gnet, graph="trajectory", streams="auto").prepare()
    timings = report["timings_ms"]
    assert set(timings) == {"streams_on", "streams_off"} and all(v > 0 for v in timings.values())
    faster = "on" if timings["streams_on"] < timings["streams_off"] else "off"
    assert report["streams"] == faster
    # Unguided: the guide is never called, nothing to fork.
    report = make(net, gnet, guidance=1, streams="auto").prepare()
    assert report["streams"] == "off" and report["timings_ms"] == {}


def test_copy_output_false_returns_the_static_buffer_zero_copy():
    net, gnet = cuda_nets()
    s = make(net, gnet, graph="trajectory", copy_output=False)
    a = s(noise_of(1), labels_of(1))
    b = s(noise_of(2), labels_of(2))
    assert a.data_ptr() == b.data_ptr()
    assert torch.equal(b, eager(net, gnet, noise_of(2), labels_of(2), **BASE))


def test_copy_output_false_buffer_stays_valid_for_work_queued_before_the_next_call_on_another_stream():
    # Call 1 on stream A, its result read on A; call 2 from stream B: call 2 must not overwrite the
    # static buffer before A's read of it (it used to wait for call 1 only, not for A's later work).
    net, gnet = cuda_nets()
    s = make(net, gnet, graph="trajectory", copy_output=False)
    expected = eager(net, gnet, noise_of(1), labels_of(1), **BASE)
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    for stream in (a, b):
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(a):
        out = s(noise_of(1), labels_of(1))
        torch.cuda._sleep(50_000_000)  # The read below starts late (tens of ms).
        doubled = out * 2
    with torch.cuda.stream(b):
        s(noise_of(2), labels_of(2))
    torch.cuda.synchronize()
    assert torch.equal(doubled, expected * 2)


@pytest.fixture
def no_tf32():
    """TF32 off for cuDNN and cuBLAS, restored after the test. (Not monkeypatch: cuBLAS's flag is
    served by __getattr__, so monkeypatch would delete it on undo instead of restoring it.)"""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_compiled_networks_are_captured_and_close_to_eager(no_tf32):
    import torch._dynamo
    from torch._dynamo.utils import counters

    # No TF32 (no_tf32): Inductor may lay small convolutions out channels-last and so pick other
    # cuDNN kernels than eager, whose TF32 rounding (~1e-3) would hide what the tolerance checks.
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]  # Process-wide, not cleared by reset().
    net, gnet = cuda_nets(count_calls=False)  # A call counter would make Dynamo recompile every call.
    s = make(net, gnet, graph="trajectory", compile_networks=True)
    noise, labels = noise_of(3), labels_of(3)
    # Dynamo giving up at its recompile limit (the graph would then capture eager code) is an error
    # here; it only logs otherwise.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        report = s.prepare()
        out = s(noise, labels)
    assert counters["stats"]["unique_graphs"] - graphs_before >= 2  # Both networks went through Dynamo.
    assert report["compile_networks"] and report["graph"] == "trajectory" and report["capture_error"] is None
    expected = eager(net, gnet, noise, labels, **BASE)
    # Inductor may fuse differently from eager: close, not bit-identical.
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_noise_and_labels_on_another_device_are_refused():
    net, gnet = cuda_nets()
    s = make(net, gnet)
    with pytest.raises(ValueError, match="^noise: expected a tensor on cuda"):
        s(noise_of(1).cpu(), labels_of(1))
    with pytest.raises(ValueError, match="^labels: expected a tensor on cuda"):
        s(noise_of(1), labels_of(1).cpu())


# A failed capture must leave no CUDA state behind that would break the tests after it (they run
# after it in this file, and in any order under pytest-xdist).
def test_capture_failure_falls_back_with_one_warning_and_a_correct_result():
    # GaussianDenoiser records float(sigma): a host sync, which cannot be captured.
    net, gnet = GaussianDenoiser(0.5), GaussianDenoiser(0.9)
    s = GuidedSampler(net, gnet, noise_shape=(4, 3, 8, 8), device="cuda", num_steps=5, guidance=2.0,
                      graph="trajectory", backend="torch")
    noises = [noise_of(i, (4, 3, 8, 8)) for i in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [s(n) for n in noises]
    mine = [w for w in caught if issubclass(w.category, GraphCaptureWarning)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    report = s.report
    assert report["graph"] == "none" and report["capture_error"]
    for n, out in zip(noises, outs):
        assert torch.equal(out, eager(net, gnet, n, None, num_steps=5, guidance=2.0, backend="torch"))


def test_streams_auto_keeps_the_one_stream_graph_when_the_second_runs_out_of_memory(monkeypatch):
    """streams="auto" holds both schedules' graphs while it times them: if building the second one
    runs out of memory, the first one is kept (not released with the call failing)."""
    net, gnet = cuda_nets(label_dim=0)
    s = GuidedSampler(net, gnet, noise_shape=(2, 3, 8, 8), device="cuda", graph="trajectory", **BASE)
    program = s._program

    def program_or_oom(streams_on: bool):
        if streams_on:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return program(streams_on)

    monkeypatch.setattr(s, "_program", program_or_oom)
    noise = noise_of(0, (2, 3, 8, 8))
    out = s(noise)
    report = s.report
    assert report["graph"] == "trajectory" and report["streams"] == "off" and report["capture_error"] is None
    assert "out of memory" in report["streams_reason"]
    assert torch.equal(out, eager(net, gnet, noise, None, **BASE))


def test_cuda_rng_and_allocator_still_work_after_a_failed_capture():
    net = GaussianDenoiser(0.5)
    s = GuidedSampler(net, noise_shape=(2, 8), device="cuda", num_steps=4, graph="trajectory", backend="torch",
                      S_churn=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphCaptureWarning)
        s(noise_of(0, (2, 8)))
    assert s.report["capture_error"]
    # Eager random draws advance again (not stuck in a half-finished capture state).
    a, b = torch.randn(1000, device="cuda"), torch.randn(1000, device="cuda")
    assert not torch.equal(a, b)
    out = s(noise_of(1, (2, 8)))  # Churn from torch.randn_like on the eager fallback.
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_default_noise_from_the_backend_kernel_is_seeded_noise(backend):
    """Calls with seeds and no noise draw the initial noise with the backend's Philox kernel
    (float32 state): the same values as the specification's torch implementation."""
    backend_or_skip(backend)
    shape = (8, 4, 64, 64)
    s = GuidedSampler(GaussianDenoiser(0.5), noise_shape=shape, device="cuda", num_steps=4, backend=backend,
                      graph="none")
    seeds = seeds_to_tensor([3, -1, 2**63 - 1, 0, 17, 2**40, 5, 6], device="cuda")
    assert torch.equal(s._seeded_noise(seeds), seeded_noise(seeds, shape, device="cuda"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_graphs_need_three_graphs_for_a_deterministic_schedule(backend):
    backend_or_skip(backend)
    net, gnet = cuda_nets()
    s = make(net, gnet, backend=backend, graph="step", streams="off")
    report = s.prepare()
    assert report["graph"] == "step" and report["graphs"] == 3, report
    noise, labels = noise_of(9), labels_of(9)
    assert torch.equal(s(noise, labels), eager(net, gnet, noise, labels, None, backend=backend, **BASE))


def test_replays_and_random_draws_in_other_threads_while_a_sampler_captures():
    """torch's CUDA generator is in capture mode process-wide while any capture is open: the
    engine's lock keeps its own replays and random draws in other threads away from captures."""
    net, gnet = cuda_nets()
    busy = make(net, gnet, graph="trajectory", streams="off", **CHURN)
    busy.prepare()
    noise, labels = noise_of(3), labels_of(3)
    torch.manual_seed(0)
    errors: list[BaseException] = []
    stop = threading.Event()

    def replay_loop() -> None:
        try:
            while not stop.is_set():
                out = busy(noise, labels)  # Churn from torch.randn_like: random draws inside the replay.
                assert torch.isfinite(out).all()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=replay_loop)
    worker.start()
    try:
        for graph in ("trajectory", "step"):
            s = make(net, gnet, graph=graph, streams="on", **CHURN)
            s.prepare(seeded=True)
            seeds = [1, 2, 3, 4]
            assert torch.equal(s(noise, labels, seeds), eager(net, gnet, noise, labels, seeds, **BASE, **CHURN))
    finally:
        stop.set()
        worker.join()
    assert errors == []


def test_two_samplers_drawing_random_numbers_on_two_streams_draw_them_in_launch_order():
    """Two samplers whose graphs draw churn noise from torch.randn_like, replayed at once from two
    threads on two streams: torch (< 2.13) hands each replay its generator offset through one shared
    device tensor, so without the engine's random fence one replay could read the other's offset.
    Each pair of results must be what running them one after the other gives, in one order or the
    other (whichever thread launched first)."""
    net, gnet = cuda_nets()
    a, b = (make(net, gnet, graph="trajectory", streams="off", **CHURN) for _ in range(2))
    a.prepare()
    b.prepare()
    noise, labels = noise_of(4), labels_of(4)
    streams = (torch.cuda.Stream(), torch.cuda.Stream())
    for trial in range(8):
        torch.manual_seed(100 + trial)
        state = torch.cuda.get_rng_state()
        out: dict[int, torch.Tensor] = {}
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def work(i: int, barrier=barrier, out=out, errors=errors) -> None:
            try:
                with torch.cuda.stream(streams[i]):
                    barrier.wait(timeout=60)
                    out[i] = (a, b)[i](noise, labels)
                streams[i].synchronize()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                barrier.abort()  # The other thread stops waiting.

        run_in_threads(work, n=2)
        assert errors == [], errors
        torch.cuda.set_rng_state(state)
        a1 = a(noise, labels)  # a launched first ...
        b1 = b(noise, labels)
        torch.cuda.set_rng_state(state)
        b2 = b(noise, labels)  # ... or b launched first.
        a2 = a(noise, labels)
        assert not torch.equal(a1, a2)  # The two orders draw different noise.
        assert any(torch.equal(out[0], x) and torch.equal(out[1], y) for x, y in ((a1, b1), (a2, b2))), trial


@pytest.mark.parametrize("graph", ["trajectory", "step"])
def test_unseeded_churn_draws_the_numbers_the_eager_loop_draws(graph):
    """Churn from torch.randn_like inside CUDA graphs: preparing (warm-up, timing, capture) leaves
    the generator as it was, and each replay draws what the eager loop draws from the same state."""
    net, gnet = cuda_nets()
    s = make(net, gnet, graph=graph, streams="off", **CHURN)
    noise, labels = noise_of(8), labels_of(8)
    for seed in (5, 6):  # The first call prepares, the second replays.
        torch.manual_seed(seed)
        out = s(noise, labels)
        torch.manual_seed(seed)
        assert torch.equal(out, eager(net, gnet, noise, labels, **BASE, **CHURN)), (graph, seed)


@pytest.mark.parametrize("graph", ["trajectory", "step"])
def test_buckets_replay_the_padded_batch_and_return_the_call_rows(graph):
    """A call of 3 images runs the bucket of 4 from its graph: bit for bit the eager run of the
    batch padded with the last image, first 3 rows; a call of 6 runs 4 + 2 (chunked); fresh
    tensors of exactly the call's rows."""
    net, gnet = cuda_nets()
    s = autoguide_fast.BucketedSampler(net, gnet, image_shape=SHAPE[1:], batch_sizes=(2, 4),
                                       image_label_shape=(LABEL_DIM,), device="cuda", graph=graph, **BASE, **CHURN)
    labels = one_hot_labels(6, LABEL_DIM, seed=3).cuda()
    seeds = [7, 8, 9, 10, 11, 12]
    for n in (3, 6):
        out = s(labels=labels[:n], seeds=seeds[:n])
        assert out.shape == (n, *SHAPE[1:]) and out.untyped_storage().nbytes() == out.numel() * 4
        parts = [(0, 3, 1)] if n == 3 else [(0, 4, 0), (4, 6, 0)]
        for start, stop, pad in parts:
            rows = seeds[start:stop] + seeds[stop - 1:stop] * pad
            lab = torch.cat([labels[start:stop], labels[stop - 1:stop].expand(pad, -1)])
            expected = eager(net, gnet, seeded_noise(rows, (len(rows), *SHAPE[1:]), device="cuda"), lab, rows,
                             **BASE, **CHURN)
            assert torch.equal(out[start:stop], expected[:stop - start]), (graph, n, start)
    assert {b: r["graph"] for b, r in s.report.items()} == {2: graph, 4: graph}


def test_noise_that_requires_grad_gets_the_reference_gradients_on_cuda():
    net, _ = cuda_nets(label_dim=0)
    noise = noise_of(3).requires_grad_()
    from autoguide_fast.reference import edm_sampler as reference_sampler

    for backend in ("auto", "torch"):
        out = fast_guided_sample(net, noise, num_steps=4, backend=backend)
        expected = reference_sampler(net, noise, num_steps=4)
        assert out.requires_grad and torch.equal(out, expected), backend
        g_out, = torch.autograd.grad(out.sum(), noise)
        g_ref, = torch.autograd.grad(expected.sum(), noise)
        # cuDNN's backward convolutions may sum in another order from one run to the next.
        torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-5 * float(g_ref.abs().max()))
