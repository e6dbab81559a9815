"""The GPU tests of the engine, the kernels and the noise, and the GPU visit's benchmark scripts,
run on the CPU under an emulated CUDA device (tests/gpu_emulation): their logic and the CUDA-only
paths (streams, graph capture and replay, capture fallback, random fence, cache route, the
benchmarks' floors and compiled arms) are checked on every CPU run, not only on a rare GPU visit."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = ["tests/test_engine_gpu.py", "tests/test_triton_device_scalars.py", "tests/test_cuda_backend.py",
         "tests/test_noise.py", "tests/gpu_emulation/check_emulation.py", "tests/gpu_emulation/check_benchmarks.py",
         "tests/test_edm2.py::test_a_general_resample_filter_is_captured_in_a_cuda_graph"]
# Beyond the emulation: it cannot tell a CPU tensor from a "CUDA" one; and with a CUDA build of
# torch (no GPU here), torch.compile asks the real CUDA runtime about the accelerator.
NOT_EMULATED = [
    "tests/test_engine_gpu.py::test_noise_and_labels_on_another_device_are_refused",
    "tests/test_triton_device_scalars.py::test_bad_scalars_raise[euler-cpu device]",
    "tests/test_triton_device_scalars.py::test_bad_scalars_raise[heun-cpu device]",
    "tests/test_cuda_backend.py::test_bad_inputs_raise_before_any_launch",
]
if torch.version.cuda is not None:
    NOT_EMULATED.append("tests/test_engine_gpu.py::test_compiled_networks_are_captured_and_close_to_eager")


@pytest.mark.slow  # About 3 minutes (the benchmark scripts compile two tiny networks twice).
def test_engine_gpu_tests_pass_on_an_emulated_device():
    import autoguide_fast
    from autoguide_fast import kernels

    # Every test must run (none skipped): the "cuda" backend is the C++ kernels, and Triton runs.
    if autoguide_fast.extension() is None or kernels.triton_error() is not None:
        pytest.skip("the emulated run needs the compiled extension and Triton")
    deselect = [arg for test in NOT_EMULATED for arg in ("--deselect", test)]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.gpu_emulation.plugin", "-p", "no:cacheprovider", "-q",
         "-m", "gpu", *deselect, *FILES],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,  # 3 to 5 min alone, far more on a busy machine.
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    # Every GPU test of these files ran, none skipped (on a GPU the Triton files' tests are all
    # `gpu`, see conftest): 78 of the engine's, 29 + 70 + 30 of the kernels' and noise's, 14 checks
    # of the emulation, 7 of the GPU visit's benchmark scripts, 1 of the EDM2 network's.
    expected = 78 + 29 + 70 + 30 + 14 + 7 + 1 - len(NOT_EMULATED)
    assert passed is not None and int(passed.group(1)) >= expected and " skipped" not in out, out[-3000:]
