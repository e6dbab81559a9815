"""Exact ground truth of the 2D toy experiment: a fractal "tree" mixture of Gaussians.

The construction follows the autoguidance paper's toy example (its Sec. 3 and appendix): two classes, A and B,
each a tree of 127 branches with 8 Gaussian components per branch (1016 components per class),
drawn from ``numpy.random.RandomState(2)``. Everything a sampler or a metric needs is available
in closed form at any noise level sigma:

    p(x; sigma) = sum_k phi_k N(x; mu_k, Sigma_k + sigma^2 I)

All 2x2 algebra (determinant, inverse, Cholesky factor) is written out by hand, and mixture sums
use log-sum-exp, so the functions are exact, vectorised and stable in log space.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["GaussianMixture", "ground_truth", "CLASSES"]

CLASSES = ("A", "B", "AB")

_ORIGIN = np.array([0.0030, 0.0325])    # root position of both trees
_SCALE = np.array([1.3136, 1.3844])     # per-axis scale so that A∪B has std ≈ 0.5
_MAX_DEPTH = 7                          # levels 0..6 -> 127 branches per class
_COMPONENTS_PER_BRANCH = 8
_ROOT_ANGLES = {"A": math.pi / 4, "B": 5 * math.pi / 4}
_LOG_2PI = math.log(2 * math.pi)
_CHUNK_ELEMENTS = 1 << 22               # points x components held in memory at once


def _build_class(rnd: np.random.RandomState, root_angle: float) -> tuple[np.ndarray, ...]:
    """One class's unnormalised weights [K], means [K, 2], covariances [K, 2, 2] (float64)."""
    phi, mu, sigma = [], [], []
    eye = np.eye(2)

    def branch(depth: int, pos: np.ndarray, angle: float) -> None:
        if depth >= _MAX_DEPTH:
            return
        direction = np.array([math.cos(angle), math.sin(angle)])
        dist = 0.292 * 0.8**depth * (1 + 0.2 * rnd.randn())
        thick = 0.2 * 0.8**depth / dist
        size = _SCALE * dist * 0.06
        along = np.outer(direction, direction)
        # Covariance: unit variance along the branch, thick^2 across it, scaled by size size^T.
        cov = (along + (eye - along) * thick**2) * np.outer(size, size)
        for t in np.linspace(0.07, 0.93, _COMPONENTS_PER_BRANCH):
            phi.append(dist * 0.5**depth)
            mu.append((pos + direction * dist * t) * _SCALE)
            sigma.append(cov)
        for sign in (1, -1):
            child_angle = angle + sign * 0.7**depth * (1 + 0.2 * rnd.randn())
            branch(depth + 1, pos + direction * dist, child_angle)

    branch(0, _ORIGIN.copy(), root_angle)
    return np.array(phi), np.array(mu), np.array(sigma)


@functools.lru_cache(maxsize=1)
def _both_classes() -> dict[str, tuple[np.ndarray, ...]]:
    # Class A is drawn first, then class B, from one RandomState(2) stream.
    rnd = np.random.RandomState(2)
    out = {}
    for name in ("A", "B"):
        out[name] = _build_class(rnd, _ROOT_ANGLES[name])
    return out


