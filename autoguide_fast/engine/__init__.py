"""The production engine: ``GuidedSampler`` (warm-up, CUDA graphs, the guide network on a side
stream, eager fallback), ``BucketedSampler`` (any batch size from a few prepared buckets) and the
sampler cache behind ``fast_guided_sample`` on CUDA tensors."""

from __future__ import annotations

from .buckets import BucketedSampler
from .cache import cache_info, clear_cache, set_cache_size
from .cuda_graphs import ENGINE_LOCK, CaptureFailed
from .guided_sampler import GraphCaptureWarning, GuidedSampler

__all__ = [
    "BucketedSampler",
    "ENGINE_LOCK",
    "CaptureFailed",
    "GraphCaptureWarning",
    "GuidedSampler",
    "cache_info",
    "clear_cache",
    "set_cache_size",
]
