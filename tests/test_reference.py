"""The golden reference against closed forms (Gaussian data, where the guided ODE is solvable)."""

import math

import pytest
import torch

import autoguide_fast
from autoguide_fast.reference import edm_sampler, edm_time_steps
from tests.nets import GaussianDenoiser

SIGMA_MAX, SIGMA_MIN = 80.0, 0.002


def exact_final(noise, s1, s0, w, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN):
    """x(σ) = x(σ0)·((s0²+σ²)/(s0²+σ0²))^((1-w)/2)·((s1²+σ²)/(s1²+σ0²))^(w/2), then the last Euler
    step to 0, which is exactly x_N = D_w(x; σ_min) = c(σ_min)·x."""
    flow = ((s0**2 + sigma_min**2) / (s0**2 + sigma_max**2)) ** ((1 - w) / 2) * (
        (s1**2 + sigma_min**2) / (s1**2 + sigma_max**2)
    ) ** (w / 2)
    c_last = (1 - w) * s0**2 / (s0**2 + sigma_min**2) + w * s1**2 / (s1**2 + sigma_min**2)
    return noise * sigma_max * flow * c_last


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_time_steps_match_formula():
    t = edm_time_steps(5, 0.002, 80, 7, torch.float64)
    i = torch.arange(5, dtype=torch.float64)
    expected = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert t.shape == (6,) and t[-1] == 0
    torch.testing.assert_close(t[:-1], expected, rtol=1e-12, atol=0)
    assert math.isclose(float(t[0]), 80, rel_tol=1e-12) and math.isclose(float(t[4]), 0.002, rel_tol=1e-12)


@pytest.mark.parametrize("sampler", ["reference", "fast"])
@pytest.mark.parametrize("w", [1.0, 2.1, 0.3])
def test_heun_converges_at_second_order(sampler, w):
    noise = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s1, s0 = 0.5, 0.9
    errors = []
    for n in (16, 32, 64, 128):
        main, guide = GaussianDenoiser(s1), GaussianDenoiser(s0)
        if sampler == "reference":
            x = edm_sampler(main, noise, gnet=guide, num_steps=n, guidance=w, dtype=torch.float64)
        else:
            x = autoguide_fast.fast_guided_sample(main, noise, gnet=guide, num_steps=n, guidance=w,
                                                  dtype=torch.float64, backend="torch")
        errors.append(rel_err(x, exact_final(noise, s1, s0, w)))
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert errors[-1] < 3e-3, errors
    assert all(1.8 < p < 2.3 for p in orders), (errors, orders)


def test_euler_solver_converges_at_first_order():
    noise = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s1, s0, w = 0.5, 0.9, 2.0
    errors = []
    for n in (64, 128, 256, 512):
        x = autoguide_fast.fast_guided_sample(GaussianDenoiser(s1), noise, gnet=GaussianDenoiser(s0), num_steps=n,
                                              guidance=w, dtype=torch.float64, solver="euler", backend="torch")
        errors.append(rel_err(x, exact_final(noise, s1, s0, w)))
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(0.8 < p < 1.3 for p in orders), (errors, orders)


def test_reference_evaluation_counts_and_guide_skipped_when_unguided():
    noise = torch.randn(3, 2)
    main, guide = GaussianDenoiser(0.5), GaussianDenoiser(0.9)
    edm_sampler(main, noise, gnet=guide, num_steps=7, guidance=2.0)
    assert main.calls == guide.calls == 2 * 7 - 1
    main, guide = GaussianDenoiser(0.5), GaussianDenoiser(0.9)
    edm_sampler(main, noise, gnet=guide, num_steps=7, guidance=1)
    assert main.calls == 13 and guide.calls == 0


def test_reference_output_dtype_follows_dtype_argument():
    noise = torch.randn(2, 2, dtype=torch.float16)
    out = edm_sampler(GaussianDenoiser(0.5), noise, num_steps=4, dtype=torch.float64)
    assert out.dtype == torch.float64
