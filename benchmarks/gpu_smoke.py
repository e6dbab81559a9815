"""One-line verdicts on every GPU path in about twenty seconds: the first stage of a GPU visit, so
that whatever fails later, we know what works.

Items (each prints one line ``PASS|WARN|FAIL|SKIP  item  detail`` as soon as it is done):

  env                     device, versions, compiled extension, backends
  <backend>/eager         GuidedSampler(graph="none", streams="off") on a tiny conv network against
                          ``reference.edm_sampler`` (deterministic schedule; bit for bit expected)
  <backend>/<graph>-<s>   graph "trajectory" or "step", guide stream "off" or "on", against the
                          same backend eagerly (bit for bit expected; a capture failure is a FAIL)
  <backend>/churn-...     the same with seeded churn (S_churn > 0, per-image seeds)
  auto                    GuidedSampler with every switch on "auto" (what it chose, and its result)
  buckets                 BucketedSampler (buckets 1, 2; 3 seeded images = 2 + 1) against eager samplers
  edm2-xs/<graph>         the real EDM2-XS network (fp16 body), 2 steps at batch 1: captured in
                          one graph with the guide on a side stream, against the same sampler eagerly
  arms/<arm>              the latency benchmark's arms F, F_par and B2 built and run as it builds them
                          (its tiny --smoke EDM2 networks, 2 steps, batch 1), so that a broken arm shows
                          up before the timed run; B2 (compiles) is skipped when too little time is left

for the backends torch, triton and cuda. Each group (one backend; the auto + EDM2 items) runs in
its own process, all at once: a kernel that faults poisons only its own CUDA context, and the
groups overlap their compilation. WARN: close to the expected result but not bit for bit.
Timings (ms per call, median of 5) are indicative only (groups share the GPU).

    python benchmarks/gpu_smoke.py --out OUTDIR     # OUTDIR/smoke.txt, smoke.json, smoke_<group>.log
    python benchmarks/gpu_smoke.py --device cpu     # a dry run of the harness (eager items only)

Exit status: 0 when no item failed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import torch

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import common  # noqa: E402

common.ensure_repo_on_path()

import autoguide_fast  # noqa: E402
from autoguide_fast import reference  # noqa: E402
from autoguide_fast.backends import resolve_backend  # noqa: E402

BACKENDS = {"cuda": ("torch", "triton", "cuda"), "cpu": ("torch", "cpp")}  # Step backends tried per device type.
SHAPE = (2, 3, 16, 16)
LABEL_DIM = 5
BASE = {"num_steps": 4, "guidance": 2.1}
EDM2_NOISE_SHAPE = (1, 4, 64, 64)  # The edm2-xs items: one img512 latent.
CHURN = {"S_churn": 20.0, "S_min": 0.05, "S_max": 50.0}
SEEDS = [3, 2**40 + 7]
WARN_REL = 1e-4     # Largest relative difference still called "close" (WARN) rather than FAIL.
SMOKE_ARMS = ("F", "F_par", "B2")  # The latency arms the smoke builds and runs (the others are smoked above).
# Seconds B2 needs at least: it compiles two tiny networks from cold (Inductor, reduce-overhead), never
# timed on a GPU yet. Generous on purpose: a group killed at its limit reports every item it did not
# reach as failed, so within the GPU check's default smoke limit (55 s) B2 is left to the timed run,
# which records a failing arm without stopping; a longer --timeout smokes it here too.
B2_NEEDS_S = 90.0


class TinyNet(torch.nn.Module):
    """EDM-preconditioned random conv denoiser with class labels: D = c_skip x + c_out F(c_in x)."""

    def __init__(self, seed: int, hidden: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(SHAPE[1], hidden, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(hidden, SHAPE[1], 3, padding=1)
        self.emb = torch.nn.Parameter(torch.zeros(LABEL_DIM, hidden))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(torch.float32)
        c_skip = 0.25 / (sigma**2 + 0.25)
        c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()
        c_in = 1 / (0.25 + sigma**2).sqrt()
        h = self.conv1(x * c_in) + sigma.log() / 4 + (labels @ self.emb)[:, :, None, None]
        return c_skip * x + c_out * self.conv2(torch.nn.functional.silu(h))


class Report:
    """Prints each verdict at once and keeps them for the JSON file."""

    def __init__(self, group: str, json_path: pathlib.Path | None) -> None:
        self.group, self.json_path, self.items = group, json_path, []

    def add(self, verdict: str, item: str, detail: str) -> None:
        self.items.append({"group": self.group, "verdict": verdict, "item": item, "detail": detail})
        print(f"{verdict:4s}  {item:28s} {detail}", flush=True)
        if self.json_path is not None:  # Rewritten after every item: a killed run keeps what it did.
            self.json_path.write_text(json.dumps(self.items, indent=1))

    def run(self, item: str, fn: Callable[[], tuple[str, str]]) -> None:
        try:
            verdict, detail = fn()
        except Exception as exc:  # Every failure is one FAIL line; the next item still runs.
            text = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {text[0][:300] if text else ''}"
            tb = traceback.extract_tb(exc.__traceback__)
            if tb:
                detail += f" (at {pathlib.Path(tb[-1].filename).name}:{tb[-1].lineno})"
            verdict = "FAIL"
        self.add(verdict, item, detail)


def _ms(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Median milliseconds of one call (CUDA events on a GPU, the wall clock on a CPU)."""
    return statistics.median(common.time_call(fn, device)[0] for _ in range(reps))


