"""The paper's 2D toy experiment, with numbers: exact vs unguided vs autoguidance vs CFG.

All four samplers run the 32-step Heun sampler (``fast_guided_sample``) with sigma_max = 5 from
the same exact class-A samples smoothed at sigma = 5 (the autoguidance paper, Sec. 3). The samples are scored against
the exact class-A density at sigma = 0:

- log p quantiles (mean, 5th percentile, median): the mean is dominated by a few far outliers,
  so the quantiles are the robust summary;
- the fraction of samples outside the class-A outline, log p < max log p - 4.49;
- coverage: the share of exact class-A samples with a generated sample within 0.02;
- the sliced Wasserstein-2 distance to exact class-A samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..cli_types import write_atomically, write_json
from .ground_truth import GaussianMixture, ground_truth
from .network import ToyNet, load_toy_net
from .training import MODELS

__all__ = ["SIGMA_MAX", "OUTLINE_DROP", "COVERAGE_RADIUS", "ToyRow", "start_noise",
           "outline_threshold", "coverage", "sliced_wasserstein", "evaluate_samples",
           "load_shipped_models", "sample_four_ways", "run_toy_experiment", "format_table"]

SIGMA_MAX = 5.0           # the toy sampler starts from exact samples at sigma = 5
OUTLINE_DROP = 4.49       # outline: log p >= max log p - 4.49
COVERAGE_RADIUS = 0.02    # an exact sample is covered if a generated one lies this close
SWD_PROJECTIONS = 256
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_EXTENT = (-0.6, 1.4, -0.75, 1.55)   # class-A plotting window (x0, x1, y0, y1)
_ZOOM = (1.0, 1.3, 0.0, 0.3)         # zoomed window: branch tips on the right of the tree


@dataclass
class ToyRow:
    """One line of the experiment's table."""

    name: str
    guidance: float | None
    mean_logp: float
    p05_logp: float
    median_logp: float
    outside: float
    coverage: float
    swd: float
    seconds: float | None


def start_noise(gt: GaussianMixture, n: int, seed: int = 1,
                sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """Sampler input: exact samples of p(x; sigma_max) divided by sigma_max (x0 = noise * t0)."""
    gen = torch.Generator().manual_seed(seed)
    return gt.sample(n, sigma_max, generator=gen) / sigma_max


# Outline level: the density's maximum (attained at a component mean, to within 4e-4 of a
# fine grid's maximum) minus OUTLINE_DROP.
def outline_threshold(gt: GaussianMixture) -> float:
    return float(gt.logp(gt.mu.double()).max()) - OUTLINE_DROP


# Coverage: share of reference points whose nearest generated point is within `radius`.
# Both sets are sorted by their first coordinate, so each chunk of reference points is only
# compared with the generated points in its x-window widened by `radius` (exact, not a grid).
def coverage(generated: torch.Tensor, reference: torch.Tensor,
             radius: float = COVERAGE_RADIUS, chunk: int = 256) -> float:
    gen = generated.double()
    gen = gen[torch.argsort(gen[:, 0])]
    gx = gen[:, 0].contiguous()
    ref = reference.double()
    ref = ref[torch.argsort(ref[:, 0])]
    hits = 0
    for i in range(0, ref.shape[0], chunk):
        rc = ref[i:i + chunk]
        lo = int(torch.searchsorted(gx, rc[:1, 0] - radius))
        hi = int(torch.searchsorted(gx, rc[-1:, 0] + radius, right=True))
        if hi > lo:
            d2 = (rc[:, None, :] - gen[None, lo:hi, :]).square().sum(-1)
            hits += int((d2.min(dim=1).values <= radius**2).sum())
    return hits / max(1, ref.shape[0])


# Sliced Wasserstein-2: sqrt(mean over random unit directions of W2^2 of the 1D projections),
# each 1D W2^2 from sorted samples (equal counts).
def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = SWD_PROJECTIONS,
                       seed: int = 0) -> float:
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    gen = torch.Generator().manual_seed(seed)
    angle = torch.rand(projections, generator=gen, dtype=torch.float64) * math.pi
    dirs = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)   # [P, 2]
    pa = torch.sort(dirs @ a.double().T, dim=1).values                # [P, N], sorted rows
    pb = torch.sort(dirs @ b.double().T, dim=1).values
    return float((pa - pb).square().mean().sqrt())


