"""The README's rules that a test can enforce: exactly two top commands, CI runs the second."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_commands():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_commands(ROOT / "README.md")


def test_readme_has_exactly_two_commands_main_job_then_tests():
    main_job, tests = load_commands()
    assert "pip install --no-build-isolation -e ." in main_job and "autoguide-fast " in main_job
    assert main_job.rstrip().split("&&")[-1].strip().startswith("autoguide-fast ")
    assert tests.rstrip().endswith("python -m pytest -q")
    # Both set up the same way (the test one adds only test tools).
    assert main_job.split(" && ")[:2] == tests.split(" && ")[:2]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_commands.py | sed -n '2p'" in ci