def _as_sigma(sigma: float | torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    """Noise level as a tensor: 0-dim (shared by the batch) or [n] (one per point)."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.ndim == 1 and s.shape[0] == 1:
        s = s.reshape(())
    if s.ndim > 1 or (s.ndim == 1 and s.shape[0] != n):
        raise ValueError(f"sigma must be a scalar or have shape [{n}], got {tuple(s.shape)}")
    if bool((s < 0).any()):
        raise ValueError("sigma must be non-negative")
    return s


@dataclass(frozen=True)
class GaussianMixture:
    """A mixture of 2D Gaussians with closed-form diffusion-smoothed density and score.

    Attributes (float32 tensors on the CPU):
        phi:   [K] component weights, summing to 1.
        mu:    [K, 2] component means.
        Sigma: [K, 2, 2] component covariances.
    """

    phi: torch.Tensor
    mu: torch.Tensor
    Sigma: torch.Tensor  # noqa: N815 (the paper's symbol)

    def __post_init__(self) -> None:
        k = self.phi.shape[0]
        if self.phi.shape != (k,) or self.mu.shape != (k, 2) or self.Sigma.shape != (k, 2, 2):
            raise ValueError("phi, mu, Sigma must have shapes [K], [K, 2], [K, 2, 2]")

    @property
    def num_components(self) -> int:
        return int(self.phi.shape[0])

    def _params(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(p.to(like.dtype).to(like.device) for p in (self.phi, self.mu, self.Sigma))

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"x must be a tensor of shape [N, 2], got {getattr(x, 'shape', x)}")
        if not x.is_floating_point():
            raise ValueError("x must be a floating-point tensor")
        return x

    # ---------------------------------------------------------------------------------------
    # Shared-sigma fast path. With C_k = Sigma_k + sigma^2 I and P_k = C_k^{-1}, the Gaussian
    # log-density is a quadratic polynomial in x, so log(phi_k N(x; mu_k, C_k)) = f(x) . W_k
    # with features f(x) = [x0^2, x0 x1, x1^2, x0, x1, 1]: one [N, 6] x [6, K] matrix product
    # per chunk instead of a dozen element-wise passes over [N, K].
    # ---------------------------------------------------------------------------------------

    def _shared_tables(self, sigma: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        phi, mu, cov = self._params(like)
        a = cov[:, 0, 0] + sigma**2
        b = cov[:, 0, 1]
        d = cov[:, 1, 1] + sigma**2
        det = a * d - b * b
        # 2x2 inverse: P = [[d, -b], [-b, a]] / det.
        pxx, pxy, pyy = d / det, -b / det, a / det
        m0, m1 = mu[:, 0], mu[:, 1]
        pm0 = pxx * m0 + pxy * m1              # (P mu)_0
        pm1 = pxy * m0 + pyy * m1              # (P mu)_1
        const = torch.log(phi) - _LOG_2PI - 0.5 * torch.log(det) - 0.5 * (m0 * pm0 + m1 * pm1)
        # log N = -1/2 x^T P x + x^T P mu + const.
        w = torch.stack([-0.5 * pxx, -pxy, -0.5 * pyy, pm0, pm1, const])  # [6, K]
        # Score of component k: -P_k x + P_k mu_k -> linear in the responsibility-weighted tables.
        score_tab = torch.stack([pxx, pxy, pyy, pm0, pm1], dim=1)         # [K, 5]
        return w, score_tab

    @staticmethod
    def _features(x: torch.Tensor) -> torch.Tensor:
        x0, x1 = x[:, 0], x[:, 1]
        return torch.stack([x0 * x0, x0 * x1, x1 * x1, x0, x1, torch.ones_like(x0)], dim=1)

    # ---------------------------------------------------------------------------------------
    # Per-point sigma path (training draws one sigma per point): direct [N, K] broadcasting.
    # ---------------------------------------------------------------------------------------

    def _per_point_terms(
        self, x: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Component log-terms [N, K] and the two score terms -P_k (x - mu_k), each [N, K]."""
        phi, mu, cov = self._params(x)
        s2 = (sigma**2)[:, None]
        a = cov[None, :, 0, 0] + s2
        b = cov[None, :, 0, 1]
        d = cov[None, :, 1, 1] + s2
        det = a * d - b * b
        dx = x[:, None, 0] - mu[None, :, 0]
        dy = x[:, None, 1] - mu[None, :, 1]
        # -P (x - mu) with P = [[d, -b], [-b, a]] / det.
        g0 = (b * dy - d * dx) / det
        g1 = (b * dx - a * dy) / det
        maha = -(dx * g0 + dy * g1)
        logterm = torch.log(phi)[None] - _LOG_2PI - 0.5 * torch.log(det) - 0.5 * maha
        return logterm, g0, g1

    def _chunk_rows(self) -> int:
        return max(1, _CHUNK_ELEMENTS // max(1, self.num_components))

    # ---------------------------------------------------------------------------------------
    # Public API.
    # ---------------------------------------------------------------------------------------

    def logp(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """log p(x; sigma) = logsumexp_k [log phi_k + log N(x; mu_k, Sigma_k + sigma^2 I)], [N]."""
        x = self._check_x(x)
        sigma = _as_sigma(sigma, x.shape[0], x)
        out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        step = self._chunk_rows()
        if sigma.ndim == 0:
            w, _ = self._shared_tables(sigma, x)
            for i in range(0, x.shape[0], step):
                out[i:i + step] = torch.logsumexp(self._features(x[i:i + step]) @ w, dim=1)
        else:
            for i in range(0, x.shape[0], step):
                logterm, _, _ = self._per_point_terms(x[i:i + step], sigma[i:i + step])
                out[i:i + step] = torch.logsumexp(logterm, dim=1)
        return out

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """grad_x log p(x; sigma) = sum_k r_k(x) (-P_k (x - mu_k)), r = softmax of log-terms, [N, 2]."""
        x = self._check_x(x)
        sigma = _as_sigma(sigma, x.shape[0], x)
        out = torch.empty_like(x)
        step = self._chunk_rows()
        if sigma.ndim == 0:
            w, score_tab = self._shared_tables(sigma, x)
            for i in range(0, x.shape[0], step):
                xc = x[i:i + step]
                r = torch.softmax(self._features(xc) @ w, dim=1)
                t = r @ score_tab                                   # [n, 5]
                out[i:i + step, 0] = t[:, 3] - t[:, 0] * xc[:, 0] - t[:, 1] * xc[:, 1]
                out[i:i + step, 1] = t[:, 4] - t[:, 1] * xc[:, 0] - t[:, 2] * xc[:, 1]
        else:
            for i in range(0, x.shape[0], step):
                logterm, g0, g1 = self._per_point_terms(x[i:i + step], sigma[i:i + step])
                r = torch.softmax(logterm, dim=1)
                out[i:i + step, 0] = (r * g0).sum(1)
                out[i:i + step, 1] = (r * g1).sum(1)
        return out

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Ideal denoiser (Tweedie): D(x; sigma) = x + sigma^2 * score(x; sigma)."""
        s = _as_sigma(sigma, x.shape[0], x)
        s2 = s**2 if s.ndim == 0 else (s**2)[:, None]
        return x + s2 * self.score(x, s)

    def sample(
        self,
        n: int,
        sigma: float | torch.Tensor = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Exact samples of p(x; sigma): a component by weight, then mu + chol(Sigma + sigma^2 I) z."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        phi, mu, cov = (p.double() for p in (self.phi, self.mu, self.Sigma))
        s = _as_sigma(sigma, n, phi)
        k = torch.multinomial(phi, n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        s2 = s**2
        a = cov[k, 0, 0] + s2
        b = cov[k, 0, 1]
        d = cov[k, 1, 1] + s2
        # Cholesky of [[a, b], [b, d]]: L = [[l00, 0], [l10, l11]].
        l00 = torch.sqrt(a)
        l10 = b / l00
        l11 = torch.sqrt(d - l10 * l10)
        x0 = mu[k, 0] + l00 * z[:, 0]
        x1 = mu[k, 1] + l10 * z[:, 0] + l11 * z[:, 1]
        return torch.stack([x0, x1], dim=1).to(self.phi.dtype)

    def denoiser(self, dtype: torch.dtype | None = None) -> ExactDenoiser:
        """The ideal denoiser as a sampler network: ``net(x, t, labels) -> D(x; t)``."""
        return ExactDenoiser(self, dtype)


class ExactDenoiser(torch.nn.Module):
    """Wraps a mixture's closed-form denoiser in the ``net(x, sigma, labels)`` calling convention.

    ``dtype`` is the compute dtype (None: that of ``x``). In float32 the denoiser agrees with a
    float64 evaluation to ~1e-5 at sigma = 5 and ~1e-6 at sigma = 0.002, and is twice as fast.
    The result is returned in the dtype of ``x``.
    """

    def __init__(self, mixture: GaussianMixture, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.mixture = mixture
        self.dtype = dtype

    def forward(
        self, x: torch.Tensor, sigma: float | torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        del labels  # one mixture per class: the toy denoisers are unconditional
        dtype = x.dtype if self.dtype is None else self.dtype
        return self.mixture.denoise(x.to(dtype), torch.as_tensor(sigma).to(dtype)).to(x.dtype)


def ground_truth(classes: str = "A") -> GaussianMixture:
    """The paper's toy ground truth for class ``"A"``, ``"B"`` or both (``"AB"``).

    Weights are normalised over the chosen classes. Construction is deterministic.
    """
    if classes not in CLASSES:
        raise ValueError(f"classes must be one of {CLASSES}, got {classes!r}")
    both = _both_classes()
    parts = [both[c] for c in classes]
    phi = np.concatenate([p[0] for p in parts])
    mu = np.concatenate([p[1] for p in parts])
    cov = np.concatenate([p[2] for p in parts])
    phi = phi / phi.sum()
    return GaussianMixture(
        phi=torch.tensor(phi, dtype=torch.float32),
        mu=torch.tensor(mu, dtype=torch.float32),
        Sigma=torch.tensor(cov, dtype=torch.float32),
    )
