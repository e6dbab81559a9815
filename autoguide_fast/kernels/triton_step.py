"""The fused sampler step in Triton: guided denoiser, Euler/Heun update and churn noise, one pass.

Per element, in the sampler's state dtype and with the reference's rounding after every
operation (EDM Algorithm 2 with the guided denoiser of autoguidance eq. 2):

* guided denoiser  D_w = D0 + w (D1 - D0) = torch.lerp(D0, D1, w): one fma,
  fma(w, D1 - D0, D0) if |w| < 0.5 else fma(w - 1, D1 - D0, D1) (torch's rule); D = D1 unguided;
* ``euler_step`` (lines 7-8):  d = (x_hat - D)/t_hat,  x_next = x_hat + (t_next - t_hat) d;
* ``heun_step`` (lines 9-11):  d' = (x_next - D')/t_next,
  x_out = x_hat + (t_next - t_hat)(0.5 d + 0.5 d');
* churn of the next step fused into either (lines 4-6 of step i+1):
  x_hat' = x + sqrt(t_hat'^2 - t'^2) S_noise eps, eps the per-image Philox noise of
  ``autoguide_fast.noise`` (seed read from device memory, stream churn_stream(i+1));
* ``churn``: the same injection on its own, with Philox noise or an explicit eps.

Scalars arrive as Python floats holding the plan's exact values and are rounded to the state
dtype in the kernel, as torch rounds a Python scalar; t_next - t_hat is computed in the state
dtype like the reference's tensor subtraction. The network outputs may have any float dtype;
they are widened (exactly) or rounded to the state dtype like ``D.to(dtype)``.

``euler_step`` and ``heun_step`` also take the scalars from device memory: ``scalars``, a float64
tensor [w, t_hat, t_next, noise_scale, stream] (stream an integer in [0, 2^32)), is read by the
kernel and replaces those Python values in the arithmetic (same rounding, bit-identical results),
so a CUDA graph captured once per kind of step replays any step after a copy into that tensor.
The Python arguments still select the compiled variant (w None or not, |w| < 0.5, churn or not).

Every op is a ``torch.library`` custom op with a fake implementation, so it works under
``torch.compile`` and inside CUDA-graph capture (no host synchronisation, no allocation besides
its outputs). Inputs that are not contiguous are copied to contiguous memory first (an extra
pass); outputs are contiguous.
"""

# No `from __future__ import annotations`: torch.library infers the op schemas from real
# annotation objects, never from evaluating annotation strings.
import math
from typing import cast, overload

import torch
import triton
import triton.language as tl

from . import OP_NAMESPACE
from ._triton_common import (
    GROUPS,
    GROUPS_NOISE,
    LAUNCH,
    check_device,
    check_float_tensor,
    check_same_shape,
    compiled_flag,
    exact_fma,
    exact_rn,
    f64_bits,
    launch_device,
    round_to,
    scalar_from_bits,
    tile_offsets,
)
from .triton_philox import normal_tile

__all__ = ["benchmark", "churn", "euler_step", "heun_step"]

_STATE_DTYPES = (torch.float32, torch.float64)
_NET_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The Philox stream is `philox_stream` in kernel signatures: Triton's launcher reserves the keyword
# `stream` (it refuses a kernel argument passed by that name: the launch always uses torch's
# current CUDA stream), which the interpreter does not check.
_SCALARS = ["w_hi", "w_lo", "th_hi", "th_lo", "tn_hi", "tn_lo", "ns_hi", "ns_lo", "philox_stream"]
_SIZES = ["numel", "groups_per_image", "total_groups", "total"]


# ---------------------------------------------------------------------------------------------
# Device functions.


@triton.jit
def _denoised(dm_ptr, dg_ptr, off, mask, w,
              GUIDED: tl.constexpr, W_SMALL: tl.constexpr, COMPILED: tl.constexpr):
    """D_w = lerp(D0, D1, w) (autoguidance eq. 2) in w's dtype (the state dtype); D1 if unguided."""
    state = w.dtype
    d1 = tl.load(dm_ptr + off, mask=mask, other=0).to(state)
    if GUIDED:
        d0 = tl.load(dg_ptr + off, mask=mask, other=0).to(state)
        diff = exact_rn(d1, d0, "sub", COMPILED)
        # torch.lerp's two branches keep the result exact at w = 0 and w = 1 (one rounding each).
        if W_SMALL:
            res = exact_fma(tl.broadcast_to(w, diff.shape), diff, d0, COMPILED)
        else:
            res = exact_fma(tl.broadcast_to(w - 1.0, diff.shape), diff, d1, COMPILED)
    else:
        res = d1
    return res


