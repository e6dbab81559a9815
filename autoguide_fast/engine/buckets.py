"""``BucketedSampler``: any batch size from one set of prepared ``GuidedSampler`` objects.

An inference server batches whatever requests are waiting, so the batch size changes from call to
call, while a CUDA graph is captured for one shape. The usual answer (as LLM serving engines do
for their decode graphs) is a few batch-size buckets: a call with b images runs the smallest
bucket B >= b, its inputs padded to B rows, and returns the first b rows of the result. Batches
larger than the largest bucket run in chunks of it.

Padding repeats the last image of the call (its noise, label and seed), so a padded row is a real
input: it cannot make the finiteness check fail where the real images would pass. The rows do not
interact in the sampler (every per-image quantity, including the seeded noise, is computed per
row), so with seeds an image's result depends only on its seed and on how the networks compute a
batch of B rows; with torch's random churn noise (no seeds) the pad rows draw noise too.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import arguments as A
from .guided_sampler import GuidedSampler

__all__ = ["DEFAULT_BATCH_SIZES", "BucketedSampler"]

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class BucketedSampler:
    """Autoguidance sampler for any batch size: one ``GuidedSampler`` per batch-size bucket.

    Each bucket is prepared on first use (or all at once by ``prepare()``, e.g. at server start)
    and chooses its own stream schedule, so a bucket where the guide on a side stream does not pay
    keeps one stream. Buckets do not share memory: the graphs' memory is the sum over the buckets
    prepared. Calls on different buckets run concurrently; calls on one bucket wait for each other.
    """

    def __init__(
        self,
        net: Callable,                          # Main network D1: net(x, t, labels) -> tensor like x.
        gnet: Callable | None = None,           # Guide network D0; required when guidance != 1.
        *,
        image_shape: Sequence[int] | None = None,  # Shape of one image's noise, e.g. (4, 64, 64) (required).
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,  # The buckets; larger calls run in chunks of the largest.
        image_label_shape: Sequence[int] | None = None,    # One image's label: (1000,) one-hot, () index; None = none.
        **sampler_kwargs: Any,                  # Any other GuidedSampler argument (device, dtype, guidance, graph...).
    ) -> None:
        for name in ("noise_shape", "label_shape"):
            if name in sampler_kwargs:
                raise TypeError(f"{name}: not an argument of BucketedSampler (the batch size varies per call; "
                                "give the per-image image_shape / image_label_shape)")
        if image_shape is None:  # Required; a keyword with a default so that the message above comes first.
            raise TypeError("image_shape: required, the shape of one image's noise, e.g. image_shape=(4, 64, 64)")
        self.image_shape = A.check_shape("image_shape", image_shape)
        # () = one class index per image (labels [b], e.g. int64 with label_dtype=torch.int64).
        self.image_label_shape = (None if image_label_shape is None else
                                  () if isinstance(image_label_shape, (tuple, list)) and len(image_label_shape) == 0
                                  else A.check_shape("image_label_shape", image_label_shape))
        self.batch_sizes = _check_batch_sizes(batch_sizes)
        self.copy_output = A.check_flag("copy_output", sampler_kwargs.pop("copy_output", True))
        # Construction is host-side only (no GPU work): every bucket exists from the start, so the
        # arguments are checked once, here, and a call never creates a sampler.
        self._buckets: dict[int, GuidedSampler] = {}
        for b in self.batch_sizes:
            self._buckets[b] = GuidedSampler(
                net, gnet,
                noise_shape=(b, *self.image_shape),
                label_shape=None if self.image_label_shape is None else (b, *self.image_label_shape),
                copy_output=self.copy_output,
                **sampler_kwargs,
            )
            self._buckets[b]._caller = "BucketedSampler"
        first = self._buckets[self.batch_sizes[0]]
        self.device, self.config, self.label_dtype = first.device, first.config, first.label_dtype

    # ---------------------------------------------------------------- public API

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def bucket_for(self, batch: int) -> int:
        """The bucket a call of ``batch`` images runs in (the largest bucket for larger batches,
        which then run in chunks)."""
        batch = _check_batch("batch", batch)
        for b in self.batch_sizes:
            if b >= batch:
                return b
        return self.max_batch_size

    def sampler(self, bucket: int) -> GuidedSampler:
        """The ``GuidedSampler`` of one bucket (for its ``report``, or to call it directly)."""
        if bucket not in self._buckets:
            raise ValueError(f"bucket: expected one of {self.batch_sizes}, got {bucket!r}")
        return self._buckets[bucket]

    def prepare(self, batch_sizes: Sequence[int] | None = None, *, seeded: bool = False) -> dict[int, dict]:
        """Prepare the given buckets (default: all), e.g. before serving; returns their reports."""
        chosen = self.batch_sizes if batch_sizes is None else _check_batch_sizes(batch_sizes, "batch_sizes")
        unknown = [b for b in chosen if b not in self._buckets]
        if unknown:  # Named before anything is prepared.
            raise ValueError(f"batch_sizes: expected sizes among the buckets {self.batch_sizes}, got {unknown}")
        return {b: self._buckets[b].prepare(seeded=seeded) for b in chosen}

    def __call__(
        self,
        noise: torch.Tensor | None = None,      # Unit noise [b, *image_shape]; None = seeded_noise(seeds) with
                                                # seeds, else torch.randn (then batch_size gives b).
        labels: torch.Tensor | None = None,     # [b, *image_label_shape] iff image_label_shape was given.
        seeds: Any = None,                      # One int per image (per-image noise and churn); None = torch RNG.
        *,
        batch_size: int | None = None,          # b when neither noise nor seeds give it.
    ) -> torch.Tensor:
        """Sample b images (b from noise, seeds or batch_size): a fresh [b, *image_shape] tensor, or
        with ``copy_output=False`` (graph modes) a view of the bucket's static output buffer, valid
        until that bucket's next call (for a call that fits one bucket)."""
        batch, seeds_t = self._check_call(noise, labels, seeds, batch_size)
        if batch <= self.max_batch_size:
            return self._run(batch, noise, labels, seeds_t, None)
        # Chunks of the largest bucket, each copied into one result inside its bucket's call.
        out = self._result(batch)
        for start in range(0, batch, self.max_batch_size):
            stop = min(start + self.max_batch_size, batch)
            self._run(stop - start, _rows(noise, start, stop), _rows(labels, start, stop),
                      _rows(seeds_t, start, stop), out[start:stop])
        return out

    @property
    def report(self) -> dict[int, dict]:
        """Each prepared bucket's ``GuidedSampler.report``."""
        reports = {b: s.report for b, s in self._buckets.items()}  # Each a deep copy: taken once.
        return {b: r for b, r in reports.items() if r["prepared"]}

    def release(self) -> None:
        """Release every bucket's graphs and buffers (the next call prepares its bucket again)."""
        for s in self._buckets.values():
            s.release()

    def __repr__(self) -> str:
        prepared = list(self.report)
        return (f"BucketedSampler(image_shape={self.image_shape}, batch_sizes={self.batch_sizes}, "
                f"device={self.device}, prepared={prepared})")

    # ---------------------------------------------------------------- internals

    def _check_call(self, noise, labels, seeds, batch_size) -> tuple[int, torch.Tensor | None]:
        """The call's batch size, from whichever inputs give it (they must agree), and the seeds as
        a tensor; host checks only."""
        given: dict[str, int] = {}
        if batch_size is not None:
            given["batch_size"] = _check_batch("batch_size", batch_size)
        if noise is not None:
            if not isinstance(noise, torch.Tensor):
                raise TypeError(f"noise: expected a torch.Tensor or None, got {type(noise).__name__}")
            if noise.dim() != len(self.image_shape) + 1:
                raise ValueError(f"noise: expected shape (batch, {', '.join(map(str, self.image_shape))}) "
                                 f"(a batch of the sampler's image_shape), got {tuple(noise.shape)}")
            rows = noise.shape[0]
            A.check_call_noise(noise, (rows, *self.image_shape), self.device,
                               shape_from="a batch of the sampler's image_shape")
            given["noise"] = rows
        seeds_t = A.check_call_seeds(seeds, None)
        if seeds_t is not None:
            given["seeds"] = seeds_t.shape[0]
        if not given:
            raise ValueError("batch_size: needed when neither noise nor seeds are given (how many images?)")
        source, batch = next(iter(given.items()))
        if any(v != batch for v in given.values()):
            raise ValueError(f"batch size: noise, seeds and batch_size disagree ({given})")
        if batch < 1:  # batch_size was checked positive above: noise or seeds gave no rows.
            raise ValueError(f"{source}: expected at least one image, got batch size {batch}")
        shape = None if self.image_label_shape is None else (batch, *self.image_label_shape)
        A.check_call_labels(labels, shape, self.label_dtype, self.device, shape_arg="image_label_shape")
        return batch, seeds_t

    def _result(self, batch: int) -> torch.Tensor:
        """A result tensor the buckets' calls write into: an ordinary tensor even under the caller's
        torch.inference_mode() (the samplers write outside it, and return ordinary tensors)."""
        with torch.inference_mode(False):
            return torch.empty((batch, *self.image_shape), dtype=self.config.dtype, device=self.device)

    def _run(self, batch: int, noise, labels, seeds, into: torch.Tensor | None) -> torch.Tensor:
        bucket = self.bucket_for(batch)
        sampler = self._buckets[bucket]
        pad = bucket - batch
        noise, labels, seeds = _pad(noise, pad), _pad(labels, pad), _pad(seeds, pad)
        if into is None and pad and self.copy_output:  # The b rows only: no pad row kept alive.
            into = self._result(batch)
        if into is not None:
            # Copied inside the bucket's call, so ordered before its next call on any stream.
            return sampler._sample(noise, labels, seeds, into)
        out = sampler(noise, labels, seeds)  # A fresh tensor, or (copy_output=False) the static buffer.
        return out[:batch] if pad else out


def _rows(x, start: int, stop: int):
    return None if x is None else x[start:stop]


def _pad(x, pad: int):
    """Repeat the last row ``pad`` times (a real input, see the module docstring)."""
    if x is None or pad == 0:
        return x
    return torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])


def _check_batch(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value}")
    return int(value)


def _check_batch_sizes(value: Any, name: str = "batch_sizes") -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"{name}: expected a non-empty sequence of positive integers, got {value!r}")
    sizes = [_check_batch(name, b) for b in value]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"{name}: expected distinct batch sizes, got {tuple(value)!r}")
    return tuple(sorted(sizes))

