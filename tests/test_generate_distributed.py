"""``autoguide-fast generate`` with 2 processes on CPU (gloo): sharded and guide-parallel runs write
the same files, bit for bit, as one process; resuming works across ranks; torchrun end to end."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import autoguide_fast.distributed.generation as G
from autoguide_fast.distributed.cli import main
from tests.test_generate import CUSTOM_SAMPLER, HERE, LEVELS, SAMPLER, ExactNet, reference_sample, rgb_guide, rgb_main
from tests.test_guide_parallel import run_ranks

ROOT = Path(__file__).resolve().parent.parent

# 11 seeds in batches of at most 4: one process runs 4+4+3, two ranks run 3+3 and 3+2 (official
# scheme), guide-parallel runs 4+4+3 on the pair. Churn, a guidance interval and per-seed classes.
JOB = ["--net", f"{HERE}:rgb_main", "--gnet", f"{HERE}:rgb_guide", "--seeds", "40-45,0-4", "--batch", "4",
       "--format", "npy"]
ARGS = [*JOB, *SAMPLER]
CUSTOM_ARGS = [*JOB, *CUSTOM_SAMPLER]  # The same job with a custom schedule (--sigmas).
PRESENT = [0, 41, 44]  # Seeds already written before the 2-process run (resume across ranks).


def _job(rank, sharded_dir, parallel_dir):
    # Record which seeds this rank writes, batch by batch.
    batches: list[list[int]] = []
    write = G._write_batch
    G._write_batch = lambda x, seeds, *args: (batches.append(list(seeds)), write(x, seeds, *args))
    out = {"sharded": main(["generate", *ARGS, "--outdir", sharded_dir, "--threads", "1"])}
    out["sharded_batches"], batches[:] = list(batches), []
    out["parallel"] = main(["generate", *ARGS, "--outdir", parallel_dir, "--guide-parallel", "--threads", "1"])
    out["parallel_batches"] = list(batches)
    # A custom schedule: each rank's sampler and, under --guide-parallel, rank 1's guide steps take it.
    out["sharded_sigmas"] = main(["generate", *CUSTOM_ARGS, "--outdir", sharded_dir + "-sigmas", "--threads", "1"])
    out["parallel_sigmas"] = main(["generate", *CUSTOM_ARGS, "--outdir", parallel_dir + "-sigmas", "--guide-parallel",
                                   "--threads", "1"])
    # Only rank 1 loads the guide under --guide-parallel: its failure must still stop rank 0.
    bad = [a if a != f"{HERE}:rgb_guide" else f"{HERE}:no_such_guide" for a in ARGS]
    out["bad_guide"] = main(["generate", *bad, "--outdir", parallel_dir + "-bad", "--guide-parallel"])
    # The guide fails while sampling: a failure on both ranks (exit 1), not a bad argument (exit 2).
    failing = [a if a != f"{HERE}:rgb_guide" else f"{HERE}:failing_guide" for a in ARGS]
    out["failing_guide"] = main(["generate", *failing, "--outdir", parallel_dir + "-failing", "--guide-parallel"])
    # Rank 0 cannot write its 2nd batch (a file stands where --subdirs needs the folder 001000): rank 1,
    # which only runs the guide, must learn of it after that batch instead of waiting in the next.
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["generate", *ARGS[:4], "--guidance", "2", "--seeds", "998-1003", "--batch", "2", "--subdirs",
                     "--steps", "2", "--format", "npy", "--outdir", parallel_dir + "-write", "--guide-parallel"])
    out["write_failure"] = (code, stderr.getvalue())
    # Resuming across ranks with a network whose last bits depend on the rest of its batch: a run
    # killed mid-job (a whole batch of rank 1 missing, one file of a batch of rank 0), then resumed,
    # writes the files of an uninterrupted 2-rank run.
    coupled = [a if a != f"{HERE}:rgb_main" else f"{HERE}:coupled_main" for a in ARGS]
    out["coupled_clean"] = main(["generate", *coupled, "--outdir", sharded_dir + "-coupled-clean", "--threads", "1"])
    out["coupled_first"] = main(["generate", *coupled, "--outdir", sharded_dir + "-coupled", "--threads", "1"])
    dist.barrier()
    if rank == 0:
        for seed in (43, 44, 45, 1):
            os.remove(os.path.join(sharded_dir + "-coupled", f"{seed:06d}.npy"))
    dist.barrier()
    out["coupled_resumed"] = main(["generate", *coupled, "--outdir", sharded_dir + "-coupled", "--threads", "1"])
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen2")
    single, sharded, parallel = tmp / "single", tmp / "sharded", tmp / "parallel"
    assert main(["generate", *ARGS, "--outdir", str(single)]) == 0
    assert main(["generate", *CUSTOM_ARGS, "--outdir", str(tmp / "single-sigmas")]) == 0
    coupled = [a if a != f"{HERE}:rgb_main" else f"{HERE}:coupled_main" for a in ARGS]
    assert main(["generate", *coupled, "--outdir", str(tmp / "single-coupled")]) == 0
    # Part of the job is already done in the sharded directory (and its settings recorded).
    sharded.mkdir()
    for seed in PRESENT:
        shutil.copy(single / f"{seed:06d}.npy", sharded)
    shutil.copy(single / "autoguide_fast_generate.json", sharded)
    stamps = {s: (sharded / f"{s:06d}.npy").stat().st_mtime_ns for s in PRESENT}
    (tmp / "parallel-write").mkdir()
    (tmp / "parallel-write" / "001000").write_text("not a folder")
    results = run_ranks(tmp, _job, str(sharded), str(parallel))
    return dict(single=single, sharded=sharded, parallel=parallel, stamps=stamps, results=results)


@pytest.mark.slow
def test_sharded_generation_writes_the_same_files_as_one_process(two_process_run):
    run = two_process_run
    assert [r["sharded"] for r in run["results"]] == [0, 0]
    # The fresh run's batches (official scheme, 11 seeds on 2 ranks: chunks [40, 41, 42] [43, 44, 45]
    # [0, 1, 2] [3, 4], dealt alternately), each sampled whole; only the missing seeds' files written.
    assert [r["sharded_batches"] for r in run["results"]] == [[[40, 42], [1, 2]], [[43, 45], [3, 4]]]
    single = _files(run["single"])
    assert len(single) == 11
    assert _files(run["sharded"]) == single
    for seed, stamp in run["stamps"].items():  # Present files were skipped, not rewritten.
        assert (run["sharded"] / f"{seed:06d}.npy").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_run_resumed_across_ranks_equals_the_uninterrupted_run_with_a_batch_dependent_network(two_process_run):
    run = two_process_run
    assert [(r["coupled_clean"], r["coupled_first"], r["coupled_resumed"]) for r in run["results"]] == [(0, 0, 0)] * 2
    base = run["sharded"].parent
    clean, resumed = _files(base / "sharded-coupled-clean"), _files(base / "sharded-coupled")
    assert len(clean) == 11 and resumed == clean
    # The network does depend on its batch: one process (batches 4+4+3) writes other bits.
    one_process = _files(base / "single-coupled")
    assert one_process.keys() == clean.keys() and any(one_process[k] != clean[k] for k in clean)


@pytest.mark.slow
def test_guide_parallel_generation_writes_the_same_files_as_one_process(two_process_run):
    run = two_process_run
    assert [r["parallel"] for r in run["results"]] == [0, 0]
    # Rank 0 walks the single-process batches and writes everything; rank 1 only runs the guide.
    assert [r["parallel_batches"] for r in run["results"]] == [[[40, 41, 42, 43], [44, 45, 0, 1], [2, 3, 4]], []]
    assert _files(run["parallel"]) == _files(run["single"])


@pytest.mark.slow
def test_a_custom_schedule_sharded_and_guide_parallel_writes_the_files_of_one_process(two_process_run):
    tmp = two_process_run["single"].parent
    assert [(r["sharded_sigmas"], r["parallel_sigmas"]) for r in two_process_run["results"]] == [(0, 0), (0, 0)]
    single = _files(tmp / "single-sigmas")
    assert len(single) == 11
    assert _files(tmp / "sharded-sigmas") == single and _files(tmp / "parallel-sigmas") == single
    # Those are the API's images with that schedule.
    got = torch.from_numpy(np.load(tmp / "single-sigmas" / "000042.npy"))
    assert torch.equal(got, reference_sample(rgb_main, rgb_guide, 42, sigmas=LEVELS))


@pytest.mark.slow
def test_a_setup_failure_on_one_rank_stops_both(two_process_run):
    # Rank 1 reports its own error (exit 2); rank 0 learns of it instead of waiting (exit 1).
    assert [r["bad_guide"] for r in two_process_run["results"]] == [1, 2]
    assert not list(Path(str(two_process_run["parallel"]) + "-bad").glob("*.npy"))


@pytest.mark.slow
def test_a_guide_failing_while_sampling_is_a_failure_on_both_ranks(two_process_run):
    # Rank 1 raised the guide's ValueError mid-trajectory: reported as a sampling failure (exit 1),
    # like rank 0's networks, and rank 0 learns of it (exit 1).
    assert [r["failing_guide"] for r in two_process_run["results"]] == [1, 1]
    assert not list(Path(str(two_process_run["parallel"]) + "-failing").glob("*.npy"))


class _FailsOnOneRank(ExactNet):
    """rgb_main, except that on rank AGF_TEST_FAIL_RANK its 8th call (the 2nd batch's first: 4 Heun
    steps are 7 calls) raises."""

    def forward(self, x, sigma, labels=None):
        if dist.get_rank() == int(os.environ["AGF_TEST_FAIL_RANK"]) and self.calls == 7:
            raise RuntimeError("the main network broke in its 2nd batch")
        return super().forward(x, sigma, labels)


def fails_on_one_rank():
    return _FailsOnOneRank(3, 8, label_dim=4, seed=0)


def _failing_job(rank, outdir, failing_rank):
    os.environ["AGF_TEST_FAIL_RANK"] = str(failing_rank)
    args = [a if a != f"{HERE}:rgb_main" else "tests.test_generate_distributed:fails_on_one_rank" for a in ARGS]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["generate", *args, "--outdir", outdir, "--threads", "1"])
    return {"code": code, "stderr": stderr.getvalue()}


@pytest.mark.slow
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_rank_failing_while_sampling_stops_every_rank_within_a_batch(tmp_path, two_process_run, failing_rank):
    # Rank 0's batches are [40, 41, 42] and [0, 1, 2], rank 1's [43, 44, 45] and [3, 4]; the failing
    # rank breaks in its 2nd batch. With failing_rank 0, rank 1's files are all present (resumed),
    # so rank 1 has no batch of its own and must still learn of the failure. Before, the other rank
    # waited in the final collective until the process group's timeout (here 30 s: a crash).
    outdir = tmp_path / "out"
    outdir.mkdir()
    present = [43, 44, 45, 3, 4] if failing_rank == 0 else []
    for seed in present:
        shutil.copy(two_process_run["single"] / f"{seed:06d}.npy", outdir)
    results = run_ranks(tmp_path, _failing_job, str(outdir), failing_rank, pg_timeout=30.0)
    assert [r["code"] for r in results] == [1, 1]
    failed, peer = results[failing_rank]["stderr"], results[1 - failing_rank]["stderr"]
    seeds = "[0, 1, 2]" if failing_rank == 0 else "[3, 4]"
    assert f"sampling the batch of seeds {seeds} failed: RuntimeError: the main network broke" in failed
    assert "Traceback" in failed
    assert f"rank(s) [{failing_rank}] failed while sampling" in peer
    # Everything sampled before the failure was written (and equals the one-process run's files);
    # the failing batch was not; the other rank stopped after its batch of the same round.
    written = {int(p.stem) for p in outdir.glob("*.npy")}
    expected = {40, 41, 42, *present} if failing_rank == 0 else {40, 41, 42, 43, 44, 45, 0, 1, 2}
    assert written == expected
    single = _files(two_process_run["single"])
    assert all(single[name] == data for name, data in _files(outdir).items())


@pytest.mark.slow
def test_a_write_failure_on_rank_0_stops_the_guide_rank_too(two_process_run):
    (code0, err0), (code1, err1) = (r["write_failure"] for r in two_process_run["results"])
    assert (code0, code1) == (1, 1), (err0, err1)
    assert "writing the files of the batch of seeds [1000, 1001] failed: FileExistsError" in err0
    assert "rank(s) [0] failed while sampling or writing a batch" in err1
    written = sorted(p.relative_to(two_process_run["parallel"].parent / "parallel-write").as_posix()
                     for p in (two_process_run["parallel"].parent / "parallel-write").rglob("*.npy"))
    assert written == ["000000/000998.npy", "000000/000999.npy"]


@pytest.mark.slow
def test_torchrun_end_to_end(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    args = ["--net", f"{HERE}:latent_main", "--gnet", f"{HERE}:latent_guide", "--seeds", "0-4", "--batch", "2",
            *SAMPLER]
    assert main(["generate", *args, "--outdir", str(single)]) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "autoguide_fast.distributed.cli", "generate", *args, "--outdir", str(sharded)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 file(s) written, 0 already present, of 5 seed(s)" in proc.stdout
    assert "2 rank(s)" in proc.stdout
    assert _files(sharded) == _files(single) and len(_files(single)) == 5


def _generate_guide_parallel(outdir):
    """generate --guide-parallel of seeds 40-45 in batches of 2 through the Python API, on the
    group the caller made: the error it ended with (type name, text) or None, and its seconds."""
    opts = G.GenerateOptions(net=f"{HERE}:rgb_main", gnet=f"{HERE}:rgb_guide", seeds="40-45", batch=2, guidance=2.0,
                             num_steps=2, format="npy", outdir=outdir, guide_parallel=True, progress=False,
                             verbose=False)
    start = time.monotonic()
    try:
        G.generate(opts)
        error = None
    except Exception as exc:
        error = (type(exc).__name__, str(exc))
    return {"error": error, "seconds": time.monotonic() - start}


def _noise_fails_on_rank_0(rank, outdir):
    """generate --guide-parallel through the Python API on a group the caller keeps (so a failing
    rank does not end the group, which with gloo would free the other rank anyway): rank 0 cannot
    make its 2nd batch's noise, while rank 1 already waits in that batch's trajectory."""
    noise = G.seeded_noise
    calls = []

    def failing_noise(*args, **kwargs):
        calls.append(1)
        if rank == 0 and len(calls) == 2:
            raise RuntimeError("no memory for the noise")
        return noise(*args, **kwargs)

    G.seeded_noise = failing_noise
    return _generate_guide_parallel(outdir)


@pytest.mark.slow
def test_guide_parallel_rank_0_failing_to_prepare_a_batch_reaches_rank_1_promptly(tmp_path):
    """Before, rank 1 waited in the trajectory's first message until the process group's timeout
    (under NCCL the watchdog then ends the process); now rank 0 announces the failure."""
    results = run_ranks(tmp_path, _noise_fails_on_rank_0, str(tmp_path / "out"), pg_timeout=40.0)
    (kind0, text0), (kind1, text1) = (r["error"] for r in results)
    assert kind0 == "SamplingFailure" and "no memory for the noise" in text0, text0
    assert kind1 == "PeerFailure" and "rank 0 (main network) failed" in text1 and "no memory for the noise" in text1
    assert results[1]["seconds"] < 20.0, results


def _reading_the_result_fails_on_rank_0(rank, outdir):
    """As above, but rank 0's first read of its 2nd batch's result fails (on a GPU: where an
    asynchronous CUDA error surfaces), after rank 1 ended that trajectory normally."""
    isfinite = torch.isfinite
    reads = []

    def failing_read(x):
        if x.dim() == 2:  # generate's per-image check: x.flatten(1).
            reads.append(1)
            if rank == 0 and len(reads) == 2:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return isfinite(x)

    torch.isfinite = failing_read
    try:
        return _generate_guide_parallel(outdir)
    finally:
        torch.isfinite = isfinite


@pytest.mark.slow
def test_guide_parallel_rank_0_failing_after_a_trajectory_reaches_rank_1_promptly(tmp_path):
    results = run_ranks(tmp_path, _reading_the_result_fails_on_rank_0, str(tmp_path / "out"), pg_timeout=40.0)
    (kind0, text0), (kind1, text1) = (r["error"] for r in results)
    assert kind1 == "PeerFailure" and "rank(s) [0] failed while sampling or writing a batch" in text1, text1
    assert "sampling the batch of seeds [42, 43] failed" in text0 and "illegal memory access" in text0, text0
    assert results[1]["seconds"] < 20.0, results
