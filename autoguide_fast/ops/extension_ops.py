"""Fake implementations and typed wrappers of the compiled fused ops (``torch.ops.autoguide_fast``).

Importing this module requires the compiled extension (it raises ``ImportError`` otherwise), which
registers the schemas and the CPU (and, in a CUDA build, CUDA) kernels. The fakes give
``torch.compile`` and CUDA-graph capture the output metadata without running anything: every
output is a new contiguous tensor of the state's shape.

Ops (one pass over memory each; scalars are the plan's exact state-dtype values):

* ``euler_step``: D = lerp(D_guide, D_main, w) (autoguidance eq. 2, D_w = D0 + w (D1 - D0); D_main
  alone when D_guide is None), d = (x_hat - D)/t_hat, x_next = x_hat + (t_next - t_hat) d
  (EDM Algorithm 2, lines 7-8) -> (d, x_next); with ``seeds``, x_next also gets the next step's
  churn x_next + churn_scale·eps(seeds, churn_stream) (line 5 of the next step). With
  ``write_d=False`` d is never stored (one write pass less) and comes back as a 0-element tensor
  of the state dtype (shape (0,)); x_next is the same bit for bit.
* ``euler_step_cast``: the same without churn, plus x_next cast to ``cast_dtype`` (the networks'
  input dtype) -> (d, x_next, x_next_cast).
* ``heun_step``: d' = (x_next - D')/t_next, x_out = x_hat + (t_next - t_hat)(d/2 + d'/2)
  (lines 9-11), with the same optional fused churn.
* ``churn``: x + scale·eps, eps explicit or seeded.

``euler_step`` and ``heun_step`` also take ``scalars``: float64 [5] = [w, t_hat, t_next,
churn_scale, churn_stream] on the op's device. The kernels then read those five values from it
(never the host), so a CUDA graph captured once can be replayed for another step after the
engine wrote that step's values into the buffer. D_guide / seeds still decide guided / churned.
* ``philox_normal``: the seeded noise of :mod:`autoguide_fast.noise`, [B, numel].
* ``philox4x32``: raw Philox4x32-10 words (known-answer tests of the generator).
"""

from __future__ import annotations

import torch

from .._extension import extension, extension_error

if extension() is None:
    raise ImportError(f"autoguide_fast.ops.extension_ops needs the compiled extension: {extension_error()}")

__all__ = [
    "OP_NAMES",
    "churn",
    "euler_step",
    "euler_step_cast",
    "has_kernel",
    "heun_step",
    "philox4x32",
    "philox_normal",
]

_ops = torch.ops.autoguide_fast
OP_NAMES = ("euler_step", "euler_step_cast", "heun_step", "churn", "philox_normal", "philox4x32")