def _compare(out: torch.Tensor, expected: torch.Tensor) -> tuple[str, str]:
    if out.shape != expected.shape or out.dtype != expected.dtype:
        return "FAIL", f"got {out.dtype} {tuple(out.shape)}, expected {expected.dtype} {tuple(expected.shape)}"
    if not bool(torch.isfinite(out).all()):
        return "FAIL", "NaN/Inf in the result"
    if torch.equal(out, expected):
        return "PASS", "bit-exact"
    diff = float((out.double() - expected.double()).abs().max())
    rel = diff / max(float(expected.double().abs().max()), 1e-30)
    return ("WARN" if rel <= WARN_REL else "FAIL"), f"max |diff| {diff:.3g} (relative {rel:.2g})"


def _engine_line(sampler, verdict: str, detail: str, ms: float, wanted: dict) -> tuple[str, str]:
    r = sampler.report
    ran = {k: r.get(k) for k in wanted}
    if r.get("capture_error"):
        return "FAIL", f"capture failed, fell back to eager: {str(r['capture_error'])[:300]}"
    if ran != wanted:
        return "FAIL", f"asked {wanted}, engine ran {ran}"
    return verdict, f"{detail}; {ms:.2f} ms/call"


def _inputs(device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=g).to(device)
    labels = torch.nn.functional.one_hot(torch.randint(LABEL_DIM, (SHAPE[0],), generator=g), LABEL_DIM)
    return noise, labels.to(device=device, dtype=torch.float32)


def _sampler(net, gnet, device, **kwargs):
    args = dict(noise_shape=SHAPE, label_shape=(SHAPE[0], LABEL_DIM), device=device, **BASE)
    args.update(kwargs)
    return autoguide_fast.GuidedSampler(net, gnet, **args)


