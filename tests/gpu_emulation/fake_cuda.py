"""Fakes of the ``torch.cuda`` pieces the engine and the GPU tests use, on CPU tensors.

* Streams and events: the CPU runs everything at once, in order; ``stream_order`` models what a
  GPU would order (vector clocks moved by ops, event records and waits, host syncs) and raises on
  an access two streams make unordered, and on a capture that breaks CUDA's rules of stream capture
  (``StreamOrderMode``, entered in every thread); events time with ``perf_counter``;
  ``torch.cuda.stream(s)`` keeps a per-thread stack of current streams.
* Graphs: ``CUDAGraph`` records the aten ops the capturing thread launches (a dispatch mode) and
  re-runs them on replay, writing each result into the tensor captured as its output (static
  buffers, as a real graph). The ops run while recording (their outputs are needed to go on), but
  as a real capture computes nothing, the capture's end undoes them: tensors that existed before
  get their contents back, tensors it allocated are filled with NaN, so only a replay gives
  results. A host sync while capturing (``.item()``, ``torch.equal``, ``nonzero``,
  ``synchronize``) invalidates the capture, as CUDA does.
* ``torch.cuda.set_sync_debug_mode``: "warn" / "error" warn or raise on the host syncs torch's own
  sync debug mode reports (``synchronize``, ``Stream.synchronize``, ops that read a device value on
  the host, blocking copies of host data to the device, and ``.cpu()``/``.tolist()``/``.numpy()``
  of any tensor (see the plugin); not ``Event.synchronize``).
* The CUDA generator is the CPU one; its "offset" is a hash of its state (it changes when it draws).
* Memory counters: the bytes of the distinct storages of all live CPU tensors.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import threading
import time
import types
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import stream_order

__all__ = ["install"]

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------- streams
class Event:
    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.enable_timing = enable_timing
        self.t = None
        self.clock = None    # The recording stream's vector clock when recorded (stream_order).
        self.capture = None  # The capture it was recorded in, if any.

    def record(self, stream=None):
        stream = stream or current_stream()
        self.t = time.perf_counter()
        with stream_order._lock:
            self.clock = dict(stream.clock)
        self.capture = stream.capture

    def wait(self, stream=None):
        (stream or current_stream()).wait_event(self)

    def query(self):
        stream_order.check_event_usable(self, "Event.query")
        return True

    def synchronize(self):
        stream_order.check_event_usable(self, "Event.synchronize")
        if self.clock is not None:
            stream_order.host_sync([self.clock])

    def elapsed_time(self, end):
        stream_order.check_event_usable(self, "Event.elapsed_time")
        if not (self.enable_timing and end.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self.t is None or end.t is None:
            raise RuntimeError("event not recorded")
        return (end.t - self.t) * 1000.0


_STREAMS = weakref.WeakSet()


class Stream:
    _count = 0

    def __init__(self, device=None, priority=0, **kwargs):
        Stream._count += 1
        self.id = Stream._count
        self.priority = priority
        self.device = CPU
        stream_order.register(self)
        _STREAMS.add(self)

    def wait_stream(self, other):
        self.wait_event(other.record_event())

    def wait_event(self, event):
        if event.clock is not None:  # CUDA: waiting on a never-recorded event is a no-op.
            stream_order.join_on_wait(self, event)

    def record_event(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def synchronize(self):
        _check_not_capturing("Stream.synchronize")
        sync_point("Stream.synchronize")
        stream_order.host_sync([self])

    def query(self):
        return True

    def __repr__(self):
        return f"<emulated cuda stream {self.id}>"


_DEFAULT_STREAM = Stream()
_current = threading.local()


def current_stream(device=None):
    stack = getattr(_current, "stack", None)
    return stack[-1] if stack else _DEFAULT_STREAM


@contextlib.contextmanager
def stream(s):
    if s is None:
        yield
        return
    stack = getattr(_current, "stack", None)
    if stack is None:
        stack = _current.stack = []
    stack.append(s)
    try:
        yield
    finally:
        stack.pop()


class StreamContext:
    def __init__(self, s):
        self.s = s
        self._cm = None

    def __enter__(self):
        self._cm = stream(self.s)
        return self._cm.__enter__()

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


# ----------------------------------------------------------------------------------- graphs
_capture = threading.local()
_aten = torch.ops.aten
_HOST_SYNC = {
    _aten._local_scalar_dense.default, _aten.equal.default, _aten.is_nonzero.default, _aten.nonzero.default,
    _aten.masked_select.default, _aten._unique2.default, _aten.unique_consecutive.default,
    _aten.repeat_interleave.Tensor, _aten.allclose.default,
}


def capturing() -> bool:
    return getattr(_capture, "graph", None) is not None


def _check_not_capturing(what):
    if capturing():
        _capture.graph.invalid = True
        raise RuntimeError(f"CUDA error: operation not permitted when stream is capturing ({what}, emulated)")


def synchronize(device=None):
    _check_not_capturing("synchronize")
    sync_point("torch.cuda.synchronize")
    stream_order.host_sync(list(_STREAMS))


def host_sync_current() -> None:
    """A blocking copy to the device: the host waited for the current stream. During a capture it
    invalidates the capture, as on a GPU (torch copies pageable host data with a stream sync).
    Only copies the emulation sees: to an explicit "cuda" device, not to ``device=t.device`` of a
    tensor that the emulation keeps on the CPU."""
    _check_not_capturing("a blocking copy of host data to the device")
    sync_point("a blocking copy of host data to the device")
    stream_order.host_sync([current_stream()])


# torch.cuda.set_sync_debug_mode: 0 "default", 1 "warn", 2 "error".
_SYNC_DEBUG_MODES = {"default": 0, "warn": 1, "error": 2}
_sync_debug_mode = [0]


def set_sync_debug_mode(mode) -> None:
    if isinstance(mode, str):
        if mode not in _SYNC_DEBUG_MODES:
            raise RuntimeError("invalid value of debug_mode, expected one of `default`, `warn`, `error`")
        mode = _SYNC_DEBUG_MODES[mode]
    _sync_debug_mode[0] = int(mode)


def sync_point(what: str) -> None:
    """A host synchronisation torch's sync debug mode reports (with its message)."""
    if _sync_debug_mode[0] == 2:
        raise RuntimeError(f"called a synchronizing CUDA operation ({what}, emulated)")
    if _sync_debug_mode[0] == 1:
        warnings.warn(f"called a synchronizing CUDA operation ({what}, emulated)", stacklevel=3)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _written(func, args, kwargs):
    """The tensors an op writes in place (its schema's mutable arguments, ``out=`` included)."""
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            yield from _tensors(args[i] if i < len(args) else kwargs.get(arg.name))


