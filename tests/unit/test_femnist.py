"""FEMNIST in LEAF's format (issue #14): writers as clients, held-out writers, FedMeta's client tasks, and one
clear error for each kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmeta.config import ConfigError, RunConfig
from fedmeta.tasks.base import DataError, support_count
from fedmeta.tasks.femnist import CLASSES, femnist_federation


def _leaf_file(path: Path, writers: dict[str, tuple[int, int]], seed: int) -> dict[str, tuple[list, list]]:
    """A LEAF JSON file: {writer: (samples, first label)}; returns what it wrote."""
    rng = np.random.default_rng(seed)
    data = {}
    for user, (count, first) in writers.items():
        x = rng.random((count, 784)).round(3).tolist()
        y = [(first + i) % CLASSES for i in range(count)]
        data[user] = (x, y)
    content = {
        "users": list(writers),
        "num_samples": [n for n, _ in writers.values()],
        "user_data": {u: {"x": x, "y": y} for u, (x, y) in data.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return data


@pytest.fixture
def leaf(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "femnist" / "leaf_niid_sf005"
    train = _leaf_file(root / "train" / "a.json", {"w1": (12, 0), "w2": (9, 5), "w3": (3, 7)}, seed=1)
    train |= _leaf_file(root / "train" / "b.json", {"w4": (10, 20), "w5": (11, 40), "w6": (8, 60)}, seed=2)
    test = _leaf_file(root / "test" / "a.json", {"w1": (3, 1), "w2": (2, 6), "w3": (1, 8)}, seed=3)
    test |= _leaf_file(root / "test" / "b.json", {"w4": (2, 21), "w5": (3, 41), "w6": (2, 61)}, seed=4)
    return tmp_path, {"train": train, "test": test}


def test_writers_pool_train_and_test_and_small_writers_are_left_out(leaf) -> None:
    root, written = leaf
    fed = femnist_federation(root, num_unseen_clients=2, min_samples=10, seed=0)

    clients = [*fed.train_clients, *fed.unseen_clients]
    assert sorted(c.client_id for c in clients) == ["w1", "w2", "w4", "w5", "w6"]  # w3 has 4 samples
    assert len(fed.unseen_clients) == 2 and fed.num_global_outputs == CLASSES
    for client in clients:
        x = np.array(written["train"][client.client_id][0] + written["test"][client.client_id][0], np.float32)
        y = written["train"][client.client_id][1] + written["test"][client.client_id][1]
        assert client.x.shape == (len(y), 1, 28, 28)
        np.testing.assert_array_equal(client.x.view(len(y), -1).numpy(), 1.0 - x)  # ink = 1
        assert client.y.tolist() == y
    again = femnist_federation(root, num_unseen_clients=2, min_samples=10, seed=0)
    assert [c.client_id for c in again.unseen_clients] == [c.client_id for c in fed.unseen_clients]


def test_a_client_task_splits_the_writers_own_data(leaf) -> None:
    root, _ = leaf
    writer = femnist_federation(root, num_unseen_clients=1, min_samples=10, seed=0).train_clients[0]

    task = writer.sample_split(np.random.default_rng(3), 0.25)

    n = len(writer)
    assert len(task.support_y) == support_count(n, 0.25) == round(n * 0.25)
    assert len(task.query_y) == n - len(task.support_y)
    x = torch.cat([task.support_x, task.query_x])
    y = torch.cat([task.support_y, task.query_y])
    pairs = sorted((float(a.sum()), int(b)) for a, b in zip(x, y, strict=True))
    assert pairs == sorted((float(a.sum()), int(b)) for a, b in zip(writer.x, writer.y, strict=True))  # a partition
    assert torch.equal(writer.sample_split(np.random.default_rng(3), 0.25).support_y, task.support_y)
    assert len(writer.sample_split(np.random.default_rng(3), 4).support_y) == 4  # a count
    with pytest.raises(DataError, match=f"writer {writer.client_id} has {n} samples; a support part of {n}"):
        writer.sample_split(np.random.default_rng(3), n)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "train" / "a.json").write_text("{not json"), r"a\.json is not readable LEAF JSON"),
        (lambda root: (root / "train" / "a.json").write_text('{"users": ["w1"]}'), r"a\.json is not in LEAF's format"),
        (
            lambda root: (root / "train" / "a.json").write_text(
                json.dumps({"users": ["w1"], "user_data": {"w1": {"x": [[0.5] * 10], "y": [1]}}})
            ),
            r"writer w1 .*expected 1 images of 784 pixels, got an array of shape \(1, 10\)",
        ),
        (
            lambda root: (root / "train" / "a.json").write_text(
                json.dumps({"users": ["w1"], "user_data": {"w1": {"x": [[0.5] * 784], "y": [99]}}})
            ),
            r"writer w1 .*labels must be in 0\.\.61",
        ),
        (lambda root: [p.unlink() for p in (root / "test").glob("*.json")], r"no LEAF \.json files in .*test"),
    ],
    ids=["malformed-json", "missing-key", "wrong-pixels", "bad-label", "no-files"],
)
def test_bad_leaf_files_get_one_clear_error(leaf, damage, message: str) -> None:
    root, _ = leaf
    damage(root / "femnist" / "leaf_niid_sf005")
    with pytest.raises(DataError, match=message):
        femnist_federation(root, num_unseen_clients=1, min_samples=1, seed=0)


def test_missing_data_and_too_few_writers_are_clear_errors(leaf, tmp_path: Path) -> None:
    root, _ = leaf
    with pytest.raises(DataError, match=r"FEMNIST directory not found: .*LEAF"):
        femnist_federation(tmp_path / "nowhere", num_unseen_clients=1, min_samples=1, seed=0)
    with pytest.raises(DataError, match="writers with at least 10 samples: 5 clients; 5 unseen ones would leave none"):
        femnist_federation(root, num_unseen_clients=5, min_samples=10, seed=0)


def test_client_tasks_are_for_natural_federations_and_adapting_methods() -> None:
    with pytest.raises(ConfigError, match="client_tasks needs a naturally partitioned dataset"):
        RunConfig().replace(**{"data.dataset": "omniglot", "episode.client_tasks": True})
    with pytest.raises(ConfigError, match="global labels: one of .* not 'protonet'"):
        RunConfig().replace(**{"algorithm": "protonet", "data.dataset": "femnist", "episode.client_tasks": True})
    with pytest.raises(ConfigError, match="support must be a fraction below 1 or a whole count, got 2.5"):
        RunConfig().replace(**{"episode.support": 2.5})
