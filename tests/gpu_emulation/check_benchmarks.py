"""The GPU visit's benchmark scripts on the emulated device (run under the plugin by
tests/test_gpu_emulation.py): their CUDA-only code (the CUDA-graph floors, the stream and graph
arms, the compiled arms with their recompile and CUDA-graph bookkeeping, CUDA-event timing, the
target verdicts of a GPU run, the smoke's graph items and EDM2 items) runs on every CPU run, so a
rare GPU visit is not spent on a Python error. Timings here mean nothing and are not looked at."""

import csv
import importlib
import json
import sys

import pytest
import torch

from tests.benchmark_modules import BENCH
from tests.gpu_emulation import plugin

pytestmark = pytest.mark.gpu  # Run with the GPU tests, under the emulation.


def _script(name: str):
    """``benchmarks/<name>.py`` imported by its own name, with the plugin's CUDA-check rewrite
    (its ``device.type == "cuda"`` branches accept the emulated device, which is the CPU)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    module = importlib.import_module(name)
    assert isinstance(module.__loader__, plugin._RewritingLoader), f"{name} was imported without the rewrite"
    return module


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def latency():
    module = _script("latency")
    assert plugin.rewrites["latency"] > 0 and plugin.rewrites["common"] > 0
    return module


def test_latency_precompile_then_every_arm_runs(latency, tmp_path):
    # As the GPU check runs it: precompile the B2 networks in one process, then time all arms.
    argv = ["--smoke", "--device", "cuda", "--batches", "1", "--reps", str(latency.common.MIN_JUDGED_REPS)]
    assert latency.main([*argv, "--precompile"]) == 0
    out = tmp_path / "latency.csv"
    assert latency.main([*argv, "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["arm"] for r in rows] == list(latency.ARM_NAMES)
    bad = {r["arm"]: (r["status"], r["notes"]) for r in rows if r["status"] != "ok"}
    assert not bad, bad
    assert {r["card"] for r in rows} == {torch.cuda.get_device_name()}
    # Every sampler's result is compared with B0's (the same noise and networks; outputs of the
    # random tiny networks reach several hundred): the uncompiled ones agree (bit for bit here).
    diffs = {r["arm"]: r["max_abs_diff_vs_B0"] for r in rows if r["kind"] != "floor" and r["arm"] != "B0"}
    assert all(d != "" for d in diffs.values()), diffs
    compiled = {a.name for a in latency.ARMS if a.compiles}
    assert all(float(d) < 1e-3 for a, d in diffs.items() if a not in compiled), diffs
    config = {r["arm"]: r["config"] for r in rows}
    assert '"graph": "trajectory", "streams": "on"' in config["ours-graph-traj"]
    assert '"graph": "step", "streams": "on"' in config["ours-graph-step"]
    assert '"compile_networks": true' in config["ours-compiled"]
    assert all(r["ratio_to_F"] for r in rows)  # F ran, so every arm has its ratio to the floor.
    # The target verdicts of a GPU run (the emulated rows say "cpu": the device is the CPU).
    text = latency.format_targets([{**r, "device_type": "cuda"} for r in rows])
    verdicts = [line for line in text.splitlines() if line.strip().startswith("smoke-tiny-edm2")]
    assert len(verdicts) == 4 and all(line.rstrip().endswith(("MET", "not met")) for line in verdicts), text


def test_bench_step_times_every_gpu_backend(tmp_path):
    bench_step = _script("bench_step")
    out, report = tmp_path / "step.csv", tmp_path / "step.txt"
    argv = ["--quick", "--device", "cuda", "--sizes", "4096", "--samples", "3", "--out", str(out), "--report",
            str(report)]
    assert bench_step.main(argv) == 0
    rows = _rows(out)
    assert {r["backend"] for r in rows} >= {"cuda", "triton", "torch"}
    assert {r["status"] for r in rows} == {"ok"}, [(r["backend"], r["op"], r["status"]) for r in rows]
    assert report.exists()


@pytest.mark.parametrize("group", ["env", "torch", "triton", "cuda", "engine"])
def test_gpu_smoke_group_passes(tmp_path, monkeypatch, group):
    gpu_smoke = _script("gpu_smoke")
    monkeypatch.setattr(gpu_smoke, "EDM2_NOISE_SHAPE", (1, 4, 16, 16))  # The EDM2-XS items, at a CPU's size.
    assert gpu_smoke.run_group(group, torch.device("cuda", 0), tmp_path) == 0
    items = json.loads((tmp_path / f"smoke_{group}.json").read_text())
    verdicts = {i["item"]: i["verdict"] for i in items}
    assert items and set(verdicts.values()) == {"PASS"}, verdicts
    if group == "engine":
        assert {"auto", "buckets", "edm2-xs/eager", "edm2-xs/trajectory-on"} <= set(verdicts)
