"""The README's rules that a test can enforce: exactly two top commands, CI runs the second, and
the docs/ pages repeat their README sections."""

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


# docs/ pages that repeat a README section for readers who land there: (file, the README section's
# heading, the page's own title or None when the page starts with the README's heading).
MIRRORS = [
    ("engine.md", "## The GPU engine: `GuidedSampler`", "# The engine: `GuidedSampler`"),
    ("generate.md", "## Generating images at scale: `autoguide-fast generate`", None),
    ("performance.md", "## Performance", None),
    ("toy.md", "## The main job: the paper's 2D toy experiment (`autoguide-fast toy`)",
     "## The paper's 2D toy experiment: `autoguide-fast toy`"),
]


def readme_section(heading):
    """The README's section under ``heading`` (a level-2 heading), up to the next level-2 heading."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def test_docs_pages_repeat_their_readme_section_word_for_word():
    """The pages under docs/ are the README's sections (a page may have its own title; the engine
    page raises its subsections one level; links into docs/ are relative to the page), so an edit
    of one without the other fails here."""
    assert sorted(p.name for p in (ROOT / "docs").glob("*.md")) == sorted(m[0] for m in MIRRORS)
    for name, heading, title in MIRRORS:
        expected = readme_section(heading)
        if title is not None:
            expected[0] = title
        if title is not None and title.startswith("# "):  # A page of its own: ### -> ##.
            expected = [line[1:] if line.startswith("### ") else line for line in expected]
        expected = [line.replace("](docs/", "](") for line in expected]
        while expected and not expected[-1]:
            expected.pop()
        page = (ROOT / "docs" / name).read_text().splitlines()
        assert page == expected, f"docs/{name} differs from the README's section {heading!r}"
