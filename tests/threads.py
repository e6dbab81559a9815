"""Run a worker in several threads at once (the thread-safety tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(worker: Callable[[int], None], n: int = 8) -> None:
    """Start ``worker(0) .. worker(n - 1)`` in n threads together and wait for all of them; an
    exception in any of them is raised here (a thread's own exception would only be printed)."""
    errors: list[tuple[int, BaseException]] = []

    def run(i: int) -> None:
        try:
            worker(i)
        except BaseException as exc:  # Re-raised in the calling thread below.
            errors.append((i, exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        i, exc = errors[0]
        raise AssertionError(f"thread {i} of {n} raised {exc!r} ({len(errors)} threads raised)") from exc
