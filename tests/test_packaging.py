"""The source distribution holds the whole source tree (setuptools alone packs only the .cpp
files setup.py lists: no headers, no CUDA files, and a wheel could not be built from it)."""

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def test_the_sdist_holds_every_tracked_file(tmp_path):
    tracked = _tracked_files()
    src = tmp_path / "src"
    for name in tracked:  # A copy: the sdist build writes its egg-info next to setup.py.
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    # Without the extension setup.py lists no sources, so MANIFEST.in alone decides what is packed.
    env = dict(os.environ, AUTOGUIDE_FAST_BUILD_EXT="0")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                          cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(set(tracked) - packed)
    assert not missing, f"tracked files missing from the sdist: {missing}"
    assert any(name.startswith("csrc/cuda/") and name.endswith(".cu") for name in packed)
    assert not [name for name in packed if name.endswith((".so", ".pyc"))]
