"""How the engine holds a network: identity (for cache keys), strong or weak reference, and the
parameter-storage signature that tells a captured CUDA graph it is stale.

A CUDA graph stores raw device pointers. A network whose parameters or buffers were *replaced*
(``module.weight = nn.Parameter(...)``, ``module.to(...)``, ``load_state_dict(..., assign=True)``)
now reads other memory than the graph does, so the engine re-captures. In-place updates
(``load_state_dict`` without ``assign``, ``param.copy_()``, an optimiser step) keep the storage
and are seen by the graph automatically.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["NetworkRef", "network_identity", "parameter_signature"]


def _module_of(fn: Any) -> torch.nn.Module | None:
    """The module whose tensors a callable reads: itself, or the owner of a bound method."""
    if isinstance(fn, torch.nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    if isinstance(fn, types.MethodType) and isinstance(owner, torch.nn.Module):
        return owner
    return None


# Per root module: its submodules, each with the children it had when listed. Checked on every call
# (a replaced submodule changes its parent's children), re-listed only when the tree changed. Held
# through weak references only: a value that referred to its key (root.modules() yields the root)
# would keep the module, and every network sampled, alive forever.
_MODULE_LISTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weak(m: torch.nn.Module | None) -> Callable[[], Any]:
    return (lambda: None) if m is None else weakref.ref(m)


def _unchanged(listed: list[tuple[Callable[[], Any], tuple]]) -> bool:
    for module_ref, child_refs in listed:
        m = module_ref()
        if m is None:
            return False
        if tuple(m._modules.values()) != tuple([r() for r in child_refs]):  # Modules compare by identity.
            return False
    return True


def _modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    listed = _MODULE_LISTS.get(root)
    if listed is not None and _unchanged(listed):
        return [module_ref() for module_ref, _ in listed]
    modules = list(root.modules())
    _MODULE_LISTS[root] = [(weakref.ref(m), tuple(_weak(c) for c in m._modules.values())) for m in modules]
    return modules


def parameter_signature(fn: Any) -> tuple:
    """The storage pointer, dtype, shape and strides of every parameter and buffer of a module
    network, in module order (a replacement may land at the captured address with another dtype
    or layout); () for any other callable (its tensors cannot be enumerated, so their replacement
    is not seen).

    Called before every replay, so it avoids ``Module.parameters()`` (a recursive generator with
    name bookkeeping, ~0.2 ms for EDM2-S on a CPU core): the submodule list is cached and only the tensors'
    pointers are read (~0.1 ms)."""
    module = _module_of(fn)
    if module is None:
        return ()
    sig = []
    for m in _modules(module):
        for tensors in (m._parameters, m._buffers):
            for t in tensors.values():
                if t is not None:
                    sig.append((t.data_ptr(), t.dtype, t.shape, t.stride()))
    return tuple(sig)


def network_identity(fn: Any) -> tuple | None:
    """A hashable identity: the object's id, or (owner id, function id) for a bound method (a new
    bound-method object is made on every attribute access, so its own id means nothing)."""
    if fn is None:
        return None
    if isinstance(fn, types.MethodType):
        return ("method", id(fn.__self__), id(fn.__func__))
    return ("object", id(fn))


class NetworkRef:
    """A strong or weak reference to a network callable (or to None).

    The cache holds its samplers' networks weakly so that caching never keeps a model alive;
    callables that cannot be weakly referenced are held strongly (their id then cannot be reused
    while the entry lives, so the identity stays sound).
    """

    def __init__(self, fn: Callable | None, *, weak: bool = False) -> None:
        self.identity = network_identity(fn)
        self._strong: Callable | None = fn
        self._weak: Callable[[], Any] | None = None
        if fn is not None and weak:
            try:
                self._weak = weakref.WeakMethod(fn) if isinstance(fn, types.MethodType) else weakref.ref(fn)
                self._strong = None
            except TypeError:
                pass

    @property
    def alive(self) -> bool:
        return self._weak is None or self._weak() is not None

    def get(self) -> Callable | None:
        if self._weak is None:
            return self._strong
        fn = self._weak()
        if fn is None:
            raise ReferenceError("the network of this cached sampler was garbage-collected")
        return fn

    def refers_to(self, fn: Any) -> bool:
        """True if this reference still designates ``fn`` (guards against a recycled id)."""
        if fn is None or self.identity is None:
            return fn is None and self.identity is None
        if not self.alive:
            return False
        mine = self.get()
        if isinstance(fn, types.MethodType):
            return (isinstance(mine, types.MethodType) and mine.__self__ is fn.__self__
                    and mine.__func__ is fn.__func__)
        return mine is fn
