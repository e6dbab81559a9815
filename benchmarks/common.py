"""Helpers shared by the benchmark scripts: where a number was measured, how it is summarised,
and how it is recorded.

Importable as a plain module from this directory (``import common`` in a script run as
``python benchmarks/<script>.py``), with no dependency beyond the standard library and torch
(numpy is not needed: a GPU machine may not have it). Also a small command line:

    python benchmarks/common.py info                 # what a row measured here would record
    python benchmarks/common.py merge SRC.csv DST.csv  # append SRC's rows to DST (union of columns)
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import importlib.metadata
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"

__all__ = [
    "COMPILED_ARMS",
    "RESULTS_DIR",
    "WRONG_OUTPUT_NOTES",
    "ROOT",
    "append_rows",
    "arm_p50",
    "by_workload_batch",
    "cpu_model",
    "deselected",
    "ensure_repo_on_path",
    "fastest",
    "git_commit",
    "judged",
    "latest_run",
    "machine_name",
    "networks_compiled",
    "percentile",
    "plot_path",
    "read_rows",
    "reps",
    "run_metadata",
    "same_round",
    "short_commit",
    "source_hash",
    "summarize",
    "time_call",
    "unjudged_reason",
    "versions",
    "versus",
]


def ensure_repo_on_path() -> None:
    """Make ``import autoguide_fast`` work from a source checkout even when it is not installed
    (a script's own directory, not the repository root, is first on ``sys.path``)."""
    root = str(ROOT)
    if root not in sys.path:
        sys.path.insert(1, root)


# ----------------------------------------------------------------------------
# Where and with what a number was measured.


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), with the number of logical cores."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name} ({os.cpu_count()} logical cores)"


def machine_name(device: Any = None) -> str:
    """The card's name for a CUDA device (``torch.cuda.get_device_name``), else the CPU model."""
    import torch

    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def _dist_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def versions() -> dict[str, str]:
    """torch, its CUDA, triton and Python versions (``none`` where absent)."""
    import torch

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _dist_version("triton", "pytorch-triton"),
        "python": platform.python_version(),
    }


def git_commit() -> str:
    """The checkout's commit (short hash, ``-dirty`` if tracked files changed).

    ``BENCH_COMMIT`` in the environment wins (a copy of the tree without ``.git`` cannot know
    its commit); ``unknown`` when neither is available. ``source_hash`` identifies the code even then.
    Git is asked only when the tree has its own ``.git``: a copy placed inside another checkout
    would otherwise record that checkout's commit.
    """
    env = os.environ.get("BENCH_COMMIT")
    if env:
        return env
    if not (ROOT / ".git").exists():
        return "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "") if sha else "unknown"


# The code whose speed is measured: the package, the compiled sources and the benchmarks.
_SOURCE_GLOBS = ("autoguide_fast/**/*.py", "csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.h", "benchmarks/*.py",
                 "setup.py")


def source_hash() -> str:
    """A short SHA-256 of the measured sources (paths and contents); the same on any copy of the
    same tree, with or without git."""
    h = hashlib.sha256()
    files = sorted({p for pattern in _SOURCE_GLOBS for p in ROOT.glob(pattern) if p.is_file()})
    for path in files:
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def run_metadata(device: Any = None) -> dict[str, str]:
    """The columns every result row starts with: when, on what, with which code."""
    import torch

    now = _dt.datetime.now(_dt.timezone.utc)
    device = torch.device(device) if device is not None else torch.device("cpu")
    v = versions()
    return {
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": now.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}",
        "card": machine_name(device),
        "device_type": device.type,
        "torch": v["torch"],
        "cuda": v["cuda"],
        "triton": v["triton"],
        "python": v["python"],
        "commit": git_commit(),
        "source_hash": source_hash(),
    }


# ----------------------------------------------------------------------------
# Summaries.


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default method)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """p20, p50 (median) and p80 of a list of timings."""
    return {"p20": percentile(values, 20), "p50": percentile(values, 50), "p80": percentile(values, 80)}


def time_call(fn: Callable[[], Any], device: Any = None) -> tuple[float, float, Any]:
    """Run ``fn()`` once, alone on the device; returns (milliseconds, wall milliseconds, result).

    CUDA: the device is synchronised first (nothing else in flight), then CUDA events bracket the
    call on the current stream, and the wall clock runs until the whole device is idle again.
    Work that ``fn`` leaves on another stream without joining the current one is missed by the
    events but not by the wall clock: compare the two. CPU: both are the wall clock.
    """
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        t0 = time.perf_counter()
        result = fn()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms, result
    torch.cuda.synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    result = fn()
    end.record()
    torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t0) * 1e3
    return start.elapsed_time(end), wall, result


