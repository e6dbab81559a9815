"""Load the official EDM2 network snapshots (``edm2-img512-s-2147483-0.070.pkl`` and the like)
into ``autoguide_fast.models.edm2.Precond``, without the official code and without running any
code from the file.

The release pickles its networks with a "persistent class" mechanism: every module is stored as a
call ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta`` holds the source
code of the module's Python file, the class name and the object's state (for a ``torch.nn.Module``
its ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``, and the constructor's
``_init_args`` / ``_init_kwargs``). Unpickling it normally executes that embedded source. Here a
restricted unpickler resolves only the functions that rebuild tensors and parameters (storages
are read with ``torch.load(weights_only=True)``); the persistent-object call returns an inert
record of the class name and state, and every other global becomes an inert placeholder that
records its arguments. Nothing from the file is executed. The network is then rebuilt from the
main object's constructor keywords and its parameters and buffers loaded by name (the release's
names, which ``Precond`` keeps).
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from collections import OrderedDict
from typing import IO, Any

import torch

from .edm2 import Precond

__all__ = ["PersistentObject", "load_edm2_snapshot", "read_edm2_snapshot", "snapshot_network"]

_PERSISTENT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
_TORCH_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
}


class PersistentObject:
    """An object of a persistent class of the release, not reconstructed: its class name and state."""

    def __init__(self, class_name: str, state: dict) -> None:
        self.class_name = class_name
        self.state = state

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name})"


class _Opaque:
    """Stands for any other global of the file: records how it was called, runs nothing."""

    _origin = "?"
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        obj = super().__new__(cls)
        obj.args, obj.kwargs = args, kwargs
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # Items of a pickled dict or list subclass arrive through these: recorded, nothing more.
    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f"<opaque {self._origin}>"


class _EasyDict(dict):
    """The release's attribute dict, read as a plain dict (an instance state, if any, is dropped)."""

    def __setstate__(self, state: Any) -> None:
        pass


def _persistent(meta: Any) -> PersistentObject:
    if not isinstance(meta, dict) or "class_name" not in meta or "state" not in meta:
        raise pickle.UnpicklingError("a persistent object without class_name/state: not an EDM2 snapshot")
    state = meta["state"]
    return PersistentObject(str(meta["class_name"]), dict(state) if isinstance(state, dict) else {})


def _storage_from_bytes(data: bytes) -> Any:
    # The release's tensors pickle their storage as torch.save bytes: read them without code.
    return torch.load(io.BytesIO(data), weights_only=True)


def _fresh(fn: Any) -> Any:
    """A new function object per lookup: a BUILD opcode aimed at it (setting ``__defaults__`` and
    the like) changes only this copy, never a function of torch or of this module."""
    return lambda *args, **kwargs: fn(*args, **kwargs)


class _SnapshotUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == _PERSISTENT:
            return _fresh(_persistent)
        if (module, name) in _TORCH_REBUILDERS:
            return _fresh(super().find_class(module, name))
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _fresh(_storage_from_bytes)
        if (module, name) == ("_codecs", "encode"):  # Bytes in pickle protocols 0-2.
            return _fresh(codecs.encode)
        # Classes: builtins cannot be changed by BUILD; this module's own class is subclassed afresh.
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("dnnlib.util", "EasyDict"):  # The snapshot itself is one (a dict subclass).
            return type("EasyDict", (_EasyDict,), {})
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset"):
            return {"set": set, "frozenset": frozenset}[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (_Opaque,), {"_origin": f"{module}.{name}"})


