"""``autoguide-fast generate`` with 2 processes on CPU (gloo): sharded and guide-parallel runs write
the same files, bit for bit, as one process; resuming works across ranks; torchrun end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import autoguide_fast.distributed.generation as G
from autoguide_fast.distributed.cli import main
from tests.test_generate import HERE, SAMPLER
from tests.test_guide_parallel import run_ranks

ROOT = Path(__file__).resolve().parent.parent

# 11 seeds in batches of at most 4: one process runs 4+4+3, two ranks run 3+3 and 3+2 (official
# scheme), guide-parallel runs 4+4+3 on the pair. Churn, a guidance interval and per-seed classes.
ARGS = ["--net", f"{HERE}:rgb_main", "--gnet", f"{HERE}:rgb_guide", "--seeds", "40-45,0-4", "--batch", "4",
        "--format", "npy", *SAMPLER]
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
    # Only rank 1 loads the guide under --guide-parallel: its failure must still stop rank 0.
    bad = [a if a != f"{HERE}:rgb_guide" else f"{HERE}:no_such_guide" for a in ARGS]
    out["bad_guide"] = main(["generate", *bad, "--outdir", parallel_dir + "-bad", "--guide-parallel"])
    # The guide fails while sampling: a failure on both ranks (exit 1), not a bad argument (exit 2).
    failing = [a if a != f"{HERE}:rgb_guide" else f"{HERE}:failing_guide" for a in ARGS]
    out["failing_guide"] = main(["generate", *failing, "--outdir", parallel_dir + "-failing", "--guide-parallel"])
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen2")
    single, sharded, parallel = tmp / "single", tmp / "sharded", tmp / "parallel"
    assert main(["generate", *ARGS, "--outdir", str(single)]) == 0
    # Part of the job is already done in the sharded directory (and its settings recorded).
    sharded.mkdir()
    for seed in PRESENT:
        shutil.copy(single / f"{seed:06d}.npy", sharded)
    shutil.copy(single / "autoguide_fast_generate.json", sharded)
    stamps = {s: (sharded / f"{s:06d}.npy").stat().st_mtime_ns for s in PRESENT}
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
def test_guide_parallel_generation_writes_the_same_files_as_one_process(two_process_run):
    run = two_process_run
    assert [r["parallel"] for r in run["results"]] == [0, 0]
    # Rank 0 walks the single-process batches and writes everything; rank 1 only runs the guide.
    assert [r["parallel_batches"] for r in run["results"]] == [[[40, 41, 42, 43], [44, 45, 0, 1], [2, 3, 4]], []]
    assert _files(run["parallel"]) == _files(run["single"])


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
