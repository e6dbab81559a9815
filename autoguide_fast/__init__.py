"""autoguide_fast: fast autoguidance sampling for diffusion models.

Autoguidance (Karras et al., NeurIPS 2024) steps with D_w = D0 + w (D1 - D0), where D1 is the
main network and D0 a smaller, less-trained guide. This package runs that sampler with fused
element-wise kernels, concurrent CUDA streams and CUDA graphs, as a drop-in for the official
EDM sampler.
"""

from __future__ import annotations

from ._extension import extension, extension_error, extension_info
from .backends import BackendStatus, backends
from .engine import BucketedSampler, GuidedSampler, clear_cache, set_cache_size
from .noise import seeded_labels, seeded_noise
from .sampler import edm_sampler, fast_guided_sample

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BucketedSampler",
    "GuidedSampler",
    "backends",
    "clear_cache",
    "edm_sampler",
    "extension_info",
    "fast_guided_sample",
    "seeded_labels",
    "seeded_noise",
    "set_cache_size",
]

extension()  # Load now so a missing extension is reported once, at import.
del extension_error
