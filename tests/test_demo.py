"""The small CLI jobs: ``autoguide-fast demo`` (analytic Gaussian networks against the closed-form
guided flow, with a verdict on the observed convergence order: Heun's method is second order) and
``autoguide-fast info``."""

from __future__ import annotations

import functools
import json

import pytest

import autoguide_fast
from autoguide_fast.cli import main
from autoguide_fast.demo import run_demo


def test_sampler_follows_the_closed_form_guided_flow():
    coarse, fine = run_demo(batch=256, num_steps=32), run_demo(batch=256, num_steps=128)
    assert coarse["relative_error_vs_closed_form"] < 0.05
    assert fine["relative_error_vs_closed_form"] < coarse["relative_error_vs_closed_form"] / 10


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