def backend_group(name: str, device: torch.device, report: Report) -> None:
    """Eager against the reference, then every graph mode against eager, for one backend."""
    status = autoguide_fast.backends()[name]
    if not status.available:
        # On a card the GPU backends are what the visit is for: missing, they fail it (a build that
        # quietly left the CUDA kernels out would otherwise end the visit green with none of them run).
        missing = "FAIL" if device.type == "cuda" and name in ("cuda", "triton") else "SKIP"
        report.add(missing, f"{name}/*", f"unavailable: {status.reason}")
        return
    try:  # A backend that cannot run on this device is a SKIP, not a FAIL.
        resolve_backend(name, device, torch.float32)
    except RuntimeError as exc:
        report.add("SKIP", f"{name}/*", str(exc))
        return
    net, gnet = TinyNet(1, 16).to(device), TinyNet(2, 8).to(device)
    noise, labels = _inputs(device, 0)
    results: dict[str, torch.Tensor] = {}

    def eager(churn: bool) -> tuple[str, str]:
        extra = CHURN if churn else {}
        s = _sampler(net, gnet, device, backend=name, graph="none", streams="off", check_finite=False, **extra)
        seeds = SEEDS if churn else None
        with torch.no_grad():
            out = s(noise, labels, seeds)
            results[f"churn={churn}"] = out
            ms = _ms(lambda: s(noise, labels, seeds), device)
            if churn:  # Seeded churn has no reference-sampler equivalent: checked against graphs below.
                return "PASS", f"ran ({ms:.2f} ms/call)"
            expected = reference.edm_sampler(net, noise, labels, gnet, **BASE)
        verdict, detail = _compare(out, expected)
        return verdict, f"vs reference.edm_sampler: {detail}; {ms:.2f} ms/call"

    report.run(f"{name}/eager", lambda: eager(False))
    report.run(f"{name}/eager-churn", lambda: eager(True))
    if device.type != "cuda":
        report.add("SKIP", f"{name}/graphs", f"CUDA graphs and streams need a CUDA device (device={device})")
        return

    def graph(mode: str, streams: str, churn: bool) -> tuple[str, str]:
        expected = results.get(f"churn={churn}")
        if expected is None:
            return "SKIP", "no eager result to compare with"
        extra = CHURN if churn else {}
        seeds = SEEDS if churn else None
        s = _sampler(net, gnet, device, backend=name, graph=mode, streams=streams, check_finite=True, **extra)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # A capture failure is read from the report.
            s.prepare(seeded=churn)
            out = s(noise, labels, seeds)
            verdict, detail = _compare(out, expected)
            ms = _ms(lambda: s(noise, labels, seeds), device)
        return _engine_line(s, verdict, f"vs eager: {detail}", ms,
                            {"backend": name, "graph": mode, "streams": streams})

    for mode in ("trajectory", "step"):
        for streams in ("off", "on"):
            report.run(f"{name}/{mode}-streams-{streams}", lambda m=mode, st=streams: graph(m, st, False))
    report.run(f"{name}/churn-trajectory-on", lambda: graph("trajectory", "on", True))
    report.run(f"{name}/churn-step-on", lambda: graph("step", "on", True))


