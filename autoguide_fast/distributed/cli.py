"""``autoguide-fast generate``: the command line of the generator.

    autoguide-fast generate --net edm2:s --gnet edm2:xs --guidance 2.1 --seeds 0-49999 --outdir out
    torchrun --standalone --nproc_per_node=8 -m autoguide_fast.distributed.cli generate ...
    torchrun --standalone --nproc_per_node=2 -m autoguide_fast.distributed.cli generate --guide-parallel ...

Exit codes: 0 done; 2 bad arguments (unknown seed syntax, an unloadable network, guidance without
a guide, --guide-parallel outside a 2-process job, an unwritable --outdir); 1 failure at run
time that is not a bug (another rank failed; NaN/Inf in the samples); 143 ended by SIGTERM (after
the clean-up Ctrl-C gets too); other errors raise.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Sequence

from ..cli_types import Given, thread_count, torch_seed
from .generation import DTYPES, FORMATS, GenerateOptions, SamplingFailure, generate
from .guide_parallel import PeerFailure
from .loading import parse_overrides

__all__ = ["register", "main", "build_parser", "options_from_args"]

PROG = "autoguide-fast generate"


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 3,64,64, got {text!r}") from None
    return values


def _interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI such as 0.28,5.42, got {text!r}") from None
    return lo, hi


def _levels(text: str) -> tuple[float, ...]:
    """--sigmas: numbers separated by commas or whitespace, or @FILE holding them (a JSON array
    too: its brackets are dropped). Only the syntax is checked here; the schedule itself is checked
    by the sampler's own rules once --dtype is known (generation._check_options)."""
    what = "noise levels such as 80,40,10,1,0.1,0.002 (or @FILE)"
    if text.startswith("@"):
        path = text[1:]
        what = f"noise levels in {path!r} (numbers separated by commas or whitespace, or a JSON array)"
        try:
            with open(path) as f:
                text = f.read()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    words = re.split(r"[\s,]+", text.strip().removeprefix("[").removesuffix("]"))
    try:
        return tuple(float(w) for w in words if w)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected {what}: {exc}") from None


