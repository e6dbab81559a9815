"""The README's "Performance" results from ``benchmarks/results/latency.csv``: one markdown table of
the latest GPU results (medians, the best "ours" arm, its speed-ups, and the ratio of the best "ours"
arm with uncompiled networks to the floor F), the plot of the same results (``plot_latency.py``'s
PNG, linked when it exists) and the verdict on every target, written between the markers

    <!-- performance-table:begin -->  ...  <!-- performance-table:end -->

of each file given to ``--write`` (README.md and docs/performance.md), or printed.

    python benchmarks/performance_table.py                         # print the latest GPU results
    python benchmarks/performance_table.py --card H100 --write README.md docs/performance.md
    python benchmarks/performance_table.py --write README.md --plot benchmarks/results/h100.png

Only rows measured on a CUDA device count: a CPU run (``--smoke``) never reaches the README.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys

_HERE = pathlib.Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import common  # noqa: E402  (a sibling module; its directory is put on the path just above)

BEGIN = "<!-- performance-table:begin -->"
END = "<!-- performance-table:end -->"
# The "no GPU numbers yet" note above the results: emptied when results are written.
NOTE_BEGIN = "<!-- no-gpu-results:begin -->"
NOTE_END = "<!-- no-gpu-results:end -->"
BASES = ("B0", "B1", "B2", "F", "F_par")


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def _speedup(group: list[dict[str, str]], base: str, best_arm: str) -> str:
    """The fastest ours arm's speed-up over ``base`` (within ``base``'s round), its name added when it
    is not the table's best arm."""
    pair = common.versus(group, base)
    if pair is None:
        return "–"
    ref, ours, arm = pair
    return f"{ref / ours:.2f}×" + ("" if arm == best_arm else f" ({arm})")


def _ratio_f(group: list[dict[str, str]]) -> str:
    """The fastest ours arm with uncompiled networks over F (the target's comparison), with its name."""
    pair = common.versus(group, "F", lambda r: not common.networks_compiled(r))
    return "–" if pair is None else f"{pair[1] / pair[0]:.2f} ({pair[2]})"


def _in_round(group: list[dict[str, str]], arm: str, text: str, mixed: bool) -> str:
    """``text`` (an arm's median cell), with the arm's round when the batch's arms span several."""
    row = next((r for r in group if r["arm"] == arm), None)
    return f"{text} (round {row.get('round') or '?'})" if mixed and row is not None else text


