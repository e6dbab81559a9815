"""End-to-end latency of guided EDM2 sampling: baselines, floors and our switches, side by side.

Workload (README "Performance"): EDM2-S main + EDM2-XS guide (ImageNet-512 presets, random weights with the
zero-initialised gains set to random non-zero values), 4x64x64 latents, 32 Heun steps (63
evaluations of each network), w = 2.1, fp16 network body, float32 sampler state; batch 1, 8, 64.
``--xxl`` adds EDM2-XXL main + EDM2-M guide (w = 2.05) at batch 1.

Arms (every row of the CSV is one arm at one batch of one workload):
  B0                 reference sampler (``autoguide_fast.reference.edm_sampler``), eager, the networks
                     one after the other, weights normalised on every call (as released).
  B1                 B0 with the weights normalised once (``prepare_for_inference``).
  B2                 B1's networks under ``torch.compile(mode="reduce-overhead")``, reference loop.
  F                  floor: one evaluation of both networks (one stream) captured in a CUDA graph,
                     replayed 2N-1 times: a sampler with zero overhead and no concurrency.
  F_par              the same with the two networks on two streams inside the graph.
  ours-fused         ``GuidedSampler(streams="off", graph="none")``: the fused step kernels alone (eager
                     loop, one stream), best fused step backend.
  ours-streams       ``GuidedSampler``: + guide on a second stream (no graph).
  ours-graph-step    + one CUDA graph per kind of step (replayed once per step).
  ours-graph-traj-1s one CUDA graph per trajectory, one stream.
  ours-graph-traj    one CUDA graph per trajectory, two streams.
  ours-compiled      + compiled networks.
  ours-auto          ``GuidedSampler`` with every switch on "auto" (what a user gets by default).
Every sampler arm after B0 runs the prepared (normalised-once) networks. An arm that cannot run
here is recorded with status ``skipped`` and the reason; one that raises is recorded as ``failed``
with the error, and the run goes on.

Method: one process; per batch, the arms that do not compile are built and warmed up (graph capture
happens there) and timed round-robin (the starting arm rotates every repetition) with CUDA events
around one whole sample, the device idle before each call (round 1); then, if any compiling arm is
set up, every arm is timed again, interleaved with it (round 2). An arm reports the repetitions of
one round only (column ``round``): round 2 when it gave the arm at least min(reps, 5) of them (then
every arm, the compiled ones included, is judged on the same repetitions), else round 1 (round 2 cut
short by the time budget, or the arm failed in it). Ratios between arms are taken only between arms
of the same round. Reported: p20/p50/p80 over the repetitions, and each arm's median divided by B0's
and by F's medians from the same run (``ratio_to_B0``, ``ratio_to_F``: time ratios, below 1 = faster).

Modes: default (full: batch 1, 8, 64; 10 repetitions); ``--quick`` (batch 1 and 8, 5 repetitions,
B2 at batch 1 only, no ours-compiled and no ours-streams, a time budget: fits the GPU check);
``--smoke`` (CPU, tiny EDM2 networks, 2 steps: keeps the harness working; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import inspect
import json
import math
import pathlib
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

_T_START = time.perf_counter()  # The time budget counts from here (torch's import and CUDA start-up included).

import torch  # noqa: E402

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import common  # noqa: E402  (a sibling module; its directory is put on the path just above)

common.ensure_repo_on_path()

import autoguide_fast  # noqa: E402
from autoguide_fast import reference  # noqa: E402
from autoguide_fast.backends import resolve_backend  # noqa: E402
from autoguide_fast.engine.streams import engine_stream  # noqa: E402
from autoguide_fast.models.edm2 import edm2_preset, prepare_for_inference, randomize_gains_  # noqa: E402

COLUMNS = [
    "date", "run_id", "mode", "card", "device_type", "torch", "cuda", "triton", "python", "commit", "source_hash",
    "workload", "main", "guide", "latent_shape", "steps", "evals", "guidance", "batch",
    "arm", "kind", "streams", "status", "n_reps", "round", "p20_ms", "p50_ms", "p80_ms", "wall_p50_ms",
    "ratio_to_B0", "ratio_to_F", "max_abs_diff_vs_B0", "setup_s", "config", "notes",
]

# The speed targets (README "Performance") (evaluated on GPU runs only; printed, never asserted).
TARGET_SPEEDUP_B0 = 2.5
TARGET_SPEEDUP_B1 = 2.0
TARGET_SPEEDUP_B2 = 1.3
TARGET_RATIO_F = 0.85


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def describe(exc: BaseException) -> str:
    """One line for the CSV: the exception type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


class Skip(Exception):
    """This arm cannot run here; the message says why."""


class BatchInterrupted(Exception):
    """A batch was interrupted (KeyboardInterrupt / SIGINT); carries the rows measured until then."""

    def __init__(self, rows: list[dict]) -> None:
        super().__init__("interrupted")
        self.rows = rows


# ----------------------------------------------------------------------------
# Workloads and networks.


@dataclasses.dataclass
class Workload:
    name: str                   # Workload id in the CSV.
    main: str                   # EDM2 preset of the main network.
    guide: str                  # EDM2 preset of the guide network.
    guidance: float             # w.
    overrides_main: dict = dataclasses.field(default_factory=dict)   # Preset overrides (smoke: tiny nets).
    overrides_guide: dict = dataclasses.field(default_factory=dict)


WORKLOAD_S_XS = Workload("edm2-img512-s+xs", "s", "xs", 2.1)
WORKLOAD_XXL_M = Workload("edm2-img512-xxl+m", "xxl", "m", 2.05)
_TINY = dict(img_resolution=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,))
WORKLOAD_SMOKE = Workload("smoke-tiny-edm2", "s", "xs", 2.1,
                          overrides_main=dict(_TINY, model_channels=16, channels_per_head=16),
                          overrides_guide=dict(_TINY, model_channels=8, channels_per_head=8))


def build_network(preset: str, overrides: dict, device: torch.device, seed: int) -> torch.nn.Module:
    """A randomly initialised EDM2 network with non-zero gains (out_gain and every block's
    emb_gain start at 0 in the release, which would make the output and the embedding
    modulation trivially zero), in eval mode, gradients off."""
    torch.manual_seed(seed)
    with torch.device(device):
        net = edm2_preset(preset, **overrides)
    return randomize_gains_(net, seed + 1).eval().requires_grad_(False)