class _Schedule(Given):
    """Stores --sigmas, or one of the options of the official schedule it replaces (--steps,
    --sigma-min, --sigma-max, --rho), and refuses the two kinds together while parsing. Refused when
    given at all, at its default value too: the sampler's own check sees only values other than the
    default, and an option given with --sigmas would be silently ignored."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        custom = self.dest == "sigmas"
        other = next((flag for flag, dest in getattr(namespace, "given", []) if (dest == "sigmas") != custom), None)
        if other is not None:
            raise argparse.ArgumentError(self, f"not allowed with argument {other} (a custom schedule, --sigmas, "
                                               "replaces the official one's steps and levels: give one or the other)")
        super().__call__(parser, namespace, values, option_string)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("networks")
    g.add_argument("--net", required=True, metavar="SPEC",
                   help="main network: module:callable (returns the network), an official EDM2 snapshot .pkl "
                        "(its ema network, loaded without running code from it), a file saved with torch.save "
                        "(a whole module), or an EDM2 preset with random weights: edm2:SIZE or edm2:DATASET-SIZE "
                        "(SIZE xxs..xxl, DATASET img512 or img64)")
    g.add_argument("--gnet", default=None, metavar="SPEC", help="guide network, same forms (needed when w != 1)")
    g.add_argument("--preset-overrides", default=None, metavar="JSON",
                   help="constructor keywords for edm2 presets, e.g. '{\"model_channels\": 16}'")
    g.add_argument("--gnet-preset-overrides", default=None, metavar="JSON",
                   help="extra keywords for the guide's edm2 preset (over --preset-overrides)")
    g.add_argument("--preset-seed", type=torch_seed, default=0,
                   help="torch seed of random weights built by a spec (guide: seed + 1; default 0)")
    g.add_argument("--shape", type=_ints, default=None, metavar="C,H,W",
                   help="image shape, for networks without img_channels / img_resolution")
    g.add_argument("--label-dim", type=int, default=None, metavar="N",
                   help="number of classes, for networks without a label_dim attribute (0 = unconditional)")

    g = p.add_argument_group("what to generate")
    g.add_argument("--seeds", default="0-63", metavar="LIST",
                   help="seeds and inclusive ranges, e.g. 0-49999,100000-100009 (default 0-63); one file per seed")
    g.add_argument("--class", dest="class_idx", type=int, default=None, metavar="INDEX",
                   help="class of every image (default: a class drawn from each image's seed)")
    g.add_argument("--batch", type=int, default=32, help="largest batch per process (default 32)")
    g.add_argument("--outdir", required=True, metavar="DIR", help="output directory (created if missing)")
    g.add_argument("--subdirs", action="store_true", help="write into 000000/, 001000/, ... by seed")
    g.add_argument("--format", default="auto", choices=FORMATS,
                   help="png (3-channel pixels in [-1, 1]) or npy (raw float arrays, e.g. latents); "
                        "auto = png for 3 channels, else npy")

    g = p.add_argument_group("sampler (as fast_guided_sample)")
    g.add_argument("--guidance", type=float, default=1.0, metavar="W", help="guidance weight w (default 1)")
    g.add_argument("--steps", dest="num_steps", type=int, default=32, action=_Schedule,
                   help="time steps N (default 32)")
    g.add_argument("--sigma-min", "--sigma_min", dest="sigma_min", type=float, default=0.002, action=_Schedule)
    g.add_argument("--sigma-max", "--sigma_max", dest="sigma_max", type=float, default=80.0, action=_Schedule)
    g.add_argument("--rho", type=float, default=7.0, action=_Schedule)
    g.add_argument("--sigmas", type=_levels, default=None, action=_Schedule, metavar="LIST",
                   help="custom schedule t_0 > ... > t_{N-1} > 0 (a final 0 is appended), e.g. "
                        "80,40,10,1,0.1,0.002, or @FILE holding the levels; replaces --steps, --sigma-min, "
                        "--sigma-max and --rho")
    g.add_argument("--S-churn", "--S_churn", dest="S_churn", type=float, default=0.0)
    g.add_argument("--S-min", "--S_min", dest="S_min", type=float, default=0.0)
    g.add_argument("--S-max", "--S_max", dest="S_max", type=float, default=math.inf)
    g.add_argument("--S-noise", "--S_noise", dest="S_noise", type=float, default=1.0)
    g.add_argument("--guidance-interval", type=_interval, default=None, metavar="LO,HI",
                   help="apply w only for LO < sigma <= HI (the guide is skipped elsewhere)")
    g.add_argument("--solver", default="heun", choices=("heun", "euler"))
    g.add_argument("--backend", default="auto", help="step backend: auto, torch, cpp, triton, cuda")
    g.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="sampler state dtype")

    g = p.add_argument_group("processes")
    g.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--guide-parallel", action="store_true",
                   help="with 2 processes: main network on rank 0, guide on rank 1, one trajectory")
    g.add_argument("--threads", type=thread_count, default=None,
                   help="torch CPU threads per process (at most the CPU count)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--quiet", dest="verbose", action="store_false", help="no summary line")


def options_from_args(args: argparse.Namespace) -> GenerateOptions:
    return GenerateOptions(
        net=args.net, gnet=args.gnet, outdir=args.outdir, seeds=args.seeds, class_idx=args.class_idx,
        batch=args.batch, guidance=args.guidance, num_steps=args.num_steps, sigma_min=args.sigma_min,
        sigma_max=args.sigma_max, rho=args.rho, sigmas=args.sigmas, S_churn=args.S_churn, S_min=args.S_min,
        S_max=args.S_max, S_noise=args.S_noise, guidance_interval=args.guidance_interval, solver=args.solver,
        backend=args.backend, dtype=args.dtype, format=args.format, subdirs=args.subdirs, shape=args.shape,
        label_dim=args.label_dim,
        preset_overrides=parse_overrides(args.preset_overrides, arg="--preset-overrides"),
        gnet_preset_overrides=parse_overrides(args.gnet_preset_overrides, arg="--gnet-preset-overrides"),
        preset_seed=args.preset_seed, device=args.device, guide_parallel=args.guide_parallel,
        progress=args.progress, verbose=args.verbose, threads=args.threads,
    )


@contextlib.contextmanager
def _terminate_unwinds():
    """SIGTERM (what torchrun, batch schedulers and ``kill`` send) ends the run the way Ctrl-C does,
    through Python's unwinding: a run that wrote no image yet removes its settings record, and the
    process group is closed. Its default action would end the process on the spot. Only in the main
    thread, and only while SIGTERM has its default action (a handler of the caller's stays)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    """The ``generate`` subcommand: returns the exit code."""
    # Under torchrun every rank reports; say which one.
    where = f" (rank {os.environ.get('RANK', '?')})" if os.environ.get("WORLD_SIZE", "1") != "1" else ""
    try:
        with _terminate_unwinds():
            generate(options_from_args(args))
    except SamplingFailure as exc:
        # A network's (or the device's) error while sampling, not a bad argument: its traceback helps.
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        print(f"{PROG}: failed{where}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, ImportError) as exc:
        # Set-up: bad arguments, networks that cannot be loaded, an unusable output directory.
        print(f"{PROG}: error{where}: {exc}", file=sys.stderr)
        return 2
    except (PeerFailure, FloatingPointError) as exc:
        print(f"{PROG}: failed{where}: {exc}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``generate`` to the ``autoguide-fast`` command line."""
    p = subparsers.add_parser(
        "generate", help="generate one image file per seed (torchrun: sharded, or --guide-parallel)",
        description="Generate one file per seed with autoguidance; under torchrun the seeds are sharded over "
                    "the processes as in the official EDM2 script, and --guide-parallel puts the main network "
                    "and the guide on two processes. Files already present are skipped.",
    )
    _add_arguments(p)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m autoguide_fast.distributed.cli")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
