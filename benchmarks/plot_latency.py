"""Plot the latest latency run of one card from ``benchmarks/results/latency.csv`` (or any CSV
written by ``benchmarks/latency.py``): grouped bars, one group per batch size, one bar per arm
that ran (status ok), one panel per workload.

    python benchmarks/plot_latency.py                      # latest results of the latest card
    python benchmarks/plot_latency.py --card H100 --metric speedup --out h100.png

``--metric ms`` (default): median milliseconds per sample on a log scale, whiskers p20-p80.
``--metric speedup``: B0's median divided by each arm's (higher is faster), log scale.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import common  # noqa: E402  (a sibling module; its directory is put on the path just above)


def plot(rows: list[dict[str, str]], out: pathlib.Path, metric: str = "ms") -> pathlib.Path:
    """Draw the run's rows into a PNG; returns its path. Raises ValueError if no row ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("p50_ms")]
    if metric == "speedup":
        ok = [r for r in ok if r.get("ratio_to_B0")]
    if not ok:
        raise ValueError("no arm with a measured time in this run")
    # Bars the table and the verdicts do not count (< 5 repetitions, wrong output) are hatched.
    unjudged = {(r["workload"], r["batch"], r["arm"]) for r in ok if common.unjudged_reason(r) is not None}
    workloads = list(dict.fromkeys(r["workload"] for r in ok))
    arms = list(dict.fromkeys(r["arm"] for r in rows))  # The harness's order.
    arms = [a for a in arms if any(r["arm"] == a for r in ok)]
    colors = {a: plt.get_cmap("tab20")(i % 20) for i, a in enumerate(arms)}
    panel_width = [max(5.0, 2.0 + 0.3 * len(arms) * len({r["batch"] for r in ok if r["workload"] == w}))
                   for w in workloads]
    # At least 10 inches: the title (card, dates, commits) and the legend (every arm) must fit.
    fig, axes = plt.subplots(1, len(workloads), figsize=(max(10.0, sum(panel_width)), 5.0), squeeze=False,
                             gridspec_kw={"width_ratios": panel_width})
    for ax, workload in zip(axes[0], workloads):
        sub = [r for r in ok if r["workload"] == workload]
        batches = sorted({int(r["batch"]) for r in sub})
        width = 0.8 / max(1, len(arms))
        for i, arm in enumerate(arms):
            xs, ys, lo, hi, hatch = [], [], [], [], []
            for j, batch in enumerate(batches):
                match = [r for r in sub if r["arm"] == arm and int(r["batch"]) == batch]
                if not match:
                    continue
                r = match[0]
                hatch.append("//" if (workload, r["batch"], arm) in unjudged else "")
                p50 = float(r["p50_ms"])
                xs.append(j - 0.4 + width * (i + 0.5))
                if metric == "speedup":
                    ys.append(1.0 / float(r["ratio_to_B0"]))
                    lo.append(0.0)
                    hi.append(0.0)
                else:
                    ys.append(p50)
                    lo.append(max(0.0, p50 - float(r["p20_ms"])))
                    hi.append(max(0.0, float(r["p80_ms"]) - p50))
            if xs:
                bars = ax.bar(xs, ys, width=width, color=colors[arm], label=arm,
                              yerr=None if metric == "speedup" else [lo, hi], capsize=2)
                for bar, h in zip(bars, hatch):
                    if h:
                        bar.set_hatch(h)
                        bar.set_alpha(0.45)
        ax.set_xticks(range(len(batches)))
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_yscale("log")
        if metric == "speedup":
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel("speed-up vs B0 (B0 median / arm median)")
        else:
            ax.set_ylabel("ms per sample (median, p20-p80)")
        first = sub[0]
        ax.set_title(f"{workload}: {first['evals']} evaluations/network, w={first['guidance']}", fontsize=9)
        ax.grid(axis="y", which="both", alpha=0.3)
    first = ok[0]
    runs = sorted({(r["date"][:16], common.short_commit(r["commit"]), r["mode"], r["torch"], r["triton"])
                   for r in ok})
    when = "\n".join(f"{date} commit {commit}, torch {torch_v}, triton {triton_v} ({mode})"
                     for date, commit, mode, torch_v, triton_v in runs)
    hatched = "; hatched: not judged (< 5 repetitions or wrong output, see the CSV)" if unjudged else ""
    fig.suptitle(f"{first['card']}" + (" (each batch from one run)" if len(runs) > 1 else "") + hatched
                 + f"\n{when}", fontsize=9)
    # The legend of every arm drawn in any panel (an arm may run in one workload only).
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = [a for a in arms if a in legend]
    fig.legend([legend[a] for a in labels], labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8,
               frameon=False)
    top = 1.0 - 0.035 * (len(runs) + 1)  # Room for the title's lines.
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 6), 1, top))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plot the latest latency results of a card as grouped bars per batch.")
    p.add_argument("--csv", default=str(common.RESULTS_DIR / "latency.csv"),
                   help="results CSV written by benchmarks/latency.py (default: benchmarks/results/latency.csv)")
    p.add_argument("--card", default=None,
                   help="part of the card's name, e.g. H100 (case-insensitive; default: the card of the latest run)")
    p.add_argument("--metric", choices=("ms", "speedup"), default="ms",
                   help="ms: median ms per sample, log scale; speedup: B0 median / arm median")
    p.add_argument("--out", default=None,
                   help="PNG path (default: benchmarks/results/latency_<card>.png, with --metric speedup "
                        "latency_<card>_speedup.png; performance_table.py links the first)")
    args = p.parse_args(argv)
    rows = common.latest_run(common.read_rows(args.csv), args.card)
    if not rows:
        print(f"{args.csv}: no run" + (f" on a card matching {args.card!r}" if args.card else ""), file=sys.stderr)
        return 1
    out = pathlib.Path(args.out) if args.out else common.plot_path(rows[0]["card"], args.metric)
    try:
        plot(rows, out, args.metric)
    except ImportError:
        print("matplotlib is not installed: install it, or copy the CSV to a machine that has it and run "
              f"python benchmarks/plot_latency.py --csv {args.csv}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"{args.csv}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({rows[0]['card']}, run(s) {', '.join(sorted({r['run_id'] for r in rows}))}, {args.metric})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
