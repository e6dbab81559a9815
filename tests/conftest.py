import os

# cuBLAS is bitwise reproducible across streams only with a fixed workspace configuration; the GPU
# tests compare two-stream runs with single-stream ones bit for bit. Set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch

from autoguide_fast import GuidedSampler
from tests.fake_graphs import RerunCapturer


def pytest_sessionstart(session):
    """AUTOGUIDE_FAST_REQUIRE_EXTENSION=1 (set by CI): fail at once when the compiled extension does
    not load, instead of skipping its tests (a package imported from elsewhere, a broken build)."""
    if os.environ.get("AUTOGUIDE_FAST_REQUIRE_EXTENSION") != "1":
        return
    if os.environ.get("AUTOGUIDE_FAST_DISABLE_EXTENSION") == "1":  # A run that simulates its absence.
        return
    import autoguide_fast

    if not autoguide_fast.backends()["cpp"].available:
        pytest.exit(f"AUTOGUIDE_FAST_REQUIRE_EXTENSION=1 but the compiled extension is not available "
                    f"({autoguide_fast.backends()['cpp'].reason}); autoguide_fast from {autoguide_fast.__file__}",
                    returncode=1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        # The Triton kernel tests run compiled on the card where there is one: part of the GPU
        # check's single `-m gpu` run (balanced over its worker processes with the other GPU tests).
        gpu = pytest.mark.gpu
        for item in items:
            if "triton" in item.nodeid.split("::")[0].rsplit("/", 1)[-1]:
                item.add_marker(gpu)
        # Bit-for-bit comparisons (graphs vs eager, two streams vs one) assume cuDNN picks the same
        # convolution algorithms each time: deterministic ones, no autotuning.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run by benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one intra-op thread: its tensors are small, and OpenMP spin-waits of a
    second thread cost more than they bring on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_graphs(monkeypatch):
    RerunCapturer.instances = []
    RerunCapturer.fail_with = None
    monkeypatch.setattr(GuidedSampler, "_capturer_type", RerunCapturer)
    yield RerunCapturer
    RerunCapturer.fail_with = None


@pytest.fixture(autouse=True)
def _same_global_rng_in_every_test():
    """Every test starts from one global RNG state, whatever ran before it: its unseeded draws do not
    depend on the order of the tests, and a failure reproduces when the test runs alone.
    AUTOGUIDE_FAST_TEST_SEED picks another state (to look for tests that pass by the draw's luck)."""
    torch.manual_seed(int(os.environ.get("AUTOGUIDE_FAST_TEST_SEED", "0")))
