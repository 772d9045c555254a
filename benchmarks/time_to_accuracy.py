"""Time-to-accuracy on unseen Omniglot alphabets: every algorithm's learning curve against issue #10's targets.

Reads the learning curves that `omniglot_accuracy.py` records in `benchmarks/results/omniglot_curves.jsonl`
(one row per training run: the unseen-client curve over training minutes, the final 5-way 1-shot figure with
its 95% CI), draws one panel per algorithm with its target as a dashed line, writes the figure and prints a
markdown table of the minutes each run took to reach its target:

    python benchmarks/time_to_accuracy.py                        # -> benchmarks/results/time_to_accuracy.png
    python benchmarks/time_to_accuracy.py --add runs/bench/reptile-5w-carried-32k --algorithm reptile

`--add RUN_DIR` appends a finished run's curve (read from its `metrics.jsonl` and `summary.json`) to the file
first. Rows whose run directory was not kept carry the curve from RESULTS.md's tables and say so in `source`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

from fedmeta.report import load_run

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

CURVES = Path("benchmarks/results/omniglot_curves.jsonl")

# Issue #10's targets on unseen alphabets, 5-way 1-shot, within 60 training minutes (ProtoNet: also 95% in 10).
TARGETS = {
    "protonet": 0.98,
    "maml": 0.95,
    "mamlpp": 0.95,
    "metasgd": 0.95,
    "fomaml": 0.93,
    "reptile": 0.93,
    "anil": 0.93,
}
EARLY_TARGETS = {"protonet": (10.0, 0.95)}
ORDER = ["protonet", "mamlpp", "maml", "metasgd", "anil", "fomaml", "reptile"]


def curve_row(run_dir: str | Path, algorithm: str, name: str | None = None) -> dict[str, Any]:
    """A finished run's learning curve and final figure, as a row of the curves file."""
    path = Path(run_dir)
    run = load_run(path)  # fedmeta report's reader: one clear error for a missing or unreadable run
    summary = run.summary
    meta = [r for r in run.rows if r.get("phase") == "meta"]
    episode = summary["config"]["episode"]
    points = [[round(r["elapsed"] / 60, 2), round(r["unseen_accuracy"], 4)] for r in meta if "unseen_accuracy" in r]
    final = summary["results"]["meta"]["over_tasks"][-1]  # after the run's evaluation steps
    return {
        "run": name or path.name,
        "algorithm": algorithm,
        "split": summary["config"]["data"].get("split", "lake"),
        "curve_metric": f"unseen {episode['ways']}-way {episode['shots']}-shot accuracy",
        "points": points,
        "train_minutes": round(meta[-1]["elapsed"] / 60, 2) if meta else 0.0,
        "rounds": meta[-1]["round"] if meta else 0,
        "final_5w1s": round(final["mean"], 4) if (episode["ways"], episode["shots"]) == (5, 1) else None,
        "final_5w1s_ci95": round(final["ci95"], 4) if (episode["ways"], episode["shots"]) == (5, 1) else None,
        "source": str(path),
    }


def record(run_dir: str | Path, algorithm: str, path: Path = CURVES) -> None:
    """Append a finished run's curve to the curves file."""
    with open(path, "a") as f:
        f.write(json.dumps(curve_row(run_dir, algorithm)) + "\n")


def minutes_to(points: list[list[float]], level: float) -> float | None:
    """The training minutes of the first curve point at or above `level`; None if the curve never gets there."""
    return next((minutes for minutes, value in points if value >= level), None)