def results_table(rows: list[dict[str, str]], plot: str | None = None) -> str:
    """Markdown: provenance line, one row per (workload, batch), the plot (an image link to ``plot``,
    if given), then the targets' verdicts."""
    gpu = [r for r in rows if r.get("device_type") == "cuda"]
    if not gpu:
        raise ValueError("no row of this run was measured on a CUDA device")
    lines = [_provenance(gpu), ""]
    lines += [
        "| workload | batch | B0 | B1 | B2 | F | F_par | ours (best arm) | vs B0 | vs B1 | vs B2 | ours / F |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    left_out = []
    mixed_rounds = False
    for (workload, batch), group in common.by_workload_batch(gpu):
        # Every arm of the run that is not tabled, with why: failed, skipped (time budget, not in
        # this mode), cut short, wrong output. Arms left out by --arms/--skip are not listed.
        left_out += [f"{r['arm']} at batch {batch}: {common.unjudged_reason(r)}" for r in group
                     if common.unjudged_reason(r) is not None and not common.deselected(r)]
        group = common.judged(group)  # The same medians as the verdicts below.
        base = {arm: common.arm_p50(group, arm) for arm in BASES}
        ours = common.fastest(group, lambda r: r.get("kind") == "ours")
        # Arms timed in different rounds of the harness (a compiled arm joins in round 2; an arm
        # left with too few repetitions in one round reports another): each median says its round,
        # so that medians side by side are never mistaken for one round's (the ratios never mix).
        mixed = len({r.get("round", "") for r in group}) > 1
        mixed_rounds = mixed_rounds or mixed
        cells = [workload, str(batch)] + [_in_round(group, a, _ms(base[a]), mixed) for a in BASES]
        if ours is not None:
            best, arm = ours
            cells += [_in_round(group, arm, f"{_ms(best)} ({arm})", mixed),
                      *(_speedup(group, b, arm) for b in ("B0", "B1", "B2")), _ratio_f(group)]
        else:
            cells += ["no ours arm judged", "–", "–", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "ours / F: the fastest ours arm whose networks are not compiled (F and F_par run the plain "
              "networks), named in brackets; a speed-up names its arm when it is not the best one."]
    if mixed_rounds:
        lines += ["", "(round k): where a batch's arms were timed in different rounds of the harness, each median "
                  "names its round; every speed-up and ratio compares arms of one round."]
    if left_out:
        lines += ["", "Not tabled (medians count with at least "
                  f"{common.MIN_JUDGED_REPS} repetitions of a correct output): " + "; ".join(left_out) + "."]
    if plot:
        lines += ["", f"![Latency per arm and batch on {gpu[0]['card']} (p50, whiskers p20-p80)]({plot})"]
    lines += ["", "Targets (each judged within the run of its batch):", ""]
    lines += ["| workload | batch | target | measured | verdict |", "|---|---:|---|---|---|"]
    for workload, batch, target, measured, verdict in _targets(gpu):
        lines.append(f"| {workload} | {batch} | {target} | {measured} | {verdict} |")
    return "\n".join(lines)


def _run_text(run: list[dict[str, str]]) -> str:
    first = run[0]
    reps = [str(n) for n in sorted({common.reps(r) for r in common.judged(run)})]
    return (f"{first['date'][:10]} (commit `{common.short_commit(first['commit'])}`, torch {first['torch']}, "
            f"CUDA {first['cuda']}, "
            f"Triton {first['triton']}; `{first['mode']}` mode, medians of {'/'.join(reps) or '?'} repetitions)")


def _provenance(rows: list[dict[str, str]]) -> str:
    """Card, date, commit and versions of the run(s) behind the table: one run per (workload, batch)."""
    runs: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        runs.setdefault(r["run_id"], []).append(r)
    tail = ("Milliseconds per sampled batch (p50); p20/p80 and every arm are in `benchmarks/results/latency.csv`.")
    card = rows[0]["card"]
    if len(runs) == 1:
        return (f"Measured on **{card}** on {_run_text(rows)}, all arms interleaved in one process. {tail}")
    parts = []
    for run_id in sorted(runs):
        batches = sorted({int(r["batch"]) for r in runs[run_id]})
        parts.append(f"batch {', '.join(map(str, batches))} on {_run_text(runs[run_id])}")
    return (f"Measured on **{card}** in {len(runs)} runs, each batch's arms interleaved in one process: "
            f"{'; '.join(parts)}. {tail}")


def _targets(rows: list[dict[str, str]]) -> list[tuple]:
    # The benchmark's own judgement of its targets (imports torch and the package: only here).
    import latency

    results = latency.evaluate_targets(rows)
    if not any(batch >= 64 for _, batch, *_ in results):  # Say so rather than leave the target out.
        measured = sorted({int(r["batch"]) for r in rows})
        results.append(("-", 64, latency.TARGET_BATCH64,
                        f"batch 64 not measured (this run: batch {', '.join(map(str, measured))})", "n/a"))
    return results


def replace_between_markers(text: str, body: str, where: str, begin: str = BEGIN, end: str = END) -> str:
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"{where}: expected exactly one '{begin}' ... '{end}' block")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}" if body else f"{begin}\n{end}", text)


def write_results(text: str, body: str, where: str) -> str:
    """``text`` with the results block replaced by ``body`` and the "no GPU numbers yet" note, if
    the file has one, emptied (its markers stay)."""
    text = replace_between_markers(text, body, where)
    if NOTE_BEGIN in text:
        text = replace_between_markers(text, "", where, NOTE_BEGIN, NOTE_END)
    return text


def plot_link(png: pathlib.Path, target: pathlib.Path) -> str | None:
    """The markdown path of ``png`` seen from the file ``target`` (relative, forward slashes), or
    None when the PNG does not exist (no plot was drawn for this card)."""
    if not png.is_file():
        return None
    return pathlib.Path(os.path.relpath(png.resolve(), target.resolve().parent)).as_posix()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=str(common.RESULTS_DIR / "latency.csv"), help="latency results CSV")
    p.add_argument("--card", default=None, help="only runs whose card name contains this (e.g. H100)")
    p.add_argument("--write", nargs="*", default=[], metavar="FILE",
                   help="replace the marked block of these files (README.md, docs/performance.md)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="plot linked in the written block when it exists (default: the card's "
                        "benchmarks/results/latency_<card>.png, as plot_latency.py writes it)")
    args = p.parse_args(argv)
    path = pathlib.Path(args.csv)
    if not path.is_file():
        p.error(f"--csv: no such file {path}")
    gpu_rows = [r for r in common.read_rows(path) if r.get("device_type") == "cuda"]
    run = common.latest_run(gpu_rows, args.card)
    if not run:
        p.error(f"--csv: no GPU run{' of a card matching ' + repr(args.card) if args.card else ''} in {path}")
    if not args.write:
        print(results_table(run))
    png = pathlib.Path(args.plot) if args.plot else common.plot_path(run[0]["card"])
    texts = {}
    for name in args.write:  # Check every file before writing any.
        f = pathlib.Path(name)
        if not f.is_file():
            p.error(f"--write: no such file {f}")
        body = results_table(run, plot_link(png, f))
        texts[f] = write_results(f.read_text(), body, str(f))
    for f, text in texts.items():
        f.write_text(text)
        ids = ", ".join(sorted({r["run_id"] for r in run}))
        shown = f", with the plot {png}" if png.is_file() else f" (no plot: {png} does not exist)"
        print(f"wrote the results of run(s) {ids} ({run[0]['card']}) into {f}{shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
