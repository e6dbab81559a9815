"""Fused step ops against the unfused torch sequence: time, bytes moved, bandwidth vs a copy.

For every backend, op and size, one row: p20/p50/p80 milliseconds per op, the bytes the op must
move (each input read once, each output written once), the achieved GB/s, the GB/s of a copy
moving the same number of bytes on the same device (``dst.copy_(src)``: memcpy on CPU, a
device-to-device copy on GPU), their ratio, and the speedup over the "torch" backend (the
reference's own eager tensor ops, which compute the same results unfused).

Ops (state float32 by default, network outputs in --net-dtype):
  euler_unguided     D = D1; d = (x_hat - D)/t_hat; x_next = x_hat + (t_next - t_hat) d
                     (EDM Algorithm 2, lines 7-8): reads x_hat, D1; writes d, x_next.
  euler_guided       D = D0 + w (D1 - D0) (autoguidance eq. 2), then as above: reads x_hat, D1, D0.
  euler_guided_last  the same without writing d (need_d=False: the last Heun step, the euler solver).
  heun_guided        d' = (x_next - D')/t_next; x_out = x_hat + (t_next - t_hat)(d/2 + d'/2)
                     (lines 9-11): reads x_hat, d, x_next, D1', D0'; writes x_out.
  heun_guided_churn  the same plus the next step's churn x_out + s eps (line 5). Fused backends draw
                     eps from the image's seed inside the op; the torch baseline is the official
                     sampler's unfused sequence: the Heun ops, then eps = torch.randn_like(x) and
                     x + s eps (torch's own generator, not the seeded noise, whose pure-torch
                     emulation would make a slow strawman; seeded_noise below times that part).
  seeded_noise       the per-image seeded normals alone (Philox4x32-10 + Box-Muller, noise.py), as
                     seeded_noise draws them; one more arm, "randn_like", is torch.randn_like of the
                     same size (the official sampler's unseeded source), for comparison.
Method: one process; per (size, op) every arm is warmed up, then the arms are timed round-robin;
a sample is the mean over an inner loop of calls (CUDA events around the loop on GPU, the wall
clock on CPU), the loop sized from the median of 5 single calls. On CPU, glibc is told to keep
freed memory (mallopt), so every arm reuses its output buffers as a caching allocator would
instead of page-faulting fresh ones on each call.

    python benchmarks/bench_step.py --backends cpp,torch --sizes 1M --out benchmarks/results/step_cpu.csv
    python benchmarks/bench_step.py --quick --out step.csv        # GPU check: cuda, triton, torch
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import pathlib
import sys
import time
from collections.abc import Callable

import torch

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import common  # noqa: E402

common.ensure_repo_on_path()

import autoguide_fast  # noqa: E402
from autoguide_fast.backends import resolve_backend  # noqa: E402
from autoguide_fast.plan import StepPlan  # noqa: E402

OPS = ("euler_unguided", "euler_guided", "euler_guided_last", "heun_guided", "heun_guided_churn", "seeded_noise")
STEP_OPS = ("euler_unguided", "euler_guided", "euler_guided_last", "heun_guided",  # The targets apply to these.
            "heun_guided_churn")
COLUMNS = [
    "date", "run_id", "card", "device_type", "torch", "cuda", "triton", "python", "commit", "source_hash",
    "backend", "op", "numel", "dtype", "net_dtype", "threads", "n_samples", "inner", "p20_ms", "p50_ms", "p80_ms",
    "bytes", "gbps", "copy_gbps", "frac_of_copy", "speedup_vs_torch", "status", "notes",
]


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * scale)


def _keep_freed_memory() -> bool:
    """glibc: no mmap for large blocks and no trimming, so freed buffers are reused (CPU only)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


def _step(index: int, t_hat: float, t_next: float, dtype: torch.dtype, device, noise_scale=None) -> StepPlan:
    th, tn = torch.tensor(t_hat, dtype=dtype), torch.tensor(t_next, dtype=dtype)
    tensors = {"t_cur": th, "t_hat": th, "t_next": tn}
    if noise_scale is not None:
        tensors["noise_scale"] = torch.tensor(noise_scale, dtype=dtype)
    host = {k: v.item() for k, v in tensors.items()}
    tensors = {k: v.to(device) for k, v in tensors.items()}
    return StepPlan(index=index, t_cur=host["t_cur"], t_hat=host["t_hat"], t_next=host["t_next"],
                    noise_scale=host.get("noise_scale"), w_first=2.1, w_second=2.1, second_order=True,
                    tensors=tensors)


