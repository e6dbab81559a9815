"""Seed lists (``--seeds 0-49999,100000-100009``) and how they are dealt to the ranks of a job.

Sharding follows the official EDM2 generator script, so a job split over W ranks runs the
same kind of batches as the official one: the seed list is cut into ``num_batches``
contiguous chunks of near-equal size (the first ``n mod num_batches`` chunks one longer),
where ``num_batches = max(ceil(n / (max_batch · W)), 1) · W``, so no chunk exceeds
``max_batch`` and every rank gets the same number of chunks; chunk k goes to rank k mod W.
"""

from __future__ import annotations

import re

__all__ = ["parse_seeds", "split_chunks", "rank_chunks", "MAX_SEEDS"]

# Most seeds one list may name: 2000x a 50k-image FID set. Checked from the ranges' lengths before
# the list is built (a list of Python ints costs ~36 bytes a seed, and every rank builds it).
MAX_SEEDS = 100_000_000

_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_seeds(
    text: str,                  # Comma-separated seeds and inclusive ranges, e.g. "0-49999,100000-100009".
    *,
    arg: str = "--seeds",       # Argument name used in error messages.
) -> list[int]:
    """The seeds in the order written. Seeds are integers in [0, 2^64); a seed may appear once."""
    if not isinstance(text, str):
        raise TypeError(f"{arg}: expected a string such as '0-63' or '0-9,20,30-39', got {type(text).__name__}")
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ValueError(f"{arg}: expected comma-separated seeds or ranges such as '0-9,20,30-39', got {text!r}")
    ranges: list[tuple[int, int]] = []
    for item in items:
        match = _ITEM.match(item)
        if match is None:
            raise ValueError(
                f"{arg}: cannot parse {item!r} in {text!r}: each item is a non-negative integer N or an "
                f"inclusive range A-B (e.g. '0-9,20,30-39')"
            )
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"{arg}: range {item!r} runs downward; write it as {hi}-{lo}")
        if hi >= 1 << 64:
            # Noise is keyed by the seed mod 2^64: a larger seed would repeat a smaller one's image.
            raise ValueError(f"{arg}: seed {hi} in {item!r} is too large (seeds are below 2^64 = {1 << 64})")
        ranges.append((lo, hi))
    count = sum(hi - lo + 1 for lo, hi in ranges)
    if count > MAX_SEEDS:
        raise ValueError(f"{arg}: {text!r} names {count} seeds; expected at most {MAX_SEEDS} "
                         f"(split the job into several runs)")
    seeds: list[int] = []
    for lo, hi in ranges:
        seeds.extend(range(lo, hi + 1))
    seen: set[int] = set()
    for seed in seeds:
        if seed in seen:
            raise ValueError(f"{arg}: seed {seed} appears more than once in {text!r} (each seed names one file)")
        seen.add(seed)
    return seeds


def split_chunks(
    num_items: int,             # Length n of the list to split.
    max_batch: int,             # Largest chunk allowed.
    world_size: int = 1,        # Number of ranks W; the chunk count is a multiple of it.
) -> list[range]:
    """All chunks of the official scheme, as index ranges (some may be empty when n < W)."""
    if num_items < 0:
        raise ValueError(f"num_items: expected >= 0, got {num_items}")
    if max_batch < 1:
        raise ValueError(f"--batch: expected a positive integer, got {max_batch}")
    if world_size < 1:
        raise ValueError(f"world_size: expected a positive integer, got {world_size}")
    num_chunks = max((num_items - 1) // (max_batch * world_size) + 1, 1) * world_size
    # Near-equal split: the first (n mod num_chunks) chunks hold one item more.
    base, extra = divmod(num_items, num_chunks)
    chunks = []
    start = 0
    for k in range(num_chunks):
        stop = start + base + (1 if k < extra else 0)
        chunks.append(range(start, stop))
        start = stop
    return chunks


def rank_chunks(num_items: int, max_batch: int, world_size: int, rank: int) -> list[range]:
    """The chunks of ``rank``: every ``world_size``-th chunk starting at chunk ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size = {world_size}, got {rank}")
    return split_chunks(num_items, max_batch, world_size)[rank::world_size]
