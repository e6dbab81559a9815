"""A quick, honest demonstration with analytic networks (no downloads, no training).

Data ~ N(0, s²I) has the exact denoiser D(x; σ) = s²/(s²+σ²)·x. We take a "main" Gaussian
denoiser with s1 and a "guide" with a wider s0 > s1 (a worse model of the same data). The guided
denoiser is linear too, so the probability-flow ODE has the closed-form solution
x(σ) = x(σ0) · ((s0²+σ²)/(s0²+σ0²))^((1-w)/2) · ((s1²+σ²)/(s1²+σ0²))^(w/2),
which the sampler must reproduce. Guidance w > 1 extrapolates away from the guide and shrinks the
spread of the samples below s1, exactly as the formula predicts.
"""

from __future__ import annotations

import math
import sys
import time

import torch


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of N(0, s²I): D(x; σ) = s²/(s²+σ²)·x (EDM eq. 3 for a Gaussian)."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = float(s)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return x * (self.s**2 / (self.s**2 + sigma.to(x.dtype) ** 2))


# Closed-form guided flow from sigma0 to sigma for Gaussian main (s1) and guide (s0) denoisers,
# as the exponential of its logarithm: each of the two powers alone overflows float64 once |w| is
# a few hundred, while their product stays representable far beyond. OverflowError past that.
def guided_gaussian_flow(s1: float, s0: float, w: float, sigma0: float, sigma: float) -> float:
    log_guide = math.log((s0**2 + sigma**2) / (s0**2 + sigma0**2))
    log_main = math.log((s1**2 + sigma**2) / (s1**2 + sigma0**2))
    return math.exp((1 - w) / 2 * log_guide + w / 2 * log_main)


SIGMA_MAX, SIGMA_MIN = 80.0, 0.002  # The default schedule's ends (fast_guided_sample's defaults).


def closed_form_scale(guidance: float, s1: float = 0.5, s0: float = 0.8) -> float:
    """The factor x_N = scale · x_0 / sigma_max of the exact guided sampler: the flow from sigma_max
    to sigma_min, then the last (Euler, to 0) step, which is x_N = D_w(x; sigma_min). Raises
    ValueError naming `guidance` when that factor is not a positive normal float64 (the demo's check
    would divide by 0 or by infinity)."""
    # D_w(x; sigma_min) = c_last · x: the guided combination of the two linear denoisers.
    c_last = (1 - guidance) * s0**2 / (s0**2 + SIGMA_MIN**2) + guidance * s1**2 / (s1**2 + SIGMA_MIN**2)
    try:
        scale = SIGMA_MAX * guided_gaussian_flow(s1, s0, guidance, SIGMA_MAX, SIGMA_MIN) * c_last
    except OverflowError:
        scale = math.inf
    if not (sys.float_info.min <= abs(scale) < math.inf):
        raise ValueError(f"guidance={guidance!r}: the closed-form guided sample's scale ({scale:.3g} for the "
                         f"demo's Gaussians) is outside float64's positive normal range, so the demo cannot "
                         f"check it; use a smaller |w|")
    return scale


def run_demo(
    batch: int = 4096,              # Number of samples.
    num_steps: int = 32,            # Heun steps.
    guidance: float = 2.0,          # Guidance weight w.
    s1: float = 0.5,                # Main denoiser's data std.
    s0: float = 0.8,                # Guide's (worse) data std.
    backend: str = "auto",
    seed: int = 0,
) -> dict:
    from . import fast_guided_sample, seeded_noise

    scale = closed_form_scale(guidance, s1, s0)  # Before sampling: refused if not checkable.
    noise = seeded_noise(range(seed, seed + batch), (batch, 2), dtype=torch.float64)
    main, guide = GaussianDenoiser(s1), GaussianDenoiser(s0)
    start = time.perf_counter()
    x = fast_guided_sample(main, noise, gnet=guide, guidance=guidance, num_steps=num_steps,
                           sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, dtype=torch.float64, backend=backend)
    elapsed = time.perf_counter() - start
    expected = noise * scale
    rel_err = float((x - expected).norm() / expected.norm())
    return {
        "batch": batch, "num_steps": num_steps, "guidance": guidance, "s_main": s1, "s_guide": s0,
        "sample_std": float(x.std()), "predicted_std": abs(scale), "relative_error_vs_closed_form": rel_err,
        "seconds": elapsed, "evaluations_per_network": 2 * num_steps - 1,
        "unguided_std": s1 * math.sqrt(1.0),
    }
