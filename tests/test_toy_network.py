"""The toy log-density network and its exact score-matching training (the autoguidance paper, Sec. 3)."""

import math

import numpy as np
import pytest
import torch

from autoguide_fast.toy.ground_truth import ground_truth
from autoguide_fast.toy.network import MPLinear, ToyNet, load_toy_net, normalize, save_toy_net
from autoguide_fast.toy.training import (
    MODELS,
    ToyModelSpec,
    learning_rate,
    power_ema_beta,
    power_ema_gamma,
    score_matching_loss,
    train_toy_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_like_net(seed=0):
    net = ToyNet(3, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        net.gain.fill_(0.7)  # a non-trivial log-density (gain 0 is a plain Gaussian)
    return net


@pytest.mark.parametrize("sigma", [0.002, 0.3, 5.0])
def test_denoiser_is_x_plus_sigma2_score(sigma):
    net = trained_like_net()
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net.logp(xg, sigma).sum(), xg)
    # Called like the sampler does: under no_grad, with a 0-dim sigma tensor shared by the batch.
    with torch.no_grad():
        d = net(x, torch.tensor(sigma), None)
    torch.testing.assert_close(d, x + sigma**2 * grad, rtol=1e-5, atol=1e-6)
    assert not d.requires_grad


def test_log_density_with_a_learned_gain_follows_the_design_formula():
    """log p̂ = gain · mean_j(y_j²) / σ − ½‖x̃‖² with y the body's output, restated in float64 from
    the design (MP-linear rows w / (1e-4 + rms(w)) / sqrt(fan_in), MP-SiLU = silu / 0.596), for a
    non-zero gain and per-point sigmas (gain 0 leaves only the Gaussian term)."""
    net = trained_like_net(5)
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(2))
    sigma = torch.linspace(0.01, 4.0, 12)
    s = sigma.double()[:, None]
    x_in = x.double() / torch.sqrt(0.25 + s**2)
    y = torch.cat([x_in, torch.log(s) / 4, torch.ones_like(s)], dim=1)
    for k, layer in enumerate(net.layers):
        w = layer.weight.detach().double()
        rms = w.square().mean(dim=1, keepdim=True).sqrt()
        if k > 0:
            y = torch.nn.functional.silu(y) / 0.596
        y = y @ (w / (1e-4 + rms) / math.sqrt(w.shape[1])).t()
    expected = 0.7 * y.square().mean(dim=1) / s[:, 0] - 0.5 * x_in.square().sum(dim=1)
    got = net.logp(x, sigma)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert (expected + 0.5 * x_in.square().sum(dim=1)).abs().max() > 0.1  # The learned term counts.


def test_zero_gain_is_the_gaussian_denoiser():
    # With gain 0, log p̂ = -|x|^2 / (2 (sigma_d^2 + sigma^2)): the denoiser of N(0, sigma_d^2 I).
    net = ToyNet(4, 8)
    x = torch.randn(20, 2)
    for sigma in (0.01, 0.5, 3.0):
        expected = x * 0.25 / (0.25 + sigma**2)
        torch.testing.assert_close(net(x, torch.tensor(sigma)), expected, rtol=1e-5, atol=1e-6)


def test_per_point_sigma_matches_shared_sigma():
    """Points with different sigmas in one call: each as if evaluated in a call of its own sigma."""
    net = trained_like_net(3)
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.05, 0.4, 2.5]).repeat(10)
    logp, denoised = net.logp(x, s), net(x, s)
    for value in (0.05, 0.4, 2.5):
        rows = s == value
        torch.testing.assert_close(logp[rows], net.logp(x[rows], value))
        torch.testing.assert_close(denoised[rows], net(x[rows], torch.tensor(value)))
    assert not torch.allclose(net.logp(x, 0.4), logp)  # The per-point sigmas are used.


def test_log_sigma_and_scaled_input_are_features():
    # The network sees x / sqrt(sigma_d^2 + sigma^2) and log(sigma)/4: rescaling x with sigma fixed
    # changes the output; the same x̃ at a different sigma changes it too (through log sigma).
    net = trained_like_net(4)
    x = torch.randn(10, 2)
    a = net.logp(x, 0.5)
    b = net.logp(x * math.sqrt(0.25 + 1.0) / math.sqrt(0.25 + 0.25), 1.0)
    assert not torch.allclose(a, b)


