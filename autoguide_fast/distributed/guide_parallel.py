"""Guide-parallel sampling: the main network on rank 0, the guide on rank 1, one trajectory.

For the latency case (batch 1, a large main network) the two forward passes of a guided
evaluation can run on two devices at once, the way multi-GPU engines split classifier-free
guidance. Per guided evaluation:

    rank 0: broadcast x ──► rank 1        (the state the networks see, in the state dtype)
    rank 0: D_main = net(x, t, labels)    ║  rank 1: D_guide = gnet(x, t, labels)
    rank 0: ◄── broadcast D_guide          (in the guide's own output dtype)
    rank 0: step (guided lerp + Euler/Heun update + churn) with the step backend

Only rank 0 holds the sampler state. Both ranks build the same plan from the same keyword
arguments (a digest of it is compared once per call), so rank 1 knows from the plan alone
which evaluations are guided: unguided ones (w = 1, outside the guidance interval) skip the
guide and cost no message. The math is that of ``fast_guided_sample`` (same plan, same step
backend, the networks see the same inputs), so the samples are the same bit for bit.

Errors: argument checks, a settings mismatch and a failure of either network at the first
guided evaluation are exchanged, so both ranks raise instead of one waiting forever. A failure
later on leaves the other rank blocked in a collective until the process group times out
(torchrun stops the remaining workers when one fails).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist

from .. import validation as V
from ..backends import resolve_backend
from ..plan import SamplerConfig, StepPlan, build_plan
from ..sampler import make_config, run_eager

__all__ = ["PeerFailure", "guide_parallel_sample"]

_PROTOCOL = 0x4147_4650  # Header tag, bumped when the message layout changes.
_MAX_DIMS = 8
_HEADER_LEN = 24
# Dtypes that may cross the wire (index = code in the header and status messages).
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16,
           torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)

# Failure codes exchanged in the status messages.
_OK, _BAD_ARGS, _MISMATCH, _NET_FAILED = 0, 1, 2, 3


class PeerFailure(RuntimeError):
    """Another rank of the job failed (its own error is reported there)."""


class _RemoteGuide:
    """Stands in for the guide living on rank 1 (it satisfies the sampler's argument checks)."""

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("guide_parallel_sample: the guide network runs on rank 1")


def _dtype_code(dtype: torch.dtype, name: str) -> int:
    if dtype not in _DTYPES:
        raise TypeError(f"{name}: dtype {dtype} cannot be sent between ranks (supported: {_DTYPES})")
    return _DTYPES.index(dtype)


def _shape_words(shape: torch.Size, name: str) -> list[int]:
    if len(shape) > _MAX_DIMS:
        raise ValueError(f"{name}: at most {_MAX_DIMS} dimensions are supported, got shape {tuple(shape)}")
    return [len(shape), *shape, *([0] * (_MAX_DIMS - len(shape)))]


def _plan_digest(config: SamplerConfig, steps: list[StepPlan]) -> int:
    """56-bit digest of everything rank 1 relies on: the evaluation sequence, times and weights."""
    h = hashlib.sha256(repr((config.num_steps, str(config.dtype), config.solver)).encode())
    for s in steps:
        fields = (s.index, s.t_hat.hex(), s.t_next.hex(), s.w_first, s.w_second, s.second_order)
        h.update(repr(fields).encode())
    return int.from_bytes(h.digest()[:7], "little")


def _evaluations(step: StepPlan) -> list[tuple[str, float | None]]:
    """(time key, weight) of each network evaluation of a step, in loop order."""
    evals = [("t_hat", step.w_first)]
    if step.second_order:
        evals.append(("t_next", step.w_second))
    return evals


class _Link:
    """The two-rank group and the device its messages travel through."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "guide_parallel_sample: needs an initialized torch.distributed process group of exactly 2 ranks "
                "(e.g. launch with torchrun --nproc_per_node=2 and call torch.distributed.init_process_group)"
            )
        # The default group exists once the process group is initialized (checked above).
        world = group if group is not None else cast(dist.ProcessGroup, dist.group.WORLD)
        size = dist.get_world_size(world)
        if size != 2:
            raise ValueError(f"group: guide_parallel_sample needs exactly 2 ranks (main, guide), got {size}")
        self.group = group
        self.rank = dist.get_rank(world)
        if self.rank < 0:
            raise ValueError("group: this process is not a member of the given process group")
        self.src_main = dist.get_global_rank(world, 0)
        self.src_guide = dist.get_global_rank(world, 1)
        # NCCL moves CUDA tensors of the current device; gloo moves CPU tensors.
        nccl = dist.get_backend(world) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def from_main(self, tensor: torch.Tensor, async_op: bool = False):
        return dist.broadcast(tensor, src=self.src_main, group=self.group, async_op=async_op)

    def from_guide(self, tensor: torch.Tensor, async_op: bool = False):
        return dist.broadcast(tensor, src=self.src_guide, group=self.group, async_op=async_op)

    def status(self, words: list[int]) -> list[int]:
        """Element-wise sum of both ranks' status words (each rank fills its own slots)."""
        t = torch.tensor(words, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return t.tolist()


def _raise_status(link: _Link, status: list[int], own_error: BaseException | None, what: str) -> None:
    """Raise on both ranks when either failed: the own error, else one naming the other rank."""
    if own_error is not None:
        raise own_error
    other = 1 - link.rank
    code = status[other]
    if code == _OK:
        return
    who = "rank 0 (main network)" if other == 0 else "rank 1 (guide network)"
    if code == _MISMATCH:
        raise ValueError(
            "guide_parallel_sample: the sampler settings differ between rank 0 and rank 1 (schedule, guidance, "
            "guidance interval, solver or dtype); pass the same keyword arguments on both ranks"
        )
    raise PeerFailure(f"guide_parallel_sample: {who} failed {what}; see that rank's error")


def _config(kwargs: dict[str, Any], gnet: Callable | None) -> SamplerConfig:
    return make_config(
        num_steps=kwargs["num_steps"], sigma_min=kwargs["sigma_min"], sigma_max=kwargs["sigma_max"],
        rho=kwargs["rho"], guidance=kwargs["guidance"], gnet=gnet, S_churn=kwargs["S_churn"],
        S_min=kwargs["S_min"], S_max=kwargs["S_max"], S_noise=kwargs["S_noise"], dtype=kwargs["dtype"],
        guidance_interval=kwargs["guidance_interval"], solver=kwargs["solver"],
    )


def guide_parallel_sample(
    net: Callable | None,                   # Main network D1 (used on group rank 0; ignored on rank 1).
    gnet: Callable | None,                  # Guide network D0 (used on group rank 1; ignored on rank 0).
    noise: torch.Tensor | None = None,      # Rank 0: unit-variance initial noise [B, ...]; rank 1: ignored.
    labels: torch.Tensor | None = None,     # Rank 0: labels for both networks, or None; rank 1: ignored.
    *,
    group: dist.ProcessGroup | None = None, # Process group of exactly 2 ranks; None = the default group.
    device: torch.device | str | None = None,  # Rank 1: device of the guide; None = inferred (see below).
    num_steps: int = 32,                    # Number of time steps N.
    sigma_min: float = 0.002,               # Lowest noise level.
    sigma_max: float = 80,                  # Highest noise level.
    rho: float = 7,                         # Time step exponent.
    guidance: float = 1,                    # Guidance weight w; 1 = unguided, rank 1 idles.
    S_churn: float = 0,                     # Stochasticity strength; 0 = deterministic.
    S_min: float = 0,                       # Churn only for S_min <= t <= S_max.
    S_max: float = float("inf"),
    S_noise: float = 1,                     # Churn noise scale.
    dtype: torch.dtype = torch.float32,     # Sampler state dtype (output dtype).
    randn_like: Callable | None = None,     # Rank 0: churn noise source; None = seeds if given, else torch.randn_like.
    seeds: Any = None,                      # Rank 0: one int per image for per-image churn noise.
    guidance_interval: tuple[float, float] | None = None,  # Guide only for lo < sigma <= hi; None = always.
    solver: str = "heun",                   # "heun" or "euler".
    backend: str = "auto",                  # Rank 0's step backend: "auto", "torch", "cpp", "triton", "cuda".
    callback: Callable[[dict], Any] | None = None,  # Rank 0: called after each step (x, i, sigma, sigma_hat, denoised).
    check_finite: bool = True,              # Rank 0: raise FloatingPointError on NaN/Inf in the result.
) -> torch.Tensor | None:
    """``fast_guided_sample`` with the main network on group rank 0 and the guide on group rank 1.

    Call it on both ranks with the same keyword arguments. Rank 0 returns the samples (the same
    as ``fast_guided_sample(net, noise, labels, gnet, ...)`` on one device), rank 1 returns None.
    Rank 1 runs the guide on ``device``, or, when None, on the current CUDA device under NCCL,
    else on the device of the guide's parameters (CPU if it has none).
    """
    link = _Link(group)
    kwargs = dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, guidance=guidance,
                  S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, dtype=dtype,
                  guidance_interval=guidance_interval, solver=solver)
    with torch.no_grad():
        if link.rank == 0:
            return _run_main(link, net, noise, labels, kwargs, randn_like, seeds, backend, callback, check_finite)
        _run_guide(link, gnet, device, kwargs)
        return None


# ----------------------------------------------------------------------------
# Rank 0: the sampler loop, with the guide's outputs arriving from rank 1.


class _MainEvaluator:
    """The evaluation strategy of rank 0's loop: the main network here, the guide's output from rank 1."""

    def __init__(self, link: _Link, net: Callable, labels: torch.Tensor | None, guided_ahead: bool) -> None:
        self.link, self.net, self.labels = link, net, labels
        self.checked_main = False
        self.guide_dtype: torch.dtype | None = None  # Known after the first guided evaluation.
        self.guided_ahead = guided_ahead  # Rank 1 waits for a first guided evaluation.

    def _main(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        D_main = self.net(x, t, self.labels)
        if not self.checked_main:
            V.check_output("net (the main network)", D_main, x)
            self.checked_main = True
        return D_main

    def __call__(self, x: torch.Tensor, t: torch.Tensor, w: float | None):
        if w is None:
            try:
                return self._main(x, t), None
            except Exception:
                if self.guide_dtype is None and self.guided_ahead:
                    # Before the first guided evaluation (e.g. outside a guidance interval) rank 1
                    # waits for that one's input: hand it this x and the failure, as it would get them.
                    self.link.from_main(x.to(self.link.device).contiguous())
                    self.link.status([_NET_FAILED, 0, 0])
                raise
        link = self.link
        link.from_main(x.to(link.device).contiguous())
        if self.guide_dtype is None:
            # First guided evaluation: both ranks report before any output is sent.
            error = None
            try:
                D_main = self._main(x, t)
            except Exception as exc:
                error = exc
            status = link.status([_OK if error is None else _NET_FAILED, 0, 0])
            _raise_status(link, status, error, "at its first network evaluation")
            self.guide_dtype = _DTYPES[status[2]]
            D_guide = torch.empty(x.shape, dtype=self.guide_dtype, device=link.device)
            link.from_guide(D_guide)
        else:
            # The guide's output is received while the main network runs.
            D_guide = torch.empty(x.shape, dtype=self.guide_dtype, device=link.device)
            work = link.from_guide(D_guide, async_op=True)
            D_main = self._main(x, t)
            work.wait()
        return D_main, D_guide.to(x.device)


def _main_header(config: SamplerConfig, steps: list[StepPlan], noise: torch.Tensor,
                 labels: torch.Tensor | None) -> list[int]:
    words = [_PROTOCOL, _OK, _plan_digest(config, steps), _dtype_code(config.dtype, "dtype")]
    words += _shape_words(noise.shape, "noise")
    if labels is None:
        words += [0, 0] + [0] * (_MAX_DIMS + 1)
    else:
        words += [1, _dtype_code(labels.dtype, "labels")] + _shape_words(labels.shape, "labels")
    assert len(words) == _HEADER_LEN
    return words


def _run_main(link, net, noise, labels, kwargs, randn_like, seeds, backend, callback, check_finite):
    # Local checks first; a failure is still announced to rank 1 through the header.
    error = None
    try:
        V.check_callable("net", net)
        V.check_callable("randn_like", randn_like, optional=True)
        V.check_callable("callback", callback, optional=True)
        V.check_backend_name(backend)
        config = _config(kwargs, _RemoteGuide())
        V.check_noise(noise)
        V.check_labels(labels, noise)
        seeds_t = V.check_seeds(seeds, noise)
        step_backend = resolve_backend(backend, noise.device, config.dtype)
        t_steps, steps = build_plan(config, noise.device)
        header = _main_header(config, steps, noise, labels)
    except Exception as exc:
        error = exc
        header = [_PROTOCOL, _BAD_ARGS] + [0] * (_HEADER_LEN - 2)
    link.from_main(torch.tensor(header, dtype=torch.int64, device=link.device))
    status = link.status([_OK if error is None else _BAD_ARGS, 0, 0])
    _raise_status(link, status, error, "its argument checks")
    if labels is not None:
        link.from_main(labels.to(link.device).contiguous())

    # The loop of sampler.run_eager (fused next-step churn included), networks split over ranks.
    x = run_eager(net, None, noise, labels, config, step_backend, seeds_t, randn_like, callback, (t_steps, steps),
                  evaluate=_MainEvaluator(link, net, labels,
                                          any(w is not None for step in steps for _, w in _evaluations(step))))
    if check_finite and not bool(torch.isfinite(x).all()):
        raise FloatingPointError(
            "guide_parallel_sample: the result contains NaN or Inf (check the networks and the schedule; "
            "pass check_finite=False to return it anyway)"
        )
    return x


# ----------------------------------------------------------------------------
# Rank 1: serve the guide for every guided evaluation of the shared plan.


def _guide_device(link: _Link, gnet: Callable | None, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if link.device.type == "cuda":
        return link.device
    if isinstance(gnet, torch.nn.Module):
        for p in gnet.parameters():
            return p.device
    return torch.device("cpu")


def _run_guide(link: _Link, gnet: Callable | None, device: torch.device | str | None, kwargs: dict[str, Any]) -> None:
    error = None
    try:
        config = _config(kwargs, gnet)
        if config.guidance != 1:
            V.check_callable("gnet", gnet)
        guide_device = _guide_device(link, gnet, device)
        _, steps = build_plan(config, guide_device)
        digest = _plan_digest(config, steps)
    except Exception as exc:
        error = exc
    header_t = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=link.device)
    link.from_main(header_t)
    header = header_t.tolist()
    code = _OK if error is None else _BAD_ARGS
    if error is None and header[1] == _OK and (header[0] != _PROTOCOL or header[2] != digest):
        code = _MISMATCH
        error = ValueError(
            "guide_parallel_sample: the sampler settings differ between rank 0 and rank 1 (schedule, guidance, "
            "guidance interval, solver or dtype); pass the same keyword arguments on both ranks"
        )
    status = link.status([0, code, 0])
    _raise_status(link, status, error, "its argument checks")

    x_dtype = _DTYPES[header[3]]
    x_shape = header[5:5 + header[4]]
    labels = None
    if header[13]:
        labels = torch.empty(header[16:16 + header[15]], dtype=_DTYPES[header[14]], device=link.device)
        link.from_main(labels)
        labels = labels.to(guide_device)
    x_buf = torch.empty(x_shape, dtype=x_dtype, device=link.device)
    first = True
    for step in steps:
        for t_key, w in _evaluations(step):
            if w is None:
                continue  # Unguided evaluation: the guide is not called, nothing is sent.
            link.from_main(x_buf)
            x = x_buf.to(guide_device)
            t = step.tensors[t_key]
            if first:
                error = None
                try:
                    D_guide = cast(Callable, gnet)(x, t, labels)  # Checked callable: guided (w is not None).
                    V.check_output("gnet (the guide network)", D_guide, x)
                    dtype_code = _dtype_code(D_guide.dtype, "gnet output")
                except Exception as exc:
                    error, dtype_code = exc, 0
                status = link.status([0, _OK if error is None else _NET_FAILED, dtype_code])
                _raise_status(link, status, error, "at its first network evaluation")
                first = False
            else:
                D_guide = cast(Callable, gnet)(x, t, labels)
            link.from_guide(D_guide.to(link.device).contiguous())