class Workload:
    """Inputs of one size: a batch of 4 images (the noise is per image)."""

    def __init__(self, numel: int, dtype: torch.dtype, net_dtype: torch.dtype, device: torch.device) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        shape = (4, numel // 4)

        def rand(dt):
            return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dt)

        self.x, self.d, self.x_next = rand(dtype), rand(dtype), rand(dtype)
        self.D1, self.D0 = rand(net_dtype), rand(net_dtype)
        self.seeds = torch.arange(4, device=device, dtype=torch.int64)
        self.step = _step(3, 3.7, 2.9, dtype, device)
        self.next = _step(4, 3.1, 2.2, dtype, device, noise_scale=1.3)
        self.numel = self.x.numel()
        s, n = self.x.element_size(), self.D1.element_size()
        self.bytes = {
            "euler_unguided": self.numel * (s + n + 2 * s),
            "euler_guided": self.numel * (s + 2 * n + 2 * s),
            "euler_guided_last": self.numel * (s + 2 * n + s),
            "heun_guided": self.numel * (3 * s + 2 * n + s),
            "heun_guided_churn": self.numel * (3 * s + 2 * n + s),
            "seeded_noise": self.numel * s,
        }

    def call(self, backend, op: str) -> Callable[[], object]:
        x, d, xn, D1, D0, step = self.x, self.d, self.x_next, self.D1, self.D0, self.step
        if op == "euler_unguided":
            return lambda: backend.euler(x, D1, None, None, step)
        if op == "euler_guided":
            return lambda: backend.euler(x, D1, D0, 2.1, step)
        if op == "euler_guided_last":
            return lambda: backend.euler(x, D1, D0, 2.1, step, need_d=False)
        if op == "heun_guided":
            return lambda: backend.heun(x, d, xn, D1, D0, 2.1, step)
        nxt, seeds = self.next, self.seeds
        if op == "seeded_noise":
            per_image, dtype = self.numel // seeds.numel(), self.x.dtype
            return lambda: backend.normal(seeds, per_image, 5, dtype)
        if getattr(backend, "fuses_churn", False):
            return lambda: backend.heun(x, d, xn, D1, D0, 2.1, step, churn_next=(nxt, seeds))
        # The official sampler's unfused churn: torch.randn_like, then x + s eps.
        return lambda: backend.churn(backend.heun(x, d, xn, D1, D0, 2.1, step), nxt, None, torch.randn_like(x))


