"""Guide-parallel sampling (main network on rank 0, guide on rank 1) on CPU with gloo, 2 processes.

``run_ranks`` (also used by the generate tests) starts a gloo job with torch.multiprocessing
and returns what each rank's function returned; a job that outlives its time limit is killed and
fails the test instead of blocking it.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autoguide_fast import fast_guided_sample, seeded_noise
from autoguide_fast.distributed import PeerFailure, guide_parallel_sample
from tests.nets import PointwiseDenoiser, TinyConvDenoiser, one_hot_labels


def _rank_main(rank, world_size, init_file, result_dir, pg_timeout, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=pg_timeout))
    try:
        result = fn(rank, *args)
    except BaseException:
        result = {"crash": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(result_dir, f"rank{rank}.pt"))


def run_ranks(tmp_path, fn, *args, world_size: int = 2, timeout: float = 600.0, pg_timeout: float = 60.0) -> list:
    """Run ``fn(rank, *args)`` on every rank of a fresh gloo group; return the results by rank.

    The job gets ``timeout`` seconds in all (then its processes are killed and the test fails, so
    a rank waiting forever cannot block the test run); ``pg_timeout`` is the process group's own
    timeout for one collective.
    """
    result_dir = tmp_path / "ranks"
    result_dir.mkdir(exist_ok=True)
    init_file = tmp_path / "pg-init"
    context = mp.spawn(_rank_main, args=(world_size, str(init_file), str(result_dir), pg_timeout, fn, args),
                       nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join()
            finished = sorted(p.name for p in result_dir.iterdir())
            pytest.fail(f"the {world_size}-rank job did not finish within {timeout:g} s (a rank waiting for "
                        f"another?); results written: {finished or 'none'}")
    results = [torch.load(result_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    for r, res in enumerate(results):
        assert not (isinstance(res, dict) and "crash" in res), f"rank {r} crashed:\n{res['crash']}"
    return results


# ----------------------------------------------------------------------------
# The cases: same keyword arguments on both ranks; rank 0 holds net, noise, labels; rank 1 the guide.

SEEDS = [11, 3, 2024, 7]
SHAPE = [len(SEEDS), 3, 8, 8]


def _cases():
    labels = one_hot_labels(len(SEEDS), 4, seed=5)
    return {
        # Heun, churn from per-image seeds, a guidance interval (some evaluations unguided), labels.
        "heun_churn_interval": dict(
            main=dict(label_dim=4, seed=0), guide=dict(label_dim=4, seed=1, hidden=4), labels=labels,
            kwargs=dict(num_steps=6, guidance=2.5, guidance_interval=(0.3, 5.0), S_churn=10.0, S_min=0.05,
                        S_max=50.0, seeds=SEEDS)),
        # Euler in float64 with a guide whose output is float16 (sent in its own dtype).
        "euler_f64_fp16_guide": dict(
            main=dict(seed=2), guide=dict(seed=3, out_dtype=torch.float16), labels=None,
            kwargs=dict(num_steps=5, guidance=1.7, solver="euler", dtype=torch.float64, sigma_max=20.0)),
        # The best step backend here (fused C++ on CPU: the next step's churn fused into the update).
        "auto_backend_fused_churn": dict(
            main=dict(label_dim=4, seed=6), guide=dict(label_dim=4, seed=7), labels=labels,
            kwargs=dict(num_steps=5, guidance=2.0, S_churn=20.0, seeds=SEEDS, backend="auto"), callback=False),
        # A custom schedule (k-diffusion style, with its final 0) instead of the official formula.
        "custom_sigmas": dict(
            main=dict(seed=8), guide=dict(seed=9), labels=None,
            kwargs=dict(sigmas=[60.0, 9.0, 1.2, 0.1, 0.0], guidance=2.2, S_churn=5.0, seeds=SEEDS)),
        # w = 1: the guide is never called, rank 1 only checks the settings.
        "unguided": dict(
            main=dict(seed=4), guide=dict(seed=5), labels=None, kwargs=dict(num_steps=4, guidance=1)),
    }


def _job_cases(rank):
    out = {}
    for name, case in _cases().items():
        kwargs = dict({"backend": "torch"}, **case["kwargs"])
        if rank == 0:
            net = TinyConvDenoiser(**case["main"])
            noise = seeded_noise(SEEDS, SHAPE)
            seen = []
            callback = (lambda d, seen=seen: seen.append(d["denoised"].clone())) if case.get("callback", True) else None
            x = guide_parallel_sample(net, None, noise, case["labels"], callback=callback, **kwargs)
            out[name] = dict(x=x, denoised=seen)
        else:
            gnet = TinyConvDenoiser(**case["guide"])
            x = guide_parallel_sample(None, gnet, **{k: v for k, v in kwargs.items() if k != "seeds"})
            out[name] = dict(x=x, guide_calls=gnet.calls)
    return out


def _reference(case):
    net, gnet = TinyConvDenoiser(**case["main"]), TinyConvDenoiser(**case["guide"])
    seen = []
    callback = (lambda d: seen.append(d["denoised"].clone())) if case.get("callback", True) else None
    x = fast_guided_sample(net, seeded_noise(SEEDS, SHAPE), case["labels"], gnet, callback=callback,
                           **dict({"backend": "torch"}, **case["kwargs"]))
    return x, seen, gnet.calls


def _job(rank):
    return {"cases": _job_cases(rank), "errors": _job_errors(rank)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process job runs every case of this module (process start-up dominates the cost)."""
    return run_ranks(tmp_path_factory.mktemp("gp"), _job)


