"""The exact tree-mixture ground truth of the 2D toy experiment (the autoguidance paper, Sec. 3)."""

import importlib
import math

import numpy as np
import pytest
import torch

from autoguide_fast.toy.ground_truth import GaussianMixture, ground_truth

gt_module = importlib.import_module("autoguide_fast.toy.ground_truth")

SIGMAS = [0.0, 0.003, 0.05, 0.4, 5.0]


pytestmark = pytest.mark.usefixtures("one_thread")


def mixture_moments(gt, sigma):
    """Exact mean and covariance of p(x; sigma), from phi, mu, Sigma alone (float64)."""
    phi, mu, cov = gt.phi.double(), gt.mu.double(), gt.Sigma.double()
    mean = phi @ mu
    second = (phi[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0)
    return mean, second + sigma**2 * torch.eye(2, dtype=torch.float64) - torch.outer(mean, mean)


@pytest.mark.parametrize("classes,count", [("A", 1016), ("B", 1016), ("AB", 2032)])
def test_component_counts_and_weights(classes, count):
    gt = ground_truth(classes)
    assert gt.phi.shape == (count,)
    assert gt.mu.shape == (count, 2)
    assert gt.Sigma.shape == (count, 2, 2)
    assert gt.phi.dtype == torch.float32
    assert torch.all(gt.phi > 0)
    assert float(gt.phi.double().sum()) == pytest.approx(1.0, abs=1e-6)
    # Covariances are symmetric positive definite.
    assert torch.equal(gt.Sigma[:, 0, 1], gt.Sigma[:, 1, 0])
    assert torch.all(torch.linalg.eigvalsh(gt.Sigma.double()) > 0)


def test_union_is_centred_with_std_half():
    mean, cov = mixture_moments(ground_truth("AB"), 0.0)
    assert torch.all(mean.abs() < 0.01), mean
    std = cov.diagonal().sqrt()
    assert torch.all((std - 0.5).abs() < 0.01), std


def test_class_weights_split_in_union():
    ab = ground_truth("AB")
    a, b = ground_truth("A"), ground_truth("B")
    ratio = float(ab.phi[:1016].double().sum())
    # Within the union each class keeps its relative weights.
    torch.testing.assert_close(ab.phi[:1016].double() / ratio, a.phi.double(), rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(ab.phi[1016:].double() / (1 - ratio), b.phi.double(), rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(ab.mu, torch.cat([a.mu, b.mu]))


def test_first_branch_follows_the_first_draw():
    # The root branch of class A starts at origin * scale, points at angle pi/4 and has length
    # 0.292 * (1 + 0.2 * first draw of RandomState(2)); its 8 components sit at t = 0.07 ... 0.93.
    first = np.random.RandomState(2).randn()
    dist = 0.292 * (1 + 0.2 * first)
    scale = np.array([1.3136, 1.3844])
    origin = np.array([0.0030, 0.0325])
    direction = np.array([math.cos(math.pi / 4), math.sin(math.pi / 4)])
    t = np.linspace(0.07, 0.93, 8)
    expected = (origin + direction * dist * t[:, None]) * scale
    gt = ground_truth("A")
    np.testing.assert_allclose(gt.mu[:8].numpy(), expected, rtol=0, atol=1e-6)
    # Class B's root points the opposite way from the same origin.
    b = ground_truth("B")
    d_b = (b.mu[7] - b.mu[0]).double().numpy() / scale
    assert d_b[0] < 0 and d_b[1] < 0
    assert d_b[0] == pytest.approx(d_b[1], rel=1e-4)


def _design_tree() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both classes' components (weights unnormalised, means, covariances), restated from the
    design's recipe: RandomState(2); a branch draws its length, adds 8 components, then recurses
    into the +1 child and the -1 child, each child's angle drawn just before it recurses; depth
    0..6; class A (root angle pi/4) before class B (5 pi/4), both from the origin."""
    rng = np.random.RandomState(2)
    origin, scale = np.array([0.0030, 0.0325]), np.array([1.3136, 1.3844])
    weights, means, covs = [], [], []

    def branch(depth: int, pos: np.ndarray, angle: float) -> None:
        if depth == 7:
            return
        direction = np.array([math.cos(angle), math.sin(angle)])
        dist = 0.292 * 0.8**depth * (1 + 0.2 * rng.randn())
        thick = 0.2 * 0.8**depth / dist
        size = scale * dist * 0.06
        outer = np.outer(direction, direction)
        cov = (outer + (np.eye(2) - outer) * thick**2) * np.outer(size, size)
        for t in np.linspace(0.07, 0.93, 8):
            weights.append(dist * 0.5**depth)
            means.append((pos + direction * dist * t) * scale)
            covs.append(cov)
        for sign in (1, -1):
            branch(depth + 1, pos + direction * dist, angle + sign * 0.7**depth * (1 + 0.2 * rng.randn()))

    branch(0, origin, math.pi / 4)
    branch(0, origin, 5 * math.pi / 4)
    return np.array(weights), np.array(means), np.array(covs)


def test_every_component_follows_the_designs_recipe():
    """The whole tree, not only its root branch: every component's weight, mean and covariance of
    both classes and of their union, against the recipe restated independently above."""
    weights, means, covs = _design_tree()
    n = len(weights) // 2
    for classes, rows in (("A", slice(0, n)), ("B", slice(n, 2 * n)), ("AB", slice(0, 2 * n))):
        gt = ground_truth(classes)
        w = weights[rows] / weights[rows].sum()
        np.testing.assert_allclose(gt.phi.double().numpy(), w, rtol=1e-6, atol=0)
        np.testing.assert_allclose(gt.mu.double().numpy(), means[rows], rtol=0, atol=1e-6)
        np.testing.assert_allclose(gt.Sigma.double().numpy(), covs[rows], rtol=1e-5, atol=1e-12)


def test_construction_is_deterministic():
    a1 = ground_truth("AB")
    gt_module._both_classes.cache_clear()
    a2 = ground_truth("AB")
    for name in ("phi", "mu", "Sigma"):
        assert torch.equal(getattr(a1, name), getattr(a2, name))


@pytest.mark.parametrize("sigma", SIGMAS)
def test_score_is_gradient_of_logp(sigma):
    gt = ground_truth("A")
    gen = torch.Generator().manual_seed(0)
    x = gt.sample(300, max(sigma, 0.02), generator=gen).double()
    x = torch.cat([x, torch.tensor([[3.0, -2.0], [-1.0, 0.2]], dtype=torch.float64)])
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gt.logp(xg, sigma).sum(), xg)
    torch.testing.assert_close(gt.score(x, sigma), grad, rtol=1e-7, atol=1e-9)
    # The per-point sigma path (used in training) agrees with the shared-sigma path.
    per_point = torch.full((x.shape[0],), sigma, dtype=torch.float64)
    torch.testing.assert_close(gt.score(x, per_point), grad, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gt.logp(x, per_point), gt.logp(x, sigma), rtol=1e-10, atol=1e-9)


def test_float32_score_close_to_float64():
    gt = ground_truth("A")
    x = gt.sample(2000, 0.01, generator=torch.Generator().manual_seed(3))
    for sigma in (0.002, 0.1, 5.0):
        s64 = gt.score(x.double(), sigma)
        s32 = gt.score(x, sigma)
        # Denoiser scale: sigma^2 * score is what the sampler uses.
        err = (sigma**2 * (s32.double() - s64)).abs().max()
        assert float(err) < 1e-4 * max(1.0, sigma)


def test_logp_integrates_to_one():
    gt = ground_truth("A")
    sigma, h = 0.25, 0.02
    g = torch.arange(-2.5, 3.5, h, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    p = gt.logp(torch.stack([xx.flatten(), yy.flatten()], dim=1), sigma).exp()
    assert float(p.sum() * h * h) == pytest.approx(1.0, abs=2e-3)


def test_logp_matches_direct_formula_for_one_point():
    gt = ground_truth("B")
    x = torch.tensor([[-0.3, -0.2]], dtype=torch.float64)
    sigma = 0.07
    cov = gt.Sigma.double() + sigma**2 * torch.eye(2, dtype=torch.float64)
    dens = torch.distributions.MultivariateNormal(gt.mu.double(), covariance_matrix=cov)
    expected = torch.logsumexp(dens.log_prob(x) + gt.phi.double().log(), dim=0)
    assert float(gt.logp(x, sigma)) == pytest.approx(float(expected), abs=1e-10)


@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_sample_moments_match_mixture(sigma):
    gt = ground_truth("A")
    n = 200_000
    x = gt.sample(n, sigma, generator=torch.Generator().manual_seed(7)).double()
    mean, cov = mixture_moments(gt, sigma)
    se = (cov.diagonal() / n).sqrt()
    assert torch.all((x.mean(0) - mean).abs() < 5 * se)
    centred = x - mean
    prods = centred[:, :, None] * centred[:, None, :]
    se_cov = prods.std(0) / math.sqrt(n)
    assert torch.all((prods.mean(0) - cov).abs() < 5 * se_cov)


def test_sampling_agrees_with_logp_histogram():
    # Chi-square test: counts of exact samples in a coarse grid of cells against the
    # probability of each cell integrated numerically from exp(logp).
    gt = ground_truth("A")
    sigma, n = 0.1, 100_000
    x = gt.sample(n, sigma, generator=torch.Generator().manual_seed(11)).double()
    lo, hi, cells, fine = -0.9, 1.7, 13, 12
    edges = torch.linspace(lo, hi, cells + 1, dtype=torch.float64)
    h = (hi - lo) / (cells * fine)
    centres = lo + h * (torch.arange(cells * fine, dtype=torch.float64) + 0.5)
    xx, yy = torch.meshgrid(centres, centres, indexing="xy")
    p = gt.logp(torch.stack([xx.flatten(), yy.flatten()], dim=1), sigma).exp() * h * h
    prob = p.reshape(cells, fine, cells, fine).sum(dim=(1, 3))         # [y cell, x cell]
    ix = torch.bucketize(x[:, 0].contiguous(), edges) - 1
    iy = torch.bucketize(x[:, 1].contiguous(), edges) - 1
    inside = (ix >= 0) & (ix < cells) & (iy >= 0) & (iy < cells)
    counts = torch.zeros(cells, cells, dtype=torch.float64)
    counts.index_put_((iy[inside], ix[inside]), torch.ones(int(inside.sum()),
                                                           dtype=torch.float64), accumulate=True)
    assert float(prob.sum()) == pytest.approx(float(inside.double().mean()), abs=0.01)
    expected = prob * n
    use = expected > 20
    chi2 = float(((counts[use] - expected[use]) ** 2 / expected[use]).sum())
    dof = int(use.sum()) - 1
    # Mean dof, std sqrt(2 dof): 5 standard deviations (numerical integration error included).
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


def test_sampling_agrees_with_score_stein_identity():
    # For x ~ p: E[score(x) x^T] = -I (integration by parts), E[score(x)] = 0.
    gt = ground_truth("AB")
    n = 50_000
    for sigma in (0.05, 1.0):
        x = gt.sample(n, sigma, generator=torch.Generator().manual_seed(5)).double()
        s = gt.score(x, sigma)
        outer = (s[:, :, None] * x[:, None, :])
        est = outer.mean(0)
        se = outer.std(0) / math.sqrt(n)
        assert torch.all((est + torch.eye(2, dtype=torch.float64)).abs() < 5 * se + 1e-3), est
        assert torch.all(s.mean(0).abs() < 5 * s.std(0) / math.sqrt(n))


def test_sample_is_seeded():
    gt = ground_truth("A")
    a = gt.sample(1000, 0.5, generator=torch.Generator().manual_seed(1))
    b = gt.sample(1000, 0.5, generator=torch.Generator().manual_seed(1))
    c = gt.sample(1000, 0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 1.0, 5.0])
def test_exact_denoiser_under_no_grad(sigma):
    """D(x; σ) = x + σ² ∇ log p(x; σ) (Tweedie), with the gradient taken by autograd of the mixture's
    log-density (independent of its closed-form score), at σ where σ and σ² differ."""
    gt = ground_truth("A")
    den = gt.denoiser()
    x = gt.sample(64, sigma, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(sigma)
    with torch.no_grad():
        d = den(x, t, None)
    assert d.dtype == x.dtype and d.shape == x.shape
    x64 = x.double().requires_grad_()
    (grad,) = torch.autograd.grad(gt.logp(x64, sigma).sum(), [x64])
    expected = x.double() + sigma**2 * grad
    scale = max(1.0, sigma**2)
    torch.testing.assert_close(d.double(), expected, rtol=0, atol=4e-5 * scale)
    with torch.no_grad():
        d64 = gt.denoiser(torch.float64)(x, t, None)             # float64 compute, float32 out
    torch.testing.assert_close(d64.double(), expected, rtol=1e-6, atol=1e-7 * scale)


def test_bad_arguments():
    gt = ground_truth("A")
    with pytest.raises(ValueError, match="classes"):
        ground_truth("C")
    with pytest.raises(ValueError, match="x must"):
        gt.logp(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="sigma"):
        gt.score(torch.zeros(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match="sigma"):
        gt.logp(torch.zeros(4, 2), -1.0)
    with pytest.raises(ValueError, match="n must"):
        gt.sample(-1)


def test_sample_covariance_of_correlated_components():
    # Strongly correlated components make a wrong Cholesky factor visible in the moments.
    mix = GaussianMixture(
        phi=torch.tensor([0.3, 0.7]),
        mu=torch.tensor([[1.0, -1.0], [-0.5, 0.25]]),
        Sigma=torch.tensor([[[0.04, 0.03], [0.03, 0.0325]], [[0.02, -0.012], [-0.012, 0.01]]]),
    )
    n, sigma = 200_000, 0.05
    x = mix.sample(n, sigma, generator=torch.Generator().manual_seed(2)).double()
    mean, cov = mixture_moments(mix, sigma)
    centred = x - mean
    prods = centred[:, :, None] * centred[:, None, :]
    assert torch.all((x.mean(0) - mean).abs() < 5 * x.std(0) / math.sqrt(n))
    assert torch.all((prods.mean(0) - cov).abs() < 5 * prods.std(0) / math.sqrt(n))
    # Per component: points nearest the first mean carry its correlation (0.03 / sqrt(.04*.0325)).
    first = x[(x - torch.tensor([1.0, -1.0], dtype=torch.float64)).norm(dim=1) < 1.0]
    corr = torch.corrcoef(first.T)[0, 1]
    sd = torch.tensor([0.04 + sigma**2, 0.0325 + sigma**2]).sqrt()
    assert float(corr) == pytest.approx(0.03 / float(sd.prod()), abs=0.01)