@dataclasses.dataclass
class Context:
    """Everything an arm needs for one (workload, batch)."""

    device: torch.device
    workload: Workload
    batch: int
    steps: int
    raw_main: torch.nn.Module       # Per-call weight normalisation (B0).
    raw_guide: torch.nn.Module
    main: torch.nn.Module           # Normalised once (every other arm).
    guide: torch.nn.Module
    noise: torch.Tensor
    labels: torch.Tensor
    backend: str                    # Best fused step backend here ("torch" if none).
    backend_note: str               # Why not a fused one, if so.
    cpu_compile: bool

    @property
    def evals(self) -> int:
        return 2 * self.steps - 1

    @property
    def guidance(self) -> float:
        return self.workload.guidance


def best_fused_backend(device: torch.device) -> tuple[str, str]:
    """The best fused step backend that can run here, or ("torch", why none can)."""
    order = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    reasons = []
    for name in order:
        try:
            resolve_backend(name, device, torch.float32)
            return name, ""
        except Exception as exc:  # Any refusal just means "not this one"; the reason is recorded.
            reasons.append(f"{name}: {describe(exc)}")
    return "torch", "no fused backend available (" + "; ".join(reasons) + "); ran backend=torch"


# ----------------------------------------------------------------------------
# Arms.


@dataclasses.dataclass
class Prepared:
    run: Callable[[], torch.Tensor | None]  # One whole sample (or, for floors, 2N-1 graph replays).
    config: str = ""                        # What exactly runs (backend, switches, engine info).
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Arm:
    name: str
    kind: str                               # "baseline", "floor" or "ours".
    streams: str                            # Streams the two networks run on: "1", "2" or "auto".
    build: Callable[[Context], Prepared]
    needs_cuda: bool = False
    compiles: bool = False


def _reference_arm(prepared_nets: bool) -> Callable[[Context], Prepared]:
    def build(ctx: Context) -> Prepared:
        net, gnet = (ctx.main, ctx.guide) if prepared_nets else (ctx.raw_main, ctx.raw_guide)

        def run() -> torch.Tensor:
            return reference.edm_sampler(net, ctx.noise, ctx.labels, gnet, num_steps=ctx.steps,
                                         guidance=ctx.guidance)

        weights = "weights normalised once" if prepared_nets else "weights normalised on every call"
        return Prepared(run, f"reference.edm_sampler, eager, {weights}")

    return build


def compile_network(net: torch.nn.Module) -> Callable:
    """``torch.compile(mode="reduce-overhead")`` (Inductor + CUDA graph trees), static shapes.

    The output is cloned right away: a CUDA-graph-tree output is overwritten by the next call of
    a compiled function, and the reference loop keeps the main output while it calls the guide.
    """
    compiled = torch.compile(net, mode="reduce-overhead", dynamic=False)

    def call(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return compiled(x, t, labels).clone()

    return call


def _build_b2(ctx: Context) -> Prepared:
    net, gnet = compile_network(ctx.main), compile_network(ctx.guide)

    def run() -> torch.Tensor:
        return reference.edm_sampler(net, ctx.noise, ctx.labels, gnet, num_steps=ctx.steps, guidance=ctx.guidance)

    return Prepared(run, 'reference.edm_sampler, both networks torch.compile(mode="reduce-overhead", dynamic=False), '
                         "weights normalised once, outputs cloned")


def _floor_arm(parallel: bool) -> Callable[[Context], Prepared]:
    def build(ctx: Context) -> Prepared:
        device = ctx.device
        x = ctx.noise * 80.0  # Any input works: the cost of a network does not depend on its values.
        t = torch.tensor(1.0, device=device)
        # The engine's kind of stream (high priority) for the side and the capture, as ours use:
        # F_par and ours then differ in the sampler's work, not in how their streams are scheduled.
        side = engine_stream(device) if parallel else None

        def both() -> tuple[torch.Tensor, torch.Tensor]:
            if side is None:
                return ctx.main(x, t, ctx.labels), ctx.guide(x, t, ctx.labels)
            here = torch.cuda.current_stream(device)
            side.wait_stream(here)  # Fork: the guide on the side stream...
            with torch.cuda.stream(side):
                d_guide = ctx.guide(x, t, ctx.labels)
            d_main = ctx.main(x, t, ctx.labels)
            here.wait_stream(side)  # ...joined back before the evaluation ends.
            return d_main, d_guide

        # Warm up on the capture stream (and the side stream) so that cuBLAS/cuDNN initialise
        # outside the capture.
        capture_stream = engine_stream(device)
        capture_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(capture_stream):
            for _ in range(2):
                both()
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture_stream):
            static_out = both()
        torch.cuda.synchronize(device)
        evals = ctx.evals

        def run() -> None:
            for _ in range(evals):
                graph.replay()

        run.keep_alive = (graph, static_out, x, t, side, capture_stream)  # type: ignore[attr-defined]
        streams = "main and guide on two streams" if parallel else "main then guide, one stream"
        return Prepared(run, f"one evaluation ({streams}) in a CUDA graph, replayed {evals} times; "
                             "weights normalised once")

    return build


# Engine report keys shown first in the CSV's config column (what the engine actually chose).
_REPORT_KEYS = ("backend", "graph", "streams", "compile_networks", "capture_error", "graph_reason", "streams_reason")


def _engine_notes(wanted: dict[str, Any], report: dict) -> list[str]:
    """Where the engine ran something other than what the arm asked for (e.g. an eager fallback
    after a failed capture), so that no row is labelled with a switch that was not on."""
    notes = []
    def shown(v: Any) -> str:  # Booleans as on/off on both sides (e.g. compile_networks=True vs True).
        return ("on" if v else "off") if isinstance(v, bool) else str(v)

    for key, value in wanted.items():
        if key in report and report[key] is not None:
            got, value = shown(report[key]), shown(value)
            if got != value:
                notes.append(f"asked {key}={value}, engine ran {key}={got}")
    if report.get("capture_error"):
        notes.append(f"capture failed: {str(report['capture_error'])[:200]}")
    return notes