@pytest.mark.slow
def test_guide_parallel_equals_single_device_sampling(two_ranks):
    rank0, rank1 = (r["cases"] for r in two_ranks)
    for name, case in _cases().items():
        x_ref, denoised_ref, guide_calls_ref = _reference(case)
        got = rank0[name]
        assert got["x"].dtype == x_ref.dtype
        assert torch.equal(got["x"], x_ref), name
        assert len(got["denoised"]) == len(denoised_ref)
        assert all(torch.equal(a, b) for a, b in zip(got["denoised"], denoised_ref)), name
        # Rank 1 ran the guide exactly where single-device sampling does, and returned nothing.
        assert rank1[name]["x"] is None
        assert rank1[name]["guide_calls"] == guide_calls_ref, name
    assert _reference(_cases()["unguided"])[2] == 0
    assert 0 < _reference(_cases()["heun_churn_interval"])[2] < 2 * 6 - 1  # Interval skipped some.


# ----------------------------------------------------------------------------
# Errors reach both ranks: nobody waits forever.


class _WrongShape(torch.nn.Module):
    def forward(self, x, sigma, labels=None):
        return x[:, :1]


class _Broken(torch.nn.Module):
    def forward(self, x, sigma, labels=None):
        raise RuntimeError("main network broken")


def _job_errors(rank):
    out = {}
    noise = seeded_noise(SEEDS, SHAPE)
    net = TinyConvDenoiser(seed=0)

    def attempt(name, fn):
        try:
            fn()
            out[name] = None
        except Exception as exc:
            out[name] = (type(exc).__name__, str(exc))

    # Different settings on the two ranks.
    attempt("mismatch", lambda: guide_parallel_sample(net, TinyConvDenoiser(seed=1), noise,
                                                      num_steps=5 if rank == 0 else 6, guidance=2.0))
    # The guide returns the wrong shape at its first evaluation.
    attempt("bad_guide", lambda: guide_parallel_sample(net, _WrongShape(), noise, num_steps=4, guidance=2.0))
    # Rank 0's own arguments are bad (NaN noise).
    attempt("bad_noise", lambda: guide_parallel_sample(net, TinyConvDenoiser(seed=1), noise * float("nan"),
                                                       num_steps=4, guidance=2.0))
    # The main network fails at an unguided evaluation before the first guided one (a guidance
    # interval that excludes sigma_max): rank 1, waiting for that guided evaluation, learns it.
    attempt("broken_main_outside_interval", lambda: guide_parallel_sample(
        _Broken() if rank == 0 else net, TinyConvDenoiser(seed=1), noise, num_steps=4, guidance=2.0,
        guidance_interval=(0.2, 20.0)))
    # Labels of a dtype NCCL cannot carry (int16): refused on rank 0 before anything is sent.
    attempt("int16_labels", lambda: guide_parallel_sample(
        net, TinyConvDenoiser(seed=1), noise, one_hot_labels(len(SEEDS), 4, seed=5).to(torch.int16), num_steps=4,
        guidance=2.0))
    # And the pair still works afterwards.
    attempt("after", lambda: guide_parallel_sample(net, TinyConvDenoiser(seed=1), noise, num_steps=4, guidance=2.0))
    return out