def _time(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """Milliseconds per call, averaged over `inner` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def _inner_for(fn: Callable[[], object], device: torch.device, target_ms: float, probes: int = 5) -> int:
    """Calls per sample: `target_ms` worth at the median time of `probes` single calls. One call is
    not enough: right after the warm-up a call can take 10-20x its steady time (page faults of
    freshly allocated memory, a descheduled thread), and sizing from it left a handful of calls
    per sample, each sample then dominated by its first call after the other arms evicted this
    arm's data from the caches (2-thread CPU timings up to 2x the steady time)."""
    ms = sorted(_time(fn, device, 1) for _ in range(probes))[probes // 2]
    return max(1, min(1000, int(target_ms / max(ms, 1e-3))))


def run(args: argparse.Namespace, emit: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Measures every (size, op); ``emit`` gets each batch of rows as soon as it is measured (so a
    run stopped by a time limit keeps what it finished)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype, net_dtype = getattr(torch, args.dtype), getattr(torch, args.net_dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = _keep_freed_memory() if device.type == "cpu" else False
    status = autoguide_fast.backends()
    names = args.backends.split(",") if args.backends else (
        ["cuda", "triton", "torch"] if device.type == "cuda" else ["cpp", "torch"])
    if "torch" not in names:
        names.append("torch")  # The baseline of every speedup.
    sizes = [_parse_size(s) for s in args.sizes.split(",")] if args.sizes else (
        ([16 << 20] if args.quick else [1 << 20, 16 << 20, 64 << 20]) if device.type == "cuda"
        else ([1 << 20] if args.quick else [1 << 16, 1 << 20, 1 << 22]))
    ops = args.ops.split(",") if args.ops else list(OPS)
    n_samples = args.samples or (7 if args.quick else 21)
    target_ms = 2.0 if args.quick else 10.0
    meta = common.run_metadata(device)
    threads = torch.get_num_threads() if device.type == "cpu" else ""
    notes = "cpu: freed memory kept (mallopt)" if kept else ""

    backends, rows = {}, []
    for name in names:
        try:
            backends[name] = resolve_backend(name, device, dtype)
        except (RuntimeError, ValueError) as exc:
            reason = str(exc) if name in status else f"unknown backend {name!r}"
            rows.append({**meta, "backend": name, "status": "skipped", "notes": reason, "dtype": args.dtype,
                         "net_dtype": args.net_dtype, "threads": threads})
            print(f"{name}: skipped ({reason})")
    emit(rows)

    for numel in sizes:
        work = Workload(numel, dtype, net_dtype, device)
        for op in ops:
            nbytes = work.bytes[op]
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            arms = {name: work.call(b, op) for name, b in backends.items()}
            if op == "seeded_noise":
                arms["randn_like"] = lambda x=work.x: torch.randn_like(x)
            arms["copy"] = lambda src=src, dst=dst: dst.copy_(src)
            failed, inner = {}, {}
            for name, fn in arms.items():  # Warm-up (compiles Triton kernels) and inner-loop sizing.
                try:
                    for _ in range(2):
                        fn()
                    inner[name] = _inner_for(fn, device, target_ms)
                except Exception as exc:  # noqa: BLE001  (an arm that fails is recorded, not fatal)
                    failed[name] = f"{type(exc).__name__}: {exc}"
            first = len(rows)
            times: dict[str, list[float]] = {name: [] for name in inner}
            order = list(inner)
            for rep in range(n_samples):
                for k in range(len(order)):
                    name = order[(rep + k) % len(order)]
                    times[name].append(_time(arms[name], device, inner[name]))
            copy_ms = common.summarize(times["copy"])["p50"] if "copy" in times else float("nan")
            copy_gbps = nbytes / copy_ms / 1e6
            torch_p50 = common.summarize(times["torch"])["p50"] if "torch" in times else float("nan")
            for name in [a for a in arms if a != "copy"]:
                row = {**meta, "backend": name, "op": op, "numel": work.numel, "dtype": args.dtype,
                       "net_dtype": args.net_dtype, "threads": threads, "bytes": nbytes, "notes": notes}
                if name in failed:
                    rows.append({**row, "status": "failed", "notes": failed[name]})
                    print(f"{name:10s} {op:18s} {work.numel:>10d}: failed ({failed[name]})")
                    continue
                q = common.summarize(times[name])
                gbps = nbytes / q["p50"] / 1e6
                row.update({
                    "n_samples": n_samples, "inner": inner[name], "status": "ok",
                    "p20_ms": f"{q['p20']:.5f}", "p50_ms": f"{q['p50']:.5f}", "p80_ms": f"{q['p80']:.5f}",
                    "gbps": f"{gbps:.2f}", "copy_gbps": f"{copy_gbps:.2f}", "frac_of_copy": f"{gbps / copy_gbps:.3f}",
                    "speedup_vs_torch": f"{torch_p50 / q['p50']:.2f}",
                })
                rows.append(row)
                print(f"{name:10s} {op:18s} {work.numel:>10d}: p50 {q['p50']:.4f} ms  {gbps:7.1f} GB/s "
                      f"({gbps / copy_gbps:5.1%} of copy {copy_gbps:.1f})  x{torch_p50 / q['p50']:.2f} vs torch")
            emit(rows[first:])
            del src, dst
        del work
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=None,
                        help="comma-separated subset of cpp,cuda,triton,torch (default: cuda,triton,torch on GPU, "
                             "cpp,torch on CPU); torch, the baseline, is always added")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated element counts, e.g. 1M,16M (K/M/G = 2^10/2^20/2^30)")
    parser.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--quick", action="store_true", help="one size (1M on CPU, 16M on GPU), fewer samples")
    parser.add_argument("--out", default=None, help="CSV to append rows to (default: benchmarks/results/step.csv)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="sampler state dtype")
    parser.add_argument("--net-dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"],
                        help="dtype of the network outputs")
    parser.add_argument("--samples", type=int, default=None, help="timed samples per arm")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--report", default=None, help="also write the target verdicts to this text file")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out) if args.out else common.RESULTS_DIR / "step.csv"
    rows: list[dict] = []

    def emit(new: list[dict]) -> None:
        rows.extend(new)
        common.append_rows(out, new, COLUMNS)

    interrupted = False
    try:
        run(args, emit)
    except KeyboardInterrupt:  # A time limit (the GPU check sends SIGINT): the finished rows are written.
        interrupted = True
        print("interrupted: the rows measured so far are written")
    print(f"{len(rows)} rows -> {out}")
    text = format_step_targets(rows, interrupted)
    print(text)
    if args.report:
        pathlib.Path(args.report).write_text(text + "\n")
    if interrupted:
        return 130
    return 0 if all(r.get("status") in ("ok", "skipped") for r in rows) else 1


# Targets of the fused step ops (benchmark, not test): on a GPU at >= 16M elements, >= 85% of the
# bandwidth of a device copy of the same bytes and >= 3x the unfused torch sequence; on a CPU at
# 1M elements, the C++ op >= 2x the unfused torch sequence.
GPU_MIN_NUMEL, GPU_MIN_FRAC_OF_COPY, GPU_MIN_SPEEDUP = 16 << 20, 0.85, 3.0
CPU_NUMEL, CPU_MIN_SPEEDUP = 1 << 20, 2.0


def step_targets(rows: list[dict]) -> list[tuple[str, str, int, str, str, str]]:
    """(backend, op, numel, target, measured, verdict) for every measured row a target applies to."""
    out = []
    for r in rows:
        if r.get("status") != "ok" or r.get("backend") in ("torch", "randn_like") or r.get("op") not in STEP_OPS:
            continue
        numel, frac, speedup = int(r["numel"]), float(r["frac_of_copy"]), float(r["speedup_vs_torch"])
        key = (r["backend"], r["op"], numel)
        faster = ("n/a (the torch sequence failed)" if speedup != speedup else None)  # NaN: no baseline.
        if r.get("device_type") == "cuda" and numel >= GPU_MIN_NUMEL:
            copy_failed = "n/a (the copy baseline failed)" if frac != frac else None  # NaN: no baseline.
            out.append((*key, f">= {GPU_MIN_FRAC_OF_COPY:.0%} of copy bandwidth", f"{frac:.1%}",
                        copy_failed or ("MET" if frac >= GPU_MIN_FRAC_OF_COPY else "not met")))
            out.append((*key, f">= {GPU_MIN_SPEEDUP:g}x the unfused torch sequence", f"{speedup:.2f}x",
                        faster or ("MET" if speedup >= GPU_MIN_SPEEDUP else "not met")))
        elif r.get("device_type") == "cpu" and numel == CPU_NUMEL and r["backend"] == "cpp":
            out.append((*key, f">= {CPU_MIN_SPEEDUP:g}x the unfused torch sequence", f"{speedup:.2f}x",
                        faster or ("MET" if speedup >= CPU_MIN_SPEEDUP else "not met")))
    return out


def format_step_targets(rows: list[dict], interrupted: bool = False) -> str:
    results = step_targets(rows)
    lines = ["Step-op targets (ratios measured side by side in this run; printed, not asserted):"]
    if interrupted:
        lines.append("  the run was interrupted (time limit): only the ops it finished are judged")
    if not results:
        return "\n".join(lines + ["  none applies to these rows (GPU: >= 16M elements; CPU: cpp at 1M)"])
    for backend, op, numel, target, measured, verdict in results:
        lines.append(f"  {backend:7s} {op:18s} {numel:>10d}  {target:36s} {measured:>8s}  {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
