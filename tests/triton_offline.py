"""Common runner of the Triton test files that compile for a GPU on a machine without one
(tests/test_triton_ptx.py, tests/test_triton_launch.py): each runs itself as a script in a fresh
interpreter in compiled mode (Triton fixes the interpreter mode when the kernels are defined, and
the other Triton tests set it), which prints one JSON object as its last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_compiled(script: str, timeout: int) -> dict:
    """The JSON result of ``python script`` without TRITON_INTERPRET; skips without Triton or ptxas."""
    pytest.importorskip("triton")
    from autoguide_fast import kernels

    if kernels.triton_error() is not None:
        pytest.skip(kernels.triton_error())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's ptxas is not available here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
