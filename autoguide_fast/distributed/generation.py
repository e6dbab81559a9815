"""``autoguide-fast generate``: one file per seed, sharded over the ranks of a torchrun job.

Per-image randomness: image s gets initial noise ``seeded_noise([s], ...)``, its class (for a
conditional network, unless ``class_idx`` is fixed) from ``seeded_labels([s], label_dim)``, and
its churn noise from ``seeds=[s]``. A file therefore depends on its seed only, not on which rank
or batch produced it (up to the networks' own batch dependence, see docs/generate.md).

Flow on every rank: parse and check the arguments (errors before any process group exists), join
the process group, set up (output directory, networks) and agree that every rank succeeded,
let rank 0 list the seeds already written and broadcast that list, deal the batches out as a fresh
run does (the official EDM2 scheme; with guide-parallel both ranks walk the single-process
batches) and drop those whose files all exist, then sample and write, each file atomically
(written aside under its writer's own name, flushed, renamed), so an interrupted run leaves only
whole files, a rerun skips them, and a resumed file equals the uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import numbers
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..backends import resolve_backend
from ..cli_types import PARTIAL_SUFFIX, progress_bar, standard_json, write_atomically, write_probe
from ..noise import seeded_labels, seeded_noise
from ..sampler import fast_guided_sample, make_config
from ..validation import FORMULA_DEFAULTS
from .guide_parallel import PeerFailure, announce_failure, guide_parallel_sample
from .loading import PRESET_PREFIX, load_network, network_label_dim, network_shape
from .routes import message_device
from .seeds import parse_seeds, rank_chunks, split_chunks

__all__ = ["GenerateOptions", "GenerateSummary", "SamplingFailure", "generate", "image_path", "SETTINGS_FILE", "DTYPES"]

SETTINGS_FILE = "autoguide_fast_generate.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = ("auto", "png", "npy")


@dataclass
class GenerateOptions:
    """Everything ``generate`` needs; the CLI maps its flags one to one onto these fields."""

    net: str                                        # --net: main network spec (see loading.py).
    outdir: str                                     # --outdir: where the files go.
    gnet: str | None = None                         # --gnet: guide network spec; None = no guide.
    seeds: str | Sequence[int] = "0-63"             # --seeds: "0-49999,100000-100009" or a list of ints.
    class_idx: int | None = None                    # --class: fixed class; None = one per seed.
    batch: int = 32                                 # --batch: largest batch per rank.
    guidance: float = 1.0                           # --guidance: w; 1 = unguided.
    num_steps: int = 32                             # --steps
    sigma_min: float = 0.002                        # --sigma-min
    sigma_max: float = 80.0                         # --sigma-max
    rho: float = 7.0                                # --rho
    sigmas: Sequence[float] | None = None           # --sigmas: custom schedule t_0 > ... > t_{N-1} > 0 in place
                                                    # of the four above (at their defaults); None = the formula.
    S_churn: float = 0.0                            # --S-churn
    S_min: float = 0.0                              # --S-min
    S_max: float = math.inf                         # --S-max
    S_noise: float = 1.0                            # --S-noise
    guidance_interval: tuple[float, float] | None = None  # --guidance-interval LO,HI
    solver: str = "heun"                            # --solver
    backend: str = "auto"                           # --backend (step backend)
    dtype: str = "float32"                          # --dtype: sampler state dtype name.
    format: str = "auto"                            # --format: auto (png for 3 channels, else npy), png, npy.
    subdirs: bool = False                           # --subdirs: files under 000000/, 001000/, ...
    shape: tuple[int, ...] | None = None            # --shape C,H,W for networks that do not tell.
    label_dim: int | None = None                    # --label-dim for networks that do not tell.
    preset_overrides: dict[str, Any] = field(default_factory=dict)       # --preset-overrides (edm2 specs).
    gnet_preset_overrides: dict[str, Any] = field(default_factory=dict)  # --gnet-preset-overrides.
    preset_seed: int = 0                            # --preset-seed: torch seed of random weights (guide: +1).
    device: str = "auto"                            # --device: auto = cuda:LOCAL_RANK if CUDA, else cpu.
    guide_parallel: bool = False                    # --guide-parallel: main on rank 0, guide on rank 1.
    progress: bool = True                           # Progress bar on rank 0.
    verbose: bool = True                            # Summary on rank 0.
    threads: int | None = None                      # --threads: torch CPU threads per process.


@dataclass
class GenerateSummary:
    requested: int          # Seeds asked for.
    skipped: int            # Already written before this run.
    written: int            # Written by this run (all ranks).
    seconds: float          # Wall time of the sampling phase.
    world_size: int
    guide_parallel: bool
    outdir: str


def image_path(outdir: str, seed: int, fmt: str, subdirs: bool = False) -> str:
    """File of one seed: OUTDIR/000042.png, or OUTDIR/001000/001042.png with subdirs (as the official script)."""
    name = f"{seed:06d}.{fmt}"
    if subdirs:
        return os.path.join(outdir, f"{seed // 1000 * 1000:06d}", name)
    return os.path.join(outdir, name)


# ----------------------------------------------------------------------------
# Argument checks that need no network and no process group (every rank raises the same).


def _is_preset(spec: str | None) -> bool:
    return spec is not None and spec.lower().startswith(PRESET_PREFIX)


def _check_options(opts: GenerateOptions) -> tuple[list[int], GenerateOptions]:
    """The seeds, and a copy of ``opts`` in plain Python types: numbers as ``int``/``float`` (a NumPy
    scalar or a 0-dim tensor of the Python API read as the number it holds, as the CLI would give
    it), the custom schedule as the sampler takes it (floats, a final 0 dropped; None: the official
    formula). The caller's options stay as given."""
    if isinstance(opts.seeds, str):
        seeds = parse_seeds(opts.seeds)
    else:
        # The Python API's sequence: integers in [0, 2^64) as the --seeds syntax allows (a float or a
        # bool would be truncated, a seed past 2^64 would draw the noise of its value modulo 2^64).
        given = opts.seeds.tolist() if hasattr(opts.seeds, "tolist") else list(opts.seeds)  # Arrays, tensors.
        for s in given:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 0 <= int(s) < 1 << 64:
                raise ValueError(f"--seeds: expected integers from 0 to 2^64 - 1, got {s!r}")
        seeds = [int(s) for s in given]
    if not seeds:
        raise ValueError("--seeds: no seeds given")
    if any(s < 0 for s in seeds):
        raise ValueError("--seeds: seeds must be non-negative")
    if len(set(seeds)) != len(seeds):
        raise ValueError("--seeds: a seed appears more than once (each seed names one file)")
    # Specs and the output directory: a path object is taken as its string.
    opts = replace(opts, net=_text("--net", opts.net), outdir=_text("--outdir", opts.outdir),
                   gnet=None if opts.gnet is None else _text("--gnet", opts.gnet))
    for flag, value in (("--dtype", opts.dtype), ("--format", opts.format), ("--backend", opts.backend),
                        ("--solver", opts.solver), ("--device", opts.device)):
        if not isinstance(value, str):
            raise TypeError(f"{flag}: expected a string, got {type(value).__name__}")
    for flag, switch in (("--subdirs", opts.subdirs), ("--guide-parallel", opts.guide_parallel),
                         ("progress", opts.progress), ("verbose", opts.verbose)):
        if not isinstance(switch, bool):
            raise TypeError(f"{flag}: expected True or False, got {switch!r}")
    batch = _whole("--batch", opts.batch, least=1)
    if not opts.net:
        raise ValueError("--net: a main network is required (module:callable, a torch.save file, or edm2:SIZE)")
    if opts.guidance != 1 and not opts.gnet:
        raise ValueError(f"--guidance {opts.guidance:g} needs a guide network: pass --gnet (or use --guidance 1)")
    if opts.guide_parallel and not opts.gnet:
        raise ValueError("--guide-parallel: needs a guide network (--gnet) to place on rank 1")
    if opts.guide_parallel and opts.guidance == 1:
        raise ValueError("--guide-parallel: with --guidance 1 the guide is never called; drop --guide-parallel")
    class_idx = None if opts.class_idx is None else _whole("--class", opts.class_idx, least=0,
                                                           expected="a non-negative class index")
    if opts.dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {tuple(DTYPES)}, got {opts.dtype!r}")
    if opts.format not in FORMATS:
        raise ValueError(f"--format: expected one of {FORMATS}, got {opts.format!r}")
    label_dim = None if opts.label_dim is None else _whole("--label-dim", opts.label_dim, least=0,
                                                           expected="0 (unconditional) or a number of classes")
    shape = None
    if opts.shape is not None:
        expected = "positive sizes such as 3,64,64"
        if isinstance(opts.shape, (str, bytes)) or not isinstance(opts.shape, Sequence) or not opts.shape:
            raise ValueError(f"--shape: expected {expected}, got {opts.shape!r}")
        shape = tuple(_whole("--shape", d, least=1, expected=expected) for d in opts.shape)
    if opts.preset_overrides and not (_is_preset(opts.net) or _is_preset(opts.gnet)):
        raise ValueError("--preset-overrides: applies to edm2:SIZE networks, but neither --net nor --gnet is one")
    if opts.gnet_preset_overrides and not _is_preset(opts.gnet):
        raise ValueError("--gnet-preset-overrides: applies only when --gnet is an edm2:SIZE preset")
    seed = opts.preset_seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
        raise ValueError(f"--preset-seed: expected an integer from 0 to 2^63 - 1, got {opts.preset_seed!r}")
    threads = None
    if opts.threads is not None:
        most = os.cpu_count() or 1
        expected = f"an integer from 1 to {most} (this machine's CPUs)"
        threads = _whole("--threads", opts.threads, least=1, expected=expected)
        if threads > most:
            raise ValueError(f"--threads: expected {expected}, got {threads}")
    # The sampler's own checks, now rather than at the first batch, naming the flags.
    try:
        config = make_config(num_steps=opts.num_steps, sigma_min=opts.sigma_min, sigma_max=opts.sigma_max,
                             rho=opts.rho, guidance=opts.guidance, gnet=_placeholder_guide, S_churn=opts.S_churn,
                             S_min=opts.S_min, S_max=opts.S_max, S_noise=opts.S_noise, dtype=DTYPES[opts.dtype],
                             guidance_interval=opts.guidance_interval, solver=opts.solver, sigmas=opts.sigmas)
    except (TypeError, ValueError) as exc:
        name, _, rest = str(exc).partition(":")
        name, bracket, index = name.partition("[")  # sigmas[2] -> --sigmas[2] (the element's index kept)
        raise type(exc)(f"{_FLAGS.get(name, name)}{bracket}{index}:{rest}") from None
    # Valid by now: real numbers (or a 0-dim tensor for guidance, read by make_config).
    interval = config.guidance_interval  # None when none was given.
    plain = replace(
        opts, batch=batch, class_idx=class_idx, label_dim=label_dim, shape=shape, threads=threads,
        num_steps=int(opts.num_steps), sigma_min=float(opts.sigma_min), sigma_max=float(opts.sigma_max),
        rho=float(opts.rho), guidance=float(config.guidance), S_churn=float(opts.S_churn), S_min=float(opts.S_min),
        S_max=float(opts.S_max), S_noise=float(opts.S_noise), sigmas=config.sigmas,
        guidance_interval=None if interval is None else (float(interval[0]), float(interval[1])),
    )
    return seeds, plain