# ----------------------------------------------------------------------------
# Tidy CSV files.


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """All rows of a CSV file as dicts ([] if the file does not exist)."""
    path = pathlib.Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def by_workload_batch(rows: Iterable[dict[str, str]]) -> list[tuple[tuple[str, int], list[dict[str, str]]]]:
    """A latency run's rows grouped by (workload, batch), in that order."""
    groups: dict[tuple[str, int], list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["workload"], int(r["batch"])), []).append(r)
    return sorted(groups.items())


def fastest(rows: Iterable[dict[str, str]], keep: Callable[[dict[str, str]], bool] = lambda r: True
            ) -> tuple[float, str] | None:
    """(p50 ms, arm) of the fastest arm that ran among the rows ``keep`` accepts, or None."""
    ran = [(float(r["p50_ms"]), r["arm"]) for r in rows if r.get("status") == "ok" and r.get("p50_ms") and keep(r)]
    return min(ran) if ran else None


def arm_p50(rows: Iterable[dict[str, str]], arm: str) -> float | None:
    """The p50 ms of ``arm`` among the rows (one workload and batch) if it ran, else None."""
    best = fastest(rows, lambda r: r["arm"] == arm)
    return None if best is None else best[0]


def same_round(rows: Iterable[dict[str, str]], row: dict[str, str]) -> list[dict[str, str]]:
    """The rows whose repetitions come from the same round of the harness as ``row``'s (column
    ``round``; rows written before the column existed all count as one round)."""
    return [r for r in rows if r.get("round", "") == row.get("round", "")]


def versus(rows: Sequence[dict[str, str]], base: str, keep: Callable[[dict[str, str]], bool] = lambda r: True
           ) -> tuple[float, float, str] | None:
    """(base's p50, p50 and name of the fastest "ours" arm that ``keep`` accepts) among the rows of
    one workload and batch, the ours arm taken among those timed in the same round as ``base``
    (so a ratio never mixes repetitions from different rounds); None if either did not run."""
    ran = [r for r in rows if r["arm"] == base and r.get("status") == "ok" and r.get("p50_ms")]
    if not ran:
        return None
    ours = fastest(same_round(rows, ran[0]), lambda r: r.get("kind") == "ours" and keep(r))
    return None if ours is None else (float(ran[0]["p50_ms"]), ours[0], ours[1])


# Arms whose networks run under torch.compile (latency.py's arms with ``compiles``; a test keeps
# the two in step).
COMPILED_ARMS = ("B2", "ours-compiled")


def networks_compiled(row: dict[str, str]) -> bool:
    """Whether the row's arm ran torch.compile'd networks: a compiling arm by name, or an arm whose
    recorded engine report (column ``config``) says the engine ran ``compile_networks`` on."""
    return row.get("arm") in COMPILED_ARMS or '"compile_networks": true' in (row.get("config") or "")


def plot_path(card: str, metric: str = "ms") -> pathlib.Path:
    """Where ``plot_latency.py`` writes a card's plot by default (and where ``performance_table.py``
    looks for it): ``benchmarks/results/latency_<card>.png`` (``..._speedup.png`` for the speed-ups)."""
    slug = "".join(c if c.isalnum() else "_" for c in card).strip("_")[:40] or "card"
    return RESULTS_DIR / f"latency_{slug}{'' if metric == 'ms' else '_' + metric}.png"


MIN_JUDGED_REPS = 5  # DESIGN: every reported median is of at least 5 repetitions.


def reps(row: dict[str, str]) -> int:
    """The row's number of timed repetitions (0 where none is recorded)."""
    try:
        return int(row.get("n_reps") or 0)
    except ValueError:
        return 0


# Notes latency.py gives an arm whose output is wrong: its timing is kept in the CSV, never judged.
WRONG_OUTPUT_NOTES = ("output has NaN/Inf", "output differs from B0")


