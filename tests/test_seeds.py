"""Seed lists and their sharding over ranks (the official EDM2 scheme)."""

from __future__ import annotations

import numpy as np
import pytest

from autoguide_fast.distributed.seeds import parse_seeds, rank_chunks, split_chunks


def test_parse_ranges_and_singles_in_order():
    assert parse_seeds("0-3,60-62, 7") == [0, 1, 2, 3, 60, 61, 62, 7]
    assert parse_seeds("5") == [5]
    assert parse_seeds("0-49999,60000-60009")[-1] == 60009
    assert len(parse_seeds("0-49999")) == 50000


@pytest.mark.parametrize("text, match", [
    ("", "comma-separated"),
    ("0-3,,5", "comma-separated"),
    ("a-b", "cannot parse 'a-b'"),
    ("-3", "cannot parse '-3'"),
    ("1.5", "cannot parse '1.5'"),
    ("0..9", "cannot parse '0..9'"),
    ("0-3-5", "cannot parse '0-3-5'"),
    ("9-3", "runs downward"),
    ("0-5,3", "seed 3 appears more than once"),
    ("18446744073709551616", "too large"),  # 2^64: would repeat seed 0's noise.
    ("18446744073709551610-18446744073709551616", "too large"),
])
def test_bad_seed_syntax_names_the_argument(text, match):
    with pytest.raises(ValueError, match="--seeds") as info:
        parse_seeds(text)
    assert match in str(info.value)


def _official_chunks(n: int, max_batch: int, world_size: int, rank: int) -> list[list[int]]:
    # The formula of the official script, with numpy's array_split, as an independent oracle.
    num_batches = max((n - 1) // (max_batch * world_size) + 1, 1) * world_size
    return [list(c) for c in np.array_split(np.arange(n), num_batches)[rank::world_size]]


@pytest.mark.parametrize("n, max_batch, world_size", [
    (1, 4, 1), (1, 4, 2), (11, 4, 1), (11, 4, 2), (50, 8, 3), (64, 64, 1), (65, 64, 1), (7, 3, 8), (100, 7, 4),
])
def test_sharding_matches_the_official_scheme(n, max_batch, world_size):
    per_rank = [rank_chunks(n, max_batch, world_size, r) for r in range(world_size)]
    for r, chunks in enumerate(per_rank):
        assert [list(c) for c in chunks] == _official_chunks(n, max_batch, world_size, r)
        assert all(len(c) <= max_batch for c in chunks)
    # Every rank runs the same number of batches; every index is dealt exactly once, in order per chunk.
    assert len({len(c) for c in per_rank}) == 1
    dealt = sorted(i for chunks in per_rank for c in chunks for i in c)
    assert dealt == list(range(n))
    # Chunk k goes to rank k mod W.
    everything = split_chunks(n, max_batch, world_size)
    assert all(everything[k] == per_rank[k % world_size][k // world_size] for k in range(len(everything)))


def test_sharding_argument_errors():
    with pytest.raises(ValueError, match="--batch"):
        split_chunks(10, 0)
    with pytest.raises(ValueError, match="rank"):
        rank_chunks(10, 4, 2, 2)
