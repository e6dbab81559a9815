"""pytest plugin: one emulated CUDA device on the CPU (see the package docstring).

    python -m pytest -p tests.gpu_emulation.plugin -m gpu tests/test_engine_gpu.py

Loaded before the test modules and the package are imported, it
* fakes ``torch.cuda`` (``fake_cuda``) and sets ``TRITON_INTERPRET=1``;
* maps the device "cuda" to the CPU: ``torch.device("cuda")`` is the CPU device, a function mode
  (entered in every thread) rewrites ``device=`` and ``.to("cuda")``, ``.cuda()`` is the identity;
* loads the engine's modules with ``.type == "cuda"`` and ``.is_cuda`` also accepting the CPU, so
  their CUDA paths (streams, graph capture, the random fence, the cache route) run;
* serves the "cuda" backend with the C++ CPU kernels, and makes "auto" prefer cuda, then triton.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import threading

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401  (imported before the fakes: it inspects CUDA at import)
import torch._inductor  # noqa: E402,F401
import torch.utils.cpp_extension  # noqa: E402,F401
from torch.overrides import TorchFunctionMode  # noqa: E402

from . import fake_cuda, stream_order  # noqa: E402

_RealDevice = torch.device


# ----------------------------------------------------------------------------------- devices
def _is_cuda_name(value) -> bool:
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


def _map_device(value):
    if _is_cuda_name(value) or (isinstance(value, _RealDevice) and value.type == "cuda"):
        return _RealDevice("cpu")
    return value


class _DeviceType(type):
    """``torch.device`` that turns "cuda" into the CPU; isinstance checks still see real devices."""

    def __instancecheck__(cls, obj):
        return isinstance(obj, _RealDevice)

    def __subclasscheck__(cls, sub):
        return issubclass(sub, _RealDevice)

    def __call__(cls, *args, **kwargs):
        if (args and _map_device(args[0]) is not args[0]) or kwargs.get("type") == "cuda":
            return _RealDevice("cpu")
        return _RealDevice(*args, **kwargs)


class _Device(metaclass=_DeviceType):
    pass


_COPIES_FROM_HOST = {"tensor", "as_tensor", "asarray", "to"}
# Reads of a tensor's values on the host: on a GPU, blocking copies to the host. The emulation
# cannot tell a host tensor from a device one, so these count only for the sync debug mode (a check
# may then report a host tensor's read too), not as synchronisations of the stream-order model
# (that would order work a GPU does not).
_COPIES_TO_HOST = {"cpu", "tolist", "numpy"}


class _DeviceMapMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _COPIES_TO_HOST:
            fake_cuda.sync_point(f"Tensor.{func.__name__}")
        to_cuda = False
        if kwargs.get("device") is not None:
            # Host data copied to the device (torch.tensor(data, device=...)); a factory such as
            # torch.zeros(device=...) is a kernel on the current stream instead.
            to_cuda = (_map_device(kwargs["device"]) is not kwargs["device"]
                       and getattr(func, "__name__", "") in _COPIES_FROM_HOST)
            kwargs = {**kwargs, "device": _map_device(kwargs["device"])}
        if func is torch.Tensor.to or getattr(func, "__name__", "") == "to":
            mapped = tuple(_map_device(a) for a in args)
            to_cuda = to_cuda or any(a is not b for a, b in zip(args, mapped))
            args = mapped
        out = func(*args, **kwargs)
        if to_cuda and not kwargs.get("non_blocking", False):
            # Data made on the host and copied to the device: a blocking copy waits for it there.
            fake_cuda.host_sync_current()
        return out


_thread_mode = threading.local()


def _enter_device_mode() -> None:
    if getattr(_thread_mode, "mode", None) is None:
        fake_cuda.enter_stream_order_mode()
        _thread_mode.mode = _DeviceMapMode()
        _thread_mode.mode.__enter__()


def _install_device_mapping() -> None:
    torch.device = _Device
    thread_run = threading.Thread.run

    def run(self):
        _enter_device_mode()
        return thread_run(self)

    threading.Thread.run = run
    def cuda(self, *args, **kwargs):  # A blocking copy to the device (stream_order: a host sync).
        fake_cuda.host_sync_current()
        return self

    torch.Tensor.cuda = cuda
    torch.nn.Module.cuda = cuda
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    torch.Tensor.record_stream = lambda self, stream: stream_order.record_stream(self, stream)


def _keep_inductor_off_triton() -> None:
    """Inductor compiles for the CPU tensors (C++) but, seeing CUDA "available", would ask Triton's
    GPU driver for libcuda: tell it Triton has no device."""
    import torch.utils._triton as torch_triton

    has_triton = torch_triton.has_triton
    for module in list(sys.modules.values()):
        if getattr(module, "has_triton", None) is has_triton:
            module.has_triton = lambda: False


# ----------------------------------------------------------------------------------- source rewrite
_REWRITTEN = {
    "autoguide_fast.engine.guided_sampler", "autoguide_fast.engine.streams", "autoguide_fast.engine.cuda_graphs",
    "autoguide_fast.engine.runners", "autoguide_fast.engine.buckets", "autoguide_fast.engine.cache",
    "autoguide_fast.engine.arguments", "autoguide_fast.engine.networks", "autoguide_fast.engine.step_kinds",
    "autoguide_fast.sampler",
    # The benchmark scripts, imported by their own names with benchmarks/ on sys.path
    # (tests/gpu_emulation/check_benchmarks.py).
    "common", "latency", "bench_step", "gpu_smoke",
}
_REPLACEMENTS = ((".type == \"cuda\"", ".type in (\"cuda\", \"cpu\")"),
                 (".type != \"cuda\"", ".type not in (\"cuda\", \"cpu\")"),
                 (".is_cuda", ".device.type in (\"cuda\", \"cpu\")"))
rewrites: dict[str, int] = {}


class _RewritingLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname):
        source = self.get_data(self.path).decode("utf-8")
        rewrites[fullname] = sum(source.count(a) for a, _ in _REPLACEMENTS)
        for a, b in _REPLACEMENTS:
            source = source.replace(a, b)
        return compile(source, self.path, "exec", dont_inherit=True)


class _RewritingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _REWRITTEN:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.origin.endswith(".py"):
            spec.loader = _RewritingLoader(fullname, spec.origin)
        return spec


# ----------------------------------------------------------------------------------- backends
def _serve_cuda_backend_with_cpu_kernels() -> None:
    backends = importlib.import_module("autoguide_fast.backends")
    from autoguide_fast._extension import extension
    from autoguide_fast.backends import cuda_backend
    from autoguide_fast.ops import extension_ops, fused_backend

    backends._AUTO_ORDER["cpu"] = backends._AUTO_ORDER["cuda"]
    cuda_backend.status = lambda: ((True, "fused CUDA kernels (emulated by the C++ CPU kernels)")
                                   if extension() is not None else (False, "extension not loaded"))
    cuda_backend.supports = lambda device, dtype: fused_backend.supports("cpu", device, dtype)
    cuda_backend.create = lambda dtype: fused_backend.FusedBackend("cuda", dtype)
    has_kernel = extension_ops.has_kernel
    extension_ops.has_kernel = lambda device_type: has_kernel("cpu" if device_type == "cuda" else device_type)


def _track_triton_launches() -> None:
    """The Triton interpreter runs kernels outside the dispatcher: count each launch as an access
    of its tensor arguments on the current stream (stream_order)."""
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run

    def tracked_run(self, *args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        fake_cuda.kernel_launch(f"triton kernel {getattr(self.fn, '__name__', self.fn)}", tensors)
        return run(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = tracked_run


def _track_inductor_allocations() -> None:
    """Inductor's generated code allocates its buffers outside the dispatcher (it looks this
    function up when a compiled module loads): tell stream_order about each allocation, or a buffer
    at an address a freed tensor had would inherit that tensor's history."""
    guards = torch._C._dynamo.guards
    empty_strided_cpu = guards._empty_strided_cpu

    def tracked(*args, **kwargs):
        out = empty_strided_cpu(*args, **kwargs)
        fake_cuda.allocated(out)
        return out

    guards._empty_strided_cpu = tracked


