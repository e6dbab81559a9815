"""The sampling plan: every step's noise levels and guidance decisions, computed on the host.

The fast paths never compare device tensors inside the loop (no host sync, CUDA-graph safe):
the schedule is computed once with the reference's tensor ops on the noise's device, copied to
the host, and every decision (churn or not, guide called or not, Heun or Euler) is made here.
Each step keeps its scalars twice: as 0-dim tensors of the state dtype on the device (so the
eager torch backend reproduces the reference bit for bit) and as Python floats holding the same
values exactly (for the fused kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .reference import edm_time_steps

__all__ = ["SamplerConfig", "StepPlan", "build_plan", "has_churn", "time_steps"]


@dataclass(frozen=True)
class SamplerConfig:
    """Every sampler argument that is not a tensor or a network (hashable: a cache key part)."""

    num_steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    guidance: float = 1.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    dtype: torch.dtype = torch.float32
    guidance_interval: tuple[float, float] | None = None
    solver: str = "heun"
    # A custom schedule t_0 > ... > t_{N-1} > 0 (N = num_steps; t_N = 0 is appended), in place of
    # the official formula of sigma_min, sigma_max and rho; None = the formula.
    sigmas: tuple[float, ...] | None = None


@dataclass(frozen=True)
class StepPlan:
    """One step i: t_cur -> (churn) t_hat -> t_next, and the weight of each evaluation."""

    index: int
    t_cur: float
    t_hat: float
    t_next: float
    noise_scale: float | None       # sqrt(t_hat² - t_cur²)·S_noise, None when no churn.
    w_first: float | None           # Guidance weight at t_hat; None = unguided (guide skipped).
    w_second: float | None          # Same at t_next for the Heun correction.
    second_order: bool              # Heun correction applied (False on the last step / euler).
    tensors: dict[str, torch.Tensor]  # 0-dim device tensors: t_cur, t_hat, t_next, noise_scale.
    # float64 [5] device tensor [w, t_hat, t_next, next step's noise_scale, next step's churn stream]
    # that the fused backends hand to their kernels instead of the floats above; None (the plan's
    # own steps) = use the floats. The per-kind step graphs set it (see engine/step_kinds.py).
    scalars: torch.Tensor | None = None


def _weight(config: SamplerConfig, sigma: float) -> float | None:
    # Guidance interval (Kynkäänniemi et al. 2024): w only for sigma_lo < sigma <= sigma_hi, compared
    # like the churn rule: a 0-dim tensor of the state dtype against the Python bounds (so the bounds
    # are rounded to the state dtype, e.g. sigma_max = 0.1 in float32 counts as <= 0.1).
    if config.guidance == 1:
        return None
    if config.guidance_interval is not None:
        lo, hi = config.guidance_interval
        t = torch.tensor(sigma, dtype=config.dtype)
        if not bool(lo < t) or not bool(t <= hi):
            return None
    return config.guidance


def _churns(config: SamplerConfig, t_cur: torch.Tensor) -> bool:
    # Same comparison as the reference (a 0-dim tensor against Python scalars), on the host.
    return config.S_churn > 0 and bool(config.S_min <= t_cur <= config.S_max)


def time_steps(config: SamplerConfig, device: torch.device | str | None) -> torch.Tensor:
    """t_0..t_N in the state dtype on ``device``: the custom ``sigmas`` with t_N = 0 appended, else
    the official formula (``reference.edm_time_steps``)."""
    if config.sigmas is not None:
        return torch.tensor([*config.sigmas, 0.0], dtype=config.dtype, device=device)
    return edm_time_steps(config.num_steps, config.sigma_min, config.sigma_max, config.rho, config.dtype, device)


def has_churn(config: SamplerConfig, device: torch.device) -> bool:
    """Whether any step injects churn noise (S_churn > 0 and some t_i within [S_min, S_max])."""
    if config.S_churn <= 0:
        return False
    t_host = time_steps(config, device).cpu()
    return any(_churns(config, t_host[i]) for i in range(config.num_steps))


def build_plan(config: SamplerConfig, device: torch.device) -> tuple[torch.Tensor, list[StepPlan]]:
    """The schedule t_0..t_N (device tensor) and the per-step plan."""
    n = config.num_steps
    t_steps = time_steps(config, device)
    t_host = t_steps.cpu()
    per_step = []
    for i in range(n):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        churn = _churns(config, t_host[i])
        tensors = {"t_cur": t_cur, "t_hat": t_cur, "t_next": t_next}
        if churn:
            gamma = min(config.S_churn / n, math.sqrt(2) - 1)
            tensors["t_hat"] = t_cur + gamma * t_cur
            tensors["noise_scale"] = (tensors["t_hat"] ** 2 - t_cur ** 2).sqrt() * config.S_noise
        per_step.append(tensors)
    # The churned scalars were computed on the device: bring them to the host in one transfer.
    churned = [tensors for tensors in per_step if "noise_scale" in tensors]
    churn_host = (
        torch.stack([v for tensors in churned for v in (tensors["t_hat"], tensors["noise_scale"])]).cpu().tolist()
        if churned else []
    )
    churn_pairs = iter(zip(churn_host[0::2], churn_host[1::2]))
    steps = []
    for i, tensors in enumerate(per_step):
        t_cur_f, t_next_f = float(t_host[i]), float(t_host[i + 1])
        t_hat, noise_scale = next(churn_pairs) if "noise_scale" in tensors else (t_cur_f, None)
        second = config.solver == "heun" and i < n - 1
        steps.append(
            StepPlan(
                index=i,
                t_cur=t_cur_f,
                t_hat=t_hat,
                t_next=t_next_f,
                noise_scale=noise_scale,
                w_first=_weight(config, t_hat),
                w_second=_weight(config, t_next_f) if second else None,
                second_order=second,
                tensors=tensors,
            )
        )
    return t_steps, steps