def _engine_arm(**switches: Any) -> Callable[[Context], Prepared]:
    """An arm running ``autoguide_fast.GuidedSampler`` with the given switches (none = all auto)."""

    def build(ctx: Context) -> Prepared:
        engine = getattr(autoguide_fast, "GuidedSampler", None)
        if engine is None:
            raise Skip("autoguide_fast.GuidedSampler is not in this build")
        try:
            params = inspect.signature(engine).parameters
        except (TypeError, ValueError) as exc:
            raise Skip(f"cannot read GuidedSampler's signature ({describe(exc)})") from exc
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        wanted = dict(switches)
        if switches:
            wanted["backend"] = ctx.backend
        for key, value in wanted.items():
            if key not in params and not takes_any:
                raise Skip(f"GuidedSampler has no {key}= switch (wanted {key}={value!r})")
        # check_finite=False: no arm pays for a host-side NaN check (B0 has none).
        common_args = dict(noise_shape=tuple(ctx.noise.shape), device=ctx.device, label_shape=tuple(ctx.labels.shape),
                           label_dtype=ctx.labels.dtype, dtype=torch.float32, num_steps=ctx.steps,
                           guidance=ctx.guidance, solver="heun", check_finite=False)
        kwargs = {k: v for k, v in common_args.items() if k in params or takes_any}
        kwargs.update(wanted)
        net, gnet = ctx.main, ctx.guide
        if switches.get("compile_networks"):
            # The engine may compile the modules in place: give it its own copies, prepared anew (a
            # copy's prepared weights no longer match the storage they were computed from, so a
            # copy of a prepared network would normalise its weights per call in eager use).
            net, gnet = (prepare_for_inference(copy.deepcopy(ctx.raw_main), check_stale=False),
                         prepare_for_inference(copy.deepcopy(ctx.raw_guide), check_stale=False))
        sampler = engine(net, gnet, **kwargs)
        report = sampler.prepare() if callable(getattr(sampler, "prepare", None)) else None

        def run() -> torch.Tensor:
            return sampler(noise=ctx.noise, labels=ctx.labels)

        run.keep_alive = (sampler, net, gnet)  # type: ignore[attr-defined]
        shown = wanted or {"switches": "all auto"}
        config = "GuidedSampler " + " ".join(f"{k}={v}" for k, v in shown.items())
        notes = [ctx.backend_note] if ctx.backend_note and switches else []
        if isinstance(report, dict):
            first = {k: report[k] for k in _REPORT_KEYS if k in report}
            rest = {k: v for k, v in report.items() if k not in first}
            config += " | engine: " + json.dumps(first, default=str) + " " + json.dumps(rest, default=str)[:300]
            notes.extend(_engine_notes(wanted, report))
        return Prepared(run, config, notes)

    return build


ARMS: list[Arm] = [
    Arm("B0", "baseline", "1", _reference_arm(prepared_nets=False)),
    Arm("B1", "baseline", "1", _reference_arm(prepared_nets=True)),
    Arm("B2", "baseline", "1", _build_b2, compiles=True),
    Arm("F", "floor", "1", _floor_arm(parallel=False), needs_cuda=True),
    Arm("F_par", "floor", "2", _floor_arm(parallel=True), needs_cuda=True),
    # Fused kernels alone: the engine's eager loop on one stream. (Not fast_guided_sample: on CUDA
    # tensors it runs through the cached engine with graphs and streams on "auto", i.e. ours-auto.)
    Arm("ours-fused", "ours", "1", _engine_arm(streams="off", graph="none")),
    Arm("ours-streams", "ours", "2", _engine_arm(streams="on", graph="none"), needs_cuda=True),
    Arm("ours-graph-step", "ours", "2", _engine_arm(streams="on", graph="step"), needs_cuda=True),
    Arm("ours-graph-traj-1s", "ours", "1", _engine_arm(streams="off", graph="trajectory"), needs_cuda=True),
    Arm("ours-graph-traj", "ours", "2", _engine_arm(streams="on", graph="trajectory"), needs_cuda=True),
    Arm("ours-compiled", "ours", "2", _engine_arm(streams="on", graph="trajectory", compile_networks=True),
        needs_cuda=True, compiles=True),
    Arm("ours-auto", "ours", "auto", _engine_arm()),
]
ARM_NAMES = [a.name for a in ARMS]


# ----------------------------------------------------------------------------
# Run plan.


@dataclasses.dataclass
class Plan:
    mode: str
    device: torch.device
    workloads: list[tuple[Workload, list[int]]]
    steps: int
    reps: int
    warmup: int
    arms: list[str]             # Selected by --arms (default all).
    skip: list[str]             # Excluded by --skip.
    time_budget: float | None   # Seconds; None = unlimited.
    compile_estimate: float     # Seconds a compiled arm needs to set up (for the budget).
    cpu_compile: bool
    seed: int


def skip_reason(arm: Arm, plan: Plan, batch: int, first_batch: int) -> str | None:
    """Why ``arm`` does not run at ``batch`` in this plan, or None if it runs."""
    if arm.name not in plan.arms:
        return "not selected by --arms"
    if arm.name in plan.skip:
        return "excluded by --skip"
    if arm.needs_cuda and plan.device.type != "cuda":
        return "needs CUDA (CUDA graphs / streams)"
    if arm.compiles and plan.device.type != "cuda" and not plan.cpu_compile:
        return "compiled arm: runs on CUDA (on CPU only with --cpu-compile)"
    if plan.mode == "quick":
        if arm.name in ("ours-compiled", "ours-streams"):
            return "not in --quick (time budget of the GPU check); run the full benchmark"
        if arm.compiles and batch != first_batch:
            return "--quick compiles at the first batch only (compile time budget)"
    return None


OVERRUN_S = 10.0                 # Repetitions stop this long after the budget, even below 5.
# An arm whose sample is further from B0's (max abs diff over B0's max |x|) computed something else.
# Measured with EDM2-S + XS, 32 steps, w = 2.1: every network output perturbed by 1e-3 (relative; far
# more than fp16 rounding or compiled kernels change) moves the sample by 0.006; Heun with half the
# steps (31 evaluations instead of 63) by 0.08, plain Euler by 0.32, a skipped guide by 0.87.
WRONG_OUTPUT_FRACTION = 0.02


class Clock:
    def __init__(self, budget: float | None) -> None:
        self.t0 = _T_START
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return math.inf if self.budget is None else self.budget - self.elapsed()


