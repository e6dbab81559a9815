"""Sampler configurations drawn at random, for the differential tests of the backends
(tests/test_random_configurations.py, tests/test_triton_random_configurations.py): each draw mixes
the options that interact (churn windows and guidance intervals that switch mid-trajectory, custom
schedules, the Euler solver, both lerp branches, 16-bit network outputs, labels, odd shapes, seeds
across the whole 64-bit range) in ways no hand-written case lists."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from autoguide_fast.noise import churn_stream, philox_normal, seeds_to_tensor
from autoguide_fast.plan import build_plan
from autoguide_fast.sampler import make_config

INF = float("inf")


class Denoiser:
    """A cheap, nonlinear, t- and label-dependent denoiser: float32 body, output in ``out_dtype``."""

    def __init__(self, seed: int, out_dtype: torch.dtype, label_dim: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(3, generator=g)
        self.label_gain = torch.randn(max(label_dim, 1), generator=g)
        self.out_dtype = out_dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        xf, tf = x.float(), t.float()
        out = xf / (1 + tf * tf) + self.a[0] * torch.tanh(self.a[1] * xf + self.a[2]) * tf / (1 + tf)
        if labels is not None:  # One-hot rows [B, label_dim]: a per-image offset.
            offset = labels.float() @ self.label_gain.to(labels.device)
            out = out + offset.reshape(-1, *([1] * (x.dim() - 1))) * 0.1
        return out.to(self.out_dtype)


@dataclass
class Draw:
    """One random configuration: the sampler arguments and the inputs."""

    kwargs: dict[str, Any]              # Sampler arguments of fast_guided_sample (no backend, no seeds).
    shape: tuple[int, ...]
    net_dtype: torch.dtype
    label_dim: int
    seeds: list[int]
    official: bool = field(default=False)  # Within the official sampler's semantics (reference applies).

    def inputs(self, device: str | torch.device = "cpu"):
        g = torch.Generator().manual_seed(sum(self.seeds) % 2**63)
        noise = torch.randn(self.shape, generator=g).to(device)
        labels = None
        if self.label_dim:
            classes = torch.randint(self.label_dim, (self.shape[0],), generator=g)
            labels = torch.nn.functional.one_hot(classes, self.label_dim).float().to(device)
        net = Denoiser(1, self.net_dtype, self.label_dim)
        gnet = Denoiser(2, self.net_dtype, self.label_dim)
        return net, gnet, noise, labels


def draw(index: int, *, net_dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> Draw:
    rng = random.Random(1000 + index)
    dtype = rng.choice([torch.float32, torch.float64])
    num_steps = rng.randint(2, 7)
    kwargs: dict[str, Any] = dict(dtype=dtype)
    official = True
    if rng.random() < 0.25:  # A custom schedule: distinct decreasing levels.
        levels = sorted({round(math.exp(rng.uniform(math.log(0.002), math.log(80.0))), 6) for _ in range(num_steps)},
                        reverse=True)
        kwargs["sigmas"] = levels
        official = False
    else:
        kwargs.update(num_steps=num_steps, sigma_min=rng.choice([0.002, 0.05, 0.3]),
                      sigma_max=rng.choice([80.0, 3.0, 14.6]), rho=rng.choice([7.0, 2.0, 3.3]))
    kwargs.update(
        guidance=rng.choice([1, 2.1, 0.3, -0.7, 0.5, 0.4999, 3.0]),
        S_churn=rng.choice([0.0, 0.0, 30.0, 1000.0]), S_min=rng.choice([0.0, 0.5]), S_max=rng.choice([INF, 5.0]),
        S_noise=rng.choice([1.0, 1.007]),
    )
    interval = rng.choice([None, None, (0.5, 5.0), (0.0, 1.0), (10.0, 100.0)])
    solver = rng.choice(["heun", "heun", "euler"])
    if interval is not None or solver != "heun":
        official = False
    kwargs.update(guidance_interval=interval, solver=solver)
    batch = rng.randint(1, 3)
    shape = (batch, 2) if rng.random() < 0.25 else (batch, rng.randint(1, 3), rng.randint(1, 9), rng.randint(1, 9))
    seeds = [rng.choice([rng.randrange(2**64), rng.randrange(100)]) for _ in range(batch)]
    return Draw(kwargs, shape, rng.choice(list(net_dtypes)), rng.choice([0, 0, 4]), seeds, official)


def seeded_randn_like(d: Draw, device: str | torch.device = "cpu"):
    """randn_like for the reference sampler that draws the seeded churn noise of each churn step
    (the noise fast_guided_sample draws with ``seeds=``)."""
    config = make_config(gnet=lambda *a: None, **_config_args(d.kwargs))
    _, steps = build_plan(config, torch.device(device))
    churn_steps = iter([s.index for s in steps if s.noise_scale is not None])
    seeds = seeds_to_tensor(d.seeds, device)

    def randn_like(x: torch.Tensor) -> torch.Tensor:
        numel = math.prod(x.shape[1:])
        return philox_normal(seeds, numel, churn_stream(next(churn_steps)), x.dtype).reshape(x.shape)

    return randn_like


def _config_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    defaults = dict(num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0, S_max=INF,
                    S_noise=1.0, guidance_interval=None, solver="heun", sigmas=None)
    return {**defaults, **kwargs}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def extended_reference(net, noise, labels, gnet, *, randn_like, dtype=torch.float32, num_steps=32, sigma_min=0.002,
                       sigma_max=80.0, rho=7.0, sigmas=None, guidance=1, S_churn=0.0, S_min=0.0, S_max=INF,
                       S_noise=1.0, guidance_interval=None, solver="heun") -> torch.Tensor:
    """The official sampler's loop (reference.edm_loop), with the package's three extensions written
    from their documented rules (not from its code): a custom schedule ``sigmas`` (t_N = 0
    appended, N its length), the guidance interval (w only for lo < sigma <= hi, the 0-dim
    state-dtype level compared with the Python bounds, the guide not called outside), and the
    Euler solver (no Heun correction)."""
    from autoguide_fast.reference import edm_loop, edm_time_steps

    if sigmas is not None:
        t_steps = torch.tensor([*sigmas, 0.0], dtype=dtype, device=noise.device)
    else:
        t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, dtype, noise.device)

    def denoise(x, t):
        Dx = net(x, t, labels).to(dtype)
        inside = guidance_interval is None or (guidance_interval[0] < t and t <= guidance_interval[1])
        if guidance == 1 or not inside:
            return Dx
        return gnet(x, t, labels).to(dtype).lerp(Dx, guidance)

    return edm_loop(denoise, noise, t_steps, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise,
                    dtype=dtype, randn_like=randn_like, second_order=solver == "heun")