def engine_group(device: torch.device, report: Report, deadline: float | None = None) -> None:
    """What a user gets (every switch on "auto"), the real EDM2 network captured, and the latency
    benchmark's floors and compiled baseline (``arm_items``; ``deadline``: time.monotonic() by which
    the group must end, None = no limit)."""
    net, gnet = TinyNet(1, 16).to(device), TinyNet(2, 8).to(device)
    noise, labels = _inputs(device, 1)

    def auto() -> tuple[str, str]:
        s = _sampler(net, gnet, device)
        with torch.no_grad():
            r = s.prepare()
            out = s(noise, labels)
            expected = reference.edm_sampler(net, noise, labels, gnet, **BASE)
            verdict, detail = _compare(out, expected)
            ms = _ms(lambda: s(noise, labels), device)
        chose = (f"backend={r['backend']} graph={r['graph']} streams={r['streams']} "
                 f"timings_ms={ {k: round(v, 3) for k, v in r['timings_ms'].items()} }")
        if r.get("capture_error"):
            return "FAIL", f"{chose}; capture failed: {str(r['capture_error'])[:300]}"
        return verdict, f"{chose}; vs reference: {detail}; {ms:.2f} ms/call"

    def buckets() -> tuple[str, str]:
        """3 seeded images from buckets (1, 2): chunks of 2 and 1, against eager samplers of those sizes."""
        seeds, lab = [5, 2**40 + 9, 13], labels[[0, 1, 1]]
        s = autoguide_fast.BucketedSampler(net, gnet, image_shape=SHAPE[1:], batch_sizes=(1, 2),
                                           image_label_shape=(LABEL_DIM,), device=device, **BASE, **CHURN)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = s(labels=lab, seeds=seeds)
            parts = []
            for a, b in ((0, 2), (2, 3)):
                e = _sampler(net, gnet, device, noise_shape=(b - a, *SHAPE[1:]), label_shape=(b - a, LABEL_DIM),
                             graph="none", **CHURN)
                parts.append(e(labels=lab[a:b], seeds=seeds[a:b]))
            verdict, detail = _compare(out, torch.cat(parts))
            ms = _ms(lambda: s(labels=lab, seeds=seeds), device)
        graphs = {b: r["graph"] for b, r in s.report.items()}
        errors = [r["capture_error"] for r in s.report.values() if r.get("capture_error")]
        if errors:
            return "FAIL", f"capture failed: {str(errors[0])[:300]}"
        return verdict, f"buckets {graphs}; vs eager per chunk: {detail}; {ms:.2f} ms/call"

    report.run("auto", auto)
    report.run("buckets", buckets)
    if device.type != "cuda":
        report.add("SKIP", "edm2-xs/*", f"needs a CUDA device (device={device})")
        report.add("SKIP", "arms/*", f"the floors need CUDA graphs (device={device})")
        return
    from latency import build_network  # The benchmark's random EDM2 network (non-zero gains).

    from autoguide_fast.models.edm2 import prepare_for_inference

    def edm2_net(seed: int):
        return prepare_for_inference(build_network("xs", {}, device, seed))

    state: dict = {}

    def edm2(mode: str) -> tuple[str, str]:
        if "nets" not in state:
            state["nets"] = edm2_net(0), edm2_net(1)
            g = torch.Generator().manual_seed(2)
            state["noise"] = torch.randn(EDM2_NOISE_SHAPE, generator=g).to(device)
            state["labels"] = torch.nn.functional.one_hot(torch.tensor([7]), 1000).to(device, torch.float32)
        main, guide = state["nets"]
        x, lab = state["noise"], state["labels"]
        streams = "off" if mode == "none" else "on"
        s = autoguide_fast.GuidedSampler(main, guide, noise_shape=x.shape, label_shape=lab.shape, device=device,
                                         num_steps=2, guidance=2.1, graph=mode, streams=streams, check_finite=True)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s.prepare()
            out = s(x, lab)
            ms = _ms(lambda: s(x, lab), device, reps=3)
        if mode == "none":
            state["eager"] = out
            verdict, detail = ("PASS", "finite") if bool(torch.isfinite(out).all()) else ("FAIL", "NaN/Inf")
        else:
            verdict, detail = _compare(out, state["eager"]) if "eager" in state else ("WARN", "no eager result")
            detail = f"vs eager: {detail}"
        return _engine_line(s, verdict, f"{detail} (3 evaluations per network)", ms,
                            {"graph": mode, "streams": streams})

    report.run("edm2-xs/eager", lambda: edm2("none"))
    report.run("edm2-xs/trajectory-on", lambda: edm2("trajectory"))
    arm_items(device, report, deadline)


