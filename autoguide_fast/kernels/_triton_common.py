"""Shared pieces of the Triton op modules: argument checks, scalar passing, IEEE-exact arithmetic.

Importing this module imports Triton.
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.jit import JITFunction

__all__ = [
    "GROUPS",
    "GROUPS_NOISE",
    "INTERPRETED",
    "LAUNCH",
    "NUM_WARPS",
    "check_device",
    "check_float_tensor",
    "check_same_shape",
    "compiled_flag",
    "exact_fma",
    "exact_rn",
    "f64_bits",
    "launch_device",
    "scalar_from_bits",
    "tile_offsets",
]

# Rows of 4 elements per program. Plain passes: 256 rows (1024 elements, 8 per thread with 4
# warps, 16-byte accesses). Passes that draw noise: 128 rows (one Philox call and two float64
# Box-Muller pairs per thread), which keeps them near 60 registers instead of ~115 at 256 rows,
# so enough warps stay resident to saturate memory bandwidth (ptxas, sm_90).
GROUPS = 256
GROUPS_NOISE = 128
NUM_WARPS = 4
# Launch options of every kernel. The reference rounds after each operation and keeps subnormals:
# no fmul+fadd contraction (LLVM and ptxas), and libdevice without flush-to-zero. (The
# interpreter ignores them.)
LAUNCH = {"num_warps": NUM_WARPS, "enable_fp_fusion": False, "enable_reflect_ftz": False}

_NOT_CUDA = "triton kernels need a CUDA device, or TRITON_INTERPRET=1 for CPU tensors"


def check_device(name: str, tensor: torch.Tensor, device: torch.device | None = None) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter; all on one device."""
    if tensor.device.type == "cuda":
        pass
    elif tensor.device.type == "cpu" and INTERPRETED:
        pass
    else:
        raise ValueError(f"{name}: {_NOT_CUDA}; got a tensor on {tensor.device}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like x_hat), got one on {tensor.device}")


