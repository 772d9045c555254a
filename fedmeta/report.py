"""Plots and a short markdown page from run directories (`fedmeta report RUN_DIR ...`).

Every figure is built from the files a run writes - `metrics.jsonl` (one row per round, the unseen-client
learning curve every `eval.curve_every` rounds) and `summary.json` (the personalisation curves: the metric
after k adaptation steps, mean and 95% CI over tasks, for every model) - and nothing else:

- training.png: the training clients' query metric and loss per round, every run;
- learning_curve.png: the unseen-client metric over training minutes, every run that scored one;
- personalisation.png: metric after k steps with 95% CI bands, every model of every run;
- privacy_utility.png: the final personalised metric against epsilon, when the runs spent different epsilons
  (a non-private run is drawn at the right edge, labelled "no DP").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


class ReportError(ValueError):
    """A run directory cannot be reported on (missing or unreadable files)."""


@dataclass(frozen=True)
class Run:
    label: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def metric(self) -> str:
        return next(iter(self.summary["results"].values()))["metric"]

    @property
    def epsilon(self) -> float | None:
        """The meta-learning run's epsilon; None without DP (infinite privacy loss is null in strict JSON)."""
        privacy = self.summary.get("privacy")
        if not privacy:
            return None
        epsilon = privacy.get("epsilon")
        return float(epsilon) if epsilon is not None else math.inf


def load_run(directory: str | Path) -> Run:
    path = Path(directory)
    summary_path, metrics_path = path / "summary.json", path / "metrics.jsonl"
    for needed in (summary_path, metrics_path):
        if not needed.is_file():
            raise ReportError(f"{needed} not found: is {path} a finished fedmeta run directory?")
    try:
        summary = json.loads(summary_path.read_text())
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        raise ReportError(f"cannot read the run in {path}: {error}") from None
    if not isinstance(summary, dict) or "results" not in summary:
        raise ReportError(f"{summary_path} has no 'results': not a fedmeta summary")
    return Run(path.name or str(path), rows, summary)


def _num(value: float | None) -> float:
    """A figure from strict JSON, where a non-finite value (a diverged loss) was written as null: NaN, a gap."""
    return math.nan if value is None else float(value)


def _percent(run: Run) -> float:
    return 100.0 if run.metric == "accuracy" else 1.0


def _axis_label(run: Run) -> str:
    return f"{run.metric} (%)" if run.metric == "accuracy" else run.metric


def _legend(ax: Axes) -> None:
    """Inside the axes for a few entries; beside them, in a column, for more (a legend over many curves would
    hide them), with 20 distinct colours once 10 run out."""
    lines = ax.get_lines()
    if len(lines) > 10:
        palette = plt.get_cmap("tab20").colors
        for i, line in enumerate(lines):
            line.set_color(palette[i % len(palette)])
        for i, band in enumerate(c for c in ax.collections if isinstance(c, PolyCollection)):
            band.set_color(palette[i % len(palette)])
    if len(lines) <= 4:
        ax.legend()
    else:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")


def training_figure(runs: list[Run]) -> Figure:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for run in runs:
        meta = [r for r in run.rows if r.get("phase") == "meta"]
        rounds = [r["round"] for r in meta]
        key = f"query_{run.metric}"
        top.plot(rounds, [_num(r.get(key)) * _percent(run) for r in meta], label=run.label)
        bottom.plot(rounds, [_num(r.get("query_loss")) for r in meta], label=run.label)
    top.set_ylabel(f"training query {_axis_label(runs[0])}")
    bottom.set_ylabel("training query loss")
    bottom.set_xlabel("round")
    _legend(top)
    fig.suptitle("Training clients, per round")
    return fig


def learning_curve_figure(runs: list[Run]) -> Figure | None:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for run in runs:
        key = f"unseen_{run.metric}"
        points = [r for r in run.rows if r.get("phase") == "meta" and key in r]
        if points:
            ax.plot(
                [r["elapsed"] / 60 for r in points],
                [_num(r[key]) * _percent(run) for r in points],
                "o-",
                label=run.label,
            )
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training minutes")
    ax.set_ylabel(f"unseen clients, {_axis_label(runs[0])}")
    ax.set_title("Unseen-client learning curve")
    _legend(ax)
    return fig


