"""The small CLI jobs: ``autoguide-fast demo`` (analytic Gaussian networks against the closed-form
guided flow, with a verdict on the observed convergence order: Heun's method is second order) and
``autoguide-fast info``."""

from __future__ import annotations

import functools
import json
import math

import pytest

import autoguide_fast
from autoguide_fast.cli import main
from autoguide_fast.demo import run_demo


def test_sampler_follows_the_closed_form_guided_flow():
    coarse, fine = run_demo(batch=256, num_steps=32), run_demo(batch=256, num_steps=128)
    assert coarse["relative_error_vs_closed_form"] < 0.05
    assert fine["relative_error_vs_closed_form"] < coarse["relative_error_vs_closed_form"] / 10


def test_the_seed_picks_the_noise_and_the_evaluations_are_counted(monkeypatch):
    """seed= draws other start noise (images seed..seed+batch-1), and a Heun run of N steps makes
    2N - 1 evaluations of each network (the last step is Euler), counted here by the calls."""
    a, b = run_demo(batch=64, num_steps=4, seed=0), run_demo(batch=64, num_steps=4, seed=1)
    assert a["sample_std"] != b["sample_std"]
    calls = []
    forward = autoguide_fast.demo.GaussianDenoiser.forward
    monkeypatch.setattr(autoguide_fast.demo.GaussianDenoiser, "forward",
                        lambda self, *args: calls.append(self.s) or forward(self, *args))
    result = run_demo(batch=8, num_steps=4, s1=0.5, s0=0.8)
    assert result["evaluations_per_network"] == calls.count(0.5) == calls.count(0.8) == 7


def test_cli_reports_second_order_convergence(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--batch", "256", "--json", str(out)]) == 0
    assert "PASS: from 32 to 64 steps" in capsys.readouterr().out
    assert 1.7 <= json.loads(out.read_text())["observed_order"] <= 2.3


def test_cli_refuses_an_unwritable_json_path_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setattr(autoguide_fast, "fast_guided_sample", None)  # Sampling would fail otherwise.
    for path in (tmp_path, "/proc/no/demo.json"):
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--json", str(path)])
        assert exc.value.code == 2


def test_cli_verdict_fails_for_a_first_order_sampler(monkeypatch, capsys):
    # Euler steps (first order) in place of Heun's: the verdict must say so.
    monkeypatch.setattr(autoguide_fast, "fast_guided_sample",
                        functools.partial(autoguide_fast.fast_guided_sample, solver="euler"))
    assert main(["demo", "--batch", "256"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_info_lists_devices_triton_extension_and_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"autoguide_fast {autoguide_fast.__version__}, torch ")
    assert "\ncuda: " in out and "\ntriton: " in out and "\nextension: " in out
    for name, status in autoguide_fast.backends().items():
        assert f"  {name:7s} {'available' if status.available else 'unavailable'}: " in out


def _flow_in_decimal(s1, s0, w, sigma0, sigma):
    """The closed-form guided flow in 60-digit decimal arithmetic (no float64 overflow)."""
    from decimal import Decimal, localcontext

    with localcontext() as ctx:
        ctx.prec = 60
        d = lambda v: Decimal(repr(float(v)))  # noqa: E731
        guide = (d(s0) ** 2 + d(sigma) ** 2) / (d(s0) ** 2 + d(sigma0) ** 2)
        main_ = (d(s1) ** 2 + d(sigma) ** 2) / (d(s1) ** 2 + d(sigma0) ** 2)
        return float(guide ** ((1 - d(w)) / 2) * main_ ** (d(w) / 2))


@pytest.mark.parametrize("w", [2.0, -3.5, 60.0, 700.0, -700.0, 1400.0])
def test_closed_form_flow_is_exact_where_each_power_alone_overflows(w):
    """The two powers of the closed form overflow float64 separately for |w| of a few hundred
    (the demo used to end in OverflowError there); their product is computed from the logarithms."""
    from autoguide_fast.demo import guided_gaussian_flow

    expected = _flow_in_decimal(0.5, 0.8, w, 80.0, 0.002)
    assert expected != 0 and math.isfinite(expected)
    assert guided_gaussian_flow(0.5, 0.8, w, 80.0, 0.002) == pytest.approx(expected, rel=1e-12)


def test_cli_refuses_a_guidance_whose_closed_form_is_out_of_range(monkeypatch, capsys):
    monkeypatch.setattr(autoguide_fast, "fast_guided_sample", None)  # Refused before sampling.
    for w in ("1e30", "-1e6", "5000"):
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--guidance", w])
        assert exc.value.code == 2
        assert "argument --guidance" in capsys.readouterr().err
    with pytest.raises(ValueError, match="guidance=1e"):  # The API's own check.
        run_demo(guidance=1e30)


def test_cli_json_has_the_verdict_and_is_standard_json(tmp_path, monkeypatch):
    """`passed` carries the verdict; a finer run that diverges (NaN/Inf samples) leaves the order
    NaN, written as the string "nan" (standard JSON has no NaN), and the verdict FAIL."""
    strict = functools.partial(json.loads, parse_constant=lambda name: pytest.fail(f"non-standard JSON: {name}"))
    out = tmp_path / "demo.json"
    assert main(["demo", "--batch", "256", "--json", str(out)]) == 0
    assert strict(out.read_text())["passed"] is True

    real = autoguide_fast.fast_guided_sample

    def diverging_when_finer(*args, num_steps, **kwargs):
        if num_steps > 32:
            raise FloatingPointError("fast_guided_sample: the result contains NaN or Inf")
        return real(*args, num_steps=num_steps, **kwargs)

    monkeypatch.setattr(autoguide_fast, "fast_guided_sample", diverging_when_finer)
    assert main(["demo", "--batch", "256", "--json", str(out)]) == 1
    data = strict(out.read_text())
    assert data["passed"] is False and data["observed_order"] == "nan"


def test_json_text_writes_non_finite_floats_as_strings():
    from autoguide_fast.cli_types import json_text

    text = json_text({"a": [math.inf, -math.inf, math.nan, (1.5, 2)], "b": "x"})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == {
        "a": ["inf", "-inf", "nan", [1.5, 2]], "b": "x"}
    assert text.endswith("}\n")