@pytest.mark.slow
def test_errors_are_raised_on_both_ranks(two_ranks):
    rank0, rank1 = (r["errors"] for r in two_ranks)
    for res in (rank0, rank1):
        assert res["mismatch"][0] == "ValueError" and "differ between rank 0 and rank 1" in res["mismatch"][1]
    assert rank1["bad_guide"][0] == "ValueError" and "gnet (the guide network)" in rank1["bad_guide"][1]
    assert rank0["bad_guide"][0] == "PeerFailure" and "rank 1 (guide network)" in rank0["bad_guide"][1]
    assert rank0["bad_noise"][0] == "ValueError" and "noise" in rank0["bad_noise"][1]
    assert rank1["bad_noise"][0] == "PeerFailure" and "rank 0 (main network)" in rank1["bad_noise"][1]
    assert rank0["broken_main_outside_interval"] == ("RuntimeError", "main network broken")
    assert rank1["broken_main_outside_interval"][0] == "PeerFailure"
    assert "rank 0 (main network)" in rank1["broken_main_outside_interval"][1]
    assert rank0["int16_labels"][0] == "TypeError" and "labels: dtype torch.int16 cannot be sent" in rank0[
        "int16_labels"][1]
    assert rank1["int16_labels"][0] == "PeerFailure" and "rank 0 (main network)" in rank1["int16_labels"][1]
    assert rank0["after"] is None and rank1["after"] is None
    assert issubclass(PeerFailure, RuntimeError)


# ----------------------------------------------------------------------------
# Failures in the middle of a trajectory reach the other rank promptly (not after the process
# group's timeout): the failing rank raises its own error, the other a PeerFailure naming it.

# The trajectory of these cases: Heun, 4 steps, 7 evaluations, all guided unless an interval is given.
MIDWAY = dict(num_steps=4, guidance=2.0)
# This interval guides the first 3 evaluations only (sigma 80 and 9.7); the last 4 are unguided.
LATE_UNGUIDED = dict(MIDWAY, guidance_interval=(0.5, 100.0))
MIDWAY_PG_TIMEOUT = 45.0  # A rank left waiting would raise (gloo) after this long; prompt is far below.
PROMPT = 15.0


class _FailAt(torch.nn.Module):
    """``net``, except that call number ``at`` raises (or returns the wrong shape)."""

    def __init__(self, net, at, what, wrong_shape=False):
        super().__init__()
        self.net, self.at, self.what, self.wrong_shape = net, at, what, wrong_shape
        self.calls = 0

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        if self.calls == self.at:
            if self.wrong_shape:
                return x[:, :1]
            raise RuntimeError(f"{self.what} broken at call {self.at}")
        return self.net(x, sigma, labels)


def _midway_cases():
    """name -> (main fails at call, guide fails at call, sampler kwargs, rank 0 extras)."""
    def stop_at_step_2(d):
        if d["i"] == 2:
            raise KeyError("callback stops at step 2")

    return {
        "main_mid": (3, None, MIDWAY, {}),              # A guided evaluation after the first.
        "guide_mid": (None, 3, MIDWAY, {}),
        "main_last": (7, None, MIDWAY, {}),             # The last evaluation (guided).
        "guide_last": (None, 7, MIDWAY, {}),
        "both_mid": (4, 4, MIDWAY, {}),                 # Both at the same evaluation.
        "guide_shape_mid": (None, -3, MIDWAY, {}),      # The guide's output changes shape at call 3.
        "main_after_guided": (5, None, LATE_UNGUIDED, {}),  # Unguided, after the last guided one.
        "main_last_unguided": (7, None, LATE_UNGUIDED, {}),
        "callback": (None, None, MIDWAY, {"callback": stop_at_step_2}),  # Not a network: same path.
    }