class _RecordMode(TorchDispatchMode):
    def __init__(self, graph):
        super().__init__()
        self.graph = graph
        self.saved = {}   # storage key -> (storage, its contents before the capture wrote it)
        self.fresh = {}   # storage key -> a tensor the capture allocated on it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_SYNC:
            self.graph.invalid = True
            raise RuntimeError(f"CUDA error: operation not permitted when stream is capturing "
                               f"({func}: host sync, emulated)")
        for t in _written(func, args, kwargs):
            key = stream_order.storage_key(t)
            if key and key not in self.fresh and key not in self.saved:
                self.saved[key] = (t.untyped_storage(), t.untyped_storage().clone())
        out = func(*args, **kwargs)
        inputs = {stream_order.storage_key(t) for t in _tensors((args, list(kwargs.values())))}
        for t in _tensors(out):
            key = stream_order.storage_key(t)
            if key and key not in inputs and key not in self.saved:
                self.fresh.setdefault(key, t)
        self.graph.ops.append((func, args, kwargs, out))
        return out

    def undo(self):
        """What a real capture leaves: no results (see the module docstring)."""
        with torch.no_grad():
            for storage, before in self.saved.values():
                storage.copy_(before)
            for t in self.fresh.values():
                if t.is_floating_point():
                    t.fill_(float("nan"))
        self.saved, self.fresh = {}, {}


_order = threading.local()  # .off: order tracking suspended in this thread (the capture's undo).


def _plain(t) -> bool:
    """A real CPU tensor with memory (not a tensor subclass of a compiler's or opcheck's tracing)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"


def _launch_stream():
    """(the stream a launch of this thread goes to, the capture in progress in this thread or None);
    during a capture the stream must be one of the capture's."""
    stream = current_stream()
    graph = getattr(_capture, "graph", None)
    if graph is not None and graph.state is not None:
        graph.state.check_member(stream)
    return stream, graph