def _text(flag: str, value: Any) -> str:
    """A spec or a directory of the Python API: a string, or a path object (taken as its string)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{flag}: expected a string or a path, got {type(value).__name__}")
    return value


def _whole(flag: str, value: Any, least: int, expected: str = "") -> int:
    """An integer option of the Python API (a NumPy integer too; not a bool, a float or a string)."""
    expected = expected or f"an integer of at least {least}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{flag}: expected {expected}, got {type(value).__name__} ({value!r})")
    if value < least:
        raise ValueError(f"{flag}: expected {expected}, got {value}")
    return int(value)


def _placeholder_guide(*args: Any) -> None:  # Stands for --gnet in the early checks.
    return None


# How long a rank waits in a collective for the others (torch's default under NCCL is 10 minutes,
# after which the watchdog ends the process): rank 0's scan of the output directory, one batch of a
# large network, or a slow network load on one rank can take longer.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


# Sampler argument -> flag, for error messages.
_FLAGS = {"num_steps": "--steps", "sigma_min": "--sigma-min", "sigma_max": "--sigma-max", "rho": "--rho",
          "sigmas": "--sigmas", "guidance": "--guidance", "S_churn": "--S-churn", "S_min": "--S-min",
          "S_max": "--S-max", "S_noise": "--S-noise", "guidance_interval": "--guidance-interval",
          "solver": "--solver", "dtype": "--dtype"}


# ----------------------------------------------------------------------------
# Process group: joined from torchrun's environment, or an existing one reused.


class _Job:
    def __init__(self, opts: GenerateOptions) -> None:
        self.owned = False
        self.made_settings = False  # Rank 0 wrote OUTDIR's settings record in this run.
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
            if not 0 <= self.rank < self.world_size:
                raise ValueError(f"RANK: expected 0 <= RANK < WORLD_SIZE (as torchrun sets them), got "
                                 f"RANK={self.rank}, WORLD_SIZE={self.world_size}")
        if opts.guide_parallel and self.world_size != 2:
            raise ValueError(
                f"--guide-parallel: needs exactly 2 processes (main and guide; launch with torchrun "
                f"--nproc_per_node=2), got a world size of {self.world_size}"
            )
        local_rank = _env_int("LOCAL_RANK", self.rank)
        local_world_size = _env_int("LOCAL_WORLD_SIZE", self.world_size)  # torchrun's processes on this machine.
        self.device = _pick_device(opts.device, local_rank, self.world_size, local_world_size)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                try:  # device_id: the communicator is made now, so a bad device set-up fails here.
                    dist.init_process_group(backend="nccl", device_id=self.device, timeout=PROCESS_GROUP_TIMEOUT)
                except dist.DistBackendError as exc:
                    raise ValueError(f"--device: NCCL could not start on {self.device} (each process needs a GPU "
                                     f"of its own: check --device, LOCAL_RANK and CUDA_VISIBLE_DEVICES): "
                                     f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from exc
            else:
                dist.init_process_group(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT)
            self.owned = True
        # The ranks' control messages (agreement, flags, counts): on the CPU where the group carries CPU
        # tensors (gloo, also "cpu:gloo,cuda:nccl"), else on this process's GPU (an NCCL-only group, which
        # a caller's may be even with --device cpu).
        self.comm_device = message_device(prefer_cpu=True) if self.world_size > 1 else torch.device("cpu")

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()

    def agree(self, error: BaseException | None, what: str) -> None:
        """Every rank learns whether any rank failed; failing ranks raise their own error."""
        if self.world_size > 1:
            flags = torch.zeros(self.world_size, dtype=torch.int64, device=self.comm_device)
            flags[self.rank] = int(error is not None)
            dist.all_reduce(flags)
            failed = [r for r, f in enumerate(flags.tolist()) if f]
        else:
            failed = [0] if error is not None else []
        if error is not None:
            raise error
        if failed:
            raise PeerFailure(f"generate: rank(s) {failed} failed while {what}; see their errors")

    def broadcast_flags(self, flags: list[bool] | None, n: int) -> list[bool]:
        if self.world_size == 1:
            return list(cast("list[bool]", flags))  # The only rank passes its list.
        t = torch.zeros(n, dtype=torch.uint8, device=self.comm_device)
        if self.rank == 0:
            t.copy_(torch.tensor(flags, dtype=torch.uint8))
        dist.broadcast(t, src=0)
        return [bool(v) for v in t.tolist()]

    def most(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.MAX)

    def total(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.SUM)

    def _reduce(self, value: int, op: Any) -> int:
        """``value`` reduced over the ranks (every rank calls it)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t, op=op)
        return int(t.item())


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: expected an integer in the environment, got {text!r}") from None


