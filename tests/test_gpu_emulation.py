"""The GPU tests of the engine, run on the CPU under an emulated CUDA device (tests/gpu_emulation):
their logic and the engine's CUDA-only paths (streams, graph capture and replay, capture fallback,
random fence, cache route) are checked on every CPU run, not only on a rare GPU visit."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = ["tests/test_engine_gpu.py", "tests/gpu_emulation/check_emulation.py"]
# Beyond the emulation: it cannot tell a CPU tensor from a "CUDA" one.
NOT_EMULATED = ["tests/test_engine_gpu.py::test_noise_and_labels_on_another_device_are_refused"]


@pytest.mark.slow  # About 45 s.
def test_engine_gpu_tests_pass_on_an_emulated_device():
    deselect = [arg for test in NOT_EMULATED for arg in ("--deselect", test)]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.gpu_emulation.plugin", "-p", "no:cacheprovider", "-q",
         "-m", "gpu", *deselect, *FILES],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    # Every GPU test of these files ran (none skipped): 46 of the engine's, 5 of the emulation's.
    assert passed is not None and int(passed.group(1)) >= 51 and " skipped" not in out, out[-3000:]