def load(path: Path = CURVES) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _target(row: dict[str, Any]) -> float | None:
    """A run's target: the early one when the run stopped within its minutes (ProtoNet's 95% in 10)."""
    early = EARLY_TARGETS.get(row["algorithm"])
    if early is not None and row["train_minutes"] <= early[0] + 0.5:
        return early[1]
    return TARGETS.get(row["algorithm"])


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| algorithm | run | training minutes | final 5w1s (95% CI) | target | met | curve reaches target at |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in sorted(rows, key=lambda r: ORDER.index(r["algorithm"]) if r["algorithm"] in ORDER else len(ORDER)):
        target, final, ci = _target(row), row.get("final_5w1s"), row.get("final_5w1s_ci95")
        five_way_curve = bool(row["points"]) and "5-way 1-shot" in row["curve_metric"]
        shown = "-" if final is None else f"{100 * final:.1f} +- {100 * ci:.1f}"
        goal, met, at = "-", "-", "-"
        if target is not None:
            goal = f"{100 * target:.0f}%"
            if target != TARGETS.get(row["algorithm"]):
                goal += f" by {EARLY_TARGETS[row['algorithm']][0]:.0f} min"
            if final is not None:
                met = "yes" if final >= target else f"no ({100 * (final - target):+.1f})"
            if five_way_curve:
                reached = minutes_to(row["points"], target)
                at = "never" if reached is None else f"{reached:.1f} min"
        cells = [row["algorithm"], row["run"], f"{row['train_minutes']:.1f}", shown, goal, met, at]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(rows: list[dict[str, Any]], out: Path) -> Path:
    algorithms = [a for a in ORDER if any(r["algorithm"] == a for r in rows)]
    columns, lines = 3, math.ceil(len(algorithms) / 3)
    fig, axes = plt.subplots(lines, columns, figsize=(12, 3.2 * lines), squeeze=False)
    for ax, algorithm in zip(axes.flat, algorithms, strict=False):
        for row in (r for r in rows if r["algorithm"] == algorithm):
            line = None
            if row["points"]:
                minutes, values = zip(*row["points"], strict=True)
                style = "o-" if "5-way 1-shot" in row["curve_metric"] else "o:"
                label = row["run"] + ("" if "5-way 1-shot" in row["curve_metric"] else " (20-way curve)")
                (line,) = ax.plot(minutes, [100 * v for v in values], style, markersize=3, label=label)
            if row.get("final_5w1s") is not None:
                ax.errorbar(
                    [row["train_minutes"]],
                    [100 * row["final_5w1s"]],
                    yerr=[100 * row["final_5w1s_ci95"]],
                    fmt="s",
                    color=line.get_color() if line else None,
                    capsize=3,
                    label=None if line else f"{row['run']} (final only)",
                )
        if algorithm in TARGETS:
            level = TARGETS[algorithm]
            ax.axhline(100 * level, color="k", linestyle="--", linewidth=1, label=f"target {100 * level:.0f}%")
        if algorithm in EARLY_TARGETS:
            minutes, level = EARLY_TARGETS[algorithm]
            label = f"{100 * level:.0f}% by {minutes:.0f} min"
            ax.plot([0, minutes], [100 * level] * 2, color="grey", linestyle="--", linewidth=1, label=label)
        ax.set_xlim(0, 62)
        ax.set_title(algorithm)
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.set_ylabel("unseen alphabets, accuracy (%)")
        entries = len(ax.get_legend_handles_labels()[1])
        # A panel of many runs (ProtoNet's) takes its legend in two columns, so that it leaves the curves visible.
        ax.legend(fontsize="xx-small" if entries > 8 else "x-small", loc="lower right", ncol=2 if entries > 8 else 1)
    for ax in list(axes.flat)[len(algorithms) :]:
        ax.set_visible(False)
    fig.suptitle("Omniglot, unseen alphabets: learning curves (lines) and final 5-way 1-shot (squares, 95% CI)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--curves", type=Path, default=CURVES)
    parser.add_argument("--add", nargs="*", default=[], metavar="RUN_DIR", help="append these finished runs first")
    parser.add_argument("--algorithm", help="the algorithm of the runs given to --add (the preset's key, e.g. mamlpp)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/time_to_accuracy.png"))
    args = parser.parse_args()
    if args.add and not args.algorithm:
        parser.error("--add needs --algorithm")
    for run_dir in args.add:
        record(run_dir, args.algorithm, args.curves)
    rows = load(args.curves)
    if not rows:
        parser.error(f"{args.curves}: no curves recorded yet (run benchmarks/omniglot_accuracy.py first)")
    print(table(rows))
    print(f"figure: {figure(rows, args.out)}")


if __name__ == "__main__":
    main()
