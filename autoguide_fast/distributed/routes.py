"""Which device's tensors a process group carries, read from its backend configuration.

``torch.distributed.get_backend`` returns the backend as it was asked for: ``"undefined"`` for
``init_process_group()`` without a backend (then only the machine's accelerator gets one: NCCL on
a GPU machine), or a per-device string such as ``"cpu:gloo,cuda:nccl"``. Comparing it with
``"nccl"`` misreads both. The backend configuration names each device type's backend.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["device_backends", "message_device"]


def device_backends(group: dist.ProcessGroup | None = None) -> dict[str, str]:
    """{device type: backend name} of ``group`` (None: the default group), e.g. {"cuda": "nccl"}."""
    routes: dict[str, str] = {}
    for pair in str(dist.get_backend_config(group)).lower().split(","):
        device, sep, backend = pair.strip().partition(":")
        if sep:
            routes[device] = backend
    return routes


def message_device(group: dist.ProcessGroup | None = None, prefer_cpu: bool = False) -> torch.device:
    """Where to make the tensors sent through ``group``: this process's GPU when NCCL carries CUDA
    tensors, else the CPU. ``prefer_cpu``: the CPU whenever the group carries CPU tensors too (small
    control messages: a host-side backend still answers when this process's CUDA context is broken)."""
    routes = device_backends(group)
    if "cpu" in routes and (prefer_cpu or routes.get("cuda") != "nccl"):
        return torch.device("cpu")
    if routes.get("cuda") == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    raise ValueError(f"group: its backends ({dist.get_backend_config(group)}) carry neither CPU tensors nor CUDA "
                     f"tensors with NCCL; use gloo, nccl or e.g. 'cpu:gloo,cuda:nccl'")