def _job_midway(rank):
    noise = seeded_noise(SEEDS, SHAPE)
    out = {}
    for name, (main_at, guide_at, kwargs, extras) in _midway_cases().items():
        net = TinyConvDenoiser(seed=0)
        gnet = TinyConvDenoiser(seed=1)
        if main_at is not None:
            net = _FailAt(net, main_at, "main network")
        if guide_at is not None:
            gnet = _FailAt(gnet, abs(guide_at), "guide network", wrong_shape=guide_at < 0)
        start = time.monotonic()
        try:
            if rank == 0:
                guide_parallel_sample(net, None, noise, **kwargs, **extras)
            else:
                guide_parallel_sample(None, gnet, **kwargs)
            res = None
        except Exception as exc:
            res = (type(exc).__name__, str(exc))
        out[name] = dict(error=res, seconds=time.monotonic() - start,
                         calls=(net if rank == 0 else gnet).calls)
    # The pair still works afterwards, bit for bit as on one device.
    start = time.monotonic()
    if rank == 0:
        x = guide_parallel_sample(TinyConvDenoiser(seed=0), None, noise, backend="torch", **LATE_UNGUIDED)
    else:
        x = guide_parallel_sample(None, TinyConvDenoiser(seed=1), backend="torch", **LATE_UNGUIDED)
    out["after"] = dict(x=x, seconds=time.monotonic() - start)
    return out


@pytest.fixture(scope="module")
def midway_ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("gp-midway"), _job_midway, timeout=240.0,
                     pg_timeout=MIDWAY_PG_TIMEOUT)


def _own(res, text):
    assert res["error"] is not None and res["error"][0] == "RuntimeError", res
    assert text in res["error"][1], res


def _peer(res, who, *texts):
    assert res["error"] is not None and res["error"][0] == "PeerFailure", res
    assert who in res["error"][1], res
    for text in texts:
        assert text in res["error"][1], res


@pytest.mark.slow
def test_a_main_network_failing_midway_reaches_rank_1(midway_ranks):
    rank0, rank1 = midway_ranks
    for name, at in (("main_mid", 3), ("main_last", 7), ("main_after_guided", 5), ("main_last_unguided", 7)):
        _own(rank0[name], f"main network broken at call {at}")
        _peer(rank1[name], "rank 0 (main network)", f"RuntimeError: main network broken at call {at}")
        assert rank0[name]["calls"] == at, name
    # Rank 1 stopped where rank 0 did: it ran the guide for the evaluations up to the failure.
    assert rank1["main_mid"]["calls"] == 3 and rank1["main_last"]["calls"] == 7
    assert rank1["main_after_guided"]["calls"] == rank1["main_last_unguided"]["calls"] == 3


@pytest.mark.slow
def test_a_guide_failing_midway_reaches_rank_0(midway_ranks):
    rank0, rank1 = midway_ranks
    for name, at in (("guide_mid", 3), ("guide_last", 7)):
        _own(rank1[name], f"guide network broken at call {at}")
        _peer(rank0[name], "rank 1 (guide network)", f"RuntimeError: guide network broken at call {at}")
        assert rank1[name]["calls"] == at and rank0[name]["calls"] == at, name
    assert rank1["guide_shape_mid"]["error"][0] == "ValueError", rank1["guide_shape_mid"]
    assert "gnet (the guide network)" in rank1["guide_shape_mid"]["error"][1]
    _peer(rank0["guide_shape_mid"], "rank 1 (guide network)", "ValueError: gnet (the guide network)")


