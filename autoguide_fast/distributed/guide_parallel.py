"""Guide-parallel sampling: the main network on rank 0, the guide on rank 1, one trajectory.

For the latency case (batch 1, a large main network) the two forward passes of a guided
evaluation can run on two devices at once, the way multi-GPU engines split classifier-free
guidance. Per guided evaluation:

    rank 0: broadcast [x, ok] ──► rank 1   (the state the networks see, in the state dtype)
    rank 0: D_main = net(x, t, labels)    ║  rank 1: D_guide = gnet(x, t, labels)
    rank 0: ◄── broadcast [D_guide, ok]     (in the guide's own output dtype)
    rank 0: step (guided lerp + Euler/Heun update + churn) with the step backend

and one element-sized message from rank 0 once the trajectory is done. ``ok`` is one extra
element after the tensor (0, or 1 when the sender failed); a failed sender follows it with its
error text (1 KiB) and both ranks stop there.

Only rank 0 holds the sampler state. Both ranks build the same plan from the same keyword
arguments (a digest of it is compared once per call), so rank 1 knows from the plan alone
which evaluations are guided: unguided ones (w = 1, outside the guidance interval) skip the
guide and cost no message. The math is that of ``fast_guided_sample`` (same plan, same step
backend, the networks see the same inputs), so the samples are the same bit for bit.

Errors: argument checks, a settings mismatch and a failure of either network at the first
guided evaluation are exchanged in a status message; any later failure of rank 0 (its network
at any evaluation, the step, the callback) is marked in the message rank 1 waits for next (the
next guided input, or the final message), and a failure of the guide in the output it sends.
So both ranks raise, the failing one its own error, the other a ``PeerFailure`` that quotes it,
instead of one waiting in a collective until the process group times out. Under NCCL each rank
reads the other's mark through a side stream and a pinned host element, so the host waits for
that message's arrival only, never for kernels queued after it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast

import torch
import torch.distributed as dist

from .. import validation as V
from ..backends import resolve_backend
from ..plan import SamplerConfig, StepPlan, build_plan
from ..sampler import make_config, run_eager
from .routes import message_device

__all__ = ["PeerFailure", "announce_failure", "guide_parallel_sample"]

_PROTOCOL = 0x4147_4652  # Header tag, bumped when the message layout changes.
_MAX_DIMS = 8
_HEADER_LEN = 24
_REASON_LEN = 1024  # Bytes of a failed rank's error text (sent on failure only).
# Dtypes that may cross the wire (index = code in the header and status messages): those both
# NCCL and gloo carry (neither takes int16).
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16,
           torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)

# Failure codes exchanged in the status messages (and 0/1 as the ok element of the tensors and
# the final message).
_OK, _BAD_ARGS, _MISMATCH, _NET_FAILED = 0, 1, 2, 3
_FAILED = 1


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


def _guided(steps: list[StepPlan]) -> int:
    """Number of guided evaluations (those that exchange messages)."""
    return sum(w is not None for step in steps for _, w in _evaluations(step))


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
        # Membership first: for a process outside the group, its size reads as -1 too.
        self.rank = dist.get_rank(world)
        if self.rank < 0:
            raise ValueError("group: this process is not a member of the given process group")
        size = dist.get_world_size(world)
        if size != 2:
            raise ValueError(f"group: guide_parallel_sample needs exactly 2 ranks (main, guide), got {size}")
        self.group = group
        self.src_main = dist.get_global_rank(world, 0)
        self.src_guide = dist.get_global_rank(world, 1)
        # Where NCCL carries CUDA tensors (also in a group such as "cpu:gloo,cuda:nccl"), every message
        # goes as a CUDA tensor of the current device: the network data never makes a round trip through
        # the host. Otherwise gloo moves CPU tensors.
        self.device = message_device(world)
        self._side: Any = None  # CUDA: the stream that watches the ok elements (made when first needed).
        self._host: dict[torch.dtype, torch.Tensor] = {}

    def from_main(self, tensor: torch.Tensor, async_op: bool = False):
        return dist.broadcast(tensor, src=self.src_main, group=self.group, async_op=async_op)

    def from_guide(self, tensor: torch.Tensor, async_op: bool = False):
        return dist.broadcast(tensor, src=self.src_guide, group=self.group, async_op=async_op)

    def status(self, words: list[int]) -> list[int]:
        """Element-wise sum of both ranks' status words (each rank fills its own slots)."""
        t = torch.tensor(words, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def final(self, code: int) -> None:
        """Rank 0's last message of a trajectory: ``_OK``, or ``_FAILED`` then its error text."""
        self.from_main(torch.full((1,), code, dtype=torch.int64, device=self.device))

    def reason(self, src: int, error: BaseException | None) -> str:
        """The error text of failed rank ``src`` (it sends ``error``, the other rank receives it).
        Only on the failure path: a fixed-size byte tensor, the text cut to ``_REASON_LEN`` bytes."""
        text = _describe(error) if src == self.rank else ""
        buf = torch.zeros(_REASON_LEN, dtype=torch.uint8)
        data = text.encode()[:_REASON_LEN]
        if data:
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(self.device)
        (self.from_main if src == 0 else self.from_guide)(buf)
        if src == self.rank:
            return text
        return bytes(buf.cpu().tolist()).rstrip(b"\0").decode(errors="replace")

    def side_stream(self) -> Any:
        if self._side is None:
            self._side = torch.cuda.Stream(device=self.device)
        return self._side

    def host_flag(self, dtype: torch.dtype) -> torch.Tensor:
        """A pinned host element per dtype (each read before the next copy into it)."""
        if dtype not in self._host:
            self._host[dtype] = torch.empty(1, dtype=dtype, pin_memory=True)
        return self._host[dtype]


class _Message:
    """A tensor sent with one element after it, ``ok``: 0, or ``_FAILED`` when its sender failed.

    Each rank keeps one per direction for a whole trajectory (the views are made once; ``ok`` is
    written only on failure). Reuse is safe: a receive into it is queued after the work that read
    the previous contents (CPU: done; CUDA: the communication stream waits for the current one).
    """

    def __init__(self, shape: torch.Size | list[int], dtype: torch.dtype, device: torch.device) -> None:
        self.buf = torch.zeros(math.prod(shape) + 1, dtype=dtype, device=device)
        self.data = self.buf[:-1].view(shape)
        self.ok = self.buf[-1:]


class _Arrival:
    """A message being received, and whether its sender failed.

    On CPU (gloo) ``ok`` is read once the message is in. On CUDA (NCCL) a side stream waits for
    this message alone, copies ``ok`` to pinned host memory and records an event: the host then
    waits for the message's arrival only, not for the kernels queued after it on the current
    stream (the network running meanwhile), and the current stream is not held up.
    """

    def __init__(self, link: _Link, work: Any, msg: _Message) -> None:
        self.work, self.msg = work, msg
        self.waited = False
        self.result: bool | None = None
        self.event: Any = None
        if msg.buf.is_cuda:
            side = link.side_stream()
            self.host = link.host_flag(msg.buf.dtype)
            with torch.cuda.stream(side):
                work.wait()  # The side stream waits for the message (the current stream does not).
                self.host.copy_(msg.ok, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(side)
            msg.buf.record_stream(side)

    def wait(self) -> None:
        """The message is needed: the current stream (CUDA) or the host (CPU) waits for it."""
        if not self.waited:
            self.work.wait()
            self.waited = True

    def known_failed(self) -> bool | None:
        """Whether the sender failed, if known without waiting (CPU, once in); else None."""
        return self.failed() if self.event is None else None

    def failed(self) -> bool:
        """Whether the sender failed (the host waits for the message's arrival)."""
        if self.result is None:
            if self.event is None:
                self.wait()
                self.result = self.msg.ok.item() != 0
            else:
                self.event.synchronize()
                self.result = self.host.item() != 0
        return self.result


def _describe(error: BaseException | None) -> str:
    text = str(error)
    return type(error).__name__ + (f": {text}" if text else "")


def _peer_failure(src: int, what: str, reason: str) -> PeerFailure:
    who = "rank 0 (main network)" if src == 0 else "rank 1 (guide network)"
    return PeerFailure(f"guide_parallel_sample: {who} failed {what}: {reason} (its traceback is on that rank)")


def _failed_while_sampling(link: _Link, src: int) -> PeerFailure:
    """The error for rank ``src`` having marked a failure while sampling: it sends its error text next."""
    return _peer_failure(src, "while sampling", link.reason(src, None))


def _settle(link: _Link, status: list[int], own_error: BaseException | None, what: str) -> None:
    """After a status exchange: each failed rank sends its error text, then both raise (the own
    error, else one naming the other rank)."""
    reasons = {src: link.reason(src, own_error) for src in (0, 1) if status[src] != _OK}
    if own_error is not None:
        raise own_error
    other = 1 - link.rank
    code = status[other]
    if code == _OK:
        return
    if code == _MISMATCH:
        raise ValueError(
            "guide_parallel_sample: the sampler settings differ between rank 0 and rank 1 (schedule, guidance, "
            "guidance interval, solver or dtype); pass the same keyword arguments on both ranks"
        )
    raise _peer_failure(other, what, reasons[other])


def _config(kwargs: dict[str, Any], gnet: Callable | None) -> SamplerConfig:
    return make_config(
        num_steps=kwargs["num_steps"], sigma_min=kwargs["sigma_min"], sigma_max=kwargs["sigma_max"],
        rho=kwargs["rho"], guidance=kwargs["guidance"], gnet=gnet, S_churn=kwargs["S_churn"],
        S_min=kwargs["S_min"], S_max=kwargs["S_max"], S_noise=kwargs["S_noise"], dtype=kwargs["dtype"],
        guidance_interval=kwargs["guidance_interval"], solver=kwargs["solver"], sigmas=kwargs["sigmas"],
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
    sigmas: Sequence[float] | torch.Tensor | None = None,  # Custom schedule (see fast_guided_sample).
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
                  guidance_interval=guidance_interval, solver=solver, sigmas=sigmas)
    with torch.no_grad():
        if link.rank == 0:
            return _run_main(link, net, noise, labels, kwargs, randn_like, seeds, backend, callback, check_finite)
        _run_guide(link, gnet, device, kwargs)
        return None


def announce_failure(error: BaseException, group: dist.ProcessGroup | None = None) -> NoReturn:
    """Rank 0, in place of a ``guide_parallel_sample`` call it cannot make (preparing its inputs
    failed): rank 1, waiting in its own call, raises a PeerFailure quoting ``error`` instead of
    waiting for the process group's timeout; rank 0 raises ``error``."""
    link = _Link(group)
    if link.rank != 0:
        raise ValueError("announce_failure: only rank 0 (the main network's) announces a failure this way")
    _open_trajectory(link, None, error, "preparing its inputs")
    raise error  # _open_trajectory raised it already; for the type checker.


def _open_trajectory(link: _Link, header: list[int] | None, error: BaseException | None, what: str) -> None:
    """Rank 0's first message of a trajectory and the status exchange after it: ``header``, or,
    after a failure (``error``), one marked _BAD_ARGS, which rank 1 answers by raising a PeerFailure
    quoting the error. Raises as _settle does (``what``: what the failure was doing)."""
    if error is not None or header is None:
        header = [_PROTOCOL, _BAD_ARGS] + [0] * (_HEADER_LEN - 2)
    link.from_main(torch.tensor(header, dtype=torch.int64, device=link.device))
    status = link.status([_OK if error is None else _BAD_ARGS, 0, 0])
    _settle(link, status, error, what)


# ----------------------------------------------------------------------------
# Rank 0: the sampler loop, with the guide's outputs arriving from rank 1.


class _MainEvaluator:
    """The evaluation strategy of rank 0's loop: the main network here, the guide's output from rank 1."""

    def __init__(self, link: _Link, net: Callable, labels: torch.Tensor | None, noise: torch.Tensor,
                 dtype: torch.dtype, guided: int) -> None:
        self.link, self.net, self.labels = link, net, labels
        self.guided = guided  # Guided evaluations in the plan.
        self.done = 0  # Guided evaluations whose guide output has arrived.
        self.settled = False  # Rank 1 waits for nothing more of this call (it failed, or knows).
        self.send = _Message(noise.shape, dtype, link.device) if guided else None  # [x, ok]
        self.recv: _Message | None = None  # [D_guide, ok], once the guide's dtype is known.

    def _main(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        D_main = self.net(x, t, self.labels)
        V.check_output("net (the main network)", D_main, x)  # Every time, as in sampler._Evaluator.
        return D_main

    def __call__(self, x: torch.Tensor, t: torch.Tensor, w: float | None):
        if w is None:
            return self._main(x, t), None
        link, send = self.link, cast(_Message, self.send)  # Guided: the plan has guided evaluations.
        send.data.copy_(x)
        recv = self.recv
        if recv is None:
            # First guided evaluation: both ranks report before any output is sent.
            link.from_main(send.buf)
            error = None
            try:
                D_main = self._main(x, t)
            except Exception as exc:
                error = exc
            status = link.status([_OK if error is None else _NET_FAILED, 0, 0])
            self.settled = status[0] != _OK or status[1] != _OK
            _settle(link, status, error, "at its first network evaluation")
            recv = self.recv = _Message(x.shape, _DTYPES[status[2]], link.device)
            link.from_guide(recv.buf)
            self.done += 1
        else:
            # The guide's output is received while the main network runs.
            link.from_main(send.buf)
            arrival = _Arrival(link, link.from_guide(recv.buf, async_op=True), recv)
            try:
                D_main = self._main(x, t)
            except Exception:
                self._arrived(arrival)  # Rank 1 may have failed too (then it waits no more).
                raise
            arrival.wait()
            reason = self._arrived(arrival)
            if reason is not None:
                raise _peer_failure(1, "while sampling", reason)
        return D_main, recv.data.to(x.device)

    def _arrived(self, arrival: _Arrival) -> str | None:
        """Count a guided evaluation's guide output in; rank 1's error text if it sent a failure instead."""
        failed = arrival.failed()
        self.done += 1
        if not failed:
            return None
        self.settled = True
        return self.link.reason(1, None)

    def abort(self, error: BaseException) -> None:
        """Rank 0 failed while sampling: mark the failure in the message rank 1 waits for, send its text."""
        if self.settled:
            return
        self.settled = True
        link = self.link
        if self.done < self.guided:
            send = cast(_Message, self.send)  # Guided evaluations remain.
            send.ok.fill_(_FAILED)
            link.from_main(send.buf)  # The next guided evaluation's input, marked failed.
        else:
            link.final(_FAILED)
        link.reason(0, error)

    def finish(self) -> None:
        """The trajectory is done: tell rank 1 (it waits for this, so it learns of any later failure)."""
        self.settled = True
        self.link.final(_OK)


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
        error, header = exc, None
    _open_trajectory(link, header, error, "its argument checks")
    if labels is not None:
        link.from_main(labels.to(link.device).contiguous())

    # The loop of sampler.run_eager (fused next-step churn included), networks split over ranks.
    evaluate = _MainEvaluator(link, net, labels, noise, config.dtype, _guided(steps))
    try:
        x = run_eager(net, None, noise, labels, config, step_backend, seeds_t, randn_like, callback,
                      (t_steps, steps), evaluate=evaluate)
    except Exception as exc:
        evaluate.abort(exc)  # Whatever failed (a network, the step, the callback), rank 1 learns it.
        raise
    evaluate.finish()
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
        config = _config(kwargs, gnet)  # Checks gnet too (callable whenever guidance != 1).
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
    _settle(link, status, error, "before its trajectory (argument checks or inputs)")

    x_dtype = _DTYPES[header[3]]
    x_shape = header[5:5 + header[4]]
    labels = None
    if header[13]:
        labels = torch.empty(header[16:16 + header[15]], dtype=_DTYPES[header[14]], device=link.device)
        link.from_main(labels)
        labels = labels.to(guide_device)
    recv = _Message(x_shape, x_dtype, link.device) if _guided(steps) else None  # [x, ok]
    send: _Message | None = None  # [D_guide, ok], once the guide's dtype is known.
    for step in steps:
        for t_key, w in _evaluations(step):
            if w is None:
                continue  # Unguided evaluation: the guide is not called, nothing is sent.
            recv = cast(_Message, recv)  # Guided: made.
            arrival = _Arrival(link, link.from_main(recv.buf, async_op=True), recv)
            arrival.wait()
            t = step.tensors[t_key]
            if send is None:
                # First guided evaluation: rank 0's mark is read first, then both ranks report
                # before any output is sent.
                if arrival.failed():
                    raise _failed_while_sampling(link, 0)
                error, out = None, None
                try:
                    x = recv.data.to(guide_device)
                    D_guide = cast(Callable, gnet)(x, t, labels)  # Checked callable: guided (w is not None).
                    V.check_output("gnet (the guide network)", D_guide, x)
                    dtype_code = _dtype_code(D_guide.dtype, "gnet output")
                    out = _Message(x_shape, D_guide.dtype, link.device)
                    out.data.copy_(D_guide)
                except Exception as exc:
                    error, dtype_code = exc, 0
                status = link.status([0, _OK if error is None else _NET_FAILED, dtype_code])
                _settle(link, status, error, "at its first network evaluation")
                send = cast(_Message, out)  # Made: no error.
            else:
                # CPU: rank 0's mark is known now, before the guide runs. CUDA: it is read once the
                # guide's kernels are queued (the host does not wait for x before queuing them),
                # and before anything is sent.
                if arrival.known_failed():
                    raise _failed_while_sampling(link, 0)
                error = None
                try:
                    x = recv.data.to(guide_device)
                    D_guide = cast(Callable, gnet)(x, t, labels)
                    V.check_output("gnet (the guide network)", D_guide, x)
                    send.data.copy_(D_guide)
                except Exception as exc:
                    error = exc
                if arrival.failed():  # (The guide, if it ran, saw a stale input: its result is moot.)
                    raise _failed_while_sampling(link, 0)
                if error is not None:
                    send.ok.fill_(_FAILED)
                    link.from_guide(send.buf)
                    link.reason(1, error)
                    raise error
            link.from_guide(send.buf)

    # Rank 0's final message: whether it got through the trajectory (it may fail after the last
    # guided evaluation: an unguided one, a step, the callback).
    final = torch.empty(1, dtype=torch.int64, device=link.device)
    link.from_main(final)
    if final.item() != _OK:
        raise _failed_while_sampling(link, 0)