# ----------------------------------------------------------------------------
# Measurement.


def _global_flags() -> dict[str, Any]:
    return {
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def _cudagraph_skips() -> int:
    """How often Inductor has declined to use CUDA graphs in this process (0 if never loaded)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:  # A private counter: its absence only loses this diagnostic.
        return 0


def _warning_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    seen: list[str] = []
    for w in caught:
        if issubclass(w.category, DeprecationWarning):
            continue
        text = f"warning: {w.category.__name__}: {str(w.message).strip().splitlines()[0][:160]}" if str(
            w.message).strip() else f"warning: {w.category.__name__}"
        if text not in seen:
            seen.append(text)
    return seen[:2]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(Exception):  # A poisoned context must not stop the bookkeeping.
            torch.cuda.synchronize(device)
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}g}"


def measure_batch(ctx: Context, plan: Plan, clock: Clock, first_batch: int, est_batch_s: float,
                  timing: dict[str, float] | None = None) -> list[dict]:
    """Build and warm up the arms at this batch and time them round-robin (the compiling arms join in
    a second round, see the module docstring); return one row per arm. ``timing`` receives
    ``round1_s``: the seconds until round 1 ended (set-up of the other arms included)."""
    t_start = time.perf_counter()
    timing = {} if timing is None else timing
    status: dict[str, str] = {}
    notes: dict[str, list[str]] = {a.name: [] for a in ARMS}
    config: dict[str, str] = {}
    setup_s: dict[str, float] = {}
    diff: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    rounds: dict[str, list[int]] = {}            # The round (1 or 2) of each repetition.
    live: list[tuple[Arm, Prepared]] = []

    interrupted = False
    budget_skip = None
    if est_batch_s > 0 and clock.left() < est_batch_s:  # The first batch always runs.
        budget_skip = f"time budget: {max(0.0, clock.left()):.0f} s left, this batch needs ~{est_batch_s:.0f} s"

    def set_up(arms: list[Arm], then_s: float = 0.0) -> int:
        """Build and warm up the arms (each failure recorded); returns how many joined ``live``.
        ``then_s``: the expected seconds of the round that follows (compiling arms join only if their
        compilation and that round fit in the budget)."""
        joined = 0
        for arm in arms:
            reason = skip_reason(arm, plan, ctx.batch, first_batch) or budget_skip
            if reason is None and arm.compiles and clock.left() < plan.compile_estimate + then_s:
                reason = (f"time budget: {max(0.0, clock.left()):.0f} s left, compiling needs "
                          f"~{plan.compile_estimate:.0f} s and the round with it ~{then_s:.0f} s")
            if reason is not None:
                status[arm.name] = "skipped"
                notes[arm.name].append(reason)
                continue
            log(f"  set up {arm.name}")
            flags, skips = _global_flags(), _cudagraph_skips()
            t0 = time.perf_counter()
            out = None
            try:
                with warnings.catch_warnings(record=True) as caught, torch.no_grad():
                    warnings.simplefilter("always")
                    prepared = arm.build(ctx)
                    config[arm.name] = prepared.config
                    notes[arm.name].extend(prepared.notes)
                    for _ in range(plan.warmup):
                        out = prepared.run()
                _sync(ctx.device)
                notes[arm.name].extend(_warning_notes(caught))
            except Skip as exc:
                status[arm.name] = "skipped"
                notes[arm.name].append(str(exc))
                log(f"  {arm.name}: skipped ({exc})")
                _free(ctx.device)
                continue
            except Exception as exc:  # One arm's failure is recorded; the others still run.
                status[arm.name] = "failed"
                notes[arm.name].append(f"setup: {describe(exc)}")
                log(f"  {arm.name}: FAILED in setup: {describe(exc)}")
                _free(ctx.device)
                continue
            setup_s[arm.name] = time.perf_counter() - t0
            if _cudagraph_skips() > skips:
                notes[arm.name].append(f"Inductor declined CUDA graphs {_cudagraph_skips() - skips} time(s) "
                                       "(those graphs run without CUDA graphs)")
            changed = {k: v for k, v in _global_flags().items() if flags[k] != v}
            if changed:
                notes[arm.name].append(f"changed process-wide flags {changed} (affects the arms after it)")
            if isinstance(out, torch.Tensor):
                if not bool(torch.isfinite(out).all()):
                    notes[arm.name].append("output has NaN/Inf")
                if arm.name == "B0":
                    ref_out.append(out.detach().float().clone())
                elif not ref_out:
                    reference_sample(notes[arm.name])
                if arm.name != "B0" and ref_out and out.shape == ref_out[0].shape:
                    diff[arm.name] = float((out.detach().float() - ref_out[0]).abs().max())
                    scale = float(ref_out[0].abs().max())
                    # Rounding (fp16 networks, compiled kernels, fused steps) moves a sample far less:
                    # beyond this the arm computed something else (a broken capture, stale buffers).
                    if not diff[arm.name] <= WRONG_OUTPUT_FRACTION * scale:
                        notes[arm.name].append(
                            f"output differs from B0: max abs diff {diff[arm.name]:.3g} > {WRONG_OUTPUT_FRACTION:g} "
                            f"x B0's max |x| {scale:.3g} (timed, never judged)")
            del out
            status[arm.name] = "ok"
            times[arm.name], walls[arm.name], rounds[arm.name] = [], [], []
            live.append((arm, prepared))
            joined += 1
        return joined

    def reference_sample(arm_notes: list[str]) -> None:
        """B0's sample, computed once and untimed when B0 itself did not run (deselected, skipped or
        failed), so that every arm's output is still checked against the reference."""
        try:
            with torch.no_grad():
                out = _reference_arm(prepared_nets=False)(ctx).run()
            _sync(ctx.device)
            ref_out.append(out.detach().float().clone())
            log("  B0 did not run: the reference sample computed once (untimed) to check the arms' outputs")
        except Exception as exc:
            arm_notes.append(f"output not checked: the reference sample failed ({describe(exc)})")

    def rotate(round_no: int, phase: str) -> None:
        """plan.reps round-robin repetitions of every live arm (a rotating start order)."""
        for rep in range(plan.reps):
            if not live:
                return
            shift = rep % len(live)
            for arm, prepared in live[shift:] + live[:shift]:
                if status[arm.name] != "ok" or arm.name in retired:
                    continue
                try:
                    with torch.no_grad():
                        ms, wall, out = common.time_call(prepared.run, ctx.device)
                    del out
                except Exception as exc:  # Recorded; the arm leaves the rotation.
                    what = f"repetition {len(times[arm.name]) + 1}: {describe(exc)}"
                    log(f"  {arm.name}: FAILED in {what}")
                    if times[arm.name]:  # Timed in the first round: those repetitions stand.
                        retired.add(arm.name)
                        notes[arm.name].append(f"{what} (left the rotation; its earlier repetitions are reported)")
                    else:
                        status[arm.name] = "failed"
                        notes[arm.name].append(what)
                    continue
                times[arm.name].append(ms)
                walls[arm.name].append(wall)
                rounds[arm.name].append(round_no)
            done = rep + 1
            latest = " ".join(f"{a.name}={times[a.name][-1]:.1f}" for a, _ in live
                              if times[a.name] and status[a.name] == "ok" and a.name not in retired)
            log(f"  {phase}rep {done}/{plan.reps}: {latest}")
            if done < plan.reps and clock.left() <= 0 and done >= 5:
                for arm, _ in live:
                    notes[arm.name].append(f"time budget: {phase}stopped after {done} repetitions (this round)")
                return
            if done < plan.reps and clock.left() < -OVERRUN_S:
                for arm, _ in live:
                    notes[arm.name].append(f"time budget overrun: {phase}stopped after {done} repetitions (this round)")
                return

    ref_out: list[torch.Tensor] = []
    retired: set[str] = set()  # Arms that failed after repetitions had been measured.
    try:
        # Arms that compile come second: the others are set up and timed first, so a time limit that
        # interrupts a long compilation still leaves their measurements. Once the compiling arms are
        # ready, every arm is timed again, interleaved with them (round 2: see reported_round).
        set_up([a for a in ARMS if not a.compiles])
        t_round1 = time.perf_counter()
        rotate(1, "")
        timing["round1_s"] = time.perf_counter() - t_start
        # Round 2 times every arm again plus the compiled ones: round 1's time per arm, scaled.
        compiling = [a for a in ARMS if a.compiles]
        per_arm = (time.perf_counter() - t_round1) / max(len(live), 1)
        if set_up(compiling, then_s=per_arm * (len(live) + len(compiling))):
            rotate(2, "with the compiled arms: ")
    except KeyboardInterrupt:
        # A time limit (the GPU check stops this stage with SIGINT): keep what was measured.
        interrupted = True
        log("  interrupted: writing the rows measured so far")
    live.clear()
    _free(ctx.device)

    for arm in ARMS:
        if not interrupted:
            break
        if arm.name not in status:
            status[arm.name] = "skipped"
            notes[arm.name].append("interrupted (time limit) before it was set up")
        elif status[arm.name] == "ok" and not times[arm.name]:
            status[arm.name] = "skipped"
            notes[arm.name].append("interrupted (time limit) before its first timed repetition")
        elif status[arm.name] == "ok":
            notes[arm.name].append(f"interrupted (time limit) after {len(times[arm.name])} repetitions")
    need = min(plan.reps, common.MIN_JUDGED_REPS)
    chosen = {name: reported_round(r, need) for name, r in rounds.items()}

    def of_chosen_round(values: dict[str, list[float]]) -> dict[str, list[float]]:
        return {name: [v for v, r in zip(vs, rounds[name]) if r == chosen[name]] for name, vs in values.items()}

    kept, kept_walls = of_chosen_round(times), of_chosen_round(walls)
    for name, r in rounds.items():
        if chosen[name] == 1 and 2 in r:
            notes[name].append(f"reports its {r.count(1)} round-1 repetitions (round 2 gave it only {r.count(2)}): "
                               "not compared with the compiled arms")
    stats = {name: common.summarize(v) for name, v in kept.items() if v and status[name] == "ok"}
    b0 = stats.get("B0", {}).get("p50")
    f = stats.get("F", {}).get("p50")

    def ratio(name: str, base: str, base_p50: float | None) -> str:
        s = stats.get(name)
        return _fmt(s["p50"] / base_p50) if s and base_p50 and chosen.get(name) == chosen.get(base) else ""

    rows = []
    for arm in ARMS:
        s = stats.get(arm.name)
        wall_p50 = common.percentile(kept_walls[arm.name], 50) if s else None
        if s and wall_p50 is not None and wall_p50 > 1.2 * s["p50"] + 0.5:
            notes[arm.name].append(f"wall clock {wall_p50:.1f} ms >> CUDA events {s['p50']:.1f} ms "
                                   "(work outside the current stream?)")
        rows.append({
            "arm": arm.name, "kind": arm.kind, "streams": arm.streams, "status": status[arm.name],
            "n_reps": len(kept[arm.name]) if s else 0, "round": str(chosen[arm.name]) if s else "",
            "p20_ms": _fmt(s and s["p20"]), "p50_ms": _fmt(s and s["p50"]), "p80_ms": _fmt(s and s["p80"]),
            "wall_p50_ms": _fmt(wall_p50),
            "ratio_to_B0": ratio(arm.name, "B0", b0),
            "ratio_to_F": ratio(arm.name, "F", f),
            "max_abs_diff_vs_B0": _fmt(diff.get(arm.name), 3),
            "setup_s": _fmt(setup_s.get(arm.name), 3),
            "config": config.get(arm.name, ""),
            "notes": "; ".join(n for n in notes[arm.name] if n),
        })
    if interrupted:
        raise BatchInterrupted(rows)
    return rows