@pytest.mark.slow
def test_failures_on_both_ranks_and_outside_the_networks(midway_ranks):
    rank0, rank1 = midway_ranks
    # Both fail at the same evaluation: each raises its own error.
    _own(rank0["both_mid"], "main network broken at call 4")
    _own(rank1["both_mid"], "guide network broken at call 4")
    # Rank 0's callback fails: rank 1 learns it the same way.
    assert rank0["callback"]["error"] == ("KeyError", "'callback stops at step 2'")
    _peer(rank1["callback"], "rank 0 (main network)", "KeyError: 'callback stops at step 2'")


@pytest.mark.slow
def test_failures_midway_are_prompt_and_leave_the_pair_usable(midway_ranks):
    rank0, rank1 = midway_ranks
    for name in _midway_cases():
        for r, res in enumerate((rank0, rank1)):
            assert res[name]["seconds"] < PROMPT, (name, r, res[name])
    x_ref = fast_guided_sample(TinyConvDenoiser(seed=0), seeded_noise(SEEDS, SHAPE), None, TinyConvDenoiser(seed=1),
                               backend="torch", **LATE_UNGUIDED)
    assert torch.equal(rank0["after"]["x"], x_ref)
    assert rank1["after"]["x"] is None


def test_needs_a_two_rank_process_group():
    assert not dist.is_initialized()
    noise = seeded_noise([1], [1, 3, 4, 4])
    with pytest.raises(ValueError, match="exactly 2 ranks"):
        guide_parallel_sample(TinyConvDenoiser(), None, noise, guidance=2.0)


def test_rejects_a_group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="exactly 2 ranks .*got 1"):
            guide_parallel_sample(TinyConvDenoiser(), None, seeded_noise([1], [1, 3, 4, 4]), guidance=2.0)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------
# More behaviours pinned in one 2-process job: the result check, the error texts' length, a float64
# guide, rank 1's own argument checks and settings that differ in one detail only.


class _NaNIn(torch.nn.Module):
    """``net``, with its output NaN in image ``image`` (every image when None)."""

    def __init__(self, net, image=None):
        super().__init__()
        self.net, self.image = net, image

    def forward(self, x, sigma, labels=None):
        out = self.net(x, sigma, labels).clone()
        out[slice(None) if self.image is None else self.image] = float("nan")
        return out


class _Round32(torch.nn.Module):
    """``net``, its output rounded through float32 (and back to its own dtype)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, sigma, labels=None):
        out = self.net(x, sigma, labels)
        return out.to(torch.float32).to(out.dtype)


NAN_IMAGE = 2
# Long error texts: one that fits the 1 KiB a failed rank sends (but not 128 bytes), and one cut to
# 1 KiB; it has 2-byte characters, so bytes and characters differ (the limit is in bytes).
# (_FailAt's error text: f"{what} broken at call {at}".)
LONG_MAIN = "main network " + "".join(chr(ord("a") + i % 26) for i in range(900))
LONG_GUIDE = "guide network " + "é0123456789" * 200
LONG_MAIN_TEXT, LONG_GUIDE_TEXT = f"{LONG_MAIN} broken at call 1", f"{LONG_GUIDE} broken at call 2"
# A schedule exactly representable in float32 and float64 (also its churned levels below: x 1.25).
EXACT_SIGMAS = [16.0, 4.0, 1.0, 0.25]
F64_GUIDE = dict(num_steps=4, guidance=2.0, dtype=torch.float64, sigma_max=20.0, backend="torch")
NAN_KWARGS = dict(num_steps=4, guidance=2.0, backend="torch")


def _f64_nets():
    """The float64 case's networks: the guide computes in the state dtype (float64 outputs that
    float32 cannot hold); the main network's output is float64 too."""
    return TinyConvDenoiser(seed=2, out_dtype=torch.float64), PointwiseDenoiser(a=1.1, b=-0.3)