def has_kernel(device_type: str) -> bool:
    """Whether this build has kernels of the fused ops for ``device_type`` ("cpu" or "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"autoguide_fast::{name}", key) for name in OP_NAMES
    )


def _like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


def _check_outputs_meta(x_hat: torch.Tensor, D_main: torch.Tensor, D_guide: torch.Tensor | None) -> None:
    for name, D in (("D_main", D_main), ("D_guide", D_guide)):
        if D is not None:
            message = f"{name}: expected shape {x_hat.shape}, got {D.shape}"
            torch._check(D.shape == x_hat.shape, lambda: message)  # noqa: B023 (called at once)


def _check_scalars_meta(scalars: torch.Tensor | None, x_hat: torch.Tensor) -> None:
    if scalars is not None:
        torch._check(
            scalars.dtype == torch.float64 and tuple(scalars.shape) == (5,),
            lambda: f"scalars: expected a float64 tensor of shape [5], got {scalars.dtype} {tuple(scalars.shape)}",
        )
        # A meta `scalars` beside real inputs dispatches here too: refuse rather than return garbage.
        torch._check(scalars.device == x_hat.device,
                     lambda: f"scalars: expected the device of x_hat ({x_hat.device}), got {scalars.device}")


@torch.library.register_fake("autoguide_fast::euler_step")
def _euler_step_fake(x_hat, D_main, D_guide, w, t_hat, t_next, seeds=None, churn_scale=0.0, churn_stream=0,
                     write_d=True, scalars=None):
    _check_outputs_meta(x_hat, D_main, D_guide)
    _check_scalars_meta(scalars, x_hat)
    return (_like(x_hat) if write_d else x_hat.new_empty((0,))), _like(x_hat)


@torch.library.register_fake("autoguide_fast::euler_step_cast")
def _euler_step_cast_fake(x_hat, D_main, D_guide, w, t_hat, t_next, cast_dtype):
    _check_outputs_meta(x_hat, D_main, D_guide)
    return _like(x_hat), _like(x_hat), _like(x_hat, cast_dtype)


@torch.library.register_fake("autoguide_fast::heun_step")
def _heun_step_fake(x_hat, d, x_next, D_main, D_guide, w, t_hat, t_next, seeds=None, churn_scale=0.0, churn_stream=0,
                    scalars=None):
    _check_outputs_meta(x_hat, D_main, D_guide)
    _check_scalars_meta(scalars, x_hat)
    return _like(x_hat)


@torch.library.register_fake("autoguide_fast::churn")
def _churn_fake(x, scale, seeds=None, stream=0, eps=None):
    return _like(x)


@torch.library.register_fake("autoguide_fast::philox_normal")
def _philox_normal_fake(seeds, numel, stream, dtype):
    return seeds.new_empty((seeds.shape[0], numel), dtype=dtype)


@torch.library.register_fake("autoguide_fast::philox4x32")
def _philox4x32_fake(counter, key):
    return torch.empty_like(counter, memory_format=torch.contiguous_format)


def euler_step(
    x_hat: torch.Tensor,                    # State at t_hat (float32/float64, contiguous).
    D_main: torch.Tensor,                   # Main network output at (x_hat, t_hat), any float dtype.
    D_guide: torch.Tensor | None,           # Guide output (same dtype as D_main), None = unguided.
    w: float,                               # Guidance weight (ignored when D_guide is None).
    t_hat: float,
    t_next: float,
    seeds: torch.Tensor | None = None,      # int64 [B]: fuse the next step's churn into x_next.
    churn_scale: float = 0.0,               # Next step's sqrt(t_hat'^2 - t'^2)·S_noise.
    churn_stream: int = 0,                  # Philox stream of that churn.
    write_d: bool = True,                   # False: d is not stored (returned with 0 elements).
    scalars: torch.Tensor | None = None,    # float64 [5] on the device: replaces w .. churn_stream.
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, x_next) of one Euler step with the guided denoiser; see the module docstring."""
    return _ops.euler_step(x_hat, D_main, D_guide, float(w), float(t_hat), float(t_next), seeds,
                           float(churn_scale), int(churn_stream), bool(write_d), scalars)


def euler_step_cast(
    x_hat: torch.Tensor,
    D_main: torch.Tensor,
    D_guide: torch.Tensor | None,
    w: float,
    t_hat: float,
    t_next: float,
    cast_dtype: torch.dtype,                # The networks' input dtype.
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, x_next, x_next.to(cast_dtype)) in one pass."""
    return _ops.euler_step_cast(x_hat, D_main, D_guide, float(w), float(t_hat), float(t_next), cast_dtype)


def heun_step(
    x_hat: torch.Tensor,
    d: torch.Tensor,                        # Euler slope of this step (state dtype).
    x_next: torch.Tensor,                   # Euler prediction at t_next (state dtype).
    D_main: torch.Tensor,                   # Main output at (x_next, t_next).
    D_guide: torch.Tensor | None,
    w: float,
    t_hat: float,
    t_next: float,
    seeds: torch.Tensor | None = None,
    churn_scale: float = 0.0,
    churn_stream: int = 0,
    scalars: torch.Tensor | None = None,    # float64 [5] on the device: replaces w .. churn_stream.
) -> torch.Tensor:
    """x_out of the Heun correction, optionally already churned for the next step."""
    return _ops.heun_step(x_hat, d, x_next, D_main, D_guide, float(w), float(t_hat), float(t_next), seeds,
                          float(churn_scale), int(churn_stream), scalars)


def churn(
    x: torch.Tensor,                        # State at t_cur.
    scale: float,                           # sqrt(t_hat^2 - t_cur^2)·S_noise.
    seeds: torch.Tensor | None = None,      # int64 [B] for seeded noise ...
    stream: int = 0,                        # ... on this Philox stream,
    eps: torch.Tensor | None = None,        # or explicit noise (state dtype): exactly one of the two.
) -> torch.Tensor:
    """x + scale·eps."""
    return _ops.churn(x, float(scale), seeds, int(stream), eps)


def philox_normal(seeds: torch.Tensor, numel: int, stream: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise [B, numel] of :mod:`autoguide_fast.noise` (float32 or float64)."""
    return _ops.philox_normal(seeds, int(numel), int(stream), dtype)


def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of each row: counter int64 [N, 4], key int64 [N, 2] (uint32 values) -> int64 [N, 4]."""
    return _ops.philox4x32(counter, key)
