"""The toy log-density network of the paper's 2D experiment (the autoguidance paper, Sec. 3).

The network outputs an (unnormalised) log-density log p̂(x; sigma); its score comes from autograd
and the denoiser is D(x; sigma) = x + sigma^2 * score. Layers are magnitude-preserving (MP) as in
EDM2: weights are normalised per output row at use, activations are MP-SiLU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ..cli_types import write_atomically

__all__ = ["MPLinear", "ToyNet", "mp_silu", "normalize", "load_toy_net", "save_toy_net"]

SIGMA_DATA = 0.5


# Row normalisation: w / (eps + RMS(w_row)), so each row has unit RMS (EDM2 "normalize").
def normalize(w: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    rms = torch.linalg.vector_norm(w, dim=1, keepdim=True) / math.sqrt(w.shape[1])
    return w / (eps + rms)


# MP-SiLU: silu(x) / 0.596 keeps unit second moment for unit-normal input.
def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x) / 0.596


class MPLinear(nn.Module):
    """Bias-free magnitude-preserving linear layer: y = x (normalize(W) / sqrt(fan_in))^T."""

    def __init__(self, in_features: int, out_features: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = normalize(self.weight) / math.sqrt(self.in_features)  # unit L2 norm per row
        return x @ w.t()

    @torch.no_grad()
    def normalize_weight_(self) -> None:
        """Training-time forced weight normalisation: replace the stored weight by normalize(W)."""
        self.weight.copy_(normalize(self.weight))


class ToyNet(nn.Module):
    """Toy log-density network; called as a sampler network ``net(x, sigma, labels) -> D``.

    Input features: [x̃, log(sigma)/4, 1] with x̃ = x / sqrt(sigma_data^2 + sigma^2).
    Body: MP-linear 4 -> H, then ``num_layers`` x (MP-SiLU, MP-linear H -> H).
    Output: log p̂ = gain * mean_j(y_j^2) / sigma - 1/2 ||x̃||^2, with ``gain`` initialised to 0.
    """

    def __init__(self, num_layers: int = 4, hidden: int = 64,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        self.num_layers = num_layers
        self.hidden = hidden
        layers = [MPLinear(4, hidden, generator)]
        layers += [MPLinear(hidden, hidden, generator) for _ in range(num_layers)]
        self.layers = nn.ModuleList(layers)
        self.gain = nn.Parameter(torch.zeros([]))

    def _sigma(self, sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if s.ndim == 0:
            s = s.expand(x.shape[0])
        if s.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], "
                             f"got {tuple(s.shape)}")
        return s

    def logp(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Learned log-density log p̂(x; sigma) up to a constant, shape [N]."""
        s = self._sigma(sigma, x)[:, None]
        x_in = x / torch.sqrt(SIGMA_DATA**2 + s**2)                       # x̃ = c_in x
        feats = torch.cat([x_in, torch.log(s) / 4, torch.ones_like(s)], dim=1)
        y = self.layers[0](feats)
        for layer in self.layers[1:]:
            y = layer(mp_silu(y))
        return self.gain * y.square().mean(dim=1) / s[:, 0] - 0.5 * x_in.square().sum(dim=1)

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor,
              create_graph: bool = False) -> torch.Tensor:
        """grad_x log p̂(x; sigma) by autograd (works under an outer ``torch.no_grad()``)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            lp = self.logp(xg, sigma)
            (g,) = torch.autograd.grad(lp.sum(), xg, create_graph=create_graph)
        return g

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        # Tweedie: D(x; sigma) = x + sigma^2 grad log p(x; sigma).
        del labels  # one network per class: the toy models are unconditional
        s = self._sigma(sigma, x)[:, None]
        return x + s**2 * self.score(x, sigma)

    @torch.no_grad()
    def normalize_weights_(self) -> None:
        for layer in self.layers:
            cast(MPLinear, layer).normalize_weight_()


def save_toy_net(net: ToyNet, path: str | Path, **meta: int | float | str) -> None:
    """Save a small float32 checkpoint loadable with ``torch.load(weights_only=True)``."""
    state = {k: v.detach().to(torch.float32).clone() for k, v in net.state_dict().items()}
    checkpoint = {"num_layers": net.num_layers, "hidden": net.hidden, "state_dict": state, "meta": dict(meta)}
    # Written aside and moved into place: an interrupted save never truncates a good checkpoint.
    write_atomically(path, lambda f: torch.save(checkpoint, f))


def load_toy_net(path: str | Path) -> ToyNet:
    """Load a checkpoint written by :func:`save_toy_net`; returns the network in eval mode."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = ToyNet(num_layers=int(ckpt["num_layers"]), hidden=int(ckpt["hidden"]))
    net.load_state_dict(ckpt["state_dict"])
    return net.eval().requires_grad_(False)