@triton.jit
def _add_churn(x, seeds_ptr, b, g, rows, scale, stream, COMPILED: tl.constexpr):
    """x + scale·eps with eps the image's Philox noise for (g, stream), rounded to x's dtype first."""
    seed = tl.load(seeds_ptr + b, mask=rows, other=0)
    eps = normal_tile(seed, g, stream).to(x.dtype)
    return exact_rn(x, exact_rn(tl.broadcast_to(scale, eps.shape), eps, "mul", COMPILED), "add", COMPILED)


@triton.jit
def _load_scalar(scalars_ptr, index, DTYPE: tl.constexpr):
    """Element index of the float64 scalars, rounded to nearest in DTYPE like scalar_from_bits."""
    return tl.load(scalars_ptr + index).to(DTYPE)


@triton.jit
def _load_stream(scalars_ptr):
    """The Philox stream stored as a float64 integer in [0, 2^32), as the uint32 that normal_tile
    reinterprets (exact: the float64 holds the integer exactly). A value out of that range (or NaN)
    reads as 0, as in the CUDA kernels (csrc/step_params.h); CPU tensors are checked on the host."""
    value = tl.load(scalars_ptr + 4)
    valid = (value >= 0.0) & (value < 4294967296.0)
    return tl.where(valid, value, 0.0).to(tl.int64).to(tl.uint32)


@triton.jit
def _step_scalars(scalars_ptr, w_hi, w_lo, th_hi, th_lo, tn_hi, tn_lo, ns_hi, ns_lo, philox_stream,
                  DTYPE: tl.constexpr):
    """(w, t_hat, t_next, noise_scale) in DTYPE and the Philox stream: loaded from memory when
    scalars_ptr is a pointer, else from the launch's arguments (the int 0 the host passes without
    scalars). The flag is the argument's type, not a constexpr parameter: launches without scalars
    (and the PTX check's signatures, an i32 per lowercase argument) compile the code they did before;
    values a kernel does not use are dead code."""
    HAS_SCALARS: tl.constexpr = scalars_ptr.dtype.is_ptr()
    if HAS_SCALARS:
        w = _load_scalar(scalars_ptr, 0, DTYPE)
        t_hat = _load_scalar(scalars_ptr, 1, DTYPE)
        t_next = _load_scalar(scalars_ptr, 2, DTYPE)
        noise_scale = _load_scalar(scalars_ptr, 3, DTYPE)
        churn_stream = _load_stream(scalars_ptr)
    else:
        w = scalar_from_bits(w_hi, w_lo, DTYPE)
        t_hat = scalar_from_bits(th_hi, th_lo, DTYPE)
        t_next = scalar_from_bits(tn_hi, tn_lo, DTYPE)
        noise_scale = scalar_from_bits(ns_hi, ns_lo, DTYPE)
        churn_stream = philox_stream
    return w, t_hat, t_next, noise_scale, churn_stream


# ---------------------------------------------------------------------------------------------
# Kernels.


