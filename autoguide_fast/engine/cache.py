"""The cache of prepared samplers behind ``fast_guided_sample`` on CUDA tensors.

Key: (main and guide network identities, noise shape, device, label shape and dtype, the full
``SamplerConfig``, backend name, check_finite). Networks are held weakly: caching never keeps a
model alive, and an entry whose network died is dropped (and its memory released) at the next
cache operation. Bounded LRU (``set_cache_size``); an evicted sampler releases its graphs, memory
pool and buffers. ``clear_cache()`` releases everything and empties the CUDA allocator cache.
The cache has its own lock; each sampler has its own (see ``GuidedSampler``).
"""

from __future__ import annotations

import dataclasses
import numbers
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..plan import SamplerConfig
from .cuda_graphs import autocast_state
from .guided_sampler import GuidedSampler
from .networks import NetworkRef, network_identity

__all__ = ["DEFAULT_CACHE_SIZE", "SamplerCache", "cache_info", "clear_cache", "sample_cached", "set_cache_size"]

DEFAULT_CACHE_SIZE = 4


class SamplerCache:
    """A thread-safe LRU of ``GuidedSampler`` objects keyed by what makes a prepared sampler reusable."""

    def __init__(self, size: int = DEFAULT_CACHE_SIZE) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, GuidedSampler] = OrderedDict()
        self._size = _check_size(size)
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        with self._lock:
            dropped = self._drop_dead()
            n = len(self._entries)
        _release_all(dropped)
        return n

    @property
    def size(self) -> int:
        return self._size

    def get(self, key: tuple, net: Callable, gnet: Callable | None,
            factory: Callable[[], GuidedSampler]) -> tuple[GuidedSampler, bool]:
        """The cached sampler for ``key`` or a new one from ``factory``; also whether it is cached
        (with size 0 nothing is, and the caller releases the sampler after use)."""
        with self._lock:
            dropped = self._drop_dead()
            sampler = self._entries.get(key)
            if sampler is not None and not _matches(sampler, net, gnet):
                dropped.append(self._entries.pop(key))  # A recycled id: same key, other network.
                sampler = None
            if sampler is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        _release_all(dropped)
        if sampler is not None:
            return sampler, True
        created = factory()  # Host-side only; outside the lock.
        with self._lock:
            existing = self._entries.get(key)
            if existing is not None and _matches(existing, net, gnet):
                self._entries.move_to_end(key)  # Another thread inserted it meanwhile.
                return existing, True
            if self._size == 0:
                return created, False
            self._entries[key] = created
            evicted = self._shrink()
        _release_all(evicted)
        return created, True

    def set_size(self, n: int) -> None:
        n = _check_size(n)
        with self._lock:
            self._size = n
            # Samplers of networks that are gone first: they never serve again, and they must not
            # push a live one out.
            evicted = self._drop_dead() + self._shrink()
        _release_all(evicted)

    def clear(self) -> None:
        with self._lock:
            dropped = list(self._entries.values())
            self._entries.clear()
        _release_all(dropped)

    def info(self) -> dict[str, int]:
        with self._lock:
            dropped = self._drop_dead()
            info = {"entries": len(self._entries), "size": self._size, "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}
        _release_all(dropped)
        return info

    def _shrink(self) -> list[GuidedSampler]:
        evicted = []
        while len(self._entries) > self._size:
            evicted.append(self._entries.popitem(last=False)[1])
            self.evictions += 1
        return evicted

    def _drop_dead(self) -> list[GuidedSampler]:
        dead = [key for key, s in self._entries.items() if not all(ref.alive for ref in s._nets)]
        return [self._entries.pop(key) for key in dead]


def _check_size(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n: expected a non-negative integer (the number of cached samplers), got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n: expected a non-negative integer (the number of cached samplers), got {n}")
    return int(n)


def _matches(sampler: GuidedSampler, net: Callable, gnet: Callable | None) -> bool:
    return sampler._nets[0].refers_to(net) and sampler._nets[1].refers_to(gnet)


def _release_all(samplers: list[GuidedSampler]) -> None:
    # Outside the cache lock: release() waits for a call in flight on that sampler to finish.
    for sampler in samplers:
        sampler.release()


_CACHE = SamplerCache()


def sampler_key(net, gnet, noise: torch.Tensor, labels: torch.Tensor | None, config: SamplerConfig,
                backend: str, check_finite: bool) -> tuple:
    label_part = None if labels is None else (tuple(labels.shape), labels.dtype)
    # The scalars' types too: np.float32(80) == 80.0 (same hash), but the official formula computes
    # sigma_max ** (1 / rho) in float32 for the one and in float64 for the other (another schedule).
    types = tuple(type(getattr(config, f.name)) for f in dataclasses.fields(config))
    # The autocast state: a graph captured under autocast replays at that precision.
    return (network_identity(net), network_identity(gnet), tuple(noise.shape), str(noise.device), label_part,
            config, types, backend, check_finite, autocast_state())


def sample_cached(
    net: Callable,                          # Main network.
    gnet: Callable | None,                  # Guide network.
    noise: torch.Tensor,                    # Unit noise (any floating dtype; shape and device are key parts).
    labels: torch.Tensor | None,            # On noise's device, or None.
    config: SamplerConfig,                  # Validated sampler arguments.
    backend: str,                           # Backend name as requested ("auto", ...).
    seeds: torch.Tensor | None,             # Per-image churn seeds, or None for torch.randn_like churn.
    check_finite: bool,
    *,
    cache: SamplerCache | None = None,      # None = the process-wide cache.
) -> torch.Tensor:
    """``fast_guided_sample`` through a cached ``GuidedSampler`` (graph and streams on "auto")."""
    cache = _CACHE if cache is None else cache
    key = sampler_key(net, gnet, noise, labels, config, backend, check_finite)

    def factory() -> GuidedSampler:
        kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        sampler = GuidedSampler(
            net, gnet, noise_shape=tuple(noise.shape), device=noise.device,
            label_shape=None if labels is None else tuple(labels.shape),
            label_dtype=torch.float32 if labels is None else labels.dtype,
            backend=backend, check_finite=check_finite, **kwargs,
        )
        sampler._nets = (NetworkRef(net, weak=True), NetworkRef(gnet, weak=True))
        sampler._caller = "fast_guided_sample"
        return sampler

    sampler, cached = cache.get(key, net, gnet, factory)
    try:
        return sampler(noise, labels, seeds)
    finally:
        if not cached:
            sampler.release()


def clear_cache() -> None:
    """Release every cached sampler (graphs, memory pools, buffers) and empty the CUDA allocator
    cache so the memory goes back to the device."""
    _CACHE.clear()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def set_cache_size(n: int) -> None:
    """Keep at most ``n`` prepared samplers (least recently used evicted first; 0 = no caching)."""
    _CACHE.set_size(n)


def cache_info() -> dict[str, int]:
    """Entries, size bound, hits, misses and evictions of the process-wide cache."""
    return _CACHE.info()