def evaluate_samples(name: str, x: torch.Tensor, gt: GaussianMixture, reference: torch.Tensor,
                     threshold: float, guidance: float | None = None,
                     seconds: float | None = None) -> ToyRow:
    """Score samples ``x`` [N, 2] against the exact density ``gt`` and exact ``reference``."""
    logp = gt.logp(x.double())
    q = torch.quantile(logp, torch.tensor([0.05, 0.5], dtype=torch.float64))
    return ToyRow(
        name=name, guidance=guidance, mean_logp=float(logp.mean()), p05_logp=float(q[0]),
        median_logp=float(q[1]), outside=float((logp < threshold).double().mean()),
        coverage=coverage(x, reference), swd=sliced_wasserstein(x, reference), seconds=seconds,
    )


def load_shipped_models(weights_dir: str | Path = WEIGHTS_DIR) -> dict[str, ToyNet]:
    """The three toy models: ``main`` (A, 4x64), ``autoguide`` (A, 4x32), ``cfg`` (A+B, 4x32)."""
    weights_dir = Path(weights_dir)
    out = {}
    for name in MODELS:
        path = weights_dir / f"{name}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"toy weights not found: {path} (run 'autoguide-fast toy "
                                    f"train --out-dir {weights_dir}')")
        try:
            out[name] = load_toy_net(path)
        except Exception as exc:  # Another file under the expected name: say which, and why.
            raise ValueError(f"toy weights: cannot load {path}: not a toy checkpoint written by "
                             f"'autoguide-fast toy train' ({type(exc).__name__}: {exc})") from exc
    return out


def sample_four_ways(
    models: dict[str, ToyNet],
    noise: torch.Tensor,                   # start points / SIGMA_MAX, [N, 2]
    *,
    gt: GaussianMixture,                   # exact class-A mixture (for the exact denoiser)
    autoguidance: float = 3.0,             # w for main + autoguide
    cfg: float = 4.0,                      # w for main + A+B guide
    num_steps: int = 32,
) -> list[tuple[str, float | None, torch.Tensor, float]]:
    """Run the Heun sampler four ways; returns (name, w, samples, seconds) per sampler."""
    from autoguide_fast import fast_guided_sample

    runs = [  # (name, weight, its argument's name, net, gnet)
        ("exact denoiser", None, None, gt.denoiser(), None),
        ("unguided", None, None, models["main"], None),
        ("autoguidance", autoguidance, "autoguidance", models["main"], models["autoguide"]),
        ("CFG-style", cfg, "cfg", models["main"], models["cfg"]),
    ]
    out = []
    for name, w, argument, net, gnet in runs:
        t0 = time.perf_counter()
        try:
            x = fast_guided_sample(net, noise, gnet=gnet, num_steps=num_steps,
                                   sigma_max=SIGMA_MAX, guidance=1 if w is None else w,
                                   backend="torch")
        except FloatingPointError as exc:
            if argument is None or w is None:
                raise  # Not a weight's doing.
            raise GuidanceOverflow(argument, w, num_steps) from exc
        out.append((name, w, x, time.perf_counter() - t0))
    return out


class GuidanceOverflow(ValueError):
    """A guided run whose samples came out NaN or Inf: its weight is too strong for the models
    (float32) and the steps. ``argument`` names the weight's argument."""

    def __init__(self, argument: str, weight: float, num_steps: int) -> None:
        self.argument, self.weight = argument, weight
        self.reason = f"the guided samples overflow to NaN/Inf (float32) with {num_steps} steps; use a smaller weight"
        super().__init__(f"{argument}={weight:g}: {self.reason}")


