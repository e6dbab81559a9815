"""Run a worker in several threads at once (the thread-safety tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(worker: Callable[[int], None], n: int = 8) -> None:
    """Start ``worker(0) .. worker(n - 1)`` in n threads together and wait for all of them."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
