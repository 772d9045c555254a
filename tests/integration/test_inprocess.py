"""The in-process federation end to end: determinism, files a user can plot, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import RunConfig
from fedmeta.metrics import read_jsonl
from simulations.cli import load_preset, main
from simulations.inprocess import simulate

SMALL = {
    "federation.rounds": 6,
    "federation.clients_per_round": 3,
    "federation.tasks_per_client": 2,
    "data.num_train_clients": 8,
    "data.num_unseen_clients": 3,
    "eval.eval_clients": 3,
    "eval.eval_tasks_per_client": 4,
    "inner.eval_steps": 3,
    "eval.fedavg_rounds": 3,
}


def small_config(**overrides) -> RunConfig:
    return RunConfig.from_dict(load_preset("sinusoid-reptile")).replace(**{**SMALL, **overrides})


@pytest.mark.parametrize("algorithm", ["reptile", "maml", "fomaml", "metasgd", "anil"])
def test_same_seed_gives_bit_identical_meta_parameters(tmp_path: Path, algorithm: str) -> None:
    config = small_config(algorithm=algorithm, **{"eval.fedavg_rounds": 0})
    simulate(config, tmp_path / "a", progress=False)
    simulate(config, tmp_path / "b", progress=False)
    simulate(config.replace(**{"federation.seed": 1}), tmp_path / "c", progress=False)

    a, b, c = (load_checkpoint(tmp_path / n / "checkpoint.pt")[1].params for n in "abc")

    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_simulate_writes_metrics_summary_and_checkpoint(tmp_path: Path) -> None:
    summary = simulate(small_config(**{"eval.curve_every": 2}), tmp_path, progress=False)

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    meta = [r for r in rows if r["phase"] == "meta"]
    assert [r["round"] for r in meta] == [1, 2, 3, 4, 5, 6]
    assert all(r["clients"] == 3 and r["tasks"] == 6 for r in meta)
    assert [r["round"] for r in meta if "unseen_mse" in r] == [2, 4, 6]
    assert len([r for r in rows if r["phase"] == "fedavg"]) == 3
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["results"].keys() == {"meta", "random_init", "fedavg"} == summary["results"].keys()
    curve = on_disk["results"]["meta"]["over_tasks"]
    assert len(curve) == 4 and curve[0]["n"] == 3 * 4
    assert load_checkpoint(tmp_path / "checkpoint.pt")[1].round == 6


def test_baselines_are_scored_on_the_very_same_tasks(tmp_path: Path) -> None:
    # With zero rounds of training the meta-model *is* the random init: identical curves prove same tasks.
    config = small_config(**{"federation.rounds": 1, "outer.outer_lr": 1e-12, "eval.fedavg_rounds": 0})
    summary = simulate(config, tmp_path, progress=False)
    meta, rand = summary["results"]["meta"]["over_tasks"], summary["results"]["random_init"]["over_tasks"]
    for m, r in zip(meta, rand, strict=True):
        assert m["mean"] == pytest.approx(r["mean"], rel=1e-4)


def test_meta_model_personalises_better_than_its_random_start(tmp_path: Path) -> None:
    # A short run: the meta-model must already fit unseen clients' tasks far better after adaptation than the
    # same architecture from its random start, and adaptation must help it. (That it also beats FedAvg at
    # the default run length is shown by `fedmeta simulate` and recorded in benchmarks/RESULTS.md.)
    config = small_config(
        **{
            "federation.rounds": 100,
            "federation.clients_per_round": 5,
            "data.num_train_clients": 40,
            "data.num_unseen_clients": 10,
            "eval.eval_clients": 10,
            "eval.eval_tasks_per_client": 10,
            "inner.eval_steps": 5,
            "eval.fedavg_rounds": 0,
        }
    )
    results = simulate(config, tmp_path, progress=False)["results"]
    meta, rand = results["meta"]["over_tasks"], results["random_init"]["over_tasks"]
    assert meta[5]["mean"] < 0.6 * rand[5]["mean"], (meta, rand)
    assert meta[5]["mean"] < meta[0]["mean"], meta


def test_cli_simulate_then_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "simulate",
            "--algorithm",
            "maml",
            "--rounds",
            "3",
            "--clients-per-round",
            "2",
            "--num-train-clients",
            "4",
            "--num-unseen-clients",
            "2",
            "--eval-clients",
            "2",
            "--eval-tasks",
            "2",
            "--eval-steps",
            "2",
            "--fedavg-rounds",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "Personalised mse on 2 unseen clients" in printed
    assert all(name in printed for name in ("meta", "random_init", "fedavg"))

    code = main(["evaluate", str(out / "checkpoint.pt"), "--out", str(tmp_path / "again"), "--no-progress"])
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    first = json.loads((out / "summary.json").read_text())
    assert code == 0
    assert again["results"]["meta"]["over_tasks"] == first["results"]["meta"]["over_tasks"]
    assert again["results"]["fedavg"]["over_tasks"] == first["results"]["fedavg"]["over_tasks"]


def test_evaluate_adapts_at_another_inner_rate_where_the_rate_is_fixed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedmeta evaluate --inner-lr` re-runs the same evaluation with adaptation stepping at the given rate: the
    unadapted metric is unchanged, and a rate too small to move the weights leaves every step's metric where it
    started. Models whose rates are learned (Meta-SGD) refuse it in one line: a rate would mean nothing there."""
    run = tmp_path / "run"
    simulate(small_config(algorithm="maml", **{"eval.fedavg_rounds": 0}), run, progress=False)
    args = ["--eval-steps", "3", "--no-progress"]
    still_out = ["--inner-lr", "1e-12", "--out", str(tmp_path / "still")]
    assert main(["evaluate", str(run / "checkpoint.pt"), *still_out, *args]) == 0

    trained = json.loads((run / "summary.json").read_text())
    still = json.loads((tmp_path / "still" / "summary.json").read_text())
    assert still["config"]["inner"]["inner_lr"] == 1e-12 and trained["config"]["inner"]["inner_lr"] == 0.02
    moved, frozen = ([s["mean"] for s in summary["results"]["meta"]["over_tasks"]] for summary in (trained, still))
    assert frozen[0] == moved[0]  # before any step: the same tasks, the same model
    assert frozen == pytest.approx([frozen[0]] * 4, rel=1e-6)
    assert moved[3] < moved[0]  # at the trained rate, three steps lower the MSE

    metasgd = tmp_path / "metasgd"
    simulate(small_config(algorithm="metasgd", **{"eval.fedavg_rounds": 0}), metasgd, progress=False)
    capsys.readouterr()
    assert main(["evaluate", str(metasgd / "checkpoint.pt"), "--inner-lr", "0.1", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fedmeta: error: --inner-lr does not apply to this metasgd model: its inner learning rates are learned "
        "meta-parameters, saved in the checkpoint"
    ]
    assert main(["evaluate", str(metasgd / "checkpoint.pt"), "--inner-lr", "-1", *args]) == 2
    assert "inner_lr" in capsys.readouterr().err


@pytest.mark.parametrize("algorithm", ["protonet", "maml", "anil"])
def test_classification_pipeline_on_a_tiny_omniglot(tmp_path: Path, algorithm: str) -> None:
    from tests.unit.test_tasks import _write_zip

    (tmp_path / "data" / "omniglot").mkdir(parents=True)
    _write_zip(tmp_path / "data" / "omniglot" / "images_background.zip", "background", {"Alpha": 2, "Beta": 2})
    _write_zip(tmp_path / "data" / "omniglot" / "images_evaluation.zip", "evaluation", {"Gamma": 2}, start_id=5)
    config = RunConfig().replace(
        **{
            "algorithm": algorithm,
            "data.dataset": "omniglot",
            "data.data_dir": str(tmp_path / "data"),
            "episode.ways": 3,
            "episode.shots": 1,
            "episode.queries": 2,
            "inner.inner_steps": 1,
            "inner.inner_lr": 0.1,
            "inner.eval_steps": 2,
            "federation.rounds": 2,
            "federation.clients_per_round": 2,
            "federation.tasks_per_client": 1,
            "eval.eval_clients": 1,
            "eval.eval_tasks_per_client": 2,
            "eval.fedavg_rounds": 2,
            "eval.fedavg_batch": 4,
            "eval.fedavg_local_steps": 1,
        }
    )

    summary = simulate(config, tmp_path / "run", progress=False)

    results = summary["results"]
    assert results.keys() == {"meta", "random_init", "fedavg"}
    assert all(0.0 <= s["mean"] <= 1.0 for r in results.values() for s in r["over_tasks"])
    assert results["meta"]["metric"] == "accuracy" and len(results["meta"]["over_tasks"]) == 3
    # The FedAvg model spans 4 characters x 4 rotations = 16 global classes; its transferred head is 3-way.
    _, _, baselines = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    if algorithm != "protonet":
        assert baselines["fedavg"]["head.weight"].shape[0] == 3


def test_a_lake_model_is_scored_on_the_vinyals_test_characters_and_never_the_reverse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedmeta evaluate --split vinyals` gives the papers' figure for a model trained on the Lake split: sound
    because the Vinyals test characters all come from evaluation alphabets, which Lake training never sees. A
    Vinyals-trained model has seen evaluation alphabets, so scoring it on the Lake split is refused."""
    from tests.unit.test_tasks import _write_zip, write_vinyals_lists

    data = tmp_path / "data"
    (data / "omniglot").mkdir(parents=True)
    _write_zip(data / "omniglot" / "images_background.zip", "background", {"Alpha": 2, "Beta": 2})
    _write_zip(data / "omniglot" / "images_evaluation.zip", "evaluation", {"Gamma": 3}, start_id=5)
    train = ("Alpha/character01", "Alpha/character02", "Beta/character01", "Beta/character02", "Gamma/character01")
    write_vinyals_lists(data, test=("Gamma/character02", "Gamma/character03"), train=train)
    common = ["--algorithm", "protonet", "--dataset", "omniglot", "--data-dir", str(data), "--ways", "3"]
    common += ["--shots", "1", "--queries", "2", "--rounds", "2", "--clients-per-round", "2", "--tasks-per-client", "1"]
    common += ["--eval-clients", "3", "--eval-tasks", "2", "--fedavg-rounds", "0", "--no-progress"]

    assert main(["simulate", *common, "--out", str(tmp_path / "lake")]) == 0
    assert main(["simulate", *common, "--split", "vinyals", "--out", str(tmp_path / "vinyals")]) == 0
    capsys.readouterr()
    again = tmp_path / "lake-on-vinyals"
    args = ["--split", "vinyals", "--eval-tasks", "4", "--out", str(again), "--no-progress"]
    assert main(["evaluate", str(tmp_path / "lake" / "checkpoint.pt"), *args]) == 0

    summary = json.loads((again / "summary.json").read_text())
    trained = json.loads((tmp_path / "lake" / "summary.json").read_text())
    assert summary["config"]["data"]["split"] == "vinyals" and summary["unseen_clients"] == 1
    assert summary["rounds"] == trained["rounds"] == 2
    assert summary["results"]["meta"]["over_tasks"][0]["n"] == 4  # 1 test client x 4 tasks
    assert summary["results"]["meta"]["over_tasks"] != trained["results"]["meta"]["over_tasks"]

    capsys.readouterr()
    code = main(["evaluate", str(tmp_path / "vinyals" / "checkpoint.pt"), "--split", "lake", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "trained on the 'vinyals' split, whose training clients hold 1 of the characters the 'lake' split" in err[0]
    assert "e.g. Gamma/character01" in err[0] and err[0].endswith("evaluate it with --split vinyals")


def test_a_second_run_into_the_same_directory_replaces_the_metrics(tmp_path: Path) -> None:
    simulate(small_config(**{"eval.fedavg_rounds": 0}), tmp_path, progress=False)
    simulate(small_config(**{"eval.fedavg_rounds": 0, "federation.rounds": 2}), tmp_path, progress=False)
    assert [r["round"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["phase"] == "meta"] == [1, 2]


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd", "reptile", "perfedavg-hf"])
def test_client_tasks_on_a_tiny_leaf_femnist(tmp_path: Path, algorithm: str) -> None:
    """FedMeta's formulation: each task is a writer's own data split into support and query over the 62
    global labels; the FedAvg baseline is evaluated whole (its head already spans those labels)."""
    from tests.unit.test_femnist import _leaf_file

    root = tmp_path / "data" / "femnist" / "leaf_niid_sf005"
    writers = {f"w{i}": (10 + i, 3 * i) for i in range(6)}
    _leaf_file(root / "train" / "all.json", writers, seed=1)
    _leaf_file(root / "test" / "all.json", {w: (3, first + 1) for w, (_, first) in writers.items()}, seed=2)
    config = RunConfig().replace(
        **{
            "algorithm": algorithm,
            "data.dataset": "femnist",
            "data.data_dir": str(tmp_path / "data"),
            "data.num_unseen_clients": 2,
            "episode.client_tasks": True,
            "episode.support": 0.25,
            "inner.inner_steps": 1,
            "inner.inner_lr": 0.1,
            "inner.eval_steps": 2,
            "federation.rounds": 2,
            "federation.clients_per_round": 2,
            "federation.tasks_per_client": 2,
            "eval.eval_clients": 2,
            "eval.eval_tasks_per_client": 2,
            "eval.fedavg_rounds": 2,
            "eval.fedavg_batch": 4,
            "eval.curve_every": 1,
        }
    )

    summary = simulate(config, tmp_path / "run", progress=False)

    _, state, baselines = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state.params["head.weight"].shape[0] == 62  # the global label space, not ways
    assert summary["results"].keys() == {"meta", "random_init", "fedavg"}
    assert all(0.0 <= s["mean"] <= 1.0 for r in summary["results"].values() for s in r["over_tasks"])
    assert summary["results"]["meta"]["over_tasks"][0]["n"] == 4  # 2 unseen writers x 2 splits
    fedavg = baselines["fedavg"]
    assert not torch.equal(fedavg["head.weight"], state.params["head.weight"])
    # Evaluating the same checkpoint again draws the same splits: the same figures.
    again = simulate(config, tmp_path / "again", progress=False)
    assert again["results"] == summary["results"]
