"""``autoguide-fast toy``: the paper's 2D toy experiment, and ``autoguide-fast toy train``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..cli_types import (
    Given,
    at_least_two,
    finite_float,
    png_file,
    positive_int,
    steps,
    thread_count,
    torch_seed,
    writable_dir,
    writable_file,
)
from .training import MODELS

__all__ = ["register", "main", "build_parser"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def weights_dir(text: str) -> Path:
    """A directory holding the three toy models' weights (checked before anything runs)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory (write one with "
                                         f"'autoguide-fast toy train --out-dir {text}')")
    missing = [f"{name}.pt" for name in MODELS if not (path / f"{name}.pt").is_file()]
    if missing:
        raise argparse.ArgumentTypeError(f"{text!r} lacks {', '.join(missing)} (write them with "
                                         f"'autoguide-fast toy train --out-dir {text}')")
    return path


def _add_experiment_args(p: argparse.ArgumentParser) -> None:
    """The experiment's options (each recorded when given: see _given_before_train)."""

    def add(*names: str, **kwargs) -> None:
        p.add_argument(*names, action=Given, **kwargs)

    add("--samples", type=at_least_two, default=16384,
        help="number of points per sampler (default 16384)")
    add("--steps", type=steps, default=32,
        help="Heun steps (default 32, i.e. 63 denoiser evaluations)")
    add("--autoguidance", type=finite_float, default=3.0, metavar="W",
        help="autoguidance weight w (default 3)")
    add("--cfg", type=finite_float, default=4.0, metavar="W",
        help="CFG-style guidance weight w with the A+B guide (default 4)")
    add("--seed", type=torch_seed, default=1, dest="experiment_seed",
        help="torch seed of the sigma = 5 starting points (default 1)")
    add("--weights-dir", type=weights_dir, default=WEIGHTS_DIR,
        help="directory with main.pt, autoguide.pt, cfg.pt (default: shipped weights)")
    add("--figure", type=png_file, default="toy.png",  # A string: argparse checks it too.
        help="output PNG path (default toy.png); 'none' skips the figure")
    add("--json", type=writable_file, default=None, metavar="PATH",
        help="also write the table as JSON to PATH ('none': no file)")
    add("--threads", type=thread_count, default=1, dest="experiment_threads",
        help="torch CPU threads (default 1: the tensors are small, and extra threads "
             "slow it down badly when the cores are shared)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                   help="which models to train (default: all three)")
    p.add_argument("--out-dir", type=writable_dir, default="toy-weights",
                   help="where to write <model>.pt (default ./toy-weights)")
    p.add_argument("--seed", type=torch_seed, default=0, help="torch seed (default 0)")
    p.add_argument("--iterations", type=positive_int, default=None,
                   help="override every model's iteration count (for quick checks)")
    p.add_argument("--batch-size", type=positive_int, default=4096,
                   help="points per iteration (default 4096)")
    p.add_argument("--threads", type=thread_count, default=1,
                   help="torch CPU threads (default 1: results are reproducible for a fixed "
                        "thread count)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    import torch

    from .network import save_toy_net
    from .training import MODELS, train_toy_model

    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in dict.fromkeys(args.models):  # Each model once, in the order given.
        spec = MODELS[name]
        t0 = time.perf_counter()
        _, ema, losses = train_toy_model(spec, seed=args.seed, iterations=args.iterations,
                                         batch_size=args.batch_size,
                                         progress=not args.no_progress)
        seconds = time.perf_counter() - t0
        path = args.out_dir / f"{name}.pt"
        save_toy_net(ema, path, classes=spec.classes, iterations=len(losses), seed=args.seed,
                     batch_size=args.batch_size, final_loss=sum(losses[-64:]) / len(losses[-64:]),
                     train_seconds=round(seconds, 1))
        print(f"{name}: {spec.num_layers}x{spec.hidden}, class {spec.classes}, "
              f"{len(losses)} iterations in {seconds:.1f} s, final loss "
              f"{losses[-1]:.4f} -> {path}", flush=True)
    return 0


def _usage_error(message: str) -> int:
    print(f"autoguide-fast toy: error: {message}", file=sys.stderr)
    return 2


def run_experiment(args: argparse.Namespace) -> int:
    from .experiment import GuidanceOverflow, require_matplotlib, run_toy_experiment

    # Outputs that would overwrite each other or an input (checked before any work).
    outputs = {"--figure": args.figure, "--json": args.json}
    resolved = {flag: p.resolve() for flag, p in outputs.items() if p is not None}
    if len(resolved) == 2 and resolved["--figure"] == resolved["--json"]:
        return _usage_error(f"--figure and --json name the same file ({args.json})")
    inputs = {(Path(args.weights_dir) / f"{name}.pt").resolve() for name in MODELS}
    for flag, p in resolved.items():
        if p in inputs:
            return _usage_error(f"{flag}: {outputs[flag]} is one of the --weights-dir files it reads")
    if args.figure is not None:
        try:
            require_matplotlib("--figure", "--figure none")
        except ImportError as exc:
            return _usage_error(str(exc))

    try:
        return run_toy_experiment(
            samples=args.samples, num_steps=args.steps, autoguidance=args.autoguidance,
            cfg=args.cfg, seed=args.experiment_seed, weights_dir=args.weights_dir,
            figure=args.figure,  # None: --figure none (cli_types.writable_file).
            json_path=args.json, threads=args.experiment_threads,
        )
    except GuidanceOverflow as exc:  # Found only by sampling: nothing was written yet.
        print(f"autoguide-fast toy: error: --{exc.argument} {exc.weight:g}: {exc.reason}", file=sys.stderr)
        return 1


def _given_before_train(args: argparse.Namespace) -> list[str]:
    """The experiment's options given before 'train' (which would ignore them), in their order:
    refused whatever their value (one given at the experiment's default would be ignored silently,
    and the defaults differ: the experiment's --seed is 1, training's 0)."""
    return list(dict.fromkeys(flag for flag, _ in getattr(args, "given", [])))


def _dispatch(args: argparse.Namespace) -> int:
    if getattr(args, "toy_action", None) == "train":
        given = _given_before_train(args)
        if given:
            return _usage_error(f"{', '.join(given)}: options of the experiment, given before 'train' (which ignores "
                                "them); give 'toy train' its own options after 'train', e.g. 'toy train --seed 7'")
        return run_train(args)
    return run_experiment(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``toy`` subcommand (and its ``train`` action) to a parent CLI."""
    toy = subparsers.add_parser(
        "toy", help="the paper's 2D toy experiment (autoguidance vs CFG vs unguided)",
        description="Sample the paper's 2D toy problem four ways (exact denoiser, unguided, "
                    "autoguidance, CFG-style) with the shipped models; print a table and write "
                    "a figure. 'toy train' retrains the three models.")
    _add_experiment_args(toy)
    actions = toy.add_subparsers(dest="toy_action", metavar="{train}")
    train = actions.add_parser("train", help="train the three toy models (main, autoguide, cfg)",
                               description="Train the toy models of the paper by exact score "
                                           "matching and save their EMA weights.")
    _add_train_args(train)
    toy.set_defaults(func=_dispatch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoguide-fast")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``main(["toy", ...])``."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
