"""A block in which any operation that makes the host wait for the GPU raises (the GPU tests of
the engine's and the kernels' promise never to synchronise)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def host_syncs_raise() -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` inside the block (the device is synchronised
    first, so only the block's own work counts); the previous mode is restored after it."""
    torch.cuda.synchronize()
    saved = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(saved)