def personalisation_figure(runs: list[Run]) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        scale = _percent(run)
        for name, result in run.summary["results"].items():
            steps = result["steps"]
            mean = [_num(s["mean"]) * scale for s in result["over_tasks"]]
            half = [_num(s["ci95"]) * scale for s in result["over_tasks"]]
            label = name if len(runs) == 1 else f"{run.label}: {name}"
            (line,) = ax.plot(steps, mean, "o-", label=label)
            low = [m - h for m, h in zip(mean, half, strict=True)]
            high = [m + h for m, h in zip(mean, half, strict=True)]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("adaptation steps k on the unseen client's support set")
    ax.set_ylabel(_axis_label(runs[0]))
    ax.set_title(f"Personalisation on {runs[0].summary['unseen_clients']} unseen clients (mean, 95% CI)")
    _legend(ax)
    return fig


def privacy_utility_figure(runs: list[Run]) -> Figure | None:
    """Final meta-model metric (at the last evaluated step) against epsilon; None unless epsilons differ."""
    if len({run.epsilon for run in runs}) < 2:
        return None
    finite = [run.epsilon for run in runs if run.epsilon is not None and math.isfinite(run.epsilon)]
    edge = max(finite) * 2 if finite else 1.0  # where a run without DP (or an infinite epsilon) is drawn
    points = sorted(
        ((run.epsilon if run.epsilon is not None and math.isfinite(run.epsilon) else edge, run) for run in runs),
        key=lambda point: point[0],
    )
    finals = [run.summary["results"]["meta"]["over_tasks"][-1] for _, run in points]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(
        [x for x, _ in points],
        [_num(f["mean"]) * _percent(run) for f, (_, run) in zip(finals, points, strict=True)],
        yerr=[_num(f["ci95"]) * _percent(run) for f, (_, run) in zip(finals, points, strict=True)],
        fmt="o-",
        capsize=3,
    )
    ax.set_xscale("log")
    no_dp = any(run.epsilon is None for run in runs)
    ax.set_xlabel("epsilon (the rightmost point: no DP)" if no_dp else "epsilon")
    ax.set_ylabel(f"meta-model after {runs[0].summary['results']['meta']['steps'][-1]} steps")
    ax.set_title("Privacy and utility")
    return fig


def build_figures(runs: list[Run]) -> dict[str, Figure]:
    figures: dict[str, Figure | None] = {
        "training": training_figure(runs),
        "learning_curve": learning_curve_figure(runs),
        "personalisation": personalisation_figure(runs),
        "privacy_utility": privacy_utility_figure(runs),
    }
    return {name: fig for name, fig in figures.items() if fig is not None}


def write_personalisation_plot(summary: dict[str, Any], path: Path) -> Path:
    """The personalisation plot of one run's summary (what `fedmeta simulate` writes at the end)."""
    fig = personalisation_figure([Run(path.parent.name, [], summary)])
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(directories: list[str | Path], out: str | Path) -> Path:
    """PNG plots and report.md in `out`; returns the markdown page's path."""
    if not directories:
        raise ReportError("give at least one run directory")
    runs = [load_run(d) for d in directories]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = build_figures(runs)
    for name, fig in figures.items():
        fig.savefig(out_dir / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    lines = ["# fedmeta report", ""]
    lines += [
        "| run | algorithm | rounds | training minutes | model | " + "k=0 | k=last |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        scale = _percent(run)
        minutes = (run.summary.get("meta_train_seconds") or 0) / 60
        for name, result in run.summary["results"].items():
            first, last = result["over_tasks"][0], result["over_tasks"][-1]
            lines.append(
                f"| {run.label} | {run.summary['config']['algorithm']} | {run.summary['rounds']} | {minutes:.1f} | "
                f"{name} | {_num(first['mean']) * scale:.4g} +- {_num(first['ci95']) * scale:.2g} | "
                f"{_num(last['mean']) * scale:.4g} +- {_num(last['ci95']) * scale:.2g} (k={result['steps'][-1]}) |"
            )
    lines.append("")
    for name in figures:
        lines += [f"![{name}]({name}.png)", ""]
    page = out_dir / "report.md"
    page.write_text("\n".join(lines))
    return page
