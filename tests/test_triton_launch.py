"""Every Triton op through Triton's real launcher, without a GPU: argument binding, specialisation
and compilation for sm_90, exactly as a launch on an H100/H200 would do them.

The interpreter (TRITON_INTERPRET=1, the other Triton tests on a CPU) runs the kernels' Python
bodies and skips the launcher, which checks what the interpreter does not: e.g. it refuses a kernel
argument passed by the name `stream` (a reserved launch keyword; the Philox stream once was passed
so and every euler/heun launch on a GPU would have failed), and it specialises integer arguments
(an int equal to 1 becomes a constant). Here each op's own implementation runs in a subprocess
(compiled mode) with a stand-in driver that reports an sm_90 device, and every `kernel[grid](...)`
is replaced by the same call in Triton's warm-up mode: bind, specialise, compile (with Triton's
ptxas), no launch. Skipped on a CUDA machine, where the Triton tests launch the kernels themselves.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton tests launch the kernels on this GPU")

CASES = [
    "euler", "euler-churn-scalars", "euler-f64-unguided-churn-ragged-no-d", "euler-small-w-cast-f16",
    "heun", "heun-f64-churn-scalars", "churn-seeds", "churn-eps", "philox-normal", "philox-normal-f16",
    "philox-words",
]


def _launch_all() -> dict[str, str]:
    """Runs in a fresh interpreter (compiled mode): 'ok' or the error of every case."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class StandInDriver:  # What the launcher asks of the active driver before it compiles.
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(StandInDriver())
    JITFunction.__getitem__ = lambda self, grid: (lambda *a, **k: self.run(*a, grid=grid, warmup=True, **k))

    from autoguide_fast import kernels

    kernels.load()
    from autoguide_fast.kernels import _triton_common as C
    from autoguide_fast.kernels import triton_philox as P
    from autoguide_fast.kernels import triton_step as S

    assert not C.INTERPRETED, "this check needs compiled mode"
    for module in (C, P, S):  # The ops refuse CPU tensors outside the interpreter.
        module.check_device = lambda *args, **kwargs: None

    def impl(op):
        return op._init_fn  # The function behind the torch.library op (no dispatcher, no device).

    x = torch.randn(4, 3, 16, 16)
    half = x.half()
    ragged = torch.randn(3, 5, 7, dtype=torch.float64)
    seeds = torch.arange(4)
    scalars = torch.tensor([2.1, 1.5, 1.0, 0.3, 7.0], dtype=torch.float64)
    cases = {
        "euler": lambda: impl(S.euler_step)(x, x, x, 2.1, 1.5, 1.0, None, None, 0, None, True),
        "euler-churn-scalars": lambda: impl(S.euler_step)(x, half, half, 2.1, 1.5, 1.0, seeds, 0.3, 7, None, True,
                                                          scalars),
        "euler-f64-unguided-churn-ragged-no-d": lambda: impl(S.euler_step)(
            ragged, ragged.float(), None, None, 1.5, 1.0, seeds[:3], 0.3, 7, None, False),
        "euler-small-w-cast-f16": lambda: impl(S.euler_step)(x, x, x, 0.3, 1.5, 1.0, None, None, 0, torch.float16,
                                                             True),
        "heun": lambda: impl(S.heun_step)(x, x, x, half, half, 2.1, 1.5, 1.0, None, None, 0, None),
        "heun-f64-churn-scalars": lambda: impl(S.heun_step)(x.double(), x.double(), x.double(), x, x, 2.1, 1.5, 1.0,
                                                            seeds, 0.3, 2, None, scalars),
        "churn-seeds": lambda: impl(S.churn)(x, 0.3, seeds, None, 5, None),
        "churn-eps": lambda: impl(S.churn)(ragged, 0.3, None, ragged, 0, None),
        "philox-normal": lambda: impl(P.philox_normal)(seeds, 768, 1, torch.float32),
        "philox-normal-f16": lambda: impl(P.philox_normal)(seeds[:3], 35, (1 << 32) - 1, torch.float16),
        "philox-words": lambda: P.philox4x32_words(torch.arange(8).reshape(2, 4), torch.arange(4).reshape(2, 2)),
    }
    assert list(cases) == CASES
    results = {}
    for name, call in cases.items():
        try:
            call()
            results[name] = "ok"
        except Exception as exc:  # noqa: BLE001  (reported per case by the test)
            results[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}"
    return results


@pytest.fixture(scope="module")
def launches():
    from tests.triton_offline import run_compiled

    return run_compiled(__file__, timeout=900)


@pytest.mark.parametrize("case", CASES)
def test_op_binds_and_compiles_through_the_launcher_for_sm90(launches, case):
    assert launches[case] == "ok", launches[case]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(_launch_all()))


_WITHOUT_NUMPY = """
import importlib.abc, os, sys
os.environ.pop("TRITON_INTERPRET", None)
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError("No module named 'numpy' (blocked)")
sys.meta_path.insert(0, Block())
from autoguide_fast import kernels
kernels.load()
from autoguide_fast.kernels import _triton_common
assert not _triton_common.INTERPRETED
print("ok")
"""


def test_compiled_kernels_load_without_numpy():
    """Compiled Triton needs no numpy (its interpreter does): the kernels load without it. They once
    imported the interpreter's module to tell the modes apart, which made the backend fail there."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _WITHOUT_NUMPY], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-2000:] + run.stderr[-2000:]
