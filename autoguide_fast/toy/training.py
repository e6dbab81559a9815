"""Training the toy models by exact score matching, with a power-function EMA (as in the paper)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..cli_types import progress_bar
from .ground_truth import GaussianMixture, ground_truth
from .network import ToyNet

__all__ = ["ToyModelSpec", "MODELS", "power_ema_gamma", "power_ema_beta", "learning_rate",
           "score_matching_loss", "train_toy_model"]


@dataclass(frozen=True)
class ToyModelSpec:
    """One of the paper's three toy models."""

    name: str          # file stem of the shipped weights
    classes: str       # "A" or "AB"
    num_layers: int
    hidden: int
    iterations: int


# The three models of the paper's toy experiment.
MODELS: dict[str, ToyModelSpec] = {
    "main": ToyModelSpec("main", "A", 4, 64, 4096),         # D1
    "autoguide": ToyModelSpec("autoguide", "A", 4, 32, 512),  # D0 for autoguidance, w = 3
    "cfg": ToyModelSpec("cfg", "AB", 4, 32, 512),           # unconditional-style guide, w = 4
}


# Power-function EMA exponent: the largest real root of
# gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (EDM2, relative std s).
def power_ema_gamma(std: float) -> float:
    if not 0 < std < 1:
        raise ValueError(f"std must be in (0, 1), got {std!r}")
    t = std**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


# EMA decay after iteration t (1-based): beta_t = (1 - 1/t)^(gamma + 1).
def power_ema_beta(t: int, gamma: float) -> float:
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


# Learning-rate schedule: lr_ref / sqrt(max(t / t_ref, 1)) (inverse square root decay).
def learning_rate(t: int, lr_ref: float = 1e-2, t_ref: int = 512) -> float:
    return lr_ref / math.sqrt(max(t / t_ref, 1.0))


# Exact score matching: mean_batch sigma^2 * mean_dims (score_gt - score_net)^2.
def score_matching_loss(net: ToyNet, gt: GaussianMixture, x: torch.Tensor,
                        sigma: torch.Tensor) -> torch.Tensor:
    score_gt = gt.score(x, sigma)
    score_net = net.score(x, sigma, create_graph=True)
    return (sigma**2 * (score_gt - score_net).square().mean(dim=1)).mean()


def train_toy_model(
    spec: ToyModelSpec,
    *,
    batch_size: int = 4096,                 # points per iteration
    lr_ref: float = 1e-2,                   # base learning rate
    lr_iter: int = 512,                     # iterations before the 1/sqrt decay starts
    ema_std: float = 0.010,                 # relative std of the power-function EMA
    p_mean: float = -2.3,                   # log-sigma mean of the training noise levels
    p_std: float = 1.5,                     # log-sigma std of the training noise levels
    seed: int = 0,                          # torch seed (network init and all training draws)
    iterations: int | None = None,          # override spec.iterations (None: the spec's)
    progress: bool | Callable[[int, float], None] = False,  # tqdm bar, or a callback(it, loss)
) -> tuple[ToyNet, ToyNet, list[float]]:
    """Train one toy model; returns (final network, EMA network, per-iteration losses)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    iterations = spec.iterations if iterations is None else iterations
    if iterations < 1:
        raise ValueError(f"iterations must be positive, got {iterations!r}")
    gt = ground_truth(spec.classes)
    gen = torch.Generator().manual_seed(seed)
    net = ToyNet(spec.num_layers, spec.hidden, generator=gen)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr_ref, betas=(0.9, 0.99))
    gamma = power_ema_gamma(ema_std)

    bar = None
    if progress is True:
        bar = progress_bar(iterations, f"toy {spec.name} ({spec.num_layers}x{spec.hidden}, class {spec.classes})", "it")
    losses: list[float] = []
    for it in range(iterations):
        for group in opt.param_groups:
            group["lr"] = learning_rate(it, lr_ref, lr_iter)
        net.normalize_weights_()
        sigma = torch.exp(torch.randn(batch_size, generator=gen) * p_std + p_mean)
        x = gt.sample(batch_size, sigma, generator=gen)
        loss = score_matching_loss(net, gt, x, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        beta = power_ema_beta(it + 1, gamma)
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p_net, 1.0 - beta)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        elif callable(progress):
            progress(it, losses[-1])
    if bar is not None:
        bar.close()
    return net.eval(), ema.eval(), losses