def reported_round(rounds: list[int], need: int) -> int:
    """The round whose repetitions an arm reports, from the round of each of its repetitions: round 2
    (timed alongside the compiled arms) when it gave the arm at least ``need``, else round 1 (round 2
    cut short, or the arm failed in it) when the arm has any there, else round 2 (the compiled arms)."""
    second = rounds.count(2)
    return 2 if second >= need or (second and 1 not in rounds) else 1


def make_context(workload: Workload, nets: tuple, batch: int, plan: Plan) -> Context:
    raw_main, raw_guide, main, guide = nets
    device = plan.device
    g = torch.Generator().manual_seed(plan.seed + batch)
    shape = (batch, main.img_channels, main.img_resolution, main.img_resolution)
    noise = torch.randn(shape, generator=g).to(device)
    classes = torch.randint(0, main.label_dim, (batch,), generator=g)
    labels = torch.nn.functional.one_hot(classes, main.label_dim).to(device=device, dtype=torch.float32)
    backend, backend_note = best_fused_backend(device)
    return Context(device, workload, batch, plan.steps, raw_main, raw_guide, main, guide, noise, labels,
                   backend, backend_note, plan.cpu_compile)


def build_networks(workload: Workload, plan: Plan) -> tuple:
    """(raw main, raw guide, prepared main, prepared guide): the same weights twice."""
    raw_main = build_network(workload.main, workload.overrides_main, plan.device, plan.seed)
    raw_guide = build_network(workload.guide, workload.overrides_guide, plan.device, plan.seed + 100)
    # Weights normalised once, as by hand: no per-call check that they changed (the benchmark never
    # changes them; the check costs a few µs per layer in every eager call, B1's among them).
    main = prepare_for_inference(copy.deepcopy(raw_main), check_stale=False)
    guide = prepare_for_inference(copy.deepcopy(raw_guide), check_stale=False)
    return raw_main, raw_guide, main, guide


