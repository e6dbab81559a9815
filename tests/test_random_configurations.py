"""Sampler configurations drawn at random (tests/random_configs.py), every CPU backend against the
plain one: the eager ``torch`` loop equals the reference sampler bit for bit (where an extension
is drawn, the official loop with the extension restated from its documented rule), and the fused
C++ kernels equal the ``torch`` loop bit for bit (float32 states, and float64 without churn;
float64 churn noise: our ln/sin/cos against torch's, within 1e-12). The Triton kernels get the
same draws in tests/test_triton_random_configurations.py."""

from __future__ import annotations

import pytest
import torch

import autoguide_fast
from autoguide_fast.reference import edm_sampler as reference_sampler
from tests.random_configs import draw, extended_reference, rel_l2, seeded_randn_like

DRAWS = 40
HAS_CPP = autoguide_fast.backends()["cpp"].available

pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(d, backend):
    net, gnet, noise, labels = d.inputs()
    return autoguide_fast.fast_guided_sample(net, noise, labels, gnet, seeds=d.seeds, backend=backend,
                                             check_finite=False, **d.kwargs)


def test_draws_cover_every_option():
    """The draws are worth their time: together they take every branch they are meant to mix."""
    draws = [draw(i) for i in range(DRAWS)]
    kw = [d.kwargs for d in draws]
    assert any(d.official for d in draws) and any(not d.official for d in draws)
    assert any("sigmas" in k for k in kw) and any(k["solver"] == "euler" for k in kw)
    assert any(k["guidance_interval"] for k in kw) and any(k["S_churn"] > 0 for k in kw)
    assert {abs(k["guidance"]) < 0.5 for k in kw if k["guidance"] != 1} == {True, False}  # Both lerp branches.
    assert {d.net_dtype for d in draws} == {torch.float32, torch.float16, torch.bfloat16}
    assert {k["dtype"] for k in kw} == {torch.float32, torch.float64}
    assert any(d.label_dim for d in draws) and any(len(d.shape) == 2 for d in draws)
    assert any(s >= 2**63 for d in draws for s in d.seeds)


@pytest.mark.parametrize("index", range(DRAWS))
def test_torch_loop_equals_the_reference(index):
    """Bit for bit: the official sampler where its semantics apply, else the official loop with the
    extensions restated from their documented rules (random_configs.extended_reference)."""
    d = draw(index)
    net, gnet, noise, labels = d.inputs()
    if d.official:
        kwargs = {k: v for k, v in d.kwargs.items() if k not in ("guidance_interval", "solver")}
        expected = reference_sampler(net, noise, labels, gnet, randn_like=seeded_randn_like(d), **kwargs)
    else:
        expected = extended_reference(net, noise, labels, gnet, randn_like=seeded_randn_like(d), **d.kwargs)
    got = _sample(d, "torch")
    assert torch.equal(got, expected), (d, rel_l2(got, expected))


def test_the_extended_reference_is_the_official_one_without_extensions():
    """The restated loop is the reference sampler itself when no extension is used."""
    for index in range(DRAWS):
        d = draw(index)
        if not d.official:
            continue
        net, gnet, noise, labels = d.inputs()
        kwargs = {k: v for k, v in d.kwargs.items() if k not in ("guidance_interval", "solver")}
        assert torch.equal(extended_reference(net, noise, labels, gnet, randn_like=seeded_randn_like(d), **kwargs),
                           reference_sampler(net, noise, labels, gnet, randn_like=seeded_randn_like(d), **kwargs))


@pytest.mark.skipif(not HAS_CPP, reason="the compiled extension (CPU kernels) is not loaded")
@pytest.mark.parametrize("index", range(DRAWS))
def test_cpp_kernels_equal_the_torch_loop(index):
    d = draw(index)
    expected, got = _sample(d, "torch"), _sample(d, "cpp")
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if d.kwargs["dtype"] == torch.float64 and d.kwargs["S_churn"] > 0:
        assert rel_l2(got, expected) <= 1e-12, d
    else:
        assert torch.equal(got, expected), (d, rel_l2(got, expected))