def _job_gaps(rank):
    noise = seeded_noise(SEEDS, SHAPE)
    out = {}

    def attempt(name, fn):
        try:
            out[name] = dict(x=fn(), error=None)
        except Exception as exc:
            out[name] = dict(x=None, error=(type(exc).__name__, str(exc)))

    def sample(net, gnet, main_kwargs=None, guide_kwargs=None, **kwargs):
        """rank 0: ``net`` with ``main_kwargs``; rank 1: ``gnet`` with ``guide_kwargs`` (both: ``kwargs``)."""
        if rank == 0:
            return guide_parallel_sample(net, None, noise, **kwargs, **(main_kwargs or {}))
        return guide_parallel_sample(None, gnet, **kwargs, **(guide_kwargs or {}))

    # The main network's output is NaN in one image, or in all: rank 0's result check.
    attempt("nan_one_image", lambda: sample(_NaNIn(TinyConvDenoiser(seed=0), NAN_IMAGE), TinyConvDenoiser(seed=1),
                                            **NAN_KWARGS))
    attempt("nan_all", lambda: sample(_NaNIn(TinyConvDenoiser(seed=0)), TinyConvDenoiser(seed=1), **NAN_KWARGS))
    attempt("nan_unchecked", lambda: sample(_NaNIn(TinyConvDenoiser(seed=0), NAN_IMAGE), TinyConvDenoiser(seed=1),
                                            main_kwargs=dict(check_finite=False), **NAN_KWARGS))
    # Error texts longer than 128 bytes: the main network's at its first evaluation (the status
    # exchange), the guide's in the middle of the trajectory (its output marked failed).
    attempt("long_main_error", lambda: sample(
        _FailAt(TinyConvDenoiser(seed=0), 1, LONG_MAIN), TinyConvDenoiser(seed=1), num_steps=4, guidance=2.0))
    attempt("long_guide_error", lambda: sample(
        TinyConvDenoiser(seed=0), _FailAt(TinyConvDenoiser(seed=1), 2, LONG_GUIDE), num_steps=4, guidance=2.0))
    # A float64 guide output with a float64 state.
    attempt("f64_guide", lambda: sample(*_f64_nets(), **F64_GUIDE))
    # Rank 1 without a guide: refused when guidance != 1, fine when it is 1 (the guide is never called).
    attempt("no_guide", lambda: sample(TinyConvDenoiser(seed=0), None, num_steps=4, guidance=2.0))
    attempt("no_guide_unguided", lambda: sample(TinyConvDenoiser(seed=0), None, num_steps=4, guidance=1))
    # Settings that differ in one detail only. A lower interval bound between t_3 = 0.25 and the
    # churned t_hat_3 = 0.3125: only the Heun correction at 0.25 (step 2's second evaluation) is
    # guided on rank 0 and not on rank 1; every level and every first evaluation's weight agree.
    churn = dict(sigmas=EXACT_SIGMAS, guidance=2.0, S_churn=1.0)  # gamma = 1 / 4.
    attempt("mismatch_second_weight", lambda: sample(
        TinyConvDenoiser(seed=0), TinyConvDenoiser(seed=1), main_kwargs=dict(guidance_interval=(0.1, 100.0),
                                                                             seeds=SEEDS),
        guide_kwargs=dict(guidance_interval=(0.26, 100.0)), **churn))
    # Only the state dtype differs, on a schedule that float32 and float64 hold exactly.
    attempt("mismatch_dtype", lambda: sample(
        TinyConvDenoiser(seed=0), TinyConvDenoiser(seed=1), main_kwargs=dict(dtype=torch.float32),
        guide_kwargs=dict(dtype=torch.float64), sigmas=EXACT_SIGMAS, guidance=2.0))
    # And the pair still works afterwards.
    attempt("after", lambda: sample(TinyConvDenoiser(seed=0), TinyConvDenoiser(seed=1), num_steps=4, guidance=2.0,
                                    backend="torch"))
    return out


@pytest.fixture(scope="module")
def gap_ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("gp-gaps"), _job_gaps, timeout=240.0, pg_timeout=MIDWAY_PG_TIMEOUT)


