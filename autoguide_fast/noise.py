"""Per-image, counter-based Gaussian noise: the one generator every backend implements.

Specification (implemented identically in pure torch here, and in Triton, C++ and CUDA C++):

* Philox4x32-10 (Salmon et al., SC'11, "Parallel random numbers: as easy as 1, 2, 3"):
  multipliers M0 = 0xD2511F53, M1 = 0xCD9E8D57, key increments W0 = 0x9E3779B9,
  W1 = 0xBB67AE85. One round maps counter (c0, c1, c2, c3) and key (k0, k1) to
  (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)); the key is bumped by
  (W0, W1) between rounds; 10 rounds.
* Key = the image's seed taken modulo 2^64: k0 = low 32 bits, k1 = high 32 bits.
* Counter = (g mod 2^32, g >> 32, stream, 0), where g = e // 4 for element e of the image
  (row-major index within one image) and ``stream`` names the use: ``STREAM_INITIAL`` (0) for
  the initial noise, ``churn_stream(i)`` = 1 + i for the churn noise injected before step i,
  ``STREAM_LABELS`` for class labels. One Philox call yields the words r0..r3 of elements
  4g .. 4g + 3.
* Uniforms u_k = ((r_k >> 8) + 1) · 2^-24, exact in float32, in (0, 1].
* Class labels (``seeded_labels``): ((r1 << 32) | r0) with its top bit cleared, modulo the number
  of classes, from the words r0, r1 of group 0 of the ``STREAM_LABELS`` stream.
* Box–Muller in float64, then rounded to the requested dtype as torch's ``.to()`` rounds (to
  float16 / bfloat16 through float32):
  z_{4g}   = sqrt(-2 ln u0) cos(2π u1),   z_{4g+1} = sqrt(-2 ln u0) sin(2π u1),
  z_{4g+2} = sqrt(-2 ln u2) cos(2π u3),   z_{4g+3} = sqrt(-2 ln u2) sin(2π u3).

An image's noise therefore depends only on its seed (and the stream), never on its position in
the batch, the batch size or the device count, and any backend can regenerate any element
without state — which makes the draw safe inside CUDA-graph capture.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import torch

__all__ = [
    "STREAM_INITIAL",
    "STREAM_LABELS",
    "churn_stream",
    "philox4x32",
    "philox_normal",
    "philox_uint32",
    "seeded_labels",
    "seeded_noise",
    "seeds_to_device",
    "seeds_to_tensor",
]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF

STREAM_INITIAL = 0
STREAM_LABELS = 0xFFFFFFFF


def churn_stream(step: int) -> int:
    """Philox stream of the churn noise injected before step ``step`` (0-based)."""
    return 1 + step


def seeds_to_device(seeds: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``seeds.to(device)``; from the CPU to a CUDA device through pinned memory, asynchronously
    (a blocking copy would make the host wait until the GPU's queue has drained). The copy reads a
    private pinned buffer, never the caller's tensor: ``pin_memory()`` of an already pinned tensor
    is that tensor, which a caller may refill for its next request before the copy has run."""
    device = torch.device(device)
    if seeds.device.type == "cpu" and device.type == "cuda":
        staged = torch.empty(seeds.shape, dtype=seeds.dtype, pin_memory=True)
        staged.copy_(seeds)
        return staged.to(device, non_blocking=True)
    return seeds.to(device)


def check_target_device(device: Any, kinds: tuple[str, ...] | None = None) -> torch.device:
    """``device`` (the argument of that name) as a torch.device that can hold values and exists here;
    ``kinds``: the device types allowed (None: any that holds values)."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a torch.device, a string or None, got {type(device).__name__}")
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: not a valid device ({exc})") from None
    if kinds is not None and target.type not in kinds:
        raise ValueError(f"device: expected a {' or '.join(k.upper() for k in kinds)} device, got {target}")
    if target.type == "meta":
        raise ValueError("device: expected a device that holds values (the CPU or a GPU), got meta")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {target} requested but CUDA is not available in this process")
    return target


def seeds_to_tensor(seeds: Sequence[int] | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Seeds as an int64 tensor holding each seed modulo 2^64 (two's complement), on ``device``
    (None: a tensor stays on its device, other seeds go to the CPU)."""
    if device is not None:
        device = check_target_device(device)
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool:
            raise TypeError(f"seeds: expected integers, got a tensor of dtype {seeds.dtype}")
        if seeds.dim() != 1:
            raise ValueError(f"seeds: expected a 1-D sequence, got shape {tuple(seeds.shape)}")
        if seeds.is_meta:
            raise ValueError("seeds: expected a tensor with values (on the CPU or a GPU), got a meta tensor")
        seeds_t = seeds.to(torch.int64)
        return seeds_t if device is None else seeds_to_device(seeds_t, device)
    expected = "a sequence of integers (list, tuple, array or tensor), one per image"
    # A set or a mapping has no image order: refused rather than paired with images arbitrarily.
    if isinstance(seeds, (str, bytes, AbstractSet, Mapping)) or not hasattr(seeds, "__len__"):
        raise TypeError(f"seeds: expected {expected}, got {type(seeds).__name__}")
    try:
        items = list(seeds)
    except TypeError:  # e.g. a 0-d array
        raise TypeError(f"seeds: expected {expected}, got {type(seeds).__name__} {seeds!r}") from None
    values = []
    for s in items:
        try:
            if isinstance(s, bool) or not isinstance(s, int) and not hasattr(s, "__index__"):
                raise TypeError
            v = int(s) % (1 << 64)
        except (TypeError, ValueError):  # e.g. a row of a 2-D array
            raise TypeError(f"seeds: expected integers, got {type(s).__name__} ({s!r})") from None
        values.append(v - (1 << 64) if v >= (1 << 63) else v)
    seeds_t = torch.tensor(values, dtype=torch.int64)
    return seeds_t if device is None else seeds_to_device(seeds_t, device)


