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
from tests.nets import TinyConvDenoiser, one_hot_labels


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