@pytest.mark.slow
def test_check_finite_raises_on_rank_0_only(gap_ranks):
    """A NaN in the result (one image, or all) makes rank 0 raise FloatingPointError after the
    trajectory (check_finite is rank 0's: rank 1 served every evaluation and returns None); with
    check_finite=False rank 0 returns the result, NaN image and all, as single-device sampling does."""
    rank0, rank1 = gap_ranks
    for name in ("nan_one_image", "nan_all"):
        assert rank0[name]["error"] is not None and rank0[name]["error"][0] == "FloatingPointError", rank0[name]
        assert "guide_parallel_sample: the result contains NaN or Inf" in rank0[name]["error"][1]
        assert rank1[name] == dict(x=None, error=None), name
    assert rank0["nan_unchecked"]["error"] is None and rank1["nan_unchecked"] == dict(x=None, error=None)
    x = rank0["nan_unchecked"]["x"]
    x_ref = fast_guided_sample(_NaNIn(TinyConvDenoiser(seed=0), NAN_IMAGE), seeded_noise(SEEDS, SHAPE), None,
                               TinyConvDenoiser(seed=1), check_finite=False, **NAN_KWARGS)
    assert x[NAN_IMAGE].isnan().all()
    finite = [i for i in range(len(SEEDS)) if i != NAN_IMAGE]
    assert x[finite].isfinite().all()
    torch.testing.assert_close(x, x_ref, rtol=0, atol=0, equal_nan=True)
    assert rank0["after"]["error"] is None and rank1["after"] == dict(x=None, error=None)


@pytest.mark.slow
def test_long_error_texts_reach_the_other_rank_up_to_1_kib(gap_ranks):
    """A failed rank's error text reaches the other rank's PeerFailure in full up to 1024 bytes
    (well beyond 128), and cut to its first 1024 bytes beyond that (a cut character is replaced)."""
    rank0, rank1 = gap_ranks
    main_reason = f"RuntimeError: {LONG_MAIN_TEXT}"
    assert 128 < len(main_reason.encode()) <= 1024
    assert rank0["long_main_error"]["error"] == ("RuntimeError", LONG_MAIN_TEXT)
    assert rank1["long_main_error"]["error"] == (
        "PeerFailure", f"guide_parallel_sample: rank 0 (main network) failed at its first network evaluation: "
                       f"{main_reason} (its traceback is on that rank)")
    guide_reason = f"RuntimeError: {LONG_GUIDE_TEXT}".encode()
    assert len(guide_reason) > 1024
    cut = guide_reason[:1024].decode(errors="replace")
    assert cut != f"RuntimeError: {LONG_GUIDE_TEXT}"[:1024]  # The limit is in bytes, not characters.
    assert rank1["long_guide_error"]["error"] == ("RuntimeError", LONG_GUIDE_TEXT)
    assert rank0["long_guide_error"]["error"] == (
        "PeerFailure", f"guide_parallel_sample: rank 1 (guide network) failed while sampling: {cut} "
                       f"(its traceback is on that rank)")


@pytest.mark.slow
def test_a_float64_guide_output_keeps_its_precision(gap_ranks):
    """A float64 guide output with a float64 state crosses in float64: the samples equal
    single-device sampling bit for bit (and would not, were the guide's output rounded to float32)."""
    rank0, rank1 = gap_ranks
    assert rank0["f64_guide"]["error"] is None and rank1["f64_guide"] == dict(x=None, error=None)
    net, gnet = _f64_nets()
    x_ref = fast_guided_sample(net, seeded_noise(SEEDS, SHAPE), None, gnet, **F64_GUIDE)
    x = rank0["f64_guide"]["x"]
    assert x.dtype == torch.float64
    assert torch.equal(x, x_ref)
    net, gnet = _f64_nets()
    assert not torch.equal(fast_guided_sample(net, seeded_noise(SEEDS, SHAPE), None, _Round32(gnet), **F64_GUIDE),
                           x_ref)