# 32x32 -> 64-bit product split into (hi, lo) words, emulated exactly in int64.
def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p0 = a * (b & 0xFFFF)  # < 2^48
    p1 = a * (b >> 16)  # < 2^48
    lo = (p0 + ((p1 & 0xFFFF) << 16)) & _MASK32
    hi = ((p0 >> 16) + p1) >> 16
    return hi, lo


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],  # uint32 words in int64
    key: tuple[torch.Tensor, torch.Tensor],                                 # uint32 words in int64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcasting)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(PHILOX_ROUNDS):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _philox_words(seeds: torch.Tensor, groups: int, stream: int) -> torch.Tensor:
    """Words r0..r3 for groups 0..groups-1 of every seed: int64 [B, groups, 4]."""
    device = seeds.device
    seeds = seeds.to(torch.int64).reshape(-1, 1)
    k0 = seeds & _MASK32
    k1 = (seeds >> 32) & _MASK32
    g = torch.arange(groups, dtype=torch.int64, device=device).reshape(1, -1)
    c0 = g & _MASK32
    c1 = g >> 32
    c2 = torch.full_like(g, stream & _MASK32)
    c3 = torch.zeros_like(g)
    words = philox4x32((c0, c1, c2, c3), (k0, k1))
    return torch.stack([w.expand(seeds.shape[0], groups) for w in words], dim=-1)


def philox_uint32(seeds: torch.Tensor, numel: int, stream: int) -> torch.Tensor:
    """Raw 32-bit words (as int64) for elements 0..numel-1 of every seed: [B, numel]."""
    groups = (numel + 3) // 4
    return _philox_words(seeds, groups, stream).reshape(seeds.shape[0], 4 * groups)[:, :numel]


def philox_normal(
    seeds: torch.Tensor,            # int64 [B], one seed per image.
    numel: int,                     # Elements per image.
    stream: int,                    # Philox stream (see the module docstring).
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise [B, numel] following the module's specification."""
    groups = (numel + 3) // 4
    r = _philox_words(seeds, groups, stream)
    u = ((r >> 8) + 1).to(torch.float64) * 2.0 ** -24
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))  # lanes 0, 2
    theta = (2.0 * math.pi) * u[..., 1::2]  # lanes 1, 3
    z = torch.stack([radius * torch.cos(theta), radius * torch.sin(theta)], dim=-1)
    # [B, G, pair, (cos, sin)] -> element order 4g + 2·pair + {0, 1}.
    return z.reshape(seeds.shape[0], 4 * groups)[:, :numel].to(dtype)


def seeded_noise(
    seeds: Sequence[int] | torch.Tensor,        # One integer seed per image.
    shape: Sequence[int],                       # Full shape [len(seeds), ...].
    *,
    device: torch.device | str | None = None,   # Where the noise is made; None = the seeds' device (CPU for a list).
    dtype: torch.dtype = torch.float32,         # Floating dtype of the noise.
    stream: int = STREAM_INITIAL,               # Philox stream in [0, 2^32): the initial noise's by default.
) -> torch.Tensor:
    """Initial noise for the given seeds: image b depends only on ``seeds[b]``."""
    seeds_t = seeds_to_tensor(seeds, device=device)
    expected = f"a full shape [len(seeds) = {seeds_t.shape[0]}, ...] of non-negative integers"
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise TypeError(f"shape: expected {expected}, got {type(shape).__name__} ({shape!r})")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in shape):
        raise TypeError(f"shape: expected {expected}, got {tuple(shape)!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or shape[0] != seeds_t.shape[0] or min(shape) < 0:
        raise ValueError(f"shape: expected {expected}, got {shape}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    if isinstance(stream, bool) or not isinstance(stream, numbers.Integral):
        raise TypeError(f"stream: expected an integer in [0, 2^32), got {type(stream).__name__} ({stream!r})")
    if not 0 <= stream < 1 << 32:
        # One counter word holds it: another value would alias a stream mod 2^32 (e.g. a churn step's).
        raise ValueError(f"stream: expected an integer in [0, 2^32), got {stream}")
    numel = math.prod(shape[1:])
    return philox_normal(seeds_t, numel, int(stream), dtype).reshape(shape)


def seeded_labels(
    seeds: Sequence[int] | torch.Tensor,        # One integer seed per image.
    num_classes: int,                           # Number of classes C.
    *,
    device: torch.device | str | None = None,   # Where the labels are made; None = the seeds' device.
) -> torch.Tensor:
    """Class index per image in [0, C), drawn from the seed's labels stream (int64 [B])."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes: expected a positive integer, got {type(num_classes).__name__} ({num_classes!r})")
    if not 1 <= num_classes < 1 << 63:
        raise ValueError(f"num_classes: expected a positive integer below 2^63, got {num_classes}")
    seeds_t = seeds_to_tensor(seeds, device=device)
    words = philox_uint32(seeds_t, 2, STREAM_LABELS)
    # 64 random bits modulo C: bias below 2^-32 for any practical C.
    value = (words[:, 1] << 32 | words[:, 0]) & ((1 << 63) - 1)
    return value % num_classes
