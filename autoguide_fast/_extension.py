"""Defensive loading of the compiled extension ``autoguide_fast._C``.

The package must import with no GPU, no compiled extension and no Triton. The extension is
loaded on first use; if it is missing or fails to load, one clear warning is logged and the
reason is kept for ``autoguide_fast.backends()``. Set ``AUTOGUIDE_FAST_DISABLE_EXTENSION=1`` to
behave as if it were absent (used by the tests to simulate a pure-Python install).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from types import ModuleType

__all__ = ["extension", "extension_error", "extension_info"]

_logger = logging.getLogger("autoguide_fast")
_lock = threading.Lock()
_state: dict = {"loaded": False, "module": None, "error": None}


def _load() -> None:
    with _lock:
        if _state["loaded"]:
            return
        if os.environ.get("AUTOGUIDE_FAST_DISABLE_EXTENSION", "0") == "1":
            _state["error"] = "disabled by AUTOGUIDE_FAST_DISABLE_EXTENSION=1"
        else:
            try:
                import torch  # noqa: F401  (the extension links against libtorch)

                _state["module"] = importlib.import_module("autoguide_fast._C")
            except (ImportError, OSError) as exc:
                _state["error"] = f"{type(exc).__name__}: {exc}"
        if _state["module"] is None:
            _logger.warning(
                "autoguide_fast: compiled extension autoguide_fast._C not loaded (%s); the 'cpp' and "
                "'cuda' backends are unavailable, the 'torch' backend (and 'triton', if installed) still work. "
                "To build it, install from the source tree against the installed torch: "
                "`pip install --no-build-isolation .` (or `-e .`).",
                _state["error"],
            )
        _state["loaded"] = True


def extension() -> ModuleType | None:
    """The loaded extension module, or None (after one logged warning)."""
    _load()
    return _state["module"]


def extension_error() -> str | None:
    """Why the extension is not loaded, or None if it is."""
    _load()
    return _state["error"]


def extension_info() -> dict:
    """What the loaded extension contains (``build_info()``), or {} when absent."""
    module = extension()
    return dict(module.build_info()) if module is not None else {}
