"""Output-path options of the small CLI jobs: ``none`` (any case) means "write no file", for
``demo --json`` as for ``toy --figure`` / ``toy --json``; a file of that name is written as ``./none``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
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


@pytest.mark.parametrize("argv", [
    ["toy", "--threads", "65536"],                   # Used to crash OpenMP (segfault).
    ["toy", "train", "--threads", "65536"],
    ["toy", "--samples", "1"],                       # Used to fail after parsing, with a traceback.
    ["toy", "--figure", "fig.pdf"],                  # Another format: used to fail after the whole run.
    ["toy", "train", "--out-dir", "/proc/agf-no-such-dir"],  # Used to fail after training.
    ["demo", "--backend", "cuda"],                   # Not available on this CPU-only machine.
])
def test_bad_cli_values_are_refused_while_parsing(argv):
    if argv[-2:] == ["--backend", "cuda"]:
        import autoguide_fast

        if autoguide_fast.backends()["cuda"].available:
            pytest.skip("cuda is available here")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2


def test_the_default_figure_path_is_checked_too(tmp_path, monkeypatch):
    # argparse applies type= to string defaults only: toy.png being a directory was found at the end.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy.png").mkdir()
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["toy"])
    assert exc.value.code == 2


def test_outputs_that_would_overwrite_each_other_or_the_weights_are_refused(tmp_path, monkeypatch, capsys):
    from autoguide_fast.toy import cli as toy_cli

    monkeypatch.setattr("autoguide_fast.toy.experiment.run_toy_experiment", lambda **kw: 0)
    same = str(tmp_path / "same.png")
    args = build_parser().parse_args(["toy", "--figure", same, "--json", same])
    assert toy_cli.run_experiment(args) == 2 and "same file" in capsys.readouterr().err
    weights = toy_cli.WEIGHTS_DIR / "main.pt"
    args = build_parser().parse_args(["toy", "--figure", "none", "--json", str(weights)])
    assert toy_cli.run_experiment(args) == 2 and "--weights-dir files" in capsys.readouterr().err


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import torch

    from autoguide_fast.toy.network import ToyNet, load_toy_net, save_toy_net

    path = tmp_path / "main.pt"
    save_toy_net(ToyNet(num_layers=2, hidden=8), path)
    good = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"trunc")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_toy_net(ToyNet(num_layers=2, hidden=8), path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["main.pt"]
    load_toy_net(path)


def test_a_wrong_file_in_the_weights_dir_is_named(tmp_path):
    from autoguide_fast.toy.experiment import load_shipped_models
    from autoguide_fast.toy.training import MODELS

    for name in MODELS:
        (tmp_path / f"{name}.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot load .*main.pt: not a toy checkpoint"):
        load_shipped_models(tmp_path)


def test_experiment_options_before_train_are_refused_not_ignored(tmp_path, capsys):
    # `toy --seed 7 train` used to train with seed 0 (the train default silently won).
    from autoguide_fast.toy import cli as toy_cli

    # Refused at the experiment's default values too: `toy --seed 1 train` would train with seed 0.
    cases = ((["--seed", "7"], "--seed"), (["--samples", "5", "--threads", "1"], "--samples, --threads"),
             (["--figure", "none"], "--figure"), (["--seed", "1"], "--seed"),
             (["--threads", "1", "--steps", "32"], "--threads, --steps"), (["--figure", "toy.png"], "--figure"))
    for argv, named in cases:
        args = build_parser().parse_args(["toy", *argv, "train", "--out-dir", str(tmp_path / "w")])
        assert toy_cli._dispatch(args) == 2
        assert f"error: {named}: options of the experiment" in capsys.readouterr().err
    # After 'train', its own options (same names) are its own.
    args = build_parser().parse_args(["toy", "train", "--seed", "1", "--threads", "1", "--out-dir",
                                      str(tmp_path / "w")])
    assert toy_cli._given_before_train(args) == [] and args.seed == 1
    assert not (tmp_path / "w").exists()


def test_python_dash_m_runs_the_command(tmp_path):
    """`python -m autoguide_fast` is the `autoguide-fast` command (its exit code included)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    ok = subprocess.run([sys.executable, "-m", "autoguide_fast", "demo", "--batch", "256", "--json", "none"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "PASS" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "autoguide_fast", "demo", "--batch", "0"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--batch" in bad.stderr


def test_standard_json_converts_non_finite_numbers_inside_tuples_too():
    import math

    from autoguide_fast.cli_types import json_text, standard_json

    assert standard_json((1.0, math.inf)) == [1.0, "inf"]
    assert standard_json({"interval": (0.0, -math.inf), "w": [math.nan]}) == {"interval": [0.0, "-inf"],
                                                                              "w": ["nan"]}
    assert json.loads(json_text({"interval": (0.0, math.inf)})) == {"interval": [0.0, "inf"]}


def test_path_and_thread_types_at_their_edges(tmp_path, monkeypatch):
    """--threads takes the machine's CPU count itself (not one fewer); a PNG name in any case; an
    empty directory name is refused (it would silently mean the current directory)."""
    import argparse

    from autoguide_fast.cli_types import png_file, thread_count, writable_dir

    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert thread_count("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="at most 3"):
        thread_count("4")
    assert png_file(str(tmp_path / "a.PNG")) == tmp_path / "a.PNG"
    with pytest.raises(argparse.ArgumentTypeError, match="expected a directory name"):
        writable_dir("")


def test_the_weights_dir_needs_files_not_directories_of_their_names(tmp_path):
    import argparse

    from autoguide_fast.toy.cli import weights_dir
    from autoguide_fast.toy.training import MODELS

    for name in MODELS:
        (tmp_path / f"{name}.pt").mkdir()
    with pytest.raises(argparse.ArgumentTypeError, match="lacks main.pt"):
        weights_dir(str(tmp_path))


def test_an_option_given_twice_before_train_is_named_once(tmp_path, capsys):
    from autoguide_fast.toy import cli as toy_cli

    args = build_parser().parse_args(["toy", "--seed", "1", "--seed", "2", "train", "--out-dir", str(tmp_path)])
    assert toy_cli._dispatch(args) == 2
    assert "error: --seed: options of the experiment" in capsys.readouterr().err


def test_defaults_the_docs_state():
    """The defaults the README and the help texts state: demo --batch 4096, toy --samples 16384,
    generate --batch 32 and --seeds 0-63."""
    assert build_parser().parse_args(["demo"]).batch == 4096
    assert build_parser().parse_args(["toy"]).samples == 16384
    gen = build_parser().parse_args(["generate", "--net", "edm2:xs", "--outdir", "out"])
    assert (gen.batch, gen.seeds) == (32, "0-63")


@pytest.mark.parametrize("env,tag", [({"WORLD_SIZE": "2", "RANK": "1"}, " (rank 1)"), ({}, "")])
def test_generate_errors_say_which_rank_under_torchrun(env, tag, monkeypatch, capsys):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["generate", "--net", "no_such_module_q7:net", "--outdir", "out", "--seeds", "0-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"autoguide-fast generate: error{tag}: "), err


@pytest.mark.parametrize("orders,passed", [((1.6, 1.6, 1.6, 1.6), False), ((1.0, 1.0, 1.0, 2.0), True),
                                           ((1.0, 1.0, 1.0, 1.0), False), ((1.75, 2.5, 2.5, 2.5), True)])
def test_the_demo_verdict_reads_the_observed_order(orders, passed, monkeypatch, capsys):
    """PASS once doubling the steps divides the error by 2^order with order in [1.7, 2.3], within
    4 doublings; synthetic errors with the given order at each doubling."""
    import autoguide_fast.demo as demo

    errors = [1e-2]
    for order in orders:
        errors.append(errors[-1] / 2**order)

    def fake_run_demo(batch, num_steps, guidance, backend):
        k = round(math.log2(num_steps / 32))
        return {"batch": batch, "num_steps": num_steps, "guidance": guidance, "s_main": 0.5, "s_guide": 0.8,
                "sample_std": 1.0, "predicted_std": 1.0, "relative_error_vs_closed_form": errors[k], "seconds": 0.0,
                "evaluations_per_network": 2 * num_steps - 1, "unguided_std": 0.5}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo"]) == (0 if passed else 1)
    assert ("PASS" if passed else "FAIL") in capsys.readouterr().out