class StreamOrderMode(TorchDispatchMode):
    """Entered in every thread: each aten op is an access of its stream (``stream_order``)."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # Off while torch.compile traces (Dynamo would not compile under it), on when compiled code runs.

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(_order, "off", False):
            return func(*args, **kwargs)
        stream, graph = _launch_stream()
        writes = [t for t in _written(func, args, kwargs) if _plain(t)]
        written = {id(t) for t in writes}
        reads = [t for t in _tensors((args, list(kwargs.values()))) if _plain(t) and id(t) not in written]
        tick, touched = stream_order.on_op(func, stream, reads, writes)
        out = func(*args, **kwargs)
        stream_order.on_allocation(stream, tick, [t for t in _tensors(out) if _plain(t)], touched)
        if func in _HOST_SYNC and graph is None:
            sync_point(str(func))
            stream_order.host_sync([stream])
        return out


def enter_stream_order_mode() -> None:
    """Track this thread's ops (once per thread)."""
    if getattr(_order, "mode", None) is None:
        _order.mode = StreamOrderMode()
        _order.mode.__enter__()


def kernel_launch(name: str, tensors) -> None:
    """A kernel launched outside the dispatcher (the Triton interpreter): every tensor argument
    counts as read and written on the current stream."""
    if getattr(_order, "off", False):
        return
    stream, _ = _launch_stream()
    stream_order.on_op(name, stream, [], [t for t in tensors if _plain(t)])


def allocated(tensor: torch.Tensor) -> None:
    """A tensor allocated outside the dispatcher (Inductor's generated code): its storage starts
    without history, as one written now on the current stream."""
    if not getattr(_order, "off", False) and _plain(tensor):
        stream = current_stream()
        stream_order.on_allocation(stream, stream_order.tick(stream), [tensor], set())


def _copy_back(dst, src):
    """Write a replayed op's result into the tensor(s) the capture produced (unless they are one)."""
    if isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor):
        same_view = (stream_order.storage_key(dst) == stream_order.storage_key(src)
                     and dst.storage_offset() == src.storage_offset() and dst.stride() == src.stride())
        if dst is not src and not same_view:
            with torch.no_grad():
                dst.copy_(src)
    elif isinstance(dst, (tuple, list)) and isinstance(src, (tuple, list)):
        for a, b in zip(dst, src):
            _copy_back(a, b)


class CUDAGraph:
    def __init__(self, keep_graph=False):
        self.ops = []
        self.invalid = False
        self._mode = None
        self.state = None  # stream_order.CaptureState while capturing.
        self.replays = 0

    def capture_begin(self, pool=None, capture_error_mode="global"):
        if capturing():
            raise RuntimeError("emulated: nested capture")
        self.state = stream_order.CaptureState(current_stream(), _DEFAULT_STREAM)
        _capture.graph = self
        self._mode = _RecordMode(self)
        self._mode.__enter__()

    def capture_end(self):
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)
            _order.off = True
            try:
                mode.undo()
            finally:
                _order.off = False
        _capture.graph = None
        state, self.state = self.state, None
        unjoined = state.end() if state is not None else None
        if unjoined is not None:
            self.invalid = True
            raise RuntimeError(unjoined)
        if self.invalid:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture (emulated)")

    def replay(self):
        if self.invalid:
            raise RuntimeError("emulated: replay of an invalid graph")
        self.replays += 1
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                _copy_back(out, func(*args, **kwargs))

    def reset(self):
        self.ops = []

    def enable_debug_mode(self):
        pass

    def debug_dump(self, path):
        pass


class graph:  # noqa: N801  (torch.cuda.graph)
    default_capture_stream = None

    def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        if graph.default_capture_stream is None:
            graph.default_capture_stream = Stream()
        self.g = cuda_graph
        self.pool = pool
        self.stream_ctx = StreamContext(stream or graph.default_capture_stream)

    def __enter__(self):
        synchronize()  # As torch.cuda.graph does before capturing.
        self.stream_ctx.__enter__()
        self.g.capture_begin(pool=self.pool)

    def __exit__(self, *exc):
        try:
            self.g.capture_end()
        finally:
            self.stream_ctx.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------------- random numbers