def _tensors(obj: object) -> list[torch.Tensor]:
    """The tensors in a (nested) tuple or list."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    return []


def arm_items(device: torch.device, report: Report, deadline: float | None) -> None:
    """The latency benchmark's arms F, F_par and B2, built by its own code on its tiny --smoke EDM2
    networks (2 steps, batch 1) and run once plus 3 timed runs: a broken arm shows up here, before
    the timed run. B2 is skipped when less than B2_NEEDS_S seconds are left before ``deadline``."""
    import latency

    plan = latency.Plan("smoke", device, [], steps=2, reps=1, warmup=1, arms=list(SMOKE_ARMS), skip=[],
                        time_budget=None, compile_estimate=0.0, cpu_compile=False, seed=0)
    specs = {a.name: a for a in latency.ARMS}
    state: dict = {}

    def arm(name: str) -> tuple[str, str]:
        spec = specs[name]
        if spec.compiles and deadline is not None and deadline - time.monotonic() < B2_NEEDS_S:
            left = max(0.0, deadline - time.monotonic())
            return "SKIP", f"{left:.0f} s left, compiling needs ~{B2_NEEDS_S:.0f} s (the timed run still runs it)"
        if "ctx" not in state:
            nets = latency.build_networks(latency.WORKLOAD_SMOKE, plan)
            state["ctx"] = latency.make_context(latency.WORKLOAD_SMOKE, nets, 1, plan)
        ctx = state["ctx"]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = spec.build(ctx)
            out = prepared.run()
            ms = _ms(prepared.run, device, reps=3)
            if isinstance(out, torch.Tensor) and "B1" not in state:
                state["B1"] = specs["B1"].build(ctx).run()
        outputs = _tensors(out) + _tensors(getattr(prepared.run, "keep_alive", ()))
        if not outputs or not all(bool(torch.isfinite(t).all()) for t in outputs):
            return "FAIL", "no output" if not outputs else "NaN/Inf in the output"
        detail = f"{prepared.config[:120]}; {ms:.2f} ms/run"
        if isinstance(out, torch.Tensor):
            diff = float((out.float() - state["B1"].float()).abs().max())
            detail = f"max |diff| vs B1 {diff:.3g} (compiled: not bit for bit); " + detail
        return "PASS", detail

    for name in SMOKE_ARMS:
        report.run(f"arms/{name}", lambda n=name: arm(n))


def env_line(device: torch.device) -> str:
    v = common.versions()
    parts = [f"torch {v['torch']}", f"cuda {v['cuda']}", f"triton {v['triton']}", f"python {v['python']}"]
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        parts.insert(0, f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]})")
    parts.append(f"extension {autoguide_fast.extension_info() or 'not loaded'}")
    parts.append("backends " + ", ".join(f"{n}=yes" if s.available else f"{n}=no ({s.reason})"
                                         for n, s in autoguide_fast.backends().items()))
    return "; ".join(parts)


def run_group(group: str, device: torch.device, out: pathlib.Path | None, deadline: float | None = None) -> int:
    """Run one group's items (``deadline``: time.monotonic() by which it must end, None = no limit);
    1 if an item failed."""
    report = Report(group, None if out is None else out / f"smoke_{group}.json")
    if group == "env":
        report.run("env", lambda: ("PASS", env_line(device)))
    elif group == "engine":
        engine_group(device, report, deadline)
    else:
        backend_group(group, device, report)
    return int(any(i["verdict"] == "FAIL" for i in report.items))


def groups_for(device: torch.device) -> list[str]:
    return ["env", *BACKENDS.get(device.type, ("torch",)), "engine"]


def run_all(device: torch.device, out: pathlib.Path, timeout: float) -> int:
    """Every group in its own process, concurrently; their lines are printed group by group."""
    procs = {}
    for group in groups_for(device):
        log = (out / f"smoke_{group}.log").open("w")
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--group", group, "--device", str(device),
               "--out", str(out), "--timeout", str(timeout)]
        procs[group] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    deadline = time.monotonic() + timeout
    lines, failed = [], False
    for group, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            lines.append(f"FAIL  {group + '/*':28s} timed out after {timeout:.0f} s (see smoke_{group}.log)")
        log.close()
        items = out / f"smoke_{group}.json"
        text = (out / f"smoke_{group}.log").read_text(errors="replace").splitlines()
        lines.extend(t for t in text if t[:4] in ("PASS", "WARN", "FAIL", "SKIP"))
        if rc != 0:
            failed = True
            if not items.exists() or rc not in (0, 1):  # Died before or between items: show why.
                lines.append(f"FAIL  {group + '/*':28s} process exit {rc}; last output: "
                             + " | ".join(text[-3:])[:400])
    merged = []
    for group in procs:
        path = out / f"smoke_{group}.json"
        if path.exists():
            merged.extend(json.loads(path.read_text()))
    (out / "smoke.json").write_text(json.dumps(merged, indent=1))
    counts = {v: sum(1 for line in lines if line.startswith(v)) for v in ("PASS", "WARN", "FAIL", "SKIP")}
    lines.append("smoke: " + ", ".join(f"{n} {v.lower()}" for v, n in counts.items()))
    (out / "smoke.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 1 if failed or counts["FAIL"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="directory for smoke.txt, smoke.json and the per-group logs "
                                               "(default: a temporary directory)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--group", default=None, help="run one group in this process (internal)")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds before a group is killed (default 150)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.group is not None:
        out = pathlib.Path(args.out) if args.out else None
        if device.type == "cpu":
            torch.set_num_threads(1)  # Tiny networks: spinning OpenMP threads only slow a shared CPU.
        # The group's clock starts after torch's import: B2_NEEDS_S has room for that.
        return run_group(args.group, device, out, time.monotonic() + args.timeout)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    else:
        import tempfile

        out = pathlib.Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    return run_all(device, out, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