@pytest.mark.slow
def test_rank_1_without_a_guide(gap_ranks):
    """Rank 1 given no guide while guidance != 1 fails its argument checks with a TypeError naming
    gnet, and rank 0 raises a PeerFailure saying so; with guidance = 1 no guide is needed."""
    rank0, rank1 = gap_ranks
    assert rank1["no_guide"]["error"][0] == "TypeError" and rank1["no_guide"]["error"][1].startswith("gnet: ")
    assert rank0["no_guide"]["error"][0] == "PeerFailure", rank0["no_guide"]
    assert rank0["no_guide"]["error"][1].startswith(
        "guide_parallel_sample: rank 1 (guide network) failed its argument checks: TypeError: gnet: ")
    assert rank0["no_guide_unguided"]["error"] is None and rank1["no_guide_unguided"] == dict(x=None, error=None)
    x_ref = fast_guided_sample(TinyConvDenoiser(seed=0), seeded_noise(SEEDS, SHAPE), None, None, num_steps=4)
    assert torch.equal(rank0["no_guide_unguided"]["x"], x_ref)


@pytest.mark.slow
def test_settings_differing_in_one_detail_are_a_mismatch(gap_ranks):
    """The settings digest covers the Heun corrections' guidance weights (an interval bound that
    changes only whether a second evaluation is guided) and the state dtype (on a schedule both
    dtypes hold exactly): both ranks raise the mismatch error instead of sampling out of step."""
    rank0, rank1 = gap_ranks
    for name in ("mismatch_second_weight", "mismatch_dtype"):
        for r, res in enumerate((rank0, rank1)):
            assert res[name]["error"] is not None and res[name]["error"][0] == "ValueError", (name, r, res[name])
            assert "differ between rank 0 and rank 1" in res[name]["error"][1], (name, r)


# ----------------------------------------------------------------------------
# Three processes: the group must have exactly 2 ranks (a 2-rank group inside a bigger job works).


def _job_three(rank):
    noise = seeded_noise(SEEDS, SHAPE)
    out = {}
    try:
        if rank == 0:
            guide_parallel_sample(TinyConvDenoiser(seed=0), None, noise, num_steps=4, guidance=2.0)
        else:
            guide_parallel_sample(None, TinyConvDenoiser(seed=1), num_steps=4, guidance=2.0)
        out["world"] = None
    except Exception as exc:
        out["world"] = (type(exc).__name__, str(exc))
    # Ranks 1 and 2 of the job as a group of their own: global rank 1 runs the main network.
    pair = dist.new_group([1, 2])
    out["pair"] = None
    if rank == 1:
        out["pair"] = guide_parallel_sample(TinyConvDenoiser(seed=0), None, noise, group=pair, num_steps=4,
                                            guidance=2.0, backend="torch")
    elif rank == 2:
        out["pair"] = guide_parallel_sample(None, TinyConvDenoiser(seed=1), group=pair, num_steps=4, guidance=2.0)
    else:  # Rank 0 is not in the pair: named as such (its size there reads as -1 too).
        try:
            guide_parallel_sample(TinyConvDenoiser(seed=0), None, noise, group=pair, num_steps=4, guidance=2.0)
        except ValueError as exc:
            out["outsider"] = str(exc)
    return out


@pytest.mark.slow
def test_refuses_a_group_of_three(tmp_path):
    """A group of 3 ranks is refused on every rank (ValueError naming its size) before any message;
    a 2-rank subgroup of the same 3-process job samples as on one device, and the process outside
    it is told so."""
    results = run_ranks(tmp_path, _job_three, world_size=3, timeout=120.0, pg_timeout=20.0)
    for r, res in enumerate(results):
        assert res["world"] is not None and res["world"][0] == "ValueError", (r, res["world"])
        assert "exactly 2 ranks (main, guide), got 3" in res["world"][1], r
    x_ref = fast_guided_sample(TinyConvDenoiser(seed=0), seeded_noise(SEEDS, SHAPE), None, TinyConvDenoiser(seed=1),
                               num_steps=4, guidance=2.0, backend="torch")
    assert torch.equal(results[1]["pair"], x_ref)
    assert results[0]["pair"] is None and results[2]["pair"] is None
    assert results[0]["outsider"] == "group: this process is not a member of the given process group"