def _unmeasured(status: str, note: str) -> list[dict]:
    """One row per arm for a batch that was not measured at all."""
    return [{"arm": a.name, "kind": a.kind, "streams": a.streams, "status": status, "n_reps": 0, "notes": note}
            for a in ARMS]


def run(plan: Plan, out: pathlib.Path, report: pathlib.Path | None = None) -> list[dict]:
    """Measure every workload and batch of the plan; append rows to ``out`` batch by batch."""
    clock = Clock(plan.time_budget)
    meta = common.run_metadata(plan.device)
    meta["mode"] = plan.mode
    log(f"{plan.mode} run {meta['run_id']} on {meta['card']} (torch {meta['torch']}, triton {meta['triton']}, "
        f"commit {meta['commit']}, sources {meta['source_hash']}); rows -> {out}")
    compiled = {a.name for a in ARMS if a.compiles}
    all_rows: list[dict] = []
    est_batch_s = 0.0  # Expected duration of the next batch, from the ones measured (for the budget).
    interrupted = False  # A KeyboardInterrupt (SIGINT: the GPU check's time limit) ends the run early.
    try:
        for workload, batches in plan.workloads:
            nets, unmeasured = None, None
            if est_batch_s > 0 and clock.left() < est_batch_s:  # The first batch always runs.
                unmeasured = _unmeasured("skipped", f"time budget: {max(0.0, clock.left()):.0f} s left, a batch needs "
                                                    f"~{est_batch_s:.0f} s")
            else:
                log(f"workload {workload.name}: building networks")
                try:
                    nets = build_networks(workload, plan)
                except Exception as exc:  # e.g. out of memory for XXL: every arm of the workload failed.
                    unmeasured = _unmeasured("failed", f"building the networks failed: {describe(exc)}")
                    log(f"workload {workload.name}: FAILED to build the networks: {describe(exc)}")
                    _free(plan.device)
            for batch in batches:
                t0 = time.perf_counter()
                shape = ""
                if nets is None:
                    rows = copy.deepcopy(unmeasured)
                else:
                    ctx = make_context(workload, nets, batch, plan)
                    shape = "x".join(str(d) for d in ctx.noise.shape[1:])
                    log(f"workload {workload.name}, batch {batch}: {ctx.evals} evaluations per network, "
                        f"step backend {ctx.backend}")
                    timing: dict[str, float] = {}
                    try:
                        rows = measure_batch(ctx, plan, clock, batches[0], est_batch_s, timing)
                    except BatchInterrupted as exc:
                        rows, interrupted = exc.rows, True
                    del ctx
                for row in rows:
                    row.update(meta)
                    row.update(workload=workload.name, main=workload.main, guide=workload.guide, latent_shape=shape,
                               steps=plan.steps, evals=2 * plan.steps - 1, guidance=workload.guidance, batch=batch)
                common.append_rows(out, rows, COLUMNS)
                all_rows.extend(rows)
                print_batch(rows)
                if interrupted:
                    break
                if nets is None:
                    continue
                compile_s = sum(float(r["setup_s"]) for r in rows if r["arm"] in compiled and r.get("setup_s"))
                # The next (larger) batch is assumed to take 1.3x as long, without compiling; and
                # without the second round when no compiling arm runs there (--quick: first batch only).
                later = [b for b in batches if b > batch]
                round2_later = any(skip_reason(a, plan, b, batches[0]) is None for a in ARMS if a.compiles
                                   for b in later)
                spent = (time.perf_counter() - t0 - compile_s if round2_later or "round1_s" not in timing
                         else timing["round1_s"])
                est_batch_s = max(est_batch_s, 1.3 * spent)
                if any(r["arm"] in compiled and r["status"] == "ok" for r in rows):
                    with contextlib.suppress(Exception):  # Drop compiled code and its CUDA graph trees.
                        torch._dynamo.reset()
                _free(plan.device)
            del nets
            _free(plan.device)
            if interrupted:
                break
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        log("interrupted (time limit): no further batch")
    log(f"done in {clock.elapsed():.0f} s; {len(all_rows)} rows appended to {out}")
    text = format_targets(all_rows)
    print(text, flush=True)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text + "\n")
    return all_rows


def print_batch(rows: list[dict]) -> None:
    print(f"  {'arm':20s} {'status':8s} {'p50 ms':>10s} {'p20-p80 ms':>19s} {'/B0':>7s} {'/F':>7s}  notes")
    for r in rows:
        band = f"{r['p20_ms']}-{r['p80_ms']}" if r.get("p50_ms") else ""
        print(f"  {r['arm']:20s} {r['status']:8s} {r.get('p50_ms', ''):>10s} {band:>19s} "
              f"{r.get('ratio_to_B0', ''):>7s} {r.get('ratio_to_F', ''):>7s}  {r.get('notes', '')[:150]}", flush=True)


# ----------------------------------------------------------------------------
# Targets (README "Performance"): computed from rows, printed, never asserted.


TARGET_F = f"ours_best (uncompiled nets) <= {TARGET_RATIO_F:g} x F"
TARGET_BATCH64 = "ours default <= best single-stream sampler"


