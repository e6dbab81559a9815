"""``GuidedSampler``: a prepared, reusable autoguidance sampler for one shape, one config, one pair
of networks — warm-up, CUDA-graph capture, the guide on a side stream, eager fallback.

Lifecycle: construct (host-side checks only) -> ``prepare()`` (build the plan, warm up, time the
stream schedules, capture; idempotent; also done by the first call) -> ``__call__`` any number of
times, from any thread -> ``release()`` (optional; frees graphs and buffers, the next call
prepares again). Dropping the sampler frees them too, after waiting for its last call's GPU work.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch

from .. import validation as V
from ..backends import resolve_backend
from ..noise import STREAM_INITIAL, seeds_to_device
from ..plan import StepPlan, build_plan
from ..sampler import make_config
from . import arguments as A
from .cuda_graphs import CaptureFailed, CudaGraphCapturer, autocast_state, capture_autocast, engine_lock, preserved_rng
from .networks import NetworkRef, parameter_signature
from .runners import EagerRunner, SamplingProgram, StaticInputs, StepGraphRunner, TrajectoryGraphRunner
from .streams import CallOrder, GuideStream, device_context, time_alternating

__all__ = ["GraphCaptureWarning", "GuidedSampler"]

# A runner's inputs for warm-up and capture: (noise, labels, seeds).
_Example = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


class GraphCaptureWarning(UserWarning):
    """CUDA-graph capture failed; the sampler runs the same fused path eagerly instead."""


@contextlib.contextmanager
def _no_autograd() -> Iterator[None]:
    """No autograd recording, and never inference mode: the sampler's persistent tensors (static
    buffers, plan, graphs' memory) are made here, and inference tensors made by a first call under
    ``torch.inference_mode()`` could not be written by a later call outside it."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class GuidedSampler:
    """Autoguidance sampler D_w = D0 + w (D1 - D0), prepared once for a fixed noise shape.

    Same sampling semantics and arguments as ``fast_guided_sample``; on CUDA the trajectory is
    replayed from CUDA graphs, with the guide network on a side stream. Inference only (calls run
    under ``torch.no_grad()``), on contiguous noise. Calls are thread-safe: one lock per sampler
    serialises them (concurrent callers wait for each other).
    """

    _capturer_type = CudaGraphCapturer   # Graph capture implementation (tests substitute a fake).
    warmup_runs = 2                      # Eager runs on the capture stream before each capture.
    timing_rounds = 3                    # Interleaved timed runs per schedule for streams="auto".

    def __init__(
        self,
        net: Callable,                          # Main network D1: net(x, t, labels) -> tensor like x.
        gnet: Callable | None = None,           # Guide network D0; required when guidance != 1.
        *,
        noise_shape: Sequence[int],             # Full noise shape [B, ...]; every call uses it.
        device: torch.device | str | None = None,  # None = CUDA if available, else CPU.
        label_shape: Sequence[int] | None = None,  # Full label shape [B, ...]; None = no labels.
        label_dtype: torch.dtype = torch.float32,  # Dtype of the labels every call passes.
        dtype: torch.dtype = torch.float32,     # Sampler state dtype (output dtype).
        num_steps: int = 32,                    # Number of time steps N (2N - 1 evaluations with heun).
        sigma_min: float = 0.002,               # Lowest noise level.
        sigma_max: float = 80,                  # Highest noise level.
        rho: float = 7,                         # Time step exponent.
        sigmas: Sequence[float] | torch.Tensor | None = None,  # Custom schedule (see fast_guided_sample).
        guidance: float = 1,                    # Guidance weight w; 1 = unguided, guide never called.
        S_churn: float = 0,                     # Stochasticity strength; 0 = deterministic.
        S_min: float = 0,                       # Churn only for S_min <= t <= S_max.
        S_max: float = float("inf"),
        S_noise: float = 1,                     # Churn noise scale.
        guidance_interval: tuple[float, float] | None = None,  # Guide only for lo < sigma <= hi; None = always.
        solver: str = "heun",                   # "heun" (official, 2nd order) or "euler".
        backend: str = "auto",                  # Step backend: "auto", "torch", "cpp", "triton", "cuda".
        streams: str = "auto",                  # Guide on a side stream: "on", "off", "auto" = time both.
        graph: str = "auto",                    # "trajectory", "step", "none"; "auto" = trajectory on CUDA.
        compile_networks: bool = False,         # torch.compile both networks (Inductor, no cudagraphs).
        copy_output: bool = True,               # False = return the static output buffer (zero-copy).
        check_finite: bool = True,              # Raise FloatingPointError if the result has NaN/Inf.
    ) -> None:
        V.check_callable("net", net)
        V.check_callable("gnet", gnet, optional=True)
        self.config = make_config(
            num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, guidance=guidance, gnet=gnet,
            S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, dtype=dtype,
            guidance_interval=guidance_interval, solver=solver, sigmas=sigmas,
        )
        self.noise_shape = A.check_shape("noise_shape", noise_shape)
        self.label_shape = None if label_shape is None else A.check_shape("label_shape", label_shape)
        if self.label_shape is not None and self.label_shape[0] != self.noise_shape[0]:
            raise ValueError(f"label_shape: expected batch size {self.noise_shape[0]} (that of noise_shape), "
                             f"got {self.label_shape}")
        self.label_dtype = A.check_dtype_arg("label_dtype", label_dtype)
        V.check_backend_name(backend)
        A.check_choices(streams, graph)
        self.compile_networks = A.check_flag("compile_networks", compile_networks)
        self.copy_output = A.check_flag("copy_output", copy_output)
        self.check_finite = A.check_flag("check_finite", check_finite)
        self.device = A.check_device(device)
        if graph in ("trajectory", "step") and not self._capturer_type.supports(self.device):
            raise ValueError(f"graph: {graph!r} needs a CUDA device, got device={self.device} "
                             "(use 'auto' or 'none')")
        if streams == "on" and self.device.type != "cuda":
            raise ValueError(f"streams: 'on' needs a CUDA device, got device={self.device} (use 'auto' or 'off')")
        self._backend = resolve_backend(backend, self.device, self.config.dtype)
        self._nets = (NetworkRef(net), NetworkRef(gnet))
        self._requested = {"backend": backend, "graph": graph, "streams": streams}
        self._caller = "GuidedSampler"
        self._lock = threading.RLock()
        self._order = CallOrder(self.device)
        # Dropped without release(): its plan, static buffers and step state were allocated on the
        # stream that prepared it but are used by every call, on the caller's stream, and the caching
        # allocator hands freed memory to new work on the allocating stream at once, while a call
        # that did not sync (check_finite=False) may still be running on another stream. So the
        # drop waits for the last call's work first (run before the attributes go; not at exit).
        weakref.finalize(self, _drain_when_dropped, self._order).atexit = False
        self._guide_stream: GuideStream | None = None
        self._compiled: tuple[Callable, Callable | None] | None = None
        self._capture_error: str | None = None
        self._recaptures = 0
        self._timings: dict[str, float] = {}
        self._reset()

    # ---------------------------------------------------------------- public API

    def prepare(self, *, seeded: bool = False) -> dict:
        """Build the plan, warm up, choose the stream schedule and capture; returns ``report``.

        Idempotent. ``seeded=True`` prepares the variant used by calls that pass ``seeds`` (it
        differs from the default one only when the schedule has churn steps).
        """
        A.check_flag("seeded", seeded)
        with self._lock, device_context(self.device), engine_lock(self.device), _no_autograd():
            self._order.begin()
            self._setup()
            self._ensure(seeded and self._churns, None)
            self._order.end()
        return self.report

    def __call__(
        self,
        noise: torch.Tensor | None = None,      # Unit noise of noise_shape; None = seeded_noise(seeds) if seeds
                                                # are given, else torch.randn on the device (state dtype).
        labels: torch.Tensor | None = None,     # Required iff label_shape was given (its shape and label_dtype).
        seeds: Any = None,                      # One int per image: per-image churn noise (and the default noise);
                                                # None = churn noise from torch.randn_like.
    ) -> torch.Tensor:
        """Sample one batch. Returns a fresh tensor, or with ``copy_output=False`` (graph modes) the
        static output buffer, valid until the next call."""
        return self._sample(noise, labels, seeds, None)

    def _sample(self, noise, labels, seeds, into: torch.Tensor | None) -> torch.Tensor:
        """``__call__``; with ``into`` (a tensor of the state dtype on the device, shaped like the
        first rows of the output) the first rows are copied there, inside the call's ordering
        (see ``BucketedSampler``), and ``into`` is returned."""
        A.check_call_noise(noise, self.noise_shape, self.device)
        A.check_call_labels(labels, self.label_shape, self.label_dtype, self.device)
        seeds_t = A.check_call_seeds(seeds, self.noise_shape[0])
        with self._lock, device_context(self.device), _no_autograd():
            # The engine lock covers the launches only, not the finiteness sync below: other samplers
            # queue their work meanwhile (see cuda_graphs.ENGINE_LOCK for why launches take it).
            with engine_lock(self.device):
                finite, out = self._launch(noise, labels, seeds_t, into)
            if finite is not None and not bool(finite):
                raise FloatingPointError(
                    f"{self._caller}: the result contains NaN or Inf (check the networks and the schedule; "
                    "pass check_finite=False to return it anyway)"
                )
        return out

    def _launch(self, noise, labels, seeds_t, into: torch.Tensor | None = None) -> tuple:
        """Everything a call launches (noise, preparation on first use, the run, the copy out):
        (finite, result)."""
        self._order.begin()
        try:
            self._setup()
            seeds_t = None if seeds_t is None else seeds_to_device(seeds_t, self.device)
            if noise is None:
                noise = (self._seeded_noise(seeds_t) if seeds_t is not None else
                         torch.randn(self.noise_shape, device=self.device, dtype=self.config.dtype))
            # Every mode works on contiguous noise and labels (graph modes copy into contiguous
            # buffers), so a call equals the official sampler given noise.contiguous() and
            # labels.contiguous() whatever the mode, and whatever layout an earlier call had.
            noise = noise.contiguous()
            labels = None if labels is None else labels.contiguous()
            variant = seeds_t is not None and self._churns
            run_seeds = seeds_t if variant else None
            example = (noise, labels, run_seeds)
            runner = self._ensure(variant, example)
            if runner.signature is not None and runner.signature != self._signature():
                runner = self._recapture(variant, example)
            x, finite = runner(noise, labels, run_seeds)
            if into is not None:
                out = into.copy_(x[: into.shape[0]])
            else:
                out = x.clone() if self.copy_output and runner.mode != "none" else x
        finally:
            self._order.end()
        return finite, out

    @property
    def report(self) -> dict:
        """What the sampler chose and measured (a copy)."""
        with self._lock:
            report = copy.deepcopy(self._report)
            report["timings_ms"] = dict(self._timings)
            report["capture_error"] = self._capture_error
            report["recaptures"] = self._recaptures
        return report

    def release(self) -> None:
        """Free the graphs, their memory pool and the static buffers (``torch.cuda.empty_cache()``
        then returns the memory to the device). The next call prepares again."""
        with self._lock:
            self._release_runners()
            self._reset()
            self._capture_error = None  # A fresh start: the next call tries to capture again.

    def __repr__(self) -> str:
        r = self._report
        return (f"GuidedSampler(noise_shape={self.noise_shape}, device={self.device}, backend={r['backend']!r}, "
                f"graph={r['graph']!r}, streams={r['streams']!r}, prepared={r['prepared']})")

    # ---------------------------------------------------------------- internals

    def _reset(self) -> None:
        self._timings = {}
        self._plan: tuple[torch.Tensor, list[StepPlan]] | None = None
        self._churns = False
        self._graph_mode: str | None = None
        self._streams_on: bool | None = None
        self._runners: dict[bool, Any] = {}
        self._report: dict[str, Any] = {
            "device": str(self.device),
            "backend": self._backend.name,
            "graph_requested": self._requested["graph"],
            "graph": None,
            "graph_reason": None,
            "streams_requested": self._requested["streams"],
            "streams": None,
            "streams_reason": None,
            "compile_networks": self.compile_networks,
            "copy_output": self.copy_output,
            "warmup_runs": 0,
            "graphs": 0,
            "variants": [],
            "prepared": False,
        }

    def _networks(self) -> tuple[Callable, Callable | None]:
        if self._compiled is not None:
            return self._compiled
        return cast(Callable, self._nets[0].get()), self._nets[1].get()  # net: checked callable.

    def _signature(self) -> tuple:
        """What a graph was captured for and cannot see change: the networks' parameter storages
        and the autocast state (a call under another autocast state re-captures)."""
        return (autocast_state(), *(parameter_signature(ref.get()) for ref in self._nets))

    def _setup(self) -> None:
        """Plan and decisions that do not need timing (once per prepare cycle)."""
        if self._plan is not None:
            return
        self._plan = build_plan(self.config, self.device)
        steps = self._plan[1]
        self._churns = any(s.noise_scale is not None for s in steps)
        guided = any(s.w_first is not None or s.w_second is not None for s in steps)
        if self.compile_networks and self._compiled is None:
            self._compiled = _compile(cast(Callable, self._nets[0].get())), (
                None if self._nets[1].get() is None else _compile(cast(Callable, self._nets[1].get())))
        r = self._report
        graphs_ok = self._capturer_type.supports(self.device)
        requested = self._requested["graph"]
        if self._capture_error is not None:
            self._graph_mode, r["graph_reason"] = "none", "capture failed earlier (see capture_error)"
        elif requested == "auto":
            self._graph_mode = "trajectory" if graphs_ok else "none"
            r["graph_reason"] = ("auto: one graph for the whole trajectory (fewest launches)" if graphs_ok
                                 else f"auto: CUDA graphs need a CUDA device (device={self.device})")
        else:
            self._graph_mode, r["graph_reason"] = requested, "requested"
        requested = self._requested["streams"]
        if self.device.type != "cuda":
            self._streams_on, r["streams_reason"] = False, f"streams need a CUDA device (device={self.device})"
        elif not guided:
            self._streams_on, r["streams_reason"] = False, "the guide network is never called"
        elif requested != "auto":
            self._streams_on, r["streams_reason"] = requested == "on", "requested"
        r["graph"] = self._graph_mode
        r["streams"] = None if self._streams_on is None else ("on" if self._streams_on else "off")

    def _program(self, streams_on: bool) -> SamplingProgram:
        streams = None
        if streams_on:
            if self._guide_stream is None:
                self._guide_stream = GuideStream(self.device)
            streams = self._guide_stream
        # The program (held by the runners the sampler holds) reaches the sampler weakly: no reference
        # cycle, so a sampler dropped without release() frees its graphs and pools at once (once its
        # last call's GPU work is done, see __init__).
        sampler = weakref.ref(self)
        plan = cast("tuple[torch.Tensor, list[StepPlan]]", self._plan)  # Built by _setup first.
        return SamplingProgram(lambda: cast(GuidedSampler, sampler())._networks(), self.config, self._backend, plan,
                               streams, self.check_finite)

    def _seeded_noise(self, seeds: torch.Tensor) -> torch.Tensor:
        """``seeded_noise(seeds, noise_shape)``: float32, as the official generator draws its latents
        (and as ``autoguide-fast generate`` does), then rounded to the state dtype like any noise.
        Drawn by the backend's own Philox kernel (one launch on the fused backends instead of ~150
        small torch ops), which is bit-exact with the specification in float32."""
        numel = math.prod(self.noise_shape[1:])
        noise = self._backend.normal(seeds, numel, STREAM_INITIAL, torch.float32)
        return noise.reshape(self.noise_shape).to(self.config.dtype)

    def _default_example(self, seeded: bool) -> _Example:
        """Inputs for warm-up and capture when prepare() is called without a call's inputs:
        seeded noise (leaves the global RNG untouched), zero labels, seeds 0..B-1."""
        seeds = torch.arange(self.noise_shape[0], device=self.device, dtype=torch.int64)
        noise = self._seeded_noise(seeds)
        labels = (None if self.label_shape is None else
                  torch.zeros(self.label_shape, device=self.device, dtype=self.label_dtype))
        return noise, labels, seeds if seeded else None

    def _ensure(self, variant: bool, example: _Example | None):
        """The runner of a variant (False: churn from randn_like; True: churn from seeds)."""
        runner = self._runners.get(variant)
        if runner is not None:
            return runner
        example = example if example is not None else self._default_example(variant)
        # Preparing must not shift the caller's random numbers: warm-up, timing and capture on CUDA
        # (and the CPU stand-in graphs of the tests) may draw churn noise, so the generator is restored
        # (under ENGINE_LOCK on CUDA). Eagerly on the CPU nothing is drawn (the compile warm-up runs
        # seeded), and a restore there would rewind what other threads drew meanwhile.
        restore = self.device.type == "cuda" or self._graph_mode != "none"
        with preserved_rng(self.device) if restore else contextlib.nullcontext():
            if self._graph_mode != "none":
                try:
                    runner = self._build_graph(example)
                except CaptureFailed as exc:
                    self._fall_back(exc)
            if runner is None:
                runner = self._build_eager(example)
        self._runners[variant] = runner
        r = self._report
        r["variants"] = sorted("seeded" if v else "default" for v in self._runners)
        r["graphs"] = sum(len(getattr(run, "graphs", ())) for run in self._runners.values())
        r["graph"] = self._graph_mode
        r["streams"] = "on" if self._streams_on else "off"
        r["prepared"] = True
        return runner

    def _build_graph(self, example: _Example):
        cls = TrajectoryGraphRunner if self._graph_mode == "trajectory" else StepGraphRunner
        # Churn from randn_like draws CUDA random numbers in the graphs (the capturer orders such
        # replays); otherwise the capturer learns whether the networks draw any.
        draws_random = True if self._churns and example[2] is None else None

        def build(streams_on: bool):
            capturer = self._capturer_type(self.device, draws_random=draws_random)
            inputs = StaticInputs(*example, dtype=self.config.dtype)
            try:
                with capture_autocast():
                    runner = cls(self._program(streams_on), capturer, inputs, self.warmup_runs)
            except BaseException:
                capturer.release()
                raise
            runner.signature = self._signature()
            self._report["warmup_runs"] = self.warmup_runs
            return runner

        if self._streams_on is not None:
            return build(self._streams_on)
        built: dict[str, Any] = {"off": build(False)}
        try:
            built["on"] = build(True)
        except CaptureFailed as exc:
            # The forked schedule alone cannot be captured: keep the single-stream graph.
            self._streams_on = False
            self._report["streams_reason"] = f"auto: capture with streams on failed ({exc}); streams off"
            return built["off"]
        except torch.OutOfMemoryError:
            # Both schedules' graphs (and memory pools) held at once did not fit: keep the one built.
            self._streams_on = False
            self._report["streams_reason"] = ("auto: out of memory building the streams-on graph next to the "
                                              "streams-off one; streams off")
            torch.cuda.empty_cache()
            return built["off"]
        except BaseException:
            built["off"].release()
            raise
        return self._keep_faster(built, example)

    def _build_eager(self, example: _Example):
        if self._streams_on is not None:
            runner = EagerRunner(self._program(self._streams_on))
            if self.compile_networks:  # Compile now rather than in the first call.
                noise, labels, seeds = example
                if seeds is None:  # Seeded churn: the warm-up draws nothing from the global generator.
                    seeds = torch.arange(self.noise_shape[0], device=self.device, dtype=torch.int64)
                runner(noise, labels, seeds)
                self._report["warmup_runs"] = 1
            return runner
        built = {"off": EagerRunner(self._program(False)), "on": EagerRunner(self._program(True))}
        return self._keep_faster(built, example)

    def _keep_faster(self, built: dict[str, Any], example: _Example):
        """streams="auto": time both schedules side by side and keep the faster."""
        timings = time_alternating({name: functools.partial(r, *example) for name, r in built.items()},
                                   self.timing_rounds)
        keep = "on" if timings["on"] < timings["off"] else "off"
        for name, runner in built.items():
            if name != keep:
                runner.release()
        self._timings = {f"streams_{name}": ms for name, ms in timings.items()}
        self._streams_on = keep == "on"
        self._report["streams_reason"] = (f"auto: streams {keep} was faster "
                                          f"({timings['on']:.3f} ms on vs {timings['off']:.3f} ms off)")
        return built[keep]

    def _fall_back(self, exc: CaptureFailed) -> None:
        reason = str(exc)
        first = self._capture_error is None
        self._capture_error = reason
        self._release_runners()
        self._graph_mode = "none"
        self._report["graph_reason"] = "capture failed (see capture_error); running the fused path eagerly"
        if first:
            warnings.warn(
                f"{self._caller}: CUDA graph capture failed, running the fused path eagerly instead "
                f"(results are unaffected): {reason}",
                GraphCaptureWarning,
                stacklevel=4,
            )

    def _recapture(self, variant: bool, example: _Example):
        """A network's parameters or buffers were replaced: every graph reads stale pointers."""
        self._release_runners()
        self._recaptures += 1
        return self._ensure(variant, example)

    def _release_runners(self) -> None:
        self._order.drain()  # A replay may still be running (no host sync when check_finite=False).
        # Destroying a graph edits torch's per-generator registry of graphs, which another thread's
        # capture edits too (under the engine lock): destroy them under it as well.
        with engine_lock(self.device):
            for runner in self._runners.values():
                runner.release()
            self._runners.clear()


def _drain_when_dropped(order: CallOrder) -> None:
    # Not from inside a capture of this thread (the cycle collector may run anywhere): waiting on an
    # event there would invalidate that capture.
    if order.cuda and not torch.cuda.is_current_stream_capturing():
        order.drain()


def _compile(fn: Callable) -> Callable:
    # Inductor kernels without Inductor's own CUDA graphs: the engine captures the whole trajectory.
    return torch.compile(fn, dynamic=False, options={"triton.cudagraphs": False})