def unjudged_reason(row: dict[str, str]) -> str | None:
    """Why the row's median does not count (None: it does): the arm did not run ("failed: ...",
    "skipped: ..." with its first note), its output was wrong, or it has fewer than MIN_JUDGED_REPS
    repetitions (a round cut short by a time limit)."""
    notes = row.get("notes") or ""
    if row.get("status") != "ok" or not row.get("p50_ms"):
        first = notes.split("; ")[0]
        return f"{row.get('status') or 'not run'}" + (f": {first}" if first else "")
    wrong = [n for n in notes.split("; ") if n.startswith(WRONG_OUTPUT_NOTES)]
    if wrong:
        return f"wrong output ({wrong[0]})"
    if reps(row) < MIN_JUDGED_REPS:
        return f"only {reps(row)} repetitions (< {MIN_JUDGED_REPS})"
    return None


def deselected(row: dict[str, str]) -> bool:
    """An arm the run was told to leave out (``--arms`` / ``--skip``), not one it failed to measure."""
    notes = row.get("notes") or ""
    return row.get("status") == "skipped" and ("not selected by --arms" in notes or "excluded by --skip" in notes)


def judged(rows: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """The rows whose medians count (``unjudged_reason`` is None: at least MIN_JUDGED_REPS
    repetitions of a correct output); the others are reported in the CSV but neither tabled nor
    judged."""
    return [r for r in rows if unjudged_reason(r) is None]


def short_commit(commit: str) -> str:
    """A recorded commit shortened to 12 hex digits, its ``-dirty`` mark kept."""
    head, dirty, _ = (commit or "unknown").partition("-dirty")
    return head[:12] + dirty


def latest_run(rows: Sequence[dict[str, str]], card: str | None = None) -> list[dict[str, str]]:
    """The latest results of one card: the card of the latest run (largest ``run_id``) among the
    rows whose ``card`` contains ``card`` (case-insensitive) if it is given, and for each
    (workload, batch) of that card the rows of the latest run that measured it (an arm ran "ok"
    there; else simply the latest run). Each group thus still comes from one process (its ratios
    were measured side by side), while a later run of other batches (the GPU check's second call
    at batch 64) does not hide the batches measured before."""
    if card:
        rows = [r for r in rows if card.lower() in r.get("card", "").lower()]
    if not rows:
        return []
    newest = max(rows, key=lambda r: r["run_id"])
    rows = [r for r in rows if r.get("card") == newest.get("card")]
    latest: dict[tuple[str, str], tuple[bool, str]] = {}
    for r in rows:
        key, rank = (r.get("workload", ""), r.get("batch", "")), (r.get("status") == "ok", r["run_id"])
        latest[key] = max(latest.get(key, rank), rank)
    return [r for r in rows if r["run_id"] == latest[(r.get("workload", ""), r.get("batch", ""))][1]]


def _header(path: pathlib.Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def append_rows(path: str | os.PathLike, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    """Append rows to a CSV file, writing the header if the file is new.

    If the file's header differs from ``columns``, the file is rewritten once with the union of
    both (old columns first), so rows from older and newer versions of a script stay one tidy table.
    """
    path = pathlib.Path(path)
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _header(path) if path.exists() and path.stat().st_size > 0 else []
    if header and header != list(columns):
        merged = header + [c for c in columns if c not in header]
        old = read_rows(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=merged, restval="")
            writer.writeheader()
            writer.writerows(old)
        os.replace(tmp, path)
        header = merged
    fieldnames = header or list(columns)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, restval="", extrasaction="raise")
        if not header:
            writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------
# Command line.


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark bookkeeping helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print the metadata a result row measured here would carry")
    p.add_argument("--device", default=None, help="device to describe (default: cuda if available, else cpu)")
    p = sub.add_parser("merge", help="append the rows of one results CSV to another (union of columns)")
    p.add_argument("src", help="CSV whose rows are appended (e.g. one brought back from a GPU machine)")
    p.add_argument("dst", help="CSV to append to (e.g. benchmarks/results/latency.csv); created if missing")
    args = parser.parse_args(argv)
    if args.command == "info":
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        for key, value in run_metadata(device).items():
            print(f"{key}: {value}")
        return 0
    rows = read_rows(args.src)
    if not rows:
        print(f"{args.src}: no rows", file=sys.stderr)
        return 1
    # Idempotent: a row already in dst (same values in every column both files have) is not added again.
    present = read_rows(args.dst)
    shared = [c for c in rows[0] if not present or c in present[0]]
    seen = {tuple(r.get(c, "") for c in shared) for r in present}
    new = [r for r in rows if tuple(r.get(c, "") for c in shared) not in seen]
    if new:
        append_rows(args.dst, new, list(rows[0].keys()))
    print(f"appended {len(new)} rows of {args.src} to {args.dst}"
          + (f" ({len(rows) - len(new)} already there)" if len(new) < len(rows) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
