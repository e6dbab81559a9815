"""Argument checks of the engine: each error names the argument and what is expected, and is
raised on the host before any GPU work is queued (the sampler arguments themselves are checked by
``autoguide_fast.validation`` through ``make_config``)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch

from .. import validation as V
from ..noise import check_target_device, seeds_to_tensor
from ..validation import check_flag

__all__ = [
    "GRAPH_MODES",
    "STREAM_MODES",
    "check_call_labels",
    "check_call_noise",
    "check_call_seeds",
    "check_device",
    "check_flag",
    "check_shape",
]

GRAPH_MODES = ("auto", "trajectory", "step", "none")
STREAM_MODES = ("auto", "on", "off")


def check_shape(name: str, value: Any) -> tuple[int, ...]:
    """A full tensor shape: a non-empty sequence of positive integers."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Size)):
        raise TypeError(f"{name}: expected a sequence of positive integers, got {type(value).__name__}")
    dims = []
    for d in value:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"{name}: expected a sequence of positive integers, got {tuple(value)!r}")
        if d < 1:
            raise ValueError(f"{name}: expected a sequence of positive integers, got {tuple(value)!r}")
        dims.append(int(d))
    if not dims:
        raise ValueError(f"{name}: expected a non-empty shape [batch, ...], got ()")
    return tuple(dims)


def check_device(device: Any) -> torch.device:
    """None -> CUDA if available, else CPU; a CUDA device gets an explicit index, a CPU device none
    (CPU tensors report ``cpu`` whatever index they were made with: ``cpu:0`` would match none)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_target_device(device, kinds=("cpu", "cuda"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    return torch.device("cpu")


def check_dtype_arg(name: str, value: Any) -> torch.dtype:
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name}: expected a torch.dtype, got {value!r}")
    return value


def check_call_noise(noise: Any, shape: tuple[int, ...], device: torch.device,
                     shape_from: str = "the sampler's noise_shape") -> None:
    """The per-call noise must match the prepared shape and device (any floating dtype: it is
    converted to the state dtype exactly as ``noise.to(dtype)`` would). ``shape_from``: where the
    expected shape comes from (named in the error)."""
    if noise is None:
        return
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise: expected a torch.Tensor or None, got {type(noise).__name__}")
    if not noise.dtype.is_floating_point:
        raise TypeError(f"noise: expected a floating tensor, got dtype {noise.dtype}")
    V.check_dense("noise", noise)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise: expected shape {shape} ({shape_from}), got {tuple(noise.shape)}")
    if noise.device != device:
        raise ValueError(f"noise: expected a tensor on {device} (the sampler's device), got one on {noise.device}")


def check_call_labels(labels: Any, shape: tuple[int, ...] | None, dtype: torch.dtype, device: torch.device,
                      shape_arg: str = "label_shape") -> None:
    """``shape_arg``: the constructor argument that gives the label shape (named in the errors)."""
    if shape is None:
        if labels is not None:
            raise ValueError(f"labels: this sampler was built without {shape_arg}, so it takes no labels "
                             f"(pass {shape_arg}=... to the constructor)")
        return
    if labels is None:
        raise ValueError(f"labels: required, a tensor of shape {shape} (from the sampler's {shape_arg})")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    V.check_dense("labels", labels)
    if tuple(labels.shape) != shape:
        raise ValueError(f"labels: expected shape {shape} (from the sampler's {shape_arg}), got {tuple(labels.shape)}")
    if labels.dtype != dtype:
        raise TypeError(f"labels: expected dtype {dtype} (the sampler's label_dtype), got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels: expected a tensor on {device} (the sampler's device), got one on {labels.device}")


def check_call_seeds(seeds: Any, batch: int | None) -> torch.Tensor | None:
    """Seeds as an int64 tensor (left on its device if it is one), one per image (``batch`` of
    them unless None); host checks only."""
    if seeds is None:
        return None
    seeds_t = seeds_to_tensor(seeds, device=seeds.device if isinstance(seeds, torch.Tensor) else None)
    if batch is not None and seeds_t.shape[0] != batch:
        raise ValueError(f"seeds: expected one seed per image ({batch}), got {seeds_t.shape[0]}")
    return seeds_t


def check_choices(streams: Any, graph: Any) -> None:
    V.check_choice("streams", streams, STREAM_MODES)
    V.check_choice("graph", graph, GRAPH_MODES)
