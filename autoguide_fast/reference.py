"""The golden reference: the official EDM sampler with (auto)guidance, restated in plain PyTorch.

Semantics follow the official release exactly (argument order and defaults, the float schedule
computed with the same tensor ops, `torch.lerp` for the guided combination, the guide never
called when ``guidance == 1``, the churn rule, a plain Euler last step, the output dtype). Every
fast path in this package is tested against this function. It is deliberately unoptimised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch

__all__ = ["edm_loop", "edm_sampler", "edm_time_steps"]


def edm_time_steps(
    num_steps: int,             # Number of sampling steps N (the schedule has N + 1 entries).
    sigma_min: float,           # Lowest noise level, reached at step N - 1.
    sigma_max: float,           # Highest noise level t_0.
    rho: float,                 # Time step exponent.
    dtype: torch.dtype,         # Dtype of the schedule (the sampler's state dtype).
    device: torch.device | str | None = None,
) -> torch.Tensor:
    # EDM eq. 5: t_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, t_N = 0.
    step_indices = torch.arange(num_steps, dtype=dtype, device=device)
    t_steps = (
        sigma_max ** (1 / rho)
        + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def edm_sampler(
    net: Callable,                      # Main network D1, called as net(x, t, labels).
    noise: torch.Tensor,                # Unit-variance initial noise [B, ...].
    labels: torch.Tensor | None = None, # Class labels passed to both networks, or None.
    gnet: Callable | None = None,       # Guide network D0; None is fine when guidance == 1.
    num_steps: int = 32,                # Number of time steps N.
    sigma_min: float = 0.002,           # Lowest noise level.
    sigma_max: float = 80,              # Highest noise level.
    rho: float = 7,                     # Time step exponent.
    guidance: float = 1,                # Guidance weight w; 1 = no guidance (guide not called).
    S_churn: float = 0,                 # Stochasticity strength; 0 = deterministic.
    S_min: float = 0,                   # Stochasticity applies for S_min <= t <= S_max.
    S_max: float = float("inf"),
    S_noise: float = 1,                 # Scale of the churn noise.
    dtype: torch.dtype = torch.float32, # Dtype of the sampler state and the schedule.
    randn_like: Callable = torch.randn_like,  # Source of churn noise.
) -> torch.Tensor:
    # Guided denoiser D_w = D0 + w (D1 - D0) (autoguidance eq. 2), via torch.lerp.
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        Dx = net(x, t, labels).to(dtype)
        if guidance == 1:
            return Dx
        ref_Dx = cast(Callable, gnet)(x, t, labels).to(dtype)  # Needed (not None) when guidance != 1.
        return ref_Dx.lerp(Dx, guidance)

    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype, noise.device)
    return edm_loop(denoise, noise, t_steps, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise,
                    dtype=dtype, randn_like=randn_like)


def edm_loop(
    denoise: Callable,                  # The (guided) denoiser, called as denoise(x, t).
    noise: torch.Tensor,                # Unit-variance initial noise [B, ...].
    t_steps: torch.Tensor,              # Noise levels t_0 > ... > t_{N-1} > t_N = 0, in dtype.
    *,
    S_churn: float = 0,                 # As edm_sampler's.
    S_min: float = 0,
    S_max: float = float("inf"),
    S_noise: float = 1,
    dtype: torch.dtype = torch.float32,
    randn_like: Callable = torch.randn_like,
    second_order: bool = True,          # Heun's correction on all steps but the last; False = Euler.
) -> torch.Tensor:
    """The official sampler's loop (EDM Algorithm 2) over the schedule ``t_steps``, N = its length
    minus one: edm_sampler's body, and the tests' restatement of the package's extensions."""
    num_steps = len(t_steps) - 1
    x_next = noise.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn (EDM Algorithm 2, lines 4-6): raise the noise level temporarily.
        if S_churn > 0 and S_min <= t_cur <= S_max:
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1)
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        else:
            t_hat = t_cur
            x_hat = x_cur

        # Euler step (EDM Algorithm 2, lines 7-8).
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Second-order (Heun) correction, all steps but the last (lines 9-11).
        if second_order and i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)

    return x_next
