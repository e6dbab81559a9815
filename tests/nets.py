"""Small random networks for tests: EDM-preconditioned convs with class labels."""

from __future__ import annotations

import torch


class TinyConvDenoiser(torch.nn.Module):
    """D(x; σ) = c_skip x + c_out F(c_in x, c_noise, labels), F a random conv + label embedding.

    Runs in float32 internally whatever the input dtype; ``out_dtype`` sets the output dtype
    (e.g. float16 to mimic an fp16 network body that is not cast back). ``count_calls=False``
    for torch.compile: an int attribute changed by forward makes Dynamo recompile on every call
    (and fall back to eager after its recompile limit).
    """

    def __init__(self, channels: int = 3, label_dim: int = 0, seed: int = 0, hidden: int = 8,
                 out_dtype: torch.dtype = torch.float32, sigma_data: float = 0.5, count_calls: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(hidden, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.label_dim = label_dim
        if label_dim:
            self.emb = torch.nn.Parameter(torch.randn(label_dim, hidden, generator=g) * 0.3)
        self.out_dtype = out_dtype
        self.sigma_data = sigma_data
        self.count_calls = count_calls
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.count_calls:
            self.calls += 1
        x32 = x.to(torch.float32)
        sigma = sigma.to(torch.float32)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        h = self.conv1(x32 * c_in) + sigma.log().reshape(-1, 1, 1, 1) / 4
        if self.label_dim:
            h = h + (labels.to(torch.float32) @ self.emb)[:, :, None, None]
        F = self.conv2(torch.nn.functional.silu(h))
        return (c_skip * x32 + c_out * F).to(self.out_dtype)


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of N(0, s²I): D(x; σ) = s²/(s²+σ²) x; counts its calls."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s
        self.calls = 0
        self.sigmas: list[float] = []

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        self.sigmas.append(float(sigma))
        return x * (self.s**2 / (self.s**2 + sigma.to(x.dtype) ** 2))


def one_hot_labels(batch: int, label_dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(label_dim, (batch,), generator=g)
    return torch.nn.functional.one_hot(idx, label_dim).to(torch.float32)


class PointwiseDenoiser(torch.nn.Module):
    """A nonlinear denoiser acting on each element alone, so its output for an image does not
    depend on the rest of the batch (bit for bit): D = c_skip x + c_out tanh(a c_in x + b)."""

    def __init__(self, a: float = 1.3, b: float = 0.2, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.a, self.b, self.sigma_data = a, b, sigma_data

    def forward(self, x, sigma, labels=None):
        sd = self.sigma_data
        sigma = sigma.to(x.dtype)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        return c_skip * x + c_out * torch.tanh(self.a * c_in * x + self.b)
