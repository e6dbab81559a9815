"""Stream ordering on the emulated device: what a GPU would race on, or leave out of a graph.

The CPU runs every op at once and in program order, so on its own the emulation cannot see a
missing wait between two CUDA streams: the code would pass here and race on a GPU (often passing
there too, by luck). This module models the ordering a GPU guarantees and nothing more:

* every emulated stream has a vector clock (for each stream, the last of its ops this stream is
  ordered after); an op ticks its stream's own entry; ``Event.record`` snapshots the clock and
  ``wait_event``/``wait_stream`` merge the snapshot in; a host synchronisation (``synchronize``,
  ``.item()``, a blocking copy to the device) orders every later launch after what it waited for;
* every storage keeps its last write and the reads since, each as (stream, tick). An op on stream S
  that reads a storage another stream wrote, or writes one another stream read or wrote, without S
  being ordered after that access, raises ``StreamRace``: on a GPU it is a data race. A storage an
  op allocates starts without history (the CPU allocator reuses addresses).

During a capture it also keeps CUDA's rules of stream capture: the capture starts on one stream
(not the legacy default stream); another stream joins by waiting on an event recorded on a member;
an op launched by the capturing thread on a stream that is not a member raises (on a GPU it would
run once, now, and be missing from every replay); a member waiting on an event recorded outside
the capture raises (CUDA needs ``cudaEventWaitExternal`` for that); at the end every member that
launched work must have been joined back into the origin stream (``cudaErrorStreamCaptureUnjoined``).
Since a capture computes nothing, the storages' history is restored when it ends.

It also models torch's CUDA caching allocator, which hands a freed block out again at once to new
work on the stream the block was allocated on: a storage freed while another stream's access of it
is neither ordered before its allocation stream (a wait, or a host sync) nor declared with
``Tensor.record_stream`` is a race with whatever reuses the memory (an "unsafe free"). It is
reported as ``StreamRace`` at the freeing thread's next op (``check_frees`` raises it at once; the
plugin fails a test that leaves one). Memory allocated during a capture lives in the graph's private
pool, which nothing else reuses: it is exempt.

The model is the one of the CUDA programming guide (streams, events, stream capture) and of torch's
caching allocator; what it does not see: the Triton interpreter's accesses other than through its
launch (all tensor arguments count as read and written by the launch), and reuse of memory a
capture freed within that capture (the emulated graph keeps every tensor of the capture alive).
"""

from __future__ import annotations

import threading
import weakref

import torch

__all__ = ["CaptureState", "StreamRace", "check_event_usable", "check_frees", "host_sync", "join_on_wait",
           "on_allocation", "on_op", "record_stream", "register", "storage_key", "tick"]


class StreamRace(RuntimeError):
    pass


_lock = threading.RLock()
_host: dict[int, int] = {}         # What the host has waited for: stream id -> tick.
_host_version = [0]
_storages: dict[int, list] = {}    # storage key -> [last write (stream id, tick) or None, {stream id: tick of a read}]
_names: dict[int, str] = {}        # stream id -> name, for messages.
# storage key -> [allocation stream, ids of the streams given to record_stream, weak reference to the storage]
_allocations: dict[int, list] = {}
_unsafe_frees: list[tuple[int, str]] = []  # (id of the freeing thread, what raced)


def register(stream) -> None:
    stream.clock = {}
    stream.capture = None
    stream.host_version = -1
    _names[stream.id] = repr(stream)


def _merge(clock: dict[int, int], other: dict[int, int]) -> None:
    for sid, t in other.items():
        if clock.get(sid, 0) < t:
            clock[sid] = t


def tick(stream) -> int:
    with _lock:
        if stream.host_version != _host_version[0]:
            _merge(stream.clock, _host)
            stream.host_version = _host_version[0]
        t = stream.clock.get(stream.id, 0) + 1
        stream.clock[stream.id] = t
        return t


def host_sync(streams) -> None:
    """The host waited for everything queued so far on ``streams`` (an event's snapshot: a dict)."""
    with _lock:
        for s in streams:
            _merge(_host, s if isinstance(s, dict) else s.clock)
        _host_version[0] += 1