def test_mp_linear_rows_have_unit_norm():
    layer = MPLinear(7, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.5, 10, 5)[:, None])
    eye = torch.eye(7)
    w_eff = layer(eye).T                      # [out, in]: the effective weight
    torch.testing.assert_close(w_eff.norm(dim=1), torch.ones(5), rtol=1e-3, atol=0)
    layer.normalize_weight_()
    rms = layer.weight.square().mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.ones(5), rtol=1e-3, atol=0)
    # normalize() divides each row by eps + RMS.
    w = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(normalize(w), w / (1e-4 + 5 / math.sqrt(2)))


def test_power_ema_constants():
    gamma = power_ema_gamma(0.010)
    assert gamma == pytest.approx(97, abs=0.5)
    t = 0.010**-2
    assert gamma**3 + 7 * gamma**2 + (16 - t) * gamma + (12 - t) == pytest.approx(0, abs=1e-6)
    # Relative std of the power EMA profile sqrt((g+1)/((g+2)^2 (g+3))) equals the requested std.
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(0.010)
    assert power_ema_beta(1, gamma) == 0.0
    assert power_ema_beta(100, gamma) == pytest.approx((1 - 1 / 100) ** (gamma + 1))
    with pytest.raises(ValueError, match="std"):
        power_ema_gamma(0.0)


def test_learning_rate_schedule():
    assert learning_rate(0) == 1e-2
    assert learning_rate(512) == 1e-2
    assert learning_rate(2048) == pytest.approx(1e-2 / 2)


