"""Output-path options of the small CLI jobs: ``none`` (any case) means "write no file", for
``demo --json`` as for ``toy --figure`` / ``toy --json``; a file of that name is written as ``./none``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoguide_fast.cli import build_parser, main
from autoguide_fast.cli_types import writable_file


@pytest.mark.parametrize("text", ["none", "None", "NONE"])
def test_writable_file_none_means_no_file(text):
    assert writable_file(text) is None


def test_writable_file_keeps_a_path_spelled_as_a_path(tmp_path):
    assert writable_file("./none") == Path("none")
    assert writable_file(str(tmp_path / "none")) == tmp_path / "none"


@pytest.mark.parametrize("argv, field", [
    (["demo", "--json", "none"], "json"),
    (["toy", "--json", "none"], "json"),
    (["toy", "--figure", "none"], "figure"),
])
def test_every_output_option_reads_none_alike(argv, field):
    assert getattr(build_parser().parse_args(argv), field) is None


def test_demo_json_none_writes_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--batch", "256", "--json", "none"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_demo_json_to_a_file_named_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--batch", "256", "--json", "./none"]) == 0
    assert 1.7 <= json.loads((tmp_path / "none").read_text())["observed_order"] <= 2.3


def test_toy_figure_to_a_file_named_none_is_not_skipped(monkeypatch):
    """`--figure ./none` names a file (only the bare word `none` skips the figure)."""
    from autoguide_fast.toy import cli as toy_cli

    seen = {}
    monkeypatch.setattr("autoguide_fast.toy.experiment.run_toy_experiment", lambda **kw: seen.update(kw) or 0)
    for text, expected in (("./none", Path("none")), ("none", None)):
        args = build_parser().parse_args(["toy", "--figure", text])
        assert toy_cli.run_experiment(args) == 0 and seen["figure"] == expected, text
