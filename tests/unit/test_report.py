"""`fedmeta report` and the plot every simulate run writes (issue #14): files are produced, and the figures hold
the data points of summary.json and metrics.jsonl (checked on the figure objects, not on pixels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmeta.report import ReportError, build_figures, load_run, write_report
from simulations.cli import main
from simulations.inprocess import simulate
from tests.flower_fakes import small

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small sinusoid runs: no DP, and central DP at two noise levels (two different epsilons)."""
    root = tmp_path_factory.mktemp("runs")
    common = {"eval.fedavg_rounds": 2, "eval.curve_every": 1}
    configs = {
        "plain": small(**common),
        "dp-1": small(**common, **{"privacy.mode": "central", "privacy.noise_multiplier": 1.0}),
        "dp-4": small(**common, **{"privacy.mode": "central", "privacy.noise_multiplier": 4.0}),
    }
    for name, config in configs.items():
        simulate(config, root / name, progress=False)
    return [root / name for name in configs]


def test_the_figures_hold_the_runs_data(runs: list[Path]) -> None:
    loaded = [load_run(d) for d in runs]

    figures = build_figures(loaded)

    assert set(figures) == {"training", "learning_curve", "personalisation", "privacy_utility"}
    lines = figures["personalisation"].axes[0].lines
    assert len(lines) == 3 * 3  # meta, random_init, fedavg of each run
    for line, (run, name) in zip(lines, [(r, n) for r in loaded for n in r.summary["results"]], strict=True):
        result = run.summary["results"][name]
        np.testing.assert_allclose(line.get_xdata(), result["steps"])
        expected = [np.nan if s["mean"] is None else s["mean"] for s in result["over_tasks"]]
        np.testing.assert_allclose(line.get_ydata(), expected)  # mse: no scaling; null (diverged) is a gap
    curve = figures["learning_curve"].axes[0].lines[0]
    rows = [r for r in loaded[0].rows if "unseen_mse" in r]
    np.testing.assert_allclose(curve.get_ydata(), [r["unseen_mse"] for r in rows])
    np.testing.assert_allclose(curve.get_xdata(), [r["elapsed"] / 60 for r in rows])
    privacy = figures["privacy_utility"].axes[0].lines[0]
    epsilons = sorted(r.summary["privacy"]["epsilon"] for r in loaded[1:])
    assert list(privacy.get_xdata()[:2]) == epsilons and privacy.get_xdata()[2] > epsilons[-1]  # no DP at the edge


def test_report_writes_pngs_and_a_page_and_simulate_writes_its_plot(runs: list[Path], tmp_path: Path, capsys) -> None:
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.md").read_text()
    for name in ("training", "learning_curve", "personalisation", "privacy_utility"):
        assert (tmp_path / "report" / f"{name}.png").read_bytes().startswith(PNG)
        assert f"]({name}.png)" in page
    assert page.count("| plain |") == 3  # one table row per model
    assert (runs[0] / "personalisation.png").exists() is False  # simulate() itself writes no plot; the CLI does
    out = tmp_path / "cli-run"
    assert main(["simulate", "--rounds", "2", "--fedavg-rounds", "0", "--no-progress", "--out", str(out)]) == 0
    assert f"plot: {out / 'personalisation.png'}" in capsys.readouterr().out
    assert (out / "personalisation.png").read_bytes().startswith(PNG)


def test_a_directory_that_is_not_a_run_is_one_clear_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(ReportError, match="summary.json not found"):
        write_report([tmp_path], tmp_path / "out")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmeta: error: ") and "summary.json not found" in err and len(err.splitlines()) == 1