def evaluate_targets(rows: list[dict]) -> list[tuple[str, int, str, str, str]]:
    """(workload, batch, target, measured, verdict) for every target the rows allow to judge.

    Only arms with at least common.MIN_JUDGED_REPS repetitions are judged (DESIGN: median of >= 5); an arm
    with fewer is reported as such, and an arm is compared only with arms of its round of repetitions
    (``common.same_round``). ours_best: the fastest such "ours-*" arm. Batch 1: ours_best at least 2.5x
    faster than B0, 2x than B1, 1.3x than B2; and the fastest ours arm whose networks are not compiled
    (``common.networks_compiled``: F runs the plain networks, so only concurrency and the sampler may
    beat it, not a compiler) at most 0.85 x F. Batch >= 64: what a user gets by default (ours-auto:
    streams and graphs on "auto"; without it, the fastest ours arm that may use two streams) no slower
    than the best single-stream sampler (baselines and ours arms whose networks share one stream; the
    floors F/F_par are not samplers).
    """
    out = []
    for (workload, batch), group in common.by_workload_batch(rows):
        judged = common.judged(group)

        def missing(arm: str, group: list[dict] = group) -> str:
            row = next((r for r in group if r["arm"] == arm), None)
            reason = None if row is None else common.unjudged_reason(row)
            return f"{arm} not measured" if reason is None else f"{arm}: {reason}"

        if common.fastest(judged, lambda r: r["kind"] == "ours") is None:
            if batch == 1 or batch >= 64:
                why = "; ".join(f"{r['arm']}: {common.unjudged_reason(r)}" for r in group if r["kind"] == "ours")
                out.append((workload, batch, "ours_best", f"no ours arm judged: {why or 'none ran'}", "n/a"))
            continue
        if batch == 1:
            out.extend((workload, batch, *t) for t in _batch1_targets(judged, missing))
        if batch >= 64:
            out.append((workload, batch, *_batch64_target(judged, missing, group)))
    return out


def _batch1_targets(judged: list[dict], missing: Callable[[str], str]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) of the batch-1 targets among one batch's judged rows."""
    out = []
    for base, need in (("B0", TARGET_SPEEDUP_B0), ("B1", TARGET_SPEEDUP_B1), ("B2", TARGET_SPEEDUP_B2)):
        target = f"ours_best >= {need:g}x faster than {base}"
        pair = common.versus(judged, base)
        if pair is None:
            why = missing(base) if common.arm_p50(judged, base) is None else f"no ours arm timed in {base}'s round"
            out.append((target, why, "n/a"))
        else:
            ref, best, best_arm = pair
            out.append((target, f"{ref / best:.2f}x ({best_arm})", "MET" if ref / best >= need else "not met"))
    pair = common.versus(judged, "F", lambda r: not common.networks_compiled(r))
    if pair is None:
        why = (missing("F") if common.arm_p50(judged, "F") is None
               else "no ours arm with uncompiled networks timed in F's round")
        out.append((TARGET_F, why, "n/a"))
    else:
        f, best, best_arm = pair
        out.append((TARGET_F, f"{best / f:.2f} x F ({best_arm})", "MET" if best / f <= TARGET_RATIO_F else "not met"))
    return out


def _batch64_target(judged: list[dict], missing: Callable[[str], str], group: list[dict]
                    ) -> tuple[str, str, str]:
    """(target, measured, verdict) of the batch-64 target among one batch's judged rows (``group``:
    all its rows). The default is ours-auto; another ours arm stands in only where ours-auto was not
    selected (--arms/--skip), never for an ours-auto that failed, was cut short or was wrong."""
    default = common.fastest(judged, lambda r: r["arm"] == "ours-auto")
    auto = next((r for r in group if r["arm"] == "ours-auto"), None)
    if default is None and (auto is None or common.deselected(auto)):
        default = common.fastest(judged, lambda r: r["kind"] == "ours" and r["streams"] != "1")
    if default is None:
        return TARGET_BATCH64, missing("ours-auto"), "n/a"
    mine, mine_arm = default
    peers = common.same_round(judged, next(r for r in judged if r["arm"] == mine_arm))
    single = common.fastest(peers, lambda r: r["kind"] != "floor" and r["streams"] == "1")
    if single is None:
        return TARGET_BATCH64, "no single-stream sampler measured", "n/a"
    ref, ref_arm = single
    return TARGET_BATCH64, f"{mine / ref:.3f} x {ref_arm} ({mine_arm})", _no_slower(judged, mine_arm, ref_arm)


def _no_slower(rows: list[dict], mine_arm: str, ref_arm: str) -> str:
    """MET if mine's median is at most ref's. A slower median is never MET: inside ref's p20-p80 band
    (e.g. ours-auto kept one stream: the same configuration as the single-stream arm, timed twice) the
    two cannot be told apart, and the verdict says "tie" with how much slower; outside it, not met."""
    mine = next(r for r in rows if r["arm"] == mine_arm)
    ref = next(r for r in rows if r["arm"] == ref_arm)
    m, p50 = float(mine["p50_ms"]), float(ref["p50_ms"])
    if m <= p50:
        return "MET"
    try:
        inside = m <= float(ref["p80_ms"])
    except (KeyError, ValueError):
        inside = False
    return (f"tie (slower median +{100 * (m / p50 - 1):.1f}%, inside the reference's p20-p80 band)" if inside
            else "not met")