# Before anything imports the package or the tests (pytest imports -p plugins first).
fake_cuda.install()
_install_device_mapping()
_keep_inductor_off_triton()
_track_inductor_allocations()
sys.meta_path.insert(0, _RewritingFinder())


def pytest_configure(config):
    _enter_device_mode()
    _serve_cuda_backend_with_cpu_kernels()
    try:
        _track_triton_launches()
    except ImportError:  # No Triton: its tests skip.
        pass


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test that freed memory another stream may still use (stream_order's caching-allocator
    model) fails, whichever thread freed it and even if no op came after the free. (What only the
    cycle collector frees is checked when it runs; a test that must see it calls gc.collect().)"""
    try:
        result = yield
    except BaseException:
        with contextlib.suppress(stream_order.StreamRace):  # Reported by the failure already raised.
            stream_order.check_frees()
        raise
    stream_order.check_frees()
    return result


def pytest_report_header(config):
    return ["gpu emulation: torch.cuda faked on the CPU (Triton interpreted, 'cuda' backend = C++ CPU kernels)"]


_exit_status: int | None = None


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config):
    if rewrites:
        sys.stderr.write(f"\ngpu emulation: CUDA checks rewritten per module: {rewrites}\n")
    # End the process here with pytest's exit status, skipping interpreter finalisation: the fakes
    # stay patched into torch, and with Inductor's compile threads still alive that finalisation
    # aborted once ("terminate called without an active exception", exit -6) after every test had
    # passed. The package starts no thread of its own; the results are all reported by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if _exit_status is None else _exit_status)