def launch_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes the tensor's CUDA device current for a launch. Triton launches on torch's *current*
    device and its current stream, whatever device the pointers live on: a tensor on cuda:1 while
    cuda:0 is current would be read through the wrong context (illegal address)."""
    if tensor.device.type == "cuda" and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def check_float_tensor(name: str, tensor: object, dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is None:
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {tensor.dtype}")
    elif tensor.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(str(d) for d in dtypes)}, got {tensor.dtype}")
    return tensor


def check_same_shape(name: str, tensor: torch.Tensor, like: torch.Tensor, like_name: str = "x_hat") -> None:
    if tensor.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} (like {like_name}), got {tuple(tensor.shape)}")


def f64_bits(value: float) -> tuple[int, int]:
    """A Python float as the (high, low) 32-bit halves of its IEEE binary64 pattern, each a signed int32.

    Triton passes Python floats to kernels as fp32; the halves carry a double exactly, and as
    int32 values of fixed type they never trigger a recompilation (the kernels mark them
    ``do_not_specialize``).
    """
    (bits,) = struct.unpack("<Q", struct.pack("<d", float(value)))
    hi, lo = bits >> 32, bits & 0xFFFFFFFF
    return (hi - (1 << 32) if hi >= 1 << 31 else hi), (lo - (1 << 32) if lo >= 1 << 31 else lo)


@triton.jit
def scalar_from_bits(hi, lo, DTYPE: tl.constexpr):
    """The double carried by (hi, lo), rounded to nearest in DTYPE (torch's scalar-to-dtype rule)."""
    bits = (hi.to(tl.int64) << 32) | (lo.to(tl.int64) & 0xFFFFFFFF)
    return bits.to(tl.float64, bitcast=True).to(DTYPE)


@triton.jit
def tile_offsets(numel, groups_per_image, total_groups, total,
                 PER_IMAGE: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr, GROUPS: tl.constexpr):
    """Offsets and mask of this program's [GROUPS, 4] tile, each row's image b and Philox group g,
    and which rows exist.

    PER_IMAGE: rows are the per-image groups of 4 (the noise needs (b, g)); otherwise rows are
    groups of 4 of the flat tensor (total elements). ALIGNED: the image size (PER_IMAGE) or the
    total size is a multiple of 4, so the element of row q, lane k is at 4q + k: the tile is one
    contiguous run of memory and rows are full (vectorised accesses)."""
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    q = pid * GROUPS + tl.arange(0, GROUPS)
    lane = tl.arange(0, 4)[None, :]
    rows = q < total_groups
    if PER_IMAGE:
        b = q // groups_per_image
        g = q - b * groups_per_image
    else:
        b = q
        g = q
    if ALIGNED:
        # A row-wise mask is constant across the 4 lanes, which lets Triton emit 16-byte accesses.
        off = q[:, None] * 4 + lane
        mask = tl.broadcast_to(rows[:, None], (GROUPS, 4))
    elif PER_IMAGE:
        e = g[:, None] * 4 + lane
        off = b[:, None] * numel + e
        mask = rows[:, None] & (e < numel)
    else:
        off = q[:, None] * 4 + lane
        mask = off < total
    return off, mask, b, g, rows


# IEEE-exact arithmetic. The reference rounds after every operation; compiled for the GPU, Triton
# (and ptxas) would contract a*b + c into one fma, so the compiled path uses libdevice's *_rn
# functions, which are never contracted. The interpreter evaluates with numpy, one correctly
# rounded operation at a time, and has no libdevice, hence the COMPILED switch (a constexpr).
@triton.jit
def exact_rn(a, b, OP: tl.constexpr, COMPILED: tl.constexpr):
    if COMPILED:
        if OP == "add":
            r = libdevice.add_rn(a, b)
        elif OP == "sub":
            r = libdevice.sub_rn(a, b)
        elif OP == "mul":
            r = libdevice.mul_rn(a, b)
        else:
            r = libdevice.div_rn(a, b)
    else:
        if OP == "add":
            r = a + b
        elif OP == "sub":
            r = a - b
        elif OP == "mul":
            r = a * b
        else:
            r = a / b
    return r


@triton.jit
def exact_fma(a, b, c, COMPILED: tl.constexpr):
    """a*b + c with one rounding (torch.lerp's rule)."""
    if COMPILED:
        r = tl.fma(a, b, c)
    elif a.dtype == tl.float32:
        # The interpreter's fma rounds twice. In float64 the fp32 product is exact, so only the
        # sum is rounded before the final rounding to fp32: a true fma except in rare
        # double-rounding cases (a float64 sum landing exactly on a float32 tie).
        r = (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    else:
        # No exact float64 fma in the interpreter: two roundings (CPU tests are toleranced).
        r = a * b + c
    return r


@triton.jit
def round_to(v, DST: tl.constexpr):
    """v in dtype DST, rounded as torch's ``.to()`` rounds: float64 to float16/bfloat16 goes
    through float32 (c10's Half/BFloat16 are built from a float), not in one step; the two differ
    on ~6e-5 of float16 and ~9e-6 of bfloat16 values."""
    if v.dtype == tl.float64 and (DST == tl.float16 or DST == tl.bfloat16):
        r = v.to(tl.float32).to(DST)
    else:
        r = v.to(DST)
    return r


# Whether this process runs the kernels in Triton's interpreter: fixed when the kernels were
# defined (TRITON_INTERPRET=1 at that moment), whatever the environment says later.
# Tested against the compiled kind: triton.runtime.interpreter (where InterpretedFunction lives)
# imports numpy, which compiled Triton does not need.
INTERPRETED = not isinstance(scalar_from_bits, JITFunction)


def compiled_flag() -> bool:
    """COMPILED constexpr: False when the interpreter runs the kernels."""
    return not INTERPRETED