@triton.jit(do_not_specialize=_SCALARS + _SIZES)
def _euler_step_kernel(
    x_ptr, dm_ptr, dg_ptr, seeds_ptr,           # inputs (dg_ptr / seeds_ptr unused unless GUIDED / CHURN)
    d_ptr, xn_ptr, xc_ptr,                      # outputs (d_ptr / xc_ptr unused unless WRITE_D / CAST)
    w_hi, w_lo, th_hi, th_lo, tn_hi, tn_lo, ns_hi, ns_lo, philox_stream,
    scalars_ptr,                                # float64 [w, t_hat, t_next, noise_scale, stream]; 0: the bits above
    numel, groups_per_image, total_groups, total,
    GUIDED: tl.constexpr, W_SMALL: tl.constexpr, WRITE_D: tl.constexpr, CAST: tl.constexpr,
    CHURN: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr, COMPILED: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """EDM Algorithm 2, lines 7-8 with D = D_w, optionally followed by the next step's churn (lines 4-6)."""
    state = x_ptr.dtype.element_ty
    off, mask, b, g, rows = tile_offsets(numel, groups_per_image, total_groups, total, CHURN, ALIGNED, WIDE, GROUPS)
    w, t_hat, t_next, noise_scale, churn_stream = _step_scalars(
        scalars_ptr, w_hi, w_lo, th_hi, th_lo, tn_hi, tn_lo, ns_hi, ns_lo, philox_stream, state)
    step = t_next - t_hat
    x = tl.load(x_ptr + off, mask=mask, other=0)
    den = _denoised(dm_ptr, dg_ptr, off, mask, w, GUIDED, W_SMALL, COMPILED)
    d = exact_rn(exact_rn(x, den, "sub", COMPILED), tl.broadcast_to(t_hat, x.shape), "div", COMPILED)
    x_next = exact_rn(x, exact_rn(tl.broadcast_to(step, d.shape), d, "mul", COMPILED), "add", COMPILED)
    if CHURN:
        x_next = _add_churn(x_next, seeds_ptr, b, g, rows, noise_scale, churn_stream, COMPILED)
    if WRITE_D:
        tl.store(d_ptr + off, d, mask=mask)
    tl.store(xn_ptr + off, x_next, mask=mask)
    if CAST:
        tl.store(xc_ptr + off, round_to(x_next, xc_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_SCALARS + _SIZES)
def _heun_step_kernel(
    x_ptr, d_ptr, xn_ptr, dm_ptr, dg_ptr, seeds_ptr,    # inputs
    out_ptr, xc_ptr,                                    # outputs
    w_hi, w_lo, th_hi, th_lo, tn_hi, tn_lo, ns_hi, ns_lo, philox_stream,
    scalars_ptr,                                        # float64 [w, t_hat, t_next, noise_scale, stream]; or 0
    numel, groups_per_image, total_groups, total,
    GUIDED: tl.constexpr, W_SMALL: tl.constexpr, CAST: tl.constexpr,
    CHURN: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr, COMPILED: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """EDM Algorithm 2, lines 9-11 with D' = D_w at (x_next, t_next), optionally followed by the next churn."""
    state = x_ptr.dtype.element_ty
    off, mask, b, g, rows = tile_offsets(numel, groups_per_image, total_groups, total, CHURN, ALIGNED, WIDE, GROUPS)
    w, t_hat, t_next, noise_scale, churn_stream = _step_scalars(
        scalars_ptr, w_hi, w_lo, th_hi, th_lo, tn_hi, tn_lo, ns_hi, ns_lo, philox_stream, state)
    step = t_next - t_hat
    x = tl.load(x_ptr + off, mask=mask, other=0)
    d = tl.load(d_ptr + off, mask=mask, other=0)
    x_next = tl.load(xn_ptr + off, mask=mask, other=0)
    den = _denoised(dm_ptr, dg_ptr, off, mask, w, GUIDED, W_SMALL, COMPILED)
    d_prime = exact_rn(exact_rn(x_next, den, "sub", COMPILED), tl.broadcast_to(t_next, x.shape), "div", COMPILED)
    # 0.5·d and 0.5·d' (exact but where they underflow), their sum and the update are rounded separately,
    # as in the reference: (d + d')·0.5 would differ at the smallest subnormals and where d + d' overflows.
    slope = exact_rn(d * 0.5, d_prime * 0.5, "add", COMPILED)
    x_out = exact_rn(x, exact_rn(tl.broadcast_to(step, slope.shape), slope, "mul", COMPILED), "add", COMPILED)
    if CHURN:
        x_out = _add_churn(x_out, seeds_ptr, b, g, rows, noise_scale, churn_stream, COMPILED)
    tl.store(out_ptr + off, x_out, mask=mask)
    if CAST:
        tl.store(xc_ptr + off, round_to(x_out, xc_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_SCALARS + _SIZES)
def _churn_kernel(
    x_ptr, eps_ptr, seeds_ptr, out_ptr, xc_ptr,
    ns_hi, ns_lo, philox_stream,
    numel, groups_per_image, total_groups, total,
    FROM_SEEDS: tl.constexpr, CAST: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr,
    COMPILED: tl.constexpr, GROUPS: tl.constexpr,
):
    """EDM Algorithm 2, lines 4-6: x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps."""
    state = x_ptr.dtype.element_ty
    off, mask, b, g, rows = tile_offsets(
        numel, groups_per_image, total_groups, total, FROM_SEEDS, ALIGNED, WIDE, GROUPS
    )
    scale = scalar_from_bits(ns_hi, ns_lo, state)
    x = tl.load(x_ptr + off, mask=mask, other=0)
    if FROM_SEEDS:
        out = _add_churn(x, seeds_ptr, b, g, rows, scale, philox_stream, COMPILED)
    else:
        eps = tl.load(eps_ptr + off, mask=mask, other=0)
        out = exact_rn(x, exact_rn(tl.broadcast_to(scale, eps.shape), eps, "mul", COMPILED), "add", COMPILED)
    tl.store(out_ptr + off, out, mask=mask)
    if CAST:
        tl.store(xc_ptr + off, round_to(out, xc_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side: checks (shared by the real and the fake implementations), launch geometry.


def _check_state(x_hat: object) -> torch.Tensor:
    x_hat = check_float_tensor("x_hat", x_hat, _STATE_DTYPES)
    check_device("x_hat", x_hat)
    return x_hat


def _check_like(name: str, t: object, x_hat: torch.Tensor, same_dtype: bool) -> None:
    t = check_float_tensor(name, t, (x_hat.dtype,) if same_dtype else _NET_DTYPES)
    check_device(name, t, x_hat.device)
    check_same_shape(name, t, x_hat)


def _check_denoiser(x_hat: torch.Tensor, D_main: object, D_guide: object, w: float | None) -> None:
    _check_like("D_main", D_main, x_hat, same_dtype=False)
    if w is not None:
        if not math.isfinite(w):
            raise ValueError(f"w: expected a finite guidance weight, got {w}")
        if D_guide is None:
            raise ValueError("D_guide: required when w is given (pass w=None for an unguided evaluation)")
        _check_like("D_guide", D_guide, x_hat, same_dtype=False)


def _check_churn(x_hat: torch.Tensor, seeds: torch.Tensor | None, noise_scale: float | None, stream: int) -> None:
    if (seeds is None) != (noise_scale is None):
        raise ValueError("seeds, noise_scale: give both (fused churn) or neither")
    if seeds is None or noise_scale is None:  # Both or neither (checked above).
        return
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise TypeError("seeds: expected an int64 tensor of shape [B]")
    if x_hat.dim() < 1 or seeds.shape[0] != x_hat.shape[0]:
        raise ValueError(f"seeds: expected one seed per image ({x_hat.shape[0] if x_hat.dim() else 0}), "
                         f"got {seeds.shape[0]}")
    check_device("seeds", seeds, x_hat.device)
    if not math.isfinite(noise_scale):
        raise ValueError(f"noise_scale: expected a finite number, got {noise_scale}")
    if not 0 <= stream < 1 << 32:
        raise ValueError(f"stream: expected an integer in [0, 2^32), got {stream}")


def _check_scalars(x_hat: torch.Tensor, scalars: object) -> None:
    # Layout, dtype and device only: the values live on the device, and reading them would
    # synchronise (and fail inside CUDA-graph capture).
    if scalars is None:
        return
    expected = "a contiguous float64 tensor of shape [5] ([w, t_hat, t_next, noise_scale, stream])"
    if not isinstance(scalars, torch.Tensor):
        raise TypeError(f"scalars: expected {expected}, got {type(scalars).__name__}")
    if scalars.dtype != torch.float64:
        raise TypeError(f"scalars: expected {expected}, got dtype {scalars.dtype}")
    if scalars.shape != (5,):
        raise ValueError(f"scalars: expected {expected}, got shape {tuple(scalars.shape)}")
    if not scalars.is_contiguous():
        raise ValueError(f"scalars: expected {expected}, got strides {scalars.stride()}")
    # x_hat's device is already a valid one: the same device is all the kernel needs.
    if scalars.device != x_hat.device:
        raise ValueError(f"scalars: expected {expected} on {x_hat.device} (like x_hat), got one on {scalars.device}")


def _check_cast(cast_dtype: torch.dtype | None) -> None:
    if cast_dtype is not None and cast_dtype not in _NET_DTYPES:
        raise TypeError(f"cast_dtype: expected a floating dtype or None, got {cast_dtype}")


def _i32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def _geometry(x: torch.Tensor, per_image: bool) -> tuple[tuple[int], dict, dict]:
    """Grid, size arguments and layout constexprs for x's shape."""
    total = x.numel()
    numel = total // x.shape[0] if per_image and x.shape[0] else total
    groups_per_image = (numel + 3) // 4
    total_groups = (total // numel if numel else 0) * groups_per_image if per_image else (total + 3) // 4
    sizes = {"numel": numel, "groups_per_image": groups_per_image, "total_groups": total_groups, "total": total}
    flags = {
        "ALIGNED": numel % 4 == 0,
        "WIDE": 4 * total_groups + 4 * GROUPS >= 2**31,
        "COMPILED": compiled_flag(),
        "GROUPS": GROUPS_NOISE if per_image else GROUPS,
    }
    return (triton.cdiv(total_groups, flags["GROUPS"]),), sizes, flags


def _scalars(w: float | None, t_hat: float, t_next: float, noise_scale: float | None, stream: int) -> dict:
    out = {}
    for name, value in (("w", w), ("th", t_hat), ("tn", t_next), ("ns", noise_scale)):
        out[f"{name}_hi"], out[f"{name}_lo"] = f64_bits(0.0 if value is None else value)
    out["philox_stream"] = _i32(stream)
    return out


def _scalars_arg(scalars: torch.Tensor | None) -> torch.Tensor | int:
    # Without device scalars the kernel gets the int 0 (not a dummy pointer): its type is the
    # kernel's HAS_SCALARS flag. 0, not 1: Triton makes an int argument equal to 1 a constant.
    if scalars is not None and scalars.device.type == "cpu":
        # (The interpreter.) Host memory: the stream is checked as the cpp ops check it; on a GPU
        # the kernel reads a value out of range as 0 (reading it here would synchronise).
        stream = float(scalars[4])
        if not (0.0 <= stream < 4294967296.0 and stream == math.floor(stream)):
            raise RuntimeError(f"scalars[4]: expected a Philox stream, an integer in [0, 2^32), got {stream}")
    return 0 if scalars is None else scalars


def _w_small(w: float | None, dtype: torch.dtype) -> bool:
    # torch decides the lerp branch on the weight rounded to the computation dtype.
    if w is None:
        return True
    rounded = torch.tensor(w, dtype=torch.float64).to(dtype).item()
    return abs(rounded) < 0.5


@overload
def _net_input(t: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor: ...
@overload
def _net_input(t: None, x_hat: torch.Tensor) -> None: ...
def _net_input(t: torch.Tensor | None, x_hat: torch.Tensor) -> torch.Tensor | None:
    """Contiguous, and on CPU (the interpreter has no bfloat16) bfloat16 widened exactly to float32."""
    if t is None:
        return None
    if t.dtype == torch.bfloat16 and x_hat.device.type == "cpu":
        t = t.to(torch.float32)
    return t.contiguous()


def _cast_target(cast_dtype: torch.dtype | None, x_hat: torch.Tensor) -> torch.dtype | None:
    # The interpreter cannot store bfloat16: it writes the state dtype and torch rounds once after.
    if cast_dtype == torch.bfloat16 and x_hat.device.type == "cpu":
        return x_hat.dtype
    return cast_dtype


# ---------------------------------------------------------------------------------------------
# Ops.


@torch.library.custom_op(f"{OP_NAMESPACE}::euler_step", mutates_args=())
def euler_step(
    x_hat: torch.Tensor,                # State at t_hat [B, ...], float32 or float64 (the state dtype).
    D_main: torch.Tensor,               # D1(x_hat, t_hat), same shape, any float dtype.
    D_guide: torch.Tensor | None,       # D0(x_hat, t_hat), or None when w is None (never read then).
    w: float | None,                    # Guidance weight; None = unguided (D = D1).
    t_hat: float,                       # Noise level of x_hat (exactly representable in the state dtype).
    t_next: float,                      # Noise level of the result.
    seeds: torch.Tensor | None,         # int64 [B]: fuse the next step's churn; None = no churn.
    noise_scale: float | None,          # sqrt(t_hat'^2 - t'^2)·S_noise of the next step, with seeds.
    stream: int,                        # Philox stream of that churn (noise.churn_stream(i + 1)).
    cast_dtype: torch.dtype | None,     # Also return x_next in this dtype (the networks' input); None = no.
    write_d: bool,                      # Write d (needed by a Heun correction); False returns an empty d.
    scalars: torch.Tensor | None = None,  # float64 [5] on x_hat's device, [w, t_hat, t_next, noise_scale,
                                          # stream]: read by the kernel instead of the Python values, so a
                                          # captured CUDA graph replays any step (None = the Python values).
) -> list[torch.Tensor]:
    """Fused Euler step: returns [d, x_next] (+ [x_next in cast_dtype]); x_next includes the churn if fused."""
    _check_euler(x_hat, D_main, D_guide, w, seeds, noise_scale, stream, cast_dtype, scalars)
    x_hat = x_hat.contiguous()
    churn_on = seeds is not None
    grid, sizes, flags = _geometry(x_hat, churn_on)
    d = torch.empty_like(x_hat) if write_d else x_hat.new_empty(0)
    x_next = torch.empty_like(x_hat)
    target = _cast_target(cast_dtype, x_hat)
    x_cast = torch.empty_like(x_hat, dtype=target) if target is not None else None
    if x_hat.numel():
        D_main = _net_input(D_main, x_hat)
        D_guide = _net_input(D_guide, x_hat) if w is not None else None
        with launch_device(x_hat):
            _euler_step_kernel[grid](
                x_hat, D_main, D_guide if D_guide is not None else D_main,
                seeds.contiguous() if seeds is not None else x_hat,
                d if write_d else x_next, x_next, x_cast if x_cast is not None else x_next,
                **_scalars(w, t_hat, t_next, noise_scale, stream), scalars_ptr=_scalars_arg(scalars), **sizes,
                GUIDED=w is not None, W_SMALL=_w_small(w, x_hat.dtype), WRITE_D=write_d, CAST=x_cast is not None,
                CHURN=churn_on, **flags, **LAUNCH,
            )
    out = [d, x_next]
    if cast_dtype is not None:
        x_cast = cast(torch.Tensor, x_cast)  # Allocated whenever cast_dtype is given.
        out.append(x_cast.to(cast_dtype) if target != cast_dtype else x_cast)
    return out


def _check_euler(x_hat, D_main, D_guide, w, seeds, noise_scale, stream, cast_dtype, scalars=None) -> None:
    x_hat = _check_state(x_hat)
    _check_denoiser(x_hat, D_main, D_guide, w)
    _check_churn(x_hat, seeds, noise_scale, stream)
    _check_cast(cast_dtype)
    _check_scalars(x_hat, scalars)


@euler_step.register_fake
def _(x_hat, D_main, D_guide, w, t_hat, t_next, seeds, noise_scale, stream, cast_dtype, write_d, scalars=None):
    _check_euler(x_hat, D_main, D_guide, w, seeds, noise_scale, stream, cast_dtype, scalars)
    shape = x_hat.shape
    out = [x_hat.new_empty(shape if write_d else (0,)), x_hat.new_empty(shape)]
    if cast_dtype is not None:
        out.append(x_hat.new_empty(shape, dtype=cast_dtype))
    return out


@torch.library.custom_op(f"{OP_NAMESPACE}::heun_step", mutates_args=())
def heun_step(
    x_hat: torch.Tensor,                # State at t_hat (the state dtype).
    d: torch.Tensor,                    # Euler slope of this step (state dtype).
    x_next: torch.Tensor,               # Euler prediction at t_next (state dtype).
    D_main: torch.Tensor,               # D1(x_next, t_next), any float dtype.
    D_guide: torch.Tensor | None,       # D0(x_next, t_next), or None when w is None.
    w: float | None,                    # Guidance weight at t_next; None = unguided.
    t_hat: float,
    t_next: float,
    seeds: torch.Tensor | None,         # int64 [B]: fuse the next step's churn; None = no churn.
    noise_scale: float | None,          # Churn scale of the next step, with seeds.
    stream: int,                        # Philox stream of that churn.
    cast_dtype: torch.dtype | None,     # Also return x_out in this dtype; None = no.
    scalars: torch.Tensor | None = None,  # float64 [5], [w, t_hat, t_next, noise_scale, stream]: read by the
                                          # kernel instead of the Python values (as in euler_step).
) -> list[torch.Tensor]:
    """Fused Heun correction: returns [x_out] (+ [x_out in cast_dtype]); x_out includes the churn if fused."""
    _check_heun(x_hat, d, x_next, D_main, D_guide, w, seeds, noise_scale, stream, cast_dtype, scalars)
    x_hat, d, x_next = x_hat.contiguous(), d.contiguous(), x_next.contiguous()
    churn_on = seeds is not None
    grid, sizes, flags = _geometry(x_hat, churn_on)
    x_out = torch.empty_like(x_hat)
    target = _cast_target(cast_dtype, x_hat)
    x_cast = torch.empty_like(x_hat, dtype=target) if target is not None else None
    if x_hat.numel():
        D_main = _net_input(D_main, x_hat)
        D_guide = _net_input(D_guide, x_hat) if w is not None else None
        with launch_device(x_hat):
            _heun_step_kernel[grid](
                x_hat, d, x_next, D_main, D_guide if D_guide is not None else D_main,
                seeds.contiguous() if seeds is not None else x_hat,
                x_out, x_cast if x_cast is not None else x_out,
                **_scalars(w, t_hat, t_next, noise_scale, stream), scalars_ptr=_scalars_arg(scalars), **sizes,
                GUIDED=w is not None, W_SMALL=_w_small(w, x_hat.dtype), CAST=x_cast is not None,
                CHURN=churn_on, **flags, **LAUNCH,
            )
    out = [x_out]
    if cast_dtype is not None:
        x_cast = cast(torch.Tensor, x_cast)  # Allocated whenever cast_dtype is given.
        out.append(x_cast.to(cast_dtype) if target != cast_dtype else x_cast)
    return out


def _check_heun(x_hat, d, x_next, D_main, D_guide, w, seeds, noise_scale, stream, cast_dtype, scalars=None) -> None:
    x_hat = _check_state(x_hat)
    _check_like("d", d, x_hat, same_dtype=True)
    _check_like("x_next", x_next, x_hat, same_dtype=True)
    _check_denoiser(x_hat, D_main, D_guide, w)
    _check_churn(x_hat, seeds, noise_scale, stream)
    _check_cast(cast_dtype)
    _check_scalars(x_hat, scalars)


@heun_step.register_fake
def _(x_hat, d, x_next, D_main, D_guide, w, t_hat, t_next, seeds, noise_scale, stream, cast_dtype, scalars=None):
    _check_heun(x_hat, d, x_next, D_main, D_guide, w, seeds, noise_scale, stream, cast_dtype, scalars)
    out = [x_hat.new_empty(x_hat.shape)]
    if cast_dtype is not None:
        out.append(x_hat.new_empty(x_hat.shape, dtype=cast_dtype))
    return out


@torch.library.custom_op(f"{OP_NAMESPACE}::churn", mutates_args=())
def churn(
    x: torch.Tensor,                    # State at t_cur (float32 or float64).
    noise_scale: float,                 # sqrt(t_hat^2 - t_cur^2)·S_noise.
    seeds: torch.Tensor | None,         # int64 [B]: Philox noise of each image's seed; None = use eps.
    eps: torch.Tensor | None,           # Explicit noise like x (same dtype), used when seeds is None.
    stream: int,                        # Philox stream (noise.churn_stream(i)); ignored with eps.
    cast_dtype: torch.dtype | None,     # Also return x_hat in this dtype; None = no.
) -> list[torch.Tensor]:
    """Churn alone: returns [x_hat] (+ [x_hat in cast_dtype]), x_hat = x + noise_scale·eps."""
    _check_churn_op(x, noise_scale, seeds, eps, stream, cast_dtype)
    x = x.contiguous()
    from_seeds = seeds is not None
    grid, sizes, flags = _geometry(x, from_seeds)
    out = torch.empty_like(x)
    target = _cast_target(cast_dtype, x)
    x_cast = torch.empty_like(x, dtype=target) if target is not None else None
    if x.numel():
        with launch_device(x):
            _churn_kernel[grid](
                x, x if from_seeds else cast(torch.Tensor, eps).contiguous(),  # eps: checked given without seeds.
                seeds.contiguous() if seeds is not None else x,
                out, x_cast if x_cast is not None else out,
                *f64_bits(noise_scale), _i32(stream), **sizes,
                FROM_SEEDS=from_seeds, CAST=x_cast is not None, **flags, **LAUNCH,
            )
    res = [out]
    if cast_dtype is not None:
        x_cast = cast(torch.Tensor, x_cast)  # Allocated whenever cast_dtype is given.
        res.append(x_cast.to(cast_dtype) if target != cast_dtype else x_cast)
    return res


def _check_churn_op(x, noise_scale, seeds, eps, stream, cast_dtype) -> None:
    x = check_float_tensor("x", x, _STATE_DTYPES)
    check_device("x", x)
    if seeds is None:
        if eps is None:
            raise ValueError("seeds, eps: give seeds (Philox noise) or eps (explicit noise)")
        _check_like("eps", eps, x, same_dtype=True)
        if not math.isfinite(noise_scale):
            raise ValueError(f"noise_scale: expected a finite number, got {noise_scale}")
    else:
        _check_churn(x, seeds, noise_scale, stream)
    _check_cast(cast_dtype)


@churn.register_fake
def _(x, noise_scale, seeds, eps, stream, cast_dtype):
    _check_churn_op(x, noise_scale, seeds, eps, stream, cast_dtype)
    out = [x.new_empty(x.shape)]
    if cast_dtype is not None:
        out.append(x.new_empty(x.shape, dtype=cast_dtype))
    return out


# ---------------------------------------------------------------------------------------------
# Benchmark helper.


def benchmark(
    shape: tuple[int, ...],                     # Full state shape [B, ...].
    *,
    op: str = "euler",                          # "euler" (first evaluation) or "heun" (correction).
    guided: bool = True,                        # Read the guide output (w = 2.1) or not.
    churn_next: bool = False,                   # Fuse the next step's Philox churn.
    state_dtype: torch.dtype = torch.float32,
    net_dtype: torch.dtype = torch.float32,     # Dtype of the network outputs.
    device: str | torch.device = "cuda",
    warmup: int = 10,
    iters: int = 100,
) -> dict[str, float]:
    """Median time of one fused op and its effective bandwidth (bytes read + written once / time).

    Times with CUDA events on a CUDA device (the op replayed ``iters`` times), wall clock otherwise."""
    import time

    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    x, d, xn = rand(state_dtype), rand(state_dtype), rand(state_dtype)
    dm = rand(net_dtype)
    dg = rand(net_dtype) if guided else None
    w = 2.1 if guided else None
    seeds = torch.arange(shape[0], dtype=torch.int64, device=device) if churn_next else None
    ns = 0.3 if churn_next else None
    net_bytes = dm.numel() * dm.element_size() * (2 if guided else 1)
    if op == "euler":
        def call() -> object:
            return euler_step(x, dm, dg, w, 10.0, 8.0, seeds, ns, 2, None, True)

        moved = x.numel() * x.element_size() * 3 + net_bytes       # x_hat in; d, x_next out.
    elif op == "heun":
        def call() -> object:
            return heun_step(x, d, xn, dm, dg, w, 10.0, 8.0, seeds, ns, 2, None)

        moved = x.numel() * x.element_size() * 4 + net_bytes       # x_hat, d, x_next in; x_out out.
    else:
        raise ValueError(f"op: expected 'euler' or 'heun', got {op!r}")
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    ms = times[len(times) // 2]
    return {"ms": ms, "gbps": moved / (ms * 1e-3) / 1e9, "bytes": float(moved)}
