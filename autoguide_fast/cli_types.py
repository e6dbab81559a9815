"""Argument types shared by the command lines (``autoguide-fast demo``, ``toy``), the probe that
tells whether a directory can be written (also used by ``generate`` for its ``--outdir``), and the
atomic file write behind every output file of the commands."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["PARTIAL_SUFFIX", "Given", "at_least_two", "finite_float", "json_text", "png_file", "positive_int",
           "standard_json", "steps", "thread_count", "torch_seed", "writable_dir", "writable_file",
           "write_atomically", "write_json", "write_probe"]


def write_probe(folder: str | os.PathLike) -> None:
    """Create and remove a file in ``folder``; raises OSError if that is not possible
    (``os.access`` says yes to root even where nothing can be created)."""
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    os.close(fd)
    os.remove(probe)


class Given(argparse.Action):
    """Stores the option's value (as argparse's default action) and records that it was given, as
    typed: ``namespace.given`` lists (flag, dest) in the order given. For rules about an option
    given at all, whatever its value (one given at its default value is still given)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = [*getattr(namespace, "given", []), (option_string, self.dest)]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def torch_seed(text: str) -> int:
    """A torch seed, 0 <= seed < 2^63 (torch takes up to 2^64 - 1; the commands also seed with
    seed + 1 and seed + 2, so this leaves room)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 1 << 63:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2^63 - 1, got {text}")
    return value


def _integer_at_least(text: str, least: int, why: str = "") -> int:
    value = positive_int(text)
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}{why}, got {text}")
    return value


def at_least_two(text: str) -> int:
    return _integer_at_least(text, 2)


def thread_count(text: str) -> int:
    """CPU threads: 1 to the machine's CPU count (more only slows down; far more crashes OpenMP)."""
    value = positive_int(text)
    most = os.cpu_count() or 1
    if value > most:
        raise argparse.ArgumentTypeError(f"must be at most {most} (this machine's CPUs), got {text}")
    return value


def steps(text: str) -> int:
    return _integer_at_least(text, 2, " (the sampler's time steps)")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def writable_file(text: str) -> Path | None:
    """An output path that can be written: not a directory, and its nearest existing ancestor
    directory writable (missing directories are created when the file is written). 'none' (any
    case) is None: write no file, for every option of this type; a file of that name is './none'."""
    if text.lower() == "none":
        return None
    path = Path(text)
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if path.is_dir():
            raise OSError("it is a directory")
        if not folder.is_dir():
            raise OSError(f"{folder} is not a directory")
        write_probe(folder)
    except OSError as exc:
        reason = exc.strerror or exc
        raise argparse.ArgumentTypeError(f"cannot write {text!r} ({reason})") from None
    return path


def png_file(text: str) -> Path | None:
    """A writable output path (as ``writable_file``) for a PNG: a name ending in .png or without a
    suffix (another suffix, e.g. .pdf, would name a file of another format); 'none' is None."""
    path = writable_file(text)
    if path is not None and path.suffix.lower() not in ("", ".png"):
        raise argparse.ArgumentTypeError(f"expected a .png file name (or 'none'), got {text!r}")
    return path


def writable_dir(text: str) -> Path:
    """An output directory: an existing writable directory, or one that can be created (its nearest
    existing ancestor is a writable directory)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a directory name, got ''")
    path = Path(text)
    folder = path.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise OSError(f"{folder} is not a directory")
        write_probe(folder)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write into {text!r} ({exc.strerror or exc})") from None
    return path


PARTIAL_SUFFIX = ".partial"  # A file being written: ".<name>.<writer>.partial" beside <name>.


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a binary file written aside under a name of this writer's own
    (``.<name>.<pid>-<random>.partial``), flushed to the disk, then renamed to ``path`` (its folder
    created if missing): a file that exists under its final name is complete, even after an
    interrupted or failed write or a crash of the machine."""
    folder, name = os.path.split(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    try:
        with open(partial, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


def standard_json(value: Any) -> Any:
    """``value`` with its non-finite floats as the strings "inf", "-inf", "nan" (standard JSON has
    no Infinity or NaN; Python's json module writes them as bare words other readers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: standard_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [standard_json(v) for v in value]
    return value


def json_text(value: Any) -> str:
    """The text of an output JSON file: standard JSON (see standard_json), indented, one final newline."""
    return json.dumps(standard_json(value), indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, value: Any) -> None:
    """``value`` as an output JSON file (json_text), written atomically (write_atomically)."""
    text = json_text(value)
    write_atomically(path, lambda f: f.write(text.encode()))


def progress_bar(total: int, desc: str, unit: str, **kwargs: Any):
    """A tqdm progress bar, or None without tqdm (the bar is a nicety: tqdm is an optional dependency)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, **kwargs)
