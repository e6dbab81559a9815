"""The ``autoguide-fast`` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import math
import sys

# Subcommand modules, each exposing register(subparsers); missing ones are skipped.
_SUBCOMMAND_MODULES = ("autoguide_fast.toy.cli", "autoguide_fast.distributed.cli")


def _info(args: argparse.Namespace) -> int:
    import torch

    import autoguide_fast

    print(f"autoguide_fast {autoguide_fast.__version__}, torch {torch.__version__}")
    if torch.cuda.is_available():
        cards = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                 for i in range(torch.cuda.device_count())]
        print(f"cuda: {torch.version.cuda}, {len(cards)} device(s): {', '.join(cards)}")
    else:
        print(f"cuda: not available (torch built with CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton: {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"extension: {autoguide_fast.extension_info() or 'not loaded'}")
    for status in autoguide_fast.backends().values():
        print(f"  {status.name:7s} {'available' if status.available else 'unavailable'}: {status.reason}")
    return 0


def _cpu_backend(text: str) -> str:
    """A step backend that can run the demo here (on CPU tensors), refused at parse time otherwise."""
    import torch

    from .backends import BACKEND_NAMES, resolve_backend

    if text not in ("auto", *BACKEND_NAMES):
        raise argparse.ArgumentTypeError(f"expected one of {('auto', *BACKEND_NAMES)}, got {text!r}")
    try:
        resolve_backend(text, torch.device("cpu"), torch.float32)
    except (RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} cannot run here: {exc}") from None
    return text


def _demo_guidance(text: str) -> float:
    """A finite guidance weight whose closed-form result the demo can check (refused at parse time
    otherwise: see demo.closed_form_scale)."""
    from .cli_types import finite_float
    from .demo import closed_form_scale

    w = finite_float(text)
    try:
        closed_form_scale(w)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return w


def _demo(args: argparse.Namespace) -> int:
    from .cli_types import write_json
    from .demo import run_demo

    def run(num_steps: int) -> dict:
        return run_demo(batch=args.batch, num_steps=num_steps, guidance=args.guidance, backend=args.backend)

    try:
        result = run(args.steps)
    except FloatingPointError as exc:  # The sampler's own check: NaN/Inf in the samples.
        print(f"autoguide-fast demo: error: --guidance {args.guidance:g} with {args.steps} steps: {exc} "
              f"(strong guidance needs more --steps)", file=sys.stderr)
        return 1
    print(
        f"Sampled {result['batch']} points of N(0, {result['s_main']}²I) with a Gaussian main denoiser and a "
        f"wider guide (s={result['s_guide']}), w={result['guidance']}, {result['num_steps']} Heun steps "
        f"({result['evaluations_per_network']} evaluations per network) in {result['seconds']:.3f} s."
    )
    print(
        f"sample std {result['sample_std']:.4f} vs closed-form {result['predicted_std']:.4f}; "
        f"relative error vs the exact guided flow {result['relative_error_vs_closed_form']:.2e}"
    )
    # The verdict: Heun's method is second order, so once the steps are fine enough (more of them
    # for stronger guidance) doubling them divides the error by ~4. Doubled up to 4 times.
    steps, error, ok, order = args.steps, result["relative_error_vs_closed_form"], False, float("nan")
    for _ in range(4):
        steps *= 2
        try:
            finer = run(steps)
        except FloatingPointError:  # Diverged: no order to observe at these steps.
            previous, error, order = error, math.inf, math.nan
            continue
        previous, error = error, finer["relative_error_vs_closed_form"]
        order = math.log2(previous / error) if previous > 0 and error > 0 else float("nan")
        if 1.7 <= order <= 2.3:
            ok = True
            break
    result["observed_order"], result["order_steps"], result["passed"] = order, [steps // 2, steps], ok
    print(f"{'PASS' if ok else 'FAIL'}: from {steps // 2} to {steps} steps the error falls from {previous:.2e} to "
          f"{error:.2e}: observed convergence order {order:.2f} (Heun's method: 2)"
          + ("" if ok else "; not second order after 4 doublings (start from more --steps for strong guidance)"))
    if args.json is not None:  # None: no --json, or --json none.
        write_json(args.json, result)  # Checked writable before the run.
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKEND_NAMES
    from .cli_types import positive_int, steps, writable_file

    parser = argparse.ArgumentParser(prog="autoguide-fast", description="Fast autoguidance sampling.")
    from . import __version__  # Lazy: the package imports this module's siblings.

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="show the available backends and the compiled extension")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="sample with analytic Gaussian networks and check the closed form")
    p.add_argument("--batch", type=positive_int, default=4096, help="points per run (default 4096)")
    p.add_argument("--steps", type=steps, default=32, help="Heun steps (default 32)")
    p.add_argument("--guidance", type=_demo_guidance, default=2.0,
                   help="guidance weight w (default 2; one whose closed-form result overflows float64, |w| beyond "
                        "about 1500, is refused; strong guidance needs many more --steps to PASS)")
    choices = "{" + ",".join(("auto", *BACKEND_NAMES)) + "}"
    p.add_argument("--backend", type=_cpu_backend, default="auto", metavar=choices,
                   help="step backend of the run on CPU (default auto; one that cannot run here is refused)")
    p.add_argument("--json", type=writable_file, default=None,
                   help="also write the result as JSON to this path ('none': no file)")
    p.set_defaults(func=_demo)
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # That job is not part of this build.
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