def read_edm2_snapshot(file: str | os.PathLike | IO[bytes]) -> dict:
    """The snapshot's top-level dict (``ema``, ``encoder``, ...) with inert objects inside."""
    try:
        if isinstance(file, (str, os.PathLike)):
            with open(file, "rb") as f:
                data = _SnapshotUnpickler(f).load()
        else:
            data = _SnapshotUnpickler(file).load()
    except OSError:
        raise
    except Exception as exc:  # Truncated, empty or foreign bytes (a zip archive, garbage).
        raise ValueError(f"file: not a readable EDM2 snapshot (a pickle file): {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"file: expected an EDM2 snapshot (a pickled dict with 'ema'), got {type(data).__name__}")
    return data


def _module_state(obj: Any) -> dict | None:
    """The stored ``__dict__`` of a module: a persistent object's state, or that of a plain torch
    module (``ModuleDict``, ``ModuleList``...) pickled the usual way (an inert record here)."""
    state = getattr(obj, "state", None)
    if isinstance(obj, (PersistentObject, _Opaque)) and isinstance(state, dict) and "_modules" in state:
        return state
    return None


def _module_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Parameters and persistent buffers of a stored module tree, by dotted name (like state_dict)."""
    state = _module_state(obj)
    if state is None:  # Only at the top: a sub-module is checked before it is entered (below).
        raise ValueError("file: the network's record holds no modules (no _modules in its stored state)")
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if _module_state(child) is not None:
            _module_tensors(child, f"{prefix}{name}.", out)
        elif child is not None:
            raise ValueError(f"file: sub-module {prefix + name} is not a stored module ({child!r})")


def _check_dtype(dtype: Any) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")


def _check_size(kwargs: dict, stored: int) -> None:
    """The constructor arguments must not describe a bigger network than the file holds: every
    U-Net block has several stored tensors, so more blocks than stored tensors is a malformed (or
    hostile) file, refused before anything is built."""
    mult, num_blocks = kwargs.get("channel_mult", (1, 2, 3, 4)), kwargs.get("num_blocks", 3)
    if not isinstance(mult, (list, tuple)) or isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
        raise ValueError(f"file: malformed channel_mult / num_blocks in the constructor arguments {kwargs}")
    blocks = len(mult) * (2 * num_blocks + 3)  # Encoder: num_blocks (+1 downsampling), decoder: num_blocks + 1 (+1).
    if blocks > stored:
        raise ValueError(f"file: the constructor arguments describe {blocks} U-Net blocks, but the file stores "
                         f"only {stored} tensors")


def snapshot_network(
    data: dict,                             # A snapshot read by read_edm2_snapshot.
    key: str = "ema",                       # Entry of the snapshot holding the network.
    *,
    dtype: torch.dtype | None = None,       # Parameter dtype; None = as stored (float16 or float32).
) -> Precond:
    """The network of a snapshot read by ``read_edm2_snapshot``, as a ``Precond`` (see
    ``load_edm2_snapshot``)."""
    _check_dtype(dtype)
    if key not in data:
        raise KeyError(f"key: {key!r} is not in the snapshot (it has {sorted(map(str, data))})")
    obj = data[key]
    if not isinstance(obj, PersistentObject):
        raise ValueError(f"key: {key!r} holds {obj!r}, not a stored network")
    if obj.class_name != "Precond":
        raise ValueError(f"key: {key!r} holds a {obj.class_name}, expected the release's Precond")
    args = obj.state.get("_init_args") or ()
    kwargs = obj.state.get("_init_kwargs")
    if args or not isinstance(kwargs, dict):
        raise ValueError("file: the network's constructor arguments were not recorded (expected keyword "
                         f"arguments in _init_kwargs, got args={args!r}, kwargs={kwargs!r})")
    kwargs = {str(k): v for k, v in kwargs.items()}
    tensors: dict[str, torch.Tensor] = {}
    _module_tensors(obj, "", tensors)
    _check_size(kwargs, len(tensors))
    try:
        with torch.device("meta"):  # No random initialisation: every tensor comes from the file.
            net = Precond(**kwargs)
    except Exception as exc:  # Whatever the recorded arguments make the constructor raise.
        raise ValueError(f"file: cannot build Precond from the snapshot's arguments {kwargs}: "
                         f"{type(exc).__name__}: {exc}") from exc
    tensors = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
               for k, v in tensors.items()}
    try:
        # assign=True: the stored tensors themselves (their dtype: the release's float16 or float32).
        net.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"file: the stored tensors do not fit Precond({kwargs}): {exc}") from exc
    left = [name for name, t in net.state_dict().items() if t.is_meta]
    if left:
        raise ValueError(f"file: no stored value for {left[:5]}")
    return net.eval().requires_grad_(False)


def load_edm2_snapshot(
    file: str | os.PathLike | IO[bytes],    # Path of an official EDM2 .pkl snapshot, or an open binary file.
    key: str = "ema",                       # Entry of the snapshot holding the network.
    *,
    dtype: torch.dtype | None = None,       # Parameter dtype; None = as stored (float16 or float32).
) -> Precond:
    """An official EDM2 snapshot's network as a ``Precond`` (eval mode, gradients off), with the
    release's weights bit for bit; runs no code from the file (see the module docstring)."""
    _check_dtype(dtype)  # Before reading what may be gigabytes.
    return snapshot_network(read_edm2_snapshot(file), key, dtype=dtype)
