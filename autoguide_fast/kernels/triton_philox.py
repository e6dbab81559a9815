"""Per-image counter-based Gaussian noise in Triton: the generator of ``autoguide_fast.noise``.

Spec (restated from ``autoguide_fast.noise``): for element e of image b, group g = e // 4,
words (r0, r1, r2, r3) = Philox4x32-10(counter = (g lo, g hi, stream, 0), key = (seed_b lo,
seed_b hi)); u_k = ((r_k >> 8) + 1)·2^-24; in float64
z_{4g} = sqrt(-2 ln u0) cos(2π u1), z_{4g+1} = sqrt(-2 ln u0) sin(2π u1), and the same with
(u2, u3) for z_{4g+2}, z_{4g+3}; then rounded to the output dtype.

Kernels work on tiles of [GROUPS_NOISE, 4] elements: one Philox call and two Box–Muller pairs per row,
so no word is computed twice, and the four lanes of a row are adjacent in memory.
"""

# No `from __future__ import annotations`: torch.library infers the op schemas from real
# annotation objects, never from evaluating annotation strings.
import math

import torch
import triton
import triton.language as tl

from . import OP_NAMESPACE
from ._triton_common import GROUPS_NOISE, LAUNCH, check_device, launch_device, round_to, tile_offsets

__all__ = ["normal_tile", "philox4x32_10", "philox4x32_words", "philox_normal"]

_FLOAT_OUT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al. 2011) on uint32 tensors: 10 rounds of
    (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)),
    the key bumped by (W0, W1) between rounds. uint32 arithmetic wraps, as the spec requires."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _box_muller(ra, rb):
    """(sqrt(-2 ln ua) cos(2π ub), sqrt(-2 ln ua) sin(2π ub)) in float64, u = ((r >> 8) + 1)·2^-24."""
    # (r >> 8) + 1 <= 2^24 and the scale is a power of two: u is exact, in (0, 1], never 0.
    ua = ((ra >> 8) + 1).to(tl.float64) * 5.9604644775390625e-08
    ub = ((rb >> 8) + 1).to(tl.float64) * 5.9604644775390625e-08
    # float64 sqrt lowers to the IEEE sqrt.rn.f64 (PTX has no approximate float64 sqrt).
    radius = tl.sqrt(-2.0 * tl.log(ua))
    # 2π as a float64 tensor: a bare literal is an fp32 constant in the interpreter.
    theta = tl.full([], 6.283185307179586, tl.float64) * ub
    return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def normal_tile(seed, g, stream):
    """Float64 noise of the tile [len(g), 4]: row i holds elements 4 g_i .. 4 g_i + 3 of the image
    whose seed is seed_i (int64), for the given stream (an int32 holding the uint32 stream)."""
    # Only builtins here (tl.full, not the jit-defined tl.zeros_like): jit helpers of Triton's
    # standard library are compiled-mode objects if Triton was imported before TRITON_INTERPRET=1.
    zero = tl.full(g.shape, 0, tl.uint32)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = g.to(tl.uint32)
    if g.dtype == tl.int64:
        c1 = (g >> 32).to(tl.uint32)
    else:
        c1 = zero
    c2 = zero + stream.to(tl.uint32, bitcast=True)
    c3 = zero
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    z0, z1 = _box_muller(r0, r1)
    z2, z3 = _box_muller(r2, r3)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(
        lane == 0, z0[:, None], tl.where(lane == 1, z1[:, None], tl.where(lane == 2, z2[:, None], z3[:, None]))
    )


@triton.jit(do_not_specialize=["numel", "philox_stream"])
def _philox_normal_kernel(
    seeds_ptr,                  # int64 [B]
    out_ptr,                    # [B, numel], contiguous
    numel,                      # elements per image
    groups_per_image,           # ceil(numel / 4)
    total_groups,               # B * groups_per_image
    philox_stream,              # uint32 stream, as an int32 (`stream` is a reserved launch keyword)
    GROUPS: tl.constexpr,
    ALIGNED: tl.constexpr,      # numel % 4 == 0
    WIDE: tl.constexpr,         # int64 indices (more than 2^31 - 1 elements in all)
):
    off, mask, b, g, rows = tile_offsets(numel, groups_per_image, total_groups, 0, True, ALIGNED, WIDE, GROUPS)
    seed = tl.load(seeds_ptr + b, mask=rows, other=0)
    z = normal_tile(seed, g, philox_stream)
    tl.store(out_ptr + off, round_to(z, out_ptr.dtype.element_ty), mask=mask)


def _stream_i32(stream: int) -> int:
    if not 0 <= stream < 1 << 32:
        raise ValueError(f"stream: expected an integer in [0, 2^32), got {stream}")
    return stream - (1 << 32) if stream >= 1 << 31 else stream