class _Generator:
    """torch.cuda.default_generators[0]: the CPU generator, its offset a hash of its state."""

    def __getattr__(self, name):
        return getattr(torch.default_generator, name)

    def get_offset(self):
        state = torch.default_generator.get_state().numpy().tobytes()
        return int.from_bytes(hashlib.md5(state).digest()[:8], "little")

    def graphsafe_get_state(self):
        return torch.default_generator.get_state()

    def graphsafe_set_state(self, state):
        torch.default_generator.set_state(state)


# ----------------------------------------------------------------------------------- memory
def _live_bytes() -> int:
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on some deprecated objects gc holds warns.
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for o in objects:
        try:
            if o.device.type == "cpu" and not o.is_meta:
                storage = o.untyped_storage()
                if storage.data_ptr() and storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # noqa: BLE001  Anything gc holds: dead weak proxies, storage-less tensors.
            pass
    return total


_peak = [0]


def memory_allocated(device=None):
    allocated = _live_bytes()
    _peak[0] = max(_peak[0], allocated)
    return allocated


def max_memory_allocated(device=None):
    return max(_peak[0], memory_allocated())


def reset_peak_memory_stats(device=None):
    _peak[0] = 0


# ----------------------------------------------------------------------------------- torch.cuda
class _Properties(types.SimpleNamespace):
    def __getattr__(self, name):  # Any other property a library may ask for.
        return 0


_PROPERTIES = _Properties(name="NVIDIA H100 (CPU emulation)", total_memory=80 * 2**30, major=9, minor=0,
                          multi_processor_count=132, L2_cache_size=50 * 2**20, gcnArchName="", warp_size=32,
                          max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536,
                          shared_memory_per_block_optin=227 * 1024, shared_memory_per_multiprocessor=228 * 1024)


def install() -> None:
    """Replace the ``torch.cuda`` functions and classes the package and its tests use."""
    fakes = dict(
        is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0,
        get_device_name=lambda device=None: _PROPERTIES.name, get_device_capability=lambda device=None: (9, 0),
        get_device_properties=lambda device=None: _PROPERTIES,
        synchronize=synchronize,
        is_initialized=lambda: True, _lazy_init=lambda: None, init=lambda: None, set_device=lambda d: None,
        empty_cache=lambda: gc.collect(), memory_allocated=memory_allocated, memory_reserved=memory_allocated,
        max_memory_allocated=max_memory_allocated, max_memory_reserved=max_memory_allocated,
        reset_peak_memory_stats=reset_peak_memory_stats, reset_max_memory_allocated=reset_peak_memory_stats,
        mem_get_info=lambda device=None: (70 * 2**30, 80 * 2**30),
        memory_stats=lambda device=None: {"allocated_bytes.all.current": memory_allocated()},
        Stream=Stream, Event=Event, current_stream=current_stream, default_stream=lambda device=None: _DEFAULT_STREAM,
        stream=stream, StreamContext=StreamContext, device=lambda d=None: contextlib.nullcontext(),
        CUDAGraph=CUDAGraph, graph=graph, graph_pool_handle=lambda: (0, 7), is_current_stream_capturing=capturing,
        get_rng_state=lambda device="cuda": torch.get_rng_state(),
        set_rng_state=lambda state, device="cuda": torch.set_rng_state(state),
        get_rng_state_all=lambda: [torch.get_rng_state()], set_rng_state_all=lambda s: torch.set_rng_state(s[0]),
        manual_seed=lambda seed: torch.manual_seed(seed), manual_seed_all=lambda seed: None,
        seed=lambda: torch.seed(), seed_all=lambda: None, initial_seed=lambda: torch.initial_seed(),
        default_generators=(_Generator(),), set_sync_debug_mode=set_sync_debug_mode,
        get_sync_debug_mode=lambda: _sync_debug_mode[0], ipc_collect=lambda: None,
        _sleep=lambda cycles: None,  # A GPU-side delay: the CPU runs everything at once anyway.
    )
    for name, fake in fakes.items():
        setattr(torch.cuda, name, fake)
    # Inductor's CUDA-graph check (mode="reduce-overhead") asks the allocator before it sees the
    # CPU tensors and skips the graphs.
    torch._C._cuda_cudaCachingAllocator_is_enabled = lambda: True