def format_table(rows: list[ToyRow]) -> str:
    head = (f"{'sampler':<22}{'w':>5}{'mean log p':>12}{'p5 log p':>10}{'median':>8}"
            f"{'outside':>9}{'coverage':>10}{'SWD':>8}{'time s':>8}")
    lines = [head, "-" * len(head)]
    def cell(text: str, width: int) -> str:  # Right-aligned; a value wider than its column still gets a space.
        return text.rjust(width) if len(text) < width else " " + text

    for r in rows:
        w = "-" if r.guidance is None else f"{r.guidance:g}"
        t = "-" if r.seconds is None else f"{r.seconds:.1f}"
        cells = [(w, 5), (f"{r.mean_logp:.2f}", 12), (f"{r.p05_logp:.2f}", 10), (f"{r.median_logp:.2f}", 8),
                 (f"{r.outside:.3f}", 9), (f"{r.coverage:.3f}", 10), (f"{r.swd:.4f}", 8), (t, 8)]
        lines.append(f"{r.name:<22}" + "".join(cell(text, width) for text, width in cells))
    return "\n".join(lines)


def require_matplotlib(argument: str = "figure", no_figure: str = "figure=None") -> None:
    """Raise ImportError naming ``argument`` when the figure cannot be drawn (checked before any work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{argument}: drawing the figure needs matplotlib (pip install matplotlib), "
                          f"or pass {no_figure}") from exc


def plot_figure(path: str | Path, gt: GaussianMixture, gt_other: GaussianMixture,
                threshold: float, samples: dict[str, torch.Tensor],
                titles: dict[str, str], grid: int = 320) -> Path:
    """The paper's panels: ground truth, unguided, CFG, autoguidance, zoom on a branch tip."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def density(extent: tuple[float, float, float, float], mix: GaussianMixture,
                n: int) -> tuple[torch.Tensor, ...]:
        gx = torch.linspace(extent[0], extent[1], n, dtype=torch.float64)
        gy = torch.linspace(extent[2], extent[3], n, dtype=torch.float64)
        xx, yy = torch.meshgrid(gx, gy, indexing="xy")
        lp = mix.logp(torch.stack([xx.flatten(), yy.flatten()], dim=1)).reshape(n, n)
        return xx, yy, lp

    xx, yy, lp = density(_EXTENT, gt, grid)
    _, _, lp_b = density(_EXTENT, gt_other, grid // 2)
    xb, yb = (torch.linspace(_EXTENT[0], _EXTENT[1], grid // 2),
              torch.linspace(_EXTENT[2], _EXTENT[3], grid // 2))
    zoom = _ZOOM
    zx, zy, zlp = density(zoom, gt, grid // 2)
    panels = ["ground truth", "unguided", "CFG-style", "autoguidance"]
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.6))
    for ax, key in zip(axes[:4], panels):
        if key == "ground truth":
            top = float(lp.max())
            ax.imshow(lp.clamp(min=threshold - 3, max=top).numpy(), origin="lower",
                      cmap="Greys", extent=_EXTENT, vmin=threshold - 3, vmax=top + 1)
            ax.contour(xb.numpy(), yb.numpy(), lp_b.numpy(), levels=[threshold],
                       colors="tab:blue", linewidths=0.6, linestyles="dashed")
        else:
            pts = samples[key].numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=1.0, c="tab:red", alpha=0.5, linewidths=0)
        ax.contour(xx.numpy(), yy.numpy(), lp.numpy(), levels=[threshold], colors="k",
                   linewidths=0.5, linestyles="solid")
        ax.set_aspect("equal")
        ax.set_xlim(_EXTENT[0], _EXTENT[1])
        ax.set_ylim(_EXTENT[2], _EXTENT[3])
        ax.set_title(titles.get(key, key), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].add_patch(plt.Rectangle((zoom[0], zoom[2]), zoom[1] - zoom[0], zoom[3] - zoom[2],
                                    fill=False, ec="tab:green", lw=1.0))
    ax = axes[4]
    for key, color, size in (("unguided", "tab:gray", 4), ("autoguidance", "tab:red", 6)):
        xy = samples[key]
        inside = ((xy[:, 0] >= zoom[0]) & (xy[:, 0] <= zoom[1]) & (xy[:, 1] >= zoom[2])
                  & (xy[:, 1] <= zoom[3]))
        pts = xy[inside].numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=size, c=color, alpha=0.8, linewidths=0, label=key)
    ax.contour(zx.numpy(), zy.numpy(), zlp.numpy(), levels=[threshold], colors="k",
               linewidths=0.6, linestyles="solid")
    ax.set_aspect("equal")
    ax.set_xlim(zoom[0], zoom[1])
    ax.set_ylim(zoom[2], zoom[3])
    ax.set_title("zoom on branch tips (green box)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, markerscale=2, framealpha=0.9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.suptitle("Class A of the 2D toy problem: black = class-A outline "
                 "(log p = max - 4.49); dashed blue = class-B outline", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    try:
        write_atomically(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def run_toy_experiment(
    *,
    samples: int = 16384,                  # points per sampler
    num_steps: int = 32,                   # Heun steps
    autoguidance: float = 3.0,             # autoguidance weight
    cfg: float = 4.0,                      # CFG-style weight (A+B guide)
    seed: int = 1,                         # seed of the sigma = 5 start points
    weights_dir: str | Path = WEIGHTS_DIR, # directory of main.pt, autoguide.pt, cfg.pt
    figure: str | Path | None = "toy.png", # PNG path; None: no figure
    json_path: str | Path | None = None,   # also write the table as JSON; None: don't
    threads: int | None = None,            # torch CPU threads; None: torch's default
    verbose: bool = True,                  # print the table and paths
) -> int:
    """Run the experiment end to end; returns a process exit code (0)."""
    if samples < 2:
        raise ValueError(f"samples must be at least 2, got {samples!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be positive, got {threads!r}")
    if figure is not None:  # Found now, not after the whole run.
        require_matplotlib()
    if threads is not None:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    gt = ground_truth("A")
    models = load_shipped_models(weights_dir)
    noise = start_noise(gt, samples, seed)
    reference = gt.sample(samples, 0.0, generator=torch.Generator().manual_seed(seed + 1))
    threshold = outline_threshold(gt)

    runs = sample_four_ways(models, noise, gt=gt, autoguidance=autoguidance, cfg=cfg,
                            num_steps=num_steps)
    rows = [evaluate_samples(name, x, gt, reference, threshold, w, sec)
            for name, w, x, sec in runs]
    # Calibration row: a second, independent exact draw (the floor of each distance metric).
    floor = gt.sample(samples, 0.0, generator=torch.Generator().manual_seed(seed + 2))
    rows.append(evaluate_samples("exact samples (floor)", floor, gt, reference, threshold))

    table = format_table(rows)
    total = time.perf_counter() - t_start
    if verbose:  # The table first: a figure that fails to write does not take it along.
        print(f"2D toy experiment: {samples} class-A points, {num_steps} Heun steps from "
              f"sigma = {SIGMA_MAX:g}; exact class-A log p at sigma = 0")
        print(table)
        print(f"outline: log p >= {threshold:.3f}; coverage radius {COVERAGE_RADIUS}; "
              f"SWD = sliced Wasserstein-2 to exact class-A samples; total {total:.1f} s", flush=True)
    fig_path = None
    if figure is not None:
        titles = {"ground truth": "ground truth (exact class-A density)",
                  "unguided": "unguided (main model)",
                  "CFG-style": f"CFG-style (A+B guide, w = {cfg:g})",
                  "autoguidance": f"autoguidance (small A guide, w = {autoguidance:g})"}
        fig_path = plot_figure(figure, gt, ground_truth("B"), threshold,
                               {name: x for name, _, x, _ in runs}, titles)
        if verbose:
            print(f"figure: {fig_path}")
    if json_path is not None:
        payload = {
            "samples": samples, "num_steps": num_steps, "sigma_max": SIGMA_MAX,
            "autoguidance": autoguidance, "cfg": cfg, "seed": seed,
            "outline_threshold": threshold, "coverage_radius": COVERAGE_RADIUS,
            "total_seconds": total, "figure": None if fig_path is None else str(fig_path),
            "rows": [asdict(r) for r in rows],
        }
        json_path = Path(json_path)
        write_json(json_path, payload)
        if verbose:
            print(f"json: {json_path}")
    return 0