def _pick_device(text: str, local_rank: int, world_size: int, local_world_size: int = 1) -> torch.device:
    """The process's device for --device ``text``: "cuda" (or "auto" with CUDA) is cuda:LOCAL_RANK
    under torchrun. An explicit cuda:N is for one process per machine (NCCL refuses two ranks on one
    GPU), and the GPU must exist."""
    if text == "auto":
        return _local_gpu(local_rank, text) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {text!r} ({exc})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available in this process")
        if device.index is None:
            single = torch.device("cuda", torch.cuda.current_device())
            device = _local_gpu(local_rank, text) if world_size > 1 else single
        elif local_world_size > 1:
            raise ValueError(f"--device {text}: {local_world_size} processes on this machine would share one GPU "
                             f"(NCCL refuses that); use --device cuda or auto, which gives process LOCAL_RANK "
                             f"cuda:LOCAL_RANK (CUDA_VISIBLE_DEVICES picks the GPUs)")
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: this process sees {torch.cuda.device_count()} GPU(s) "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return device


def _local_gpu(local_rank: int, text: str) -> torch.device:
    """cuda:LOCAL_RANK; cuda:0 when this process sees one GPU (a launcher that narrows
    CUDA_VISIBLE_DEVICES to each process's own GPU)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return torch.device("cuda", local_rank)
    if count == 1:
        return torch.device("cuda", 0)
    raise ValueError(f"--device {text}: LOCAL_RANK={local_rank} but this process sees {count} GPU(s) "
                     f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); start at most {count} "
                     f"processes per machine, or give each process its own GPU")


# ----------------------------------------------------------------------------
# Output directory, settings record, existing files.


def _check_not_a_file(outdir: str) -> None:
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise OSError(f"--outdir: {outdir!r} exists and is not a directory")


def _check_outdir(outdir: str) -> None:
    _check_not_a_file(outdir)
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as exc:
        raise OSError(f"--outdir: cannot create {outdir!r}: {exc.strerror or exc}") from exc
    try:
        write_probe(outdir)
    except OSError as exc:
        raise OSError(f"--outdir: cannot write to {outdir!r}: {exc.strerror or exc}") from exc


def _check_settings(outdir: str, settings: dict[str, Any]) -> bool:
    """Record the settings next to the files; refuse to resume into files made with other settings.
    Returns whether the record was written now (False: it was there, with the same settings)."""
    path = os.path.join(outdir, SETTINGS_FILE)
    settings = standard_json(json.loads(json.dumps(settings)))  # The JSON form (tuples -> lists) on both sides.
    if os.path.exists(path):
        try:
            with open(path) as f:
                previous = standard_json(json.load(f))
            if not isinstance(previous, dict):
                raise ValueError(f"expected a JSON object of settings, got {type(previous).__name__}")
        except (OSError, ValueError) as exc:
            raise OSError(f"--outdir: cannot read {path!r}: {exc}") from exc
        diffs = sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))
        if diffs:
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in diffs)
            raise ValueError(
                f"--outdir: {outdir!r} holds files generated with other settings ({detail}); use another "
                f"--outdir, or delete {SETTINGS_FILE} there to mix them"
            )
        return False
    write_atomically(path, lambda f: f.write(json.dumps(settings, indent=2, sort_keys=True, allow_nan=False).encode()))
    return True


_IMAGE_NAME = re.compile(r"\d{6,}\.(png|npy)")  # image_path()'s file names; its subdirectories are digits too.


def _holds_images(outdir: str) -> bool:
    """Whether ``outdir`` holds an image file of this command (of any seed, either layout)."""
    try:
        with os.scandir(outdir) as entries:
            for entry in entries:
                if _IMAGE_NAME.fullmatch(entry.name):
                    return True
                if entry.name.isdigit() and entry.is_dir():
                    with os.scandir(entry.path) as inner:
                        if any(_IMAGE_NAME.fullmatch(e.name) for e in inner):
                            return True
    except OSError:
        return True  # Cannot tell: keep the record.
    return False


def _partial_target(name: str) -> str | None:
    """What a partial file's name holds between its leading dot and ".partial": the target file's
    name followed by ".<writer>" (".000042.png.<writer>.partial"; the older ".000042.png.partial"
    has the target alone), or None for any other name."""
    if not (name.startswith(".") and name.endswith(PARTIAL_SUFFIX)):
        return None
    return name[1:-len(PARTIAL_SUFFIX)]


def _existing(outdir: str, seeds: list[int], fmt: str, subdirs: bool) -> list[bool]:
    """Which seeds already have their file. Partial files left by a killed run for *these* seeds
    are removed; partial files of other seeds (another job writing into the same directory) are
    left alone."""
    paths = [image_path(outdir, s, fmt, subdirs) for s in seeds]
    wanted: dict[str, set[str]] = {}
    for p in paths:
        wanted.setdefault(os.path.dirname(p), set()).add(os.path.basename(p))
    names: dict[str, set[str]] = {}
    for folder, targets in wanted.items():
        found: set[str] = set()
        if os.path.isdir(folder):
            with os.scandir(folder) as entries:
                for entry in entries:
                    target = _partial_target(entry.name)
                    if target is not None:
                        if target in targets or target.rsplit(".", 1)[0] in targets:
                            with contextlib.suppress(FileNotFoundError):
                                os.remove(entry.path)
                    elif entry.is_file():
                        found.add(entry.name)
        names[folder] = found
    return [os.path.basename(p) in names[os.path.dirname(p)] for p in paths]


def _require_pillow() -> None:
    try:
        import PIL.Image  # noqa: F401
    except ImportError as exc:
        raise ImportError("--format png needs Pillow (pip install Pillow), or pass --format npy") from exc


def _write_batch(x: torch.Tensor, seeds: list[int], outdir: str, fmt: str, subdirs: bool) -> None:
    if fmt == "png":
        import PIL.Image

        # [-1, 1] -> uint8 as the official script: floor(127.5 x + 128) clipped to [0, 255].
        # In float32 as the official script (float64 states in float64: the formula, not a rounding of it).
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        pixels = (x.to(wide) * 127.5 + 128).clip(0, 255).to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
    else:
        y = x.detach().cpu()
        arrays = (y.to(torch.float32) if y.dtype == torch.bfloat16 else y).numpy()
    import numpy as np

    for seed, array in zip(seeds, arrays):
        path = image_path(outdir, seed, fmt, subdirs)
        if subdirs:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        if fmt == "png":
            image = PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
            write_atomically(path, functools.partial(image.save, format="PNG"))
        else:
            write_atomically(path, functools.partial(np.save, arr=array))


# ----------------------------------------------------------------------------
# The job.


def _labels(seeds: list[int], label_dim: int, class_idx: int | None, device: torch.device) -> torch.Tensor | None:
    if label_dim == 0:
        return None
    if class_idx is not None:
        index = torch.full([len(seeds)], class_idx, dtype=torch.int64, device=device)
    else:
        index = seeded_labels(seeds, label_dim, device=device)
    # One-hot rows [B, label_dim], as EDM2 networks expect.
    return F.one_hot(index, label_dim).to(torch.float32)


def generate(opts: GenerateOptions) -> GenerateSummary:
    """Run the job described by ``opts`` in this process (one rank of it under torchrun)."""
    # Options in one form (plain numbers; the schedule as floats, a final 0 dropped) for the sampler and
    # the settings record: the same values written another way resume the same directory.
    seeds, opts = _check_options(opts)
    threads_before = torch.get_num_threads()  # --threads is for this job: the caller's count comes back.
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        job = _Job(opts)
        try:
            return _run(job, opts, seeds)
        except BaseException:
            # The settings record this run made, with no image in the directory (the run failed before
            # writing one: a guide broken at its first call, a peer that could not load its network),
            # would refuse the corrected command's other settings: removed.
            if job.made_settings and not _holds_images(opts.outdir):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(opts.outdir, SETTINGS_FILE))
            raise
        finally:
            job.close()
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


def _run(job: _Job, opts: GenerateOptions, seeds: list[int]) -> GenerateSummary:
    rank, device, gp = job.rank, job.device, opts.guide_parallel
    is_main = not gp or rank == 0          # Holds the main network and writes files.
    has_guide = bool(opts.gnet) and (not gp or rank == 1)
    net: Callable | None = None
    gnet: Callable | None = None
    shape: tuple[int, ...] = ()
    label_dim, fmt = 0, opts.format
    done: list[bool] = []

    # Set up; every rank learns whether all succeeded before any collective of the job.
    error = None
    try:
        _check_not_a_file(opts.outdir)  # Before loading any network.
        if is_main:
            try:
                resolve_backend(opts.backend, device, DTYPES[opts.dtype])
            except (RuntimeError, ValueError) as exc:
                raise ValueError(f"--backend: {exc}") from None
            net = load_network(opts.net, arg="--net", device=device, seed=opts.preset_seed,
                               overrides=opts.preset_overrides if _is_preset(opts.net) else None)
            shape = network_shape(net, opts.shape, arg="--net")
            label_dim = network_label_dim(net, opts.label_dim)
            if opts.class_idx is not None and not opts.class_idx < label_dim:
                raise ValueError(f"--class: {opts.class_idx} is not a class of the main network "
                                 f"(label_dim {label_dim}{', unconditional' if label_dim == 0 else ''})")
            if fmt == "auto":
                fmt = "png" if shape[0] == 3 else "npy"
            if fmt == "png":
                if len(shape) != 3 or shape[0] not in (1, 3):
                    raise ValueError(f"--format png: needs images of 1 or 3 channels [C, H, W], got {shape}; "
                                     f"use --format npy")
                _require_pillow()
        if has_guide:
            overrides = {**opts.preset_overrides, **opts.gnet_preset_overrides} if _is_preset(opts.gnet) else None
            gnet = load_network(cast(str, opts.gnet), arg="--gnet", device=device, seed=opts.preset_seed + 1,
                                overrides=overrides)  # has_guide: --gnet given.
        _check_outdir(opts.outdir)  # Created once the networks and settings are known to be usable.
        if rank == 0:
            job.made_settings = _check_settings(opts.outdir, _settings(opts, fmt, shape, label_dim))
            # Rank 0 decides what is left to do (all ranks then deal the same list).
            done = _existing(opts.outdir, seeds, fmt, opts.subdirs)
    except Exception as exc:
        error = exc
    job.agree(error, "setting up")
    done = job.broadcast_flags(done if rank == 0 else None, len(seeds))
    # The batches of a fresh run, also when resuming: a network's last bits may depend on the rest
    # of its batch, so a resumed file equals the uninterrupted run's. A batch whose files all exist
    # is skipped; one partly written is sampled whole and its missing files are written.
    if gp:
        chunks = split_chunks(len(seeds), opts.batch, 1)
    else:
        chunks = rank_chunks(len(seeds), opts.batch, job.world_size, rank)
    chunks = [c for c in chunks if not all(done[j] for j in c)]

    sampler_kwargs: dict[str, Any] = dict(
        num_steps=opts.num_steps, sigma_min=opts.sigma_min, sigma_max=opts.sigma_max, rho=opts.rho,
        sigmas=opts.sigmas, guidance=opts.guidance, S_churn=opts.S_churn, S_min=opts.S_min, S_max=opts.S_max,
        S_noise=opts.S_noise, dtype=DTYPES[opts.dtype], guidance_interval=opts.guidance_interval, solver=opts.solver,
    )
    bar = _progress(opts.progress and rank == 0, len(chunks), job.world_size, gp)
    written, nonfinite = 0, list[int]()
    # The ranks agree after every round of batches whether one failed, so a failure stops every
    # rank within one batch instead of leaving the others waiting in a collective; resuming can
    # leave sharded ranks different numbers of batches, so all run the most. (A guide-parallel
    # pair tells each other of failures within the trajectory, see guide_parallel; the agreement
    # carries rank 0's failures to write the files.)
    rounds = job.most(len(chunks))
    start = time.perf_counter()
    for r in range(rounds):
        chunk = chunks[r] if r < len(chunks) else None
        error = None
        if chunk is not None:
            try:
                written_now, nonfinite_now = _run_batch(chunk, seeds, done, net, gnet, shape, label_dim, fmt,
                                                        opts, job, sampler_kwargs)
                written, nonfinite = written + written_now, nonfinite + nonfinite_now
            except SamplingFailure as exc:  # A peer's failure (PeerFailure) propagates as it is.
                if gp and not isinstance(exc, _LocalFailure):
                    raise  # Within the trajectory (or announced before it): the pair knows already.
                error = exc
        job.agree(error, "sampling or writing a batch")
        if bar is not None and chunk is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    summary = GenerateSummary(
        requested=len(seeds), skipped=sum(done), written=job.total(written), seconds=seconds,
        world_size=job.world_size, guide_parallel=gp, outdir=opts.outdir,
    )
    if opts.verbose and rank == 0:
        _print_summary(summary)
    if nonfinite:
        raise FloatingPointError(
            f"the networks produced NaN or Inf for {len(nonfinite)} seed(s): {_seed_text(nonfinite)}; their files "
            f"were not written (every other file was). Fix the networks, or leave these seeds out of --seeds"
        )
    return summary


class SamplingFailure(RuntimeError):
    """Sampling a batch, or writing its files, failed (the cause is chained): a network's, the
    device's or the file system's error, not a bad argument."""


class _LocalFailure(SamplingFailure):
    """A failure only this rank knows of, outside a guide-parallel trajectory (writing a batch's
    files, or the first read of its result): the ranks learn it in their agreement."""


def _run_batch(chunk: Sequence[int], seeds: list[int], done: list[bool], net, gnet, shape: tuple[int, ...],
               label_dim: int, fmt: str, opts: GenerateOptions, job: _Job,
               sampler_kwargs: dict[str, Any]) -> tuple[int, list[int]]:
    """Sample one batch and write its files that are missing (rank 1 of a guide-parallel pair
    only runs the guide); returns the number of files written and the seeds whose images are not
    finite. A failure other than a peer's is raised as a SamplingFailure."""
    batch_seeds = [seeds[j] for j in chunk]
    gp = opts.guide_parallel
    try:
        if gp and job.rank == 1:
            guide_parallel_sample(None, gnet, device=job.device, **sampler_kwargs)
            return 0, []
        x = _sample_batch(net, gnet, batch_seeds, shape, label_dim, opts, job.device, sampler_kwargs)
    except PeerFailure:
        raise
    except Exception as exc:  # A network's (or the device's) failure, not a bad argument.
        what = "running the guide for" if gp and job.rank == 1 else "sampling"
        raise SamplingFailure(f"{what} the batch of seeds {_seed_text(batch_seeds)} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    try:
        # Checked per image: a network's NaN/Inf for one seed does not stop the other files. On a
        # GPU this first read of the result is where an asynchronous error surfaces: after a
        # guide-parallel trajectory, which rank 1 ended normally, only this rank knows of it.
        finite = torch.isfinite(x.flatten(1)).all(1).tolist()
    except Exception as exc:
        raise _LocalFailure(f"sampling the batch of seeds {_seed_text(batch_seeds)} failed: "
                            f"{type(exc).__name__}: {exc}") from exc
    keep = [i for i, j in enumerate(chunk) if not done[j] and finite[i]]
    try:
        _write_batch(x[keep], [batch_seeds[i] for i in keep], opts.outdir, fmt, opts.subdirs)
    except Exception as exc:
        raise _LocalFailure(f"writing the files of the batch of seeds {_seed_text(batch_seeds)} failed: "
                            f"{type(exc).__name__}: {exc}") from exc
    return len(keep), [seed for seed, ok in zip(batch_seeds, finite) if not ok]


def _seed_text(seeds: list[int], most: int = 8) -> str:
    shown = ", ".join(map(str, seeds[:most]))
    return f"[{shown}{', ...' if len(seeds) > most else ''}]"


def _sample_batch(net, gnet, batch_seeds: list[int], shape: tuple[int, ...], label_dim: int, opts: GenerateOptions,
                  device: torch.device, sampler_kwargs: dict[str, Any]) -> torch.Tensor:
    """One batch on rank 0 (guide-parallel) or on this rank: unit noise and labels from the seeds."""
    try:
        noise = seeded_noise(batch_seeds, [len(batch_seeds), *shape], device=device)
        labels = _labels(batch_seeds, label_dim, opts.class_idx, device)
    except Exception as exc:
        if opts.guide_parallel:  # Rank 1 already waits in its guide_parallel_sample: it must learn it.
            announce_failure(exc)
        raise
    if opts.guide_parallel:
        x = guide_parallel_sample(net, None, noise, labels, seeds=batch_seeds, backend=opts.backend,
                                  check_finite=False, **sampler_kwargs)
    else:
        x = fast_guided_sample(cast(Callable, net), noise, labels, gnet, seeds=batch_seeds,  # net: loaded by is_main.
                               backend=opts.backend, check_finite=False, **sampler_kwargs)
    return cast(torch.Tensor, x)  # Rank 0 of guide-parallel returns the samples.


def _settings(opts: GenerateOptions, fmt: str, shape: tuple[int, ...], label_dim: int) -> dict[str, Any]:
    """What decides the content of a file (not which seeds, batches or devices produced it)."""
    keep = ("net", "gnet", "class_idx", "guidance", "num_steps", "sigma_min", "sigma_max", "rho", "S_churn",
            "S_min", "S_max", "S_noise", "guidance_interval", "solver", "dtype", "subdirs", "preset_overrides",
            "gnet_preset_overrides", "preset_seed")
    settings = {k: v for k, v in asdict(opts).items() if k in keep}
    settings.update(format=fmt, shape=list(shape), label_dim=label_dim)
    if opts.sigmas is not None:
        # A custom schedule in place of the formula's options (unused, at their defaults). The default
        # schedule adds no key: its record is the one written before custom schedules existed, so those
        # directories resume, and a custom schedule never matches them.
        for name in FORMULA_DEFAULTS:
            del settings[name]
        settings["sigmas"] = list(opts.sigmas)
    if _is_preset(opts.net) or _is_preset(opts.gnet):
        # edm2: networks gained random non-zero gains (earlier files came from zero gains): files of
        # the two kinds differ and must not be mixed in one directory.
        settings["edm2_preset_gains"] = "random"
    return settings


def _progress(enabled: bool, total: int, world_size: int, gp: bool):
    if not enabled:
        return None
    desc = "generate (guide-parallel)" if gp else f"generate (rank 0 of {world_size})"
    return progress_bar(total, desc, "batch", file=sys.stderr, dynamic_ncols=True)


def _print_summary(s: GenerateSummary) -> None:
    rate = s.written / s.seconds if s.seconds > 0 else float("nan")
    mode = "guide-parallel on 2 ranks" if s.guide_parallel else f"{s.world_size} rank(s)"
    print(f"generate: {s.written} file(s) written, {s.skipped} already present, of {s.requested} seed(s); "
          f"{s.seconds:.1f} s ({rate:.2f} images/s, {mode}) -> {s.outdir}")