def test_loss_is_zero_for_the_exact_score():
    gt = ground_truth("A")

    class Exact(ToyNet):
        def score(self, x, sigma, create_graph=False):
            return gt.score(x, sigma)

    x = gt.sample(64, 0.1, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((64,), 0.1)
    assert float(score_matching_loss(Exact(1, 4), gt, x, sigma)) == pytest.approx(0, abs=1e-8)


def test_loss_is_the_sigma_squared_weighted_mean_squared_score_error():
    """L = mean over points of σ_i² · mean over the 2 coordinates of (score_gt − score_net)², for a
    network whose score is off by a known amount, per-point sigmas (the paper's EDM weighting)."""
    gt = ground_truth("A")
    gen = torch.Generator().manual_seed(1)
    offset = torch.randn(16, 2, generator=gen, dtype=torch.float64)

    class Off(ToyNet):
        def score(self, x, sigma, create_graph=False):
            return gt.score(x, sigma) + offset.to(x.dtype)

    x = gt.sample(16, 0.3, generator=gen).double()
    sigma = torch.linspace(0.05, 3.0, 16, dtype=torch.float64)
    expected = sum(float(sigma[i]) ** 2 * (float(offset[i, 0]) ** 2 + float(offset[i, 1]) ** 2) / 2
                   for i in range(16)) / 16
    assert float(score_matching_loss(Off(1, 4), gt, x, sigma)) == pytest.approx(expected, rel=1e-12)


def test_training_is_the_designs_loop():
    """train_toy_model against the design's training loop written out here: forced weight
    normalisation before each forward, sigma = exp(N(-2.3, 1.5^2)), exact samples at sigma, the
    sigma^2-weighted score error, Adam(0.9, 0.99) at lr = 1e-2 / sqrt(max(iter / T, 1)) (T = 2 here,
    so the decay is exercised), and the power-function EMA (std 0.010: gamma ~ 97) after each step."""
    spec = ToyModelSpec("tiny", "A", 2, 8, 150)  # 150 iterations: the EMA's beta grows to ~0.5.
    net, ema, losses = train_toy_model(spec, batch_size=32, lr_iter=2, seed=3)

    gt = ground_truth("A")
    gen = torch.Generator().manual_seed(3)
    mine = ToyNet(2, 8, generator=gen)
    avg = [p.detach().clone() for p in mine.parameters()]
    opt = torch.optim.Adam(mine.parameters(), lr=1e-2, betas=(0.9, 0.99))
    roots = np.roots([1.0, 7.0, 16.0 - 0.010**-2, 12.0 - 0.010**-2])
    gamma = max(r.real for r in roots if abs(r.imag) < 1e-9)
    assert 96 < gamma < 98
    mine_losses = []
    for it in range(150):
        opt.param_groups[0]["lr"] = 1e-2 / math.sqrt(max(it / 2, 1.0))
        with torch.no_grad():
            for layer in mine.layers:
                w = layer.weight
                w.copy_(w / (1e-4 + w.square().mean(dim=1, keepdim=True).sqrt()))
        sigma = torch.exp(torch.randn(32, generator=gen) * 1.5 - 2.3)
        x = gt.sample(32, sigma, generator=gen)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (score,) = torch.autograd.grad(mine.logp(xg, sigma).sum(), xg, create_graph=True)
        loss = (sigma**2 * (gt.score(x, sigma) - score).square().mean(dim=1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        beta = (1 - 1 / (it + 1)) ** (gamma + 1)
        with torch.no_grad():
            for a, p in zip(avg, mine.parameters()):
                a.copy_(beta * a + (1 - beta) * p)
        mine_losses.append(loss.item())
    assert losses == pytest.approx(mine_losses, rel=1e-5)
    for got, want in zip(net.parameters(), mine.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(ema.parameters(), avg):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The average is not the net (by far more than the loops' agreement): the EMA rule is checked.
    assert (ema.layers[0].weight - net.layers[0].weight).abs().max() > 1e-4


def test_short_training_lowers_the_loss():
    spec = ToyModelSpec("tiny", "A", 2, 16, 60)
    seen = []
    net, ema, losses = train_toy_model(spec, batch_size=512, progress=lambda i, v: seen.append(i))
    assert len(losses) == 60 and seen == list(range(60))
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:5])
    # On a fresh batch the trained network beats its own initialisation.
    gt = ground_truth("A")
    gen = torch.Generator().manual_seed(123)
    sigma = torch.exp(torch.randn(2048, generator=gen) * 1.5 - 2.3)
    x = gt.sample(2048, sigma, generator=gen)
    init = ToyNet(2, 16, generator=torch.Generator().manual_seed(0))
    before = float(score_matching_loss(init, gt, x, sigma).detach())
    after = float(score_matching_loss(ema, gt, x, sigma).detach())
    assert after < 0.75 * before
    # The EMA differs from the final weights (it averages over the trajectory).
    assert not torch.equal(ema.layers[1].weight, net.layers[1].weight)


def test_training_is_reproducible():
    spec = ToyModelSpec("tiny", "AB", 1, 8, 4)
    a = train_toy_model(spec, batch_size=128, seed=3)[1]
    b = train_toy_model(spec, batch_size=128, seed=3)[1]
    c = train_toy_model(spec, batch_size=128, seed=4)[1]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)


def test_model_specs():
    assert (MODELS["main"].classes, MODELS["main"].num_layers, MODELS["main"].hidden,
            MODELS["main"].iterations) == ("A", 4, 64, 4096)
    assert (MODELS["autoguide"].classes, MODELS["autoguide"].hidden,
            MODELS["autoguide"].iterations) == ("A", 32, 512)
    assert (MODELS["cfg"].classes, MODELS["cfg"].hidden, MODELS["cfg"].iterations) == \
        ("AB", 32, 512)


def test_save_load_round_trip(tmp_path):
    net = trained_like_net(5)
    path = tmp_path / "net.pt"
    save_toy_net(net, path, classes="A", iterations=3)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["meta"] == {"classes": "A", "iterations": 3}
    loaded = load_toy_net(path)
    x = torch.randn(8, 2)
    torch.testing.assert_close(loaded(x, torch.tensor(0.2)), net(x, torch.tensor(0.2)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        ToyNet(0, 8)
    with pytest.raises(ValueError, match="hidden"):
        ToyNet(2, 0)
    with pytest.raises(ValueError, match="sigma"):
        ToyNet(1, 4).logp(torch.zeros(3, 2), torch.ones(2))
    with pytest.raises(ValueError, match="iterations"):
        train_toy_model(MODELS["autoguide"], iterations=0)
    with pytest.raises(ValueError, match="batch_size"):
        train_toy_model(MODELS["autoguide"], batch_size=0)