def _check_philox_args(seeds: torch.Tensor, numel: int, stream: int, dtype: torch.dtype) -> None:
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise TypeError("seeds: expected an int64 tensor of shape [B]")
    check_device("seeds", seeds)
    if numel < 0:
        raise ValueError(f"numel: expected >= 0, got {numel}")
    _stream_i32(stream)
    if dtype not in _FLOAT_OUT:
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")


def _philox_normal_impl(seeds: torch.Tensor, numel: int, stream: int, dtype: torch.dtype) -> torch.Tensor:
    batch = seeds.shape[0]
    if seeds.device.type == "cpu" and dtype == torch.bfloat16:
        # The interpreter (numpy) has no bfloat16: draw float64 and let torch round once, as the spec says.
        return _philox_normal_impl(seeds, numel, stream, torch.float64).to(dtype)
    out = torch.empty((batch, numel), dtype=dtype, device=seeds.device)
    groups_per_image = (numel + 3) // 4
    total_groups = batch * groups_per_image
    if total_groups == 0:
        return out
    grid = (triton.cdiv(total_groups, GROUPS_NOISE),)
    with launch_device(seeds):
        _philox_normal_kernel[grid](
            seeds.contiguous(), out, numel, groups_per_image, total_groups, _stream_i32(stream),
            GROUPS=GROUPS_NOISE, ALIGNED=numel % 4 == 0, WIDE=4 * total_groups + 4 * GROUPS_NOISE >= 2**31, **LAUNCH,
        )
    return out


@torch.library.custom_op(f"{OP_NAMESPACE}::philox_normal", mutates_args=())
def philox_normal(
    seeds: torch.Tensor,        # int64 [B], one seed per image (taken modulo 2^64).
    numel: int,                 # Elements per image.
    stream: int,                # Philox stream in [0, 2^32) (noise.STREAM_INITIAL, noise.churn_stream(i), ...).
    dtype: torch.dtype,         # Output dtype (values computed in float64, rounded once).
) -> torch.Tensor:
    """Standard normal noise [B, numel] of ``autoguide_fast.noise.philox_normal``, on the device of seeds."""
    _check_philox_args(seeds, numel, stream, dtype)
    return _philox_normal_impl(seeds, numel, stream, dtype)


@philox_normal.register_fake
def _(seeds: torch.Tensor, numel: int, stream: int, dtype: torch.dtype) -> torch.Tensor:
    _check_philox_args(seeds, numel, stream, dtype)
    return seeds.new_empty((seeds.shape[0], numel), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Raw Philox words for arbitrary counters and keys (known-answer tests of the block function).


@triton.jit
def _philox_words_kernel(counter_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # 4 i overflows int32 past 2^29
    m = i < n
    c0 = tl.load(counter_ptr + 4 * i + 0, mask=m).to(tl.uint32, bitcast=True)
    c1 = tl.load(counter_ptr + 4 * i + 1, mask=m).to(tl.uint32, bitcast=True)
    c2 = tl.load(counter_ptr + 4 * i + 2, mask=m).to(tl.uint32, bitcast=True)
    c3 = tl.load(counter_ptr + 4 * i + 3, mask=m).to(tl.uint32, bitcast=True)
    k0 = tl.load(key_ptr + 2 * i + 0, mask=m).to(tl.uint32, bitcast=True)
    k1 = tl.load(key_ptr + 2 * i + 1, mask=m).to(tl.uint32, bitcast=True)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 4 * i + 0, r0.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 4 * i + 1, r1.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 4 * i + 2, r2.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 4 * i + 3, r3.to(tl.int32, bitcast=True), mask=m)


def philox4x32_words(counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of counters [N, 4] under keys [N, 2] (uint32 values held in int64): int64 [N, 4]."""
    if counters.dim() != 2 or counters.shape[1] != 4:
        raise ValueError(f"counters: expected shape [N, 4], got {tuple(counters.shape)}")
    if keys.shape != (counters.shape[0], 2):
        raise ValueError(f"keys: expected shape [{counters.shape[0]}, 2], got {tuple(keys.shape)}")
    check_device("counters", counters)
    check_device("keys", keys, counters.device)

    def as_i32(t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.int64) & 0xFFFFFFFF
        return torch.where(t >= 1 << 31, t - (1 << 32), t).to(torch.int32).contiguous()

    n = counters.shape[0]
    out = torch.empty((n, 4), dtype=torch.int32, device=counters.device)
    if n:
        block = 64
        with launch_device(counters):
            _philox_words_kernel[(math.ceil(n / block),)](as_i32(counters), as_i32(keys), out, n, BLOCK=block,
                                                          **LAUNCH)
    return out.to(torch.int64) & 0xFFFFFFFF