def _ordered(stream, access: tuple[int, int]) -> bool:
    sid, t = access
    return sid == stream.id or stream.clock.get(sid, 0) >= t


def storage_key(t: torch.Tensor) -> int:
    """The address of a tensor's storage (shared by its views), or 0 without one."""
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # No real storage (e.g. a functionalization wrapper): not tracked.
        return 0


def _race(kind: str, func, stream, other: int, t: torch.Tensor) -> StreamRace:
    return StreamRace(
        f"emulated CUDA stream race ({kind}): {func} on {_names.get(stream.id, stream)} accesses a "
        f"{tuple(t.shape)} {t.dtype} tensor that {_names.get(other, other)} accessed without the two "
        "streams being ordered (a missing wait_stream / wait_event)")


def on_op(func, stream, reads: list[torch.Tensor], writes: list[torch.Tensor]) -> tuple[int, set[int]]:
    """Check and record an op's accesses on ``stream`` (before it runs); returns its tick and the
    storage keys it touched (an output on another storage is an allocation)."""
    if _unsafe_frees:
        check_frees(threading.get_ident())
    with _lock:
        t = tick(stream)
        touched = set()
        for tensor, is_write in [(x, False) for x in reads] + [(x, True) for x in writes]:
            key = storage_key(tensor)
            if not key:
                continue
            touched.add(key)
            state = _storages.get(key)
            if state is None:
                state = _storages[key] = [None, {}]
            last_write, state_reads = state
            if last_write is not None and not _ordered(stream, last_write):
                raise _race("write after write" if is_write else "read after write", func, stream, last_write[0],
                            tensor)
            if is_write:
                for sid, rt in state_reads.items():
                    if not _ordered(stream, (sid, rt)):
                        raise _race("write after read", func, stream, sid, tensor)
        for tensor, is_write in [(x, False) for x in reads] + [(x, True) for x in writes]:
            key = storage_key(tensor)
            if key:
                if is_write:
                    _storages[key] = [(stream.id, t), {}]
                else:
                    _storages[key][1][stream.id] = t
        return t, touched


def on_allocation(stream, tick_: int, tensors, touched: set[int]) -> None:
    with _lock:
        for tensor in tensors:
            key = storage_key(tensor)
            if key and key not in touched:
                _storages[key] = [(stream.id, tick_), {}]
                for capture in _captures:
                    capture.allocated.add(key)
                try:
                    ref = weakref.ref(tensor.untyped_storage(), lambda ref, key=key: _freed(key, ref))
                except TypeError:  # A storage without a Python object of its own: not tracked.
                    continue
                _allocations[key] = [stream, set(), ref]


# ----------------------------------------------------------------------------------- caching allocator
def record_stream(tensor: torch.Tensor, stream) -> None:
    """``Tensor.record_stream``: the allocator will not reuse the block before ``stream``'s work
    queued at the free is done."""
    with _lock:
        entry = _allocations.get(storage_key(tensor))
        if entry is not None:
            entry[1].add(stream.id)


def _freed(key: int, ref) -> None:
    """A tracked storage was freed (called by its weak reference): its memory is free for new work on
    its allocation stream at once, so every access of another stream must be covered by then."""
    try:
        with _lock:
            entry = _allocations.get(key)
            if entry is None or entry[2] is not ref:
                return
            del _allocations[key]
            # Read only (a free may come from the cycle collector while the history is being walked);
            # the next allocation at this address resets the history (on_allocation).
            state = _storages.get(key)
            if state is None:
                return
            stream, recorded, _ = entry
            accesses = ([state[0]] if state[0] is not None else []) + list(state[1].items())
            for sid, t in accesses:
                if sid == stream.id or sid in recorded:
                    continue
                if stream.clock.get(sid, 0) >= t or _host.get(sid, 0) >= t:
                    continue
                _unsafe_frees.append((threading.get_ident(), (
                    f"emulated CUDA stream race (unsafe free): a tensor allocated on {_names.get(stream.id, stream)} "
                    f"was freed while {_names.get(sid, sid)} may still access it (neither a wait of the allocation "
                    "stream, a host sync nor record_stream orders that access before the caching allocator hands "
                    "the memory out again)")))
                return
    except Exception:  # noqa: BLE001  (interpreter shutdown: the module may be half torn down)
        pass


