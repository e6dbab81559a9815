"""Scale-out on torch.distributed: sharded generation and guide-parallel sampling.

* ``generate`` / ``autoguide-fast generate``: one file per seed; under torchrun the seeds are
  dealt to the ranks as in the official EDM2 script (NCCL on GPUs, gloo on CPU).
* ``guide_parallel_sample``: one trajectory with the main network on rank 0 and the guide on
  rank 1 (the latency case: batch 1, a large main network).
"""

from .generation import GenerateOptions, GenerateSummary, SamplingFailure, generate, image_path
from .guide_parallel import PeerFailure, announce_failure, guide_parallel_sample
from .loading import load_network
from .seeds import parse_seeds, rank_chunks, split_chunks

__all__ = [
    "GenerateOptions",
    "GenerateSummary",
    "PeerFailure",
    "SamplingFailure",
    "announce_failure",
    "generate",
    "guide_parallel_sample",
    "image_path",
    "load_network",
    "parse_seeds",
    "rank_chunks",
    "split_chunks",
]
