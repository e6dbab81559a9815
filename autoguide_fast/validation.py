"""Argument checks of the public sampling API: every error names the argument and what is expected,
and is raised before any network is called or any GPU work is queued."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import torch

from .backends import BACKEND_NAMES
from .noise import seeds_to_tensor

SOLVERS = ("heun", "euler")
# State dtypes: those torch computes the schedule in (arange, pow) on every device.
STATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _real(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        # In the official sampler a tensor here computes the schedule (or the churn) in the tensor's
        # dtype, rounding differently from a Python number: refused rather than silently different.
        raise TypeError(f"{name}: expected a real number, got a tensor (pass float({name}); only guidance "
                        "may be a 0-dim tensor)")
    # Python and NumPy numbers only: the official sampler hands these to tensor ops, which take no
    # other numbers (a Fraction there fails part-way, or works on one backend and not another).
    numpy_scalar = type(value).__module__ == "numpy"  # np.float32 and the like, without importing NumPy.
    plain_number = isinstance(value, (int, float)) or numpy_scalar
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not plain_number:
        raise TypeError(f"{name}: expected a real number (int, float or a NumPy scalar), got "
                        f"{type(value).__name__} ({value!r})")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name}: expected a number, got NaN")
    return value


def check_callable(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not callable(value):
        raise TypeError(f"{name}: expected a callable, got {type(value).__name__}")


def check_schedule(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise, *, min_steps: int = 2):
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise TypeError(f"num_steps: expected an integer >= {min_steps}, got {type(num_steps).__name__}")
    if num_steps < min_steps:
        raise ValueError(f"num_steps: expected an integer >= {min_steps}, got {num_steps}")
    sigma_min = _real("sigma_min", sigma_min)
    sigma_max = _real("sigma_max", sigma_max)
    if not (sigma_min > 0 and math.isfinite(sigma_min)):
        raise ValueError(f"sigma_min: expected a finite value > 0, got {sigma_min}")
    if not math.isfinite(sigma_max) or not sigma_max >= sigma_min:
        raise ValueError(f"sigma_max: expected a finite value >= sigma_min = {sigma_min}, got {sigma_max}")
    rho_value = _real("rho", rho)
    if not (rho_value > 0 and math.isfinite(rho_value)):
        raise ValueError(f"rho: expected a finite value > 0, got {rho}")
    S_churn_value = _real("S_churn", S_churn)
    if not S_churn_value >= 0:
        raise ValueError(f"S_churn: expected >= 0, got {S_churn}")
    S_noise_value = _real("S_noise", S_noise)
    # Finite where it scales noise (S_churn > 0); unused otherwise, as in the official sampler.
    if not S_noise_value >= 0 or (S_churn_value > 0 and not math.isfinite(S_noise_value)):
        raise ValueError(f"S_noise: expected a finite value >= 0, got {S_noise}")
    _real("S_min", S_min)
    _real("S_max", S_max)


def check_guidance(guidance, gnet, guidance_interval, dtype: torch.dtype):
    w = _real("guidance", guidance)
    if not math.isfinite(w):
        raise ValueError(f"guidance: expected a finite number, got {guidance}")
    # The official torch.lerp takes a number weight in float32 for every state dtype but float64
    # and raises beyond float32's range (after the networks ran); the fused kernels would return inf.
    f32_max = torch.finfo(torch.float32).max
    if dtype != torch.float64 and w != 1 and abs(w) > f32_max:
        raise ValueError(f"guidance: {guidance} is beyond float32's range (|w| <= {f32_max:.8g}), in which "
                         f"torch.lerp (the official sampler) takes the weight for a {dtype} state")
    if w != 1 and not callable(gnet):
        raise TypeError(f"gnet: a guide network is required when guidance != 1 (guidance={w}); "
                        f"expected a callable, got {type(gnet).__name__}")
    if guidance_interval is None:
        return None
    if not isinstance(guidance_interval, (tuple, list)) or len(guidance_interval) != 2:
        raise ValueError(f"guidance_interval: expected a pair (sigma_lo, sigma_hi), got {guidance_interval!r}")
    lo = _real("guidance_interval[0]", guidance_interval[0])
    hi = _real("guidance_interval[1]", guidance_interval[1])
    if not (0 <= lo < hi):
        raise ValueError(f"guidance_interval: expected 0 <= sigma_lo < sigma_hi, got ({lo}, {hi})")
    return (lo, hi)


def check_time_steps(num_steps, sigma_min, sigma_max, rho, dtype: torch.dtype) -> None:
    """The schedule t_0 > ... > t_{N-1} > 0 must hold finite, non-zero noise levels in the state dtype
    (the official formula, computed as the samplers compute it): otherwise every step divides by zero
    or carries NaN, and the networks would be blamed for it. Names the argument that breaks it."""
    # The scalars' types are part of the key: np.float32(80) == 80.0, but the formula then
    # computes in float32. Cached: a serving loop's calls repeat the same few schedules.
    problem = _schedule_problem(int(num_steps), sigma_min, sigma_max, rho, dtype,
                                (type(sigma_min), type(sigma_max), type(rho)))
    if problem is not None:
        raise ValueError(problem)


@functools.lru_cache(maxsize=256)
def _schedule_problem(num_steps: int, sigma_min, sigma_max, rho, dtype: torch.dtype, types: tuple) -> str | None:
    from .reference import edm_time_steps  # Lazy: reference is only needed once the scalars are valid.

    finfo = torch.finfo(dtype)
    for name, value in (("sigma_max", sigma_max), ("sigma_min", sigma_min)):
        rounded = float(torch.tensor(float(value), dtype=dtype))
        if not math.isfinite(rounded) or rounded == 0:
            return (f"{name}: {value} is not a usable noise level in dtype {dtype} (it rounds to {rounded}; "
                    f"{dtype} holds {finfo.tiny:g} to {finfo.max:g}); pick another {name} or dtype")
    try:
        t = edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype, "cpu")[:-1]
    except OverflowError:  # sigma ** (1 / rho) beyond a Python float.
        return (f"rho: {rho} is too small for sigma_max = {sigma_max}: sigma_max ** (1 / rho) overflows; "
                f"expected a larger rho (the EDM default is 7)")
    bad = ~torch.isfinite(t) | (t == 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        return (f"rho: with rho = {rho}, sigma_min = {sigma_min} and sigma_max = {sigma_max} the official "
                f"schedule gives t_{i} = {float(t[i])} in dtype {dtype} (out of its range, or lost to rounding), "
                f"and the sampler divides by it; expected a larger rho (the EDM default is 7), a narrower "
                f"sigma range or a wider dtype")
    return None


# The defaults of the arguments a custom schedule replaces (they must be left at these with sigmas).
FORMULA_DEFAULTS = {"num_steps": 32, "sigma_min": 0.002, "sigma_max": 80, "rho": 7}


def check_sigmas(sigmas, dtype: torch.dtype, formula: dict[str, Any]) -> tuple[float, ...]:
    """A custom schedule as the tuple t_0 > ... > t_{N-1} > 0 of Python floats (a final 0, as
    k-diffusion's schedules end, is dropped: t_N = 0 is always appended). ``formula``: the values
    given for num_steps, sigma_min, sigma_max and rho, which it replaces (they must be at their
    defaults: a schedule of one and a formula of the other would be silently ambiguous)."""
    for name, value in formula.items():
        if value != FORMULA_DEFAULTS[name]:
            raise ValueError(f"{name}: not used with a custom schedule (sigmas); leave it at its default "
                             f"({FORMULA_DEFAULTS[name]}), the schedule gives its own number of steps and levels")
    expected = "a 1-D sequence of decreasing noise levels t_0 > ... > t_{N-1} > 0 (optionally a final 0), N >= 2"
    if isinstance(sigmas, torch.Tensor):
        if sigmas.dim() != 1 or not sigmas.dtype.is_floating_point or sigmas.is_meta:
            raise TypeError(f"sigmas: expected {expected}, got a tensor of shape {tuple(sigmas.shape)} and dtype "
                            f"{sigmas.dtype}{' on meta' if sigmas.is_meta else ''}")
        values = [float(v) for v in sigmas.detach().cpu().double().tolist()]  # Read once, on the host.
    else:
        if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__len__"):
            raise TypeError(f"sigmas: expected {expected}, got {type(sigmas).__name__}")
        values = [_real(f"sigmas[{i}]", v) for i, v in enumerate(sigmas)]
    if values and values[-1] == 0:
        values = values[:-1]
    if len(values) < 2:
        raise ValueError(f"sigmas: expected {expected}, got {len(values)} level(s) above 0")
    rounded = torch.tensor(values, dtype=torch.float64).to(dtype).double().tolist()
    for i, (v, r) in enumerate(zip(values, rounded)):
        if not (math.isfinite(v) and v > 0 and math.isfinite(r) and r > 0):
            raise ValueError(f"sigmas: expected {expected}; sigmas[{i}] = {v} is not a finite level > 0 "
                             f"in dtype {dtype}")
        if i and not r < rounded[i - 1]:
            raise ValueError(f"sigmas: expected {expected}; sigmas[{i}] = {v} is not below sigmas[{i - 1}] = "
                             f"{values[i - 1]} in dtype {dtype}")
    return tuple(values)


def check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or dtype not in STATE_DTYPES:
        raise TypeError(f"dtype: expected one of {', '.join(map(str, STATE_DTYPES))}, got {dtype!r}")


def check_flag(name: str, value: Any) -> bool:
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        value = bool(value)  # A NumPy bool scalar (np.bool_).
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} ({value!r})")
    return value


def check_noise(noise, values: bool = True) -> None:
    """Type, dtype and shape of ``noise``; with ``values`` also that it holds no NaN/Inf (on a GPU
    that check makes the host wait for the GPU: callers skip it when asked not to sync)."""
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise: expected a torch.Tensor, got {type(noise).__name__}")
    if not noise.dtype.is_floating_point:
        raise TypeError(f"noise: expected a floating tensor, got dtype {noise.dtype}")
    if noise.is_meta:
        raise ValueError("noise: expected a tensor with values (on the CPU or a GPU), got a meta tensor")
    check_dense("noise", noise)
    if noise.dim() < 1 or noise.numel() == 0:
        raise ValueError(f"noise: expected a non-empty tensor [batch, ...], got shape {tuple(noise.shape)}")
    if values and not bool(torch.isfinite(noise).all()):
        raise ValueError("noise: contains NaN or Inf")


def check_dense(name: str, tensor: torch.Tensor) -> None:
    """A strided tensor (not sparse): what the samplers copy, step and hand to networks."""
    if tensor.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {tensor.layout}")


def check_labels(labels, noise: torch.Tensor, *, as_official: bool = False) -> None:
    """Labels of batch size B (that of noise). ``as_official`` (the drop-in samplers): like the
    official sampler, which passes labels on to the networks unread, also a tensor of batch size 1
    (networks such as EDM2's Precond broadcast it) and any object that is not a tensor (e.g. a dict
    of conditioning tensors for a custom network). A tensor of another batch size is refused in
    every case: it cannot label B images."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        if as_official:
            return
        raise TypeError(f"labels: expected a torch.Tensor or None, got {type(labels).__name__}")
    sizes = (noise.shape[0], 1) if as_official else (noise.shape[0],)
    if labels.dim() < 1 or labels.shape[0] not in sizes:
        also = " or 1" if as_official and noise.shape[0] != 1 else ""
        expected = f"batch size {noise.shape[0]} (that of noise){also}"
        raise ValueError(f"labels: expected {expected}, got shape {tuple(labels.shape)}")


def check_seeds(seeds, noise: torch.Tensor) -> torch.Tensor | None:
    if seeds is None:
        return None
    seeds_t = seeds_to_tensor(seeds, device=noise.device)
    if seeds_t.shape[0] != noise.shape[0]:
        raise ValueError(f"seeds: expected one seed per image ({noise.shape[0]}), got {seeds_t.shape[0]}")
    return seeds_t


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_backend_name(backend) -> None:
    check_choice("backend", backend, ("auto",) + BACKEND_NAMES)


def check_output(name: str, out, x: torch.Tensor) -> None:
    """A network's output must be a floating tensor shaped like its input, on its device."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} returned {type(out).__name__}, expected a tensor shaped like its input")
    if out.shape != x.shape:
        raise ValueError(f"{name} returned shape {tuple(out.shape)}, expected the input's shape {tuple(x.shape)}")
    if not out.dtype.is_floating_point:
        raise TypeError(f"{name} returned dtype {out.dtype}, expected a floating dtype")
    if out.device != x.device:
        raise ValueError(f"{name} returned a tensor on {out.device}, expected the input's device {x.device}")