def format_targets(rows: list[dict]) -> str:
    lines = ["Targets: ratios of medians measured side by side in this run; printed, not asserted."]
    if not rows:
        return "\n".join(lines + ["  no rows"])
    if any(r.get("device_type") != "cuda" for r in rows):
        return "\n".join(lines + ["  not evaluated: this is not a GPU run (the targets are GPU targets)."])
    results = evaluate_targets(rows)
    if not any(batch >= 64 for _, batch, *_ in results):
        results.append(("-", 64, TARGET_BATCH64, "batch 64 not in this run", "n/a"))
    width = max(len(t) for _, _, t, _, _ in results)
    lines.append(f"  {'workload':20s} {'batch':>5s}  {'target':{width}s}  {'measured':34s} verdict")
    for workload, batch, target, measured, verdict in results:
        lines.append(f"  {workload:20s} {batch:>5d}  {target:{width}s}  {measured:34s} {verdict}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Precompilation (run alongside other work so that the timed run finds warm compile caches).


def precompile(plan: Plan) -> int:
    """Compile the B2 networks at every batch the plan compiles them at, with the same inputs'
    shapes, so Inductor's and Triton's on-disk caches are warm for the timed run."""
    clock = Clock(plan.time_budget)
    arm = next(a for a in ARMS if a.name == "B2")
    planned = [(w, b) for w, batches in plan.workloads for b in batches
               if skip_reason(arm, plan, b, batches[0]) is None]
    log(f"precompile: B2 at {', '.join(f'{w.name} batch {b}' for w, b in planned) or 'no batch (B2 does not run)'}")
    for workload, batches in plan.workloads:
        nets = build_networks(workload, plan)
        for batch in batches:
            if skip_reason(arm, plan, batch, batches[0]) is not None:
                continue
            if clock.left() <= 0:
                log("precompile: time budget spent")
                return 0
            ctx = make_context(workload, nets, batch, plan)
            t = reference.edm_time_steps(ctx.steps, 0.002, 80, 7, torch.float32, ctx.device)[0]
            x = ctx.noise * t
            t0 = time.perf_counter()
            with torch.no_grad():
                for net in (ctx.main, ctx.guide):
                    compile_network(net)(x, t, ctx.labels)
            _sync(ctx.device)
            log(f"precompile: {workload.name} batch {batch} compiled in {time.perf_counter() - t0:.1f} s")
        del nets
    return 0


# ----------------------------------------------------------------------------
# Command line.


def _names(text: str | None) -> list[str]:
    if not text:
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARM_NAMES]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; arms are: {', '.join(ARM_NAMES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="End-to-end latency of guided EDM2 sampling: baselines B0/B1/B2, floors F/F_par and our "
                    "switches, interleaved in one process. Rows are appended to a tidy CSV.",
        epilog="Arms: " + ", ".join(ARM_NAMES) + ". See benchmarks/README.md.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="GPU check: batch 1 and 8, 5 repetitions, B2 at batch 1 only, without ours-compiled and "
                           "ours-streams, time budget 150 s unless --time-budget is given")
    mode.add_argument("--smoke", action="store_true",
                      help="CPU harness check: tiny EDM2 networks, 2 steps, batch 2; the numbers mean nothing")
    mode.add_argument("--targets-from", metavar="CSV", default=None,
                      help="only print the targets of the latest results in this CSV (no measuring)")
    p.add_argument("--out", default=None,
                   help="CSV to append rows to (default: benchmarks/results/latency.csv; with --smoke a file in "
                        "the temporary directory, since smoke numbers are not results)")
    p.add_argument("--report", default=None, help="also write the targets table to this text file")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (overrides the mode's)")
    p.add_argument("--steps", type=int, default=None, help="Heun steps N (default 32; --smoke 2)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per arm (default 10; --quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per arm before timing (default 2; "
                   "--quick/--smoke 1)")
    p.add_argument("--arms", default=None, help="comma-separated arms to run (default: all)")
    p.add_argument("--skip", default=None, help="comma-separated arms not to run (recorded as skipped), e.g. B2")
    p.add_argument("--xxl", action="store_true", help="also run EDM2-XXL main + EDM2-M guide (w=2.05) at batch 1")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds from the start: after this no new batch or compilation starts, repetitions stop "
                        "after the 5th, and all stop 10 s later")
    p.add_argument("--compile-estimate", type=float, default=60.0,
                   help="seconds a compiled arm is assumed to need, for the time budget (default 60)")
    p.add_argument("--cpu-compile", action="store_true",
                   help="run the compiled arm B2 on CPU too (slow; for checking the harness)")
    p.add_argument("--precompile", action="store_true",
                   help="only compile the B2 networks of this plan (warms the compile caches), measure nothing")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, noise and labels")
    return p


def make_plan(args: argparse.Namespace) -> Plan:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    defaults = {
        "full": ([1, 8, 64], 32, 10, 2, None),
        "quick": ([1, 8], 32, 5, 1, 150.0),
        "smoke": ([2], 2, 2, 1, None),
    }[mode]
    batches, steps, reps, warmup, budget = defaults
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    if any(b < 1 for b in batches):
        raise SystemExit(f"--batches must be positive, got {batches}")
    steps = args.steps if args.steps is not None else steps
    if steps < 2:
        raise SystemExit("--steps must be at least 2")
    workloads = [(WORKLOAD_SMOKE if mode == "smoke" else WORKLOAD_S_XS, batches)]
    if args.xxl:
        workloads.append((WORKLOAD_XXL_M, [1]))
    return Plan(
        mode=mode, device=device, workloads=workloads, steps=steps,
        reps=args.reps if args.reps is not None else reps,
        warmup=max(1, args.warmup if args.warmup is not None else warmup),
        arms=_names(args.arms) or list(ARM_NAMES), skip=_names(args.skip),
        time_budget=args.time_budget if args.time_budget is not None else budget,
        compile_estimate=args.compile_estimate, cpu_compile=args.cpu_compile, seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = pathlib.Path(args.report) if args.report else None
    if args.targets_from:
        if not pathlib.Path(args.targets_from).is_file():
            build_parser().error(f"--targets-from: no such file: {args.targets_from}")
        text = format_targets(common.latest_run(common.read_rows(args.targets_from)))
        print(text)
        if report is not None:
            report.write_text(text + "\n")
        return 0
    plan = make_plan(args)
    if plan.device.type == "cuda" or plan.cpu_compile:
        # Many (network, batch, mode) specialisations are compiled in one process: lift the limit
        # after which torch.compile silently falls back to eager.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if args.precompile:
        return precompile(plan)
    if args.out:
        out = pathlib.Path(args.out)
    elif plan.mode == "smoke":
        out = pathlib.Path(tempfile.gettempdir()) / "autoguide_fast_latency_smoke.csv"
    else:
        out = common.RESULTS_DIR / "latency.csv"
    threads = torch.get_num_threads()
    if plan.mode == "smoke":
        # Smoke numbers mean nothing; one intra-op thread keeps a shared CPU from stalling the
        # harness check (spinning OpenMP threads on an oversubscribed machine cost 10-100x).
        torch.set_num_threads(1)
    try:
        run(plan, out, report)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