def check_frees(thread: int | None = None) -> None:
    """Raise ``StreamRace`` for the unsafe frees of ``thread`` (None: of every thread) so far."""
    with _lock:
        mine = [m for t, m in _unsafe_frees if thread is None or t == thread]
        _unsafe_frees[:] = [(t, m) for t, m in _unsafe_frees if not (thread is None or t == thread)]
    if mine:
        raise StreamRace(mine[0] + (f" (and {len(mine) - 1} more)" if len(mine) > 1 else ""))


# ----------------------------------------------------------------------------------- capture
_captures: list[CaptureState] = []  # Active captures (any thread).

class CaptureState:
    """The streams of one capture and where each joined it."""

    def __init__(self, origin, default_stream) -> None:
        if origin is default_stream:
            raise RuntimeError("CUDA error: operation not supported (capture on the legacy default stream, emulated)")
        if origin.capture is not None:
            raise RuntimeError("CUDA error: the stream is already capturing (emulated)")
        self.origin = origin
        self.active = True
        self.joined_at = {origin.id: origin.clock.get(origin.id, 0)}
        self.members = [origin]
        self.allocated: set[int] = set()  # Storages allocated while it runs.
        origin.capture = self
        with _lock:
            self._saved = {k: [v[0], dict(v[1])] for k, v in _storages.items()}
            _captures.append(self)

    def check_member(self, stream) -> None:
        if stream.capture is not self:
            raise RuntimeError(
                f"emulated CUDA capture: an op was launched on {stream!r}, which is not part of the capture "
                f"started on {self.origin!r} (on a GPU it would run once, now, and be missing from every replay; "
                "a side stream joins a capture by waiting on the capturing stream)")

    def end(self) -> str | None:
        """Ends the capture; returns why it is invalid (unjoined work), or None."""
        self.active = False
        unjoined = [s for s in self.members[1:]
                    if s.clock.get(s.id, 0) > self.joined_at[s.id]
                    and self.origin.clock.get(s.id, 0) < s.clock.get(s.id, 0)]
        for s in self.members:
            s.capture = None
        with _lock:
            # A capture computes nothing: what existed before it is as it was; what it allocated
            # starts without history (the snapshot may hold a freed tensor's at the same address).
            _captures.remove(self)
            _storages.clear()
            _storages.update(self._saved)
            for key in self.allocated:
                _storages.pop(key, None)
                _allocations.pop(key, None)  # The graph's private pool: never handed to other work.
        if unjoined:
            return ("CUDA error: capture sequence contains a fork that was not joined to the primary stream "
                    f"({', '.join(map(repr, unjoined))}; cudaErrorStreamCaptureUnjoined, emulated)")
        return None


def join_on_wait(stream, event) -> None:
    """``stream.wait_event(event)`` under CUDA's capture rules; then the clocks merge."""
    recorded_in = event.capture
    if stream.capture is not None:
        if recorded_in is None:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing (a capturing stream "
                               "waits on an event recorded outside the capture, emulated)")
        if recorded_in is not stream.capture:
            raise RuntimeError("CUDA error: capture isolation (waiting on an event of another capture, emulated)")
    elif recorded_in is not None:
        if not recorded_in.active:
            raise RuntimeError("CUDA error: operation not permitted on an event last recorded in a capturing "
                               "stream (emulated)")
        stream.capture = recorded_in
        recorded_in.members.append(stream)
        recorded_in.joined_at[stream.id] = stream.clock.get(stream.id, 0)
    with _lock:
        _merge(stream.clock, event.clock)


def check_event_usable(event, what: str) -> None:
    if event.capture is not None:
        raise RuntimeError(f"CUDA error: operation not permitted on an event last recorded in a capturing stream "
                           f"({what}, emulated)")
