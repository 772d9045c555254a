"""Task families and partitions: determinism, non-IID windows, Omniglot decoding, caching and errors."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmeta.config import ConfigError, RunConfig
from fedmeta.experiment import Experiment, build_run_algorithm
from fedmeta.sampling import local_tasks, sample_clients
from fedmeta.tasks import DataError, task_rng
from fedmeta.tasks import omniglot as om
from fedmeta.tasks.base import counter_uniforms
from fedmeta.tasks.sinusoid import AMPLITUDE, PHASE, sinusoid_federation
from tests.conftest import record_training_tasks


def test_sinusoid_tasks_are_deterministic_from_the_seed_and_respect_the_client_window() -> None:
    fed = sinusoid_federation(num_train_clients=4, num_unseen_clients=2, window=0.2, seed=0)
    client = fed.train_clients[1]

    a = client.sample_task(task_rng(0, "train", 3, 1), ways=1, shots=5, queries=7)
    b = client.sample_task(task_rng(0, "train", 3, 1), ways=1, shots=5, queries=7)
    c = client.sample_task(task_rng(0, "train", 4, 1), ways=1, shots=5, queries=7)

    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(a.support_x, c.support_x)
    assert a.support_x.shape == (5, 1) and a.query_y.shape == (7, 1)
    assert float(a.support_x.abs().max()) <= 5.0
    # y = A sin(x - phase): recover A and phase by least squares on sin/cos features and check the window.
    x, y = (
        torch.cat([a.support_x, a.query_x]).double().numpy()[:, 0],
        torch.cat([a.support_y, a.query_y]).double().numpy()[:, 0],
    )
    coef, *_ = np.linalg.lstsq(np.stack([np.sin(x), np.cos(x)], axis=1), y, rcond=None)
    amplitude, phase = np.hypot(*coef), np.arctan2(-coef[1], coef[0])
    assert client.amplitude[0] - 1e-4 <= amplitude <= client.amplitude[1] + 1e-4
    assert client.phase[0] - 1e-4 <= phase <= client.phase[1] + 1e-4


def _fit_sine(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(A, phase) of y = A sin(x - phase), by least squares on sin/cos features."""
    xs, ys = x.double().numpy()[:, 0], y.double().numpy()[:, 0]
    coef, *_ = np.linalg.lstsq(np.stack([np.sin(xs), np.cos(xs)], axis=1), ys, rcond=None)
    return float(np.hypot(*coef)), float(np.arctan2(-coef[1], coef[0]))


def test_counter_uniforms_are_a_function_of_their_indices_alone() -> None:
    cohort = counter_uniforms(7, "train", [3, np.arange(20_000)], 6)
    alone = counter_uniforms(7, "train", [3, 517], 6)

    assert cohort.shape == (20_000, 6) and np.array_equal(alone[0], cohort[517])
    assert not np.array_equal(counter_uniforms(7, "eval", [3, 517], 6), alone)  # streams apart
    assert not np.array_equal(counter_uniforms(8, "train", [3, 517], 6), alone)  # seeds apart
    assert not np.array_equal(counter_uniforms(7, "train", [4, 517], 6), alone)  # rounds apart
    assert cohort.min() >= 0 and cohort.max() < 1
    # Uniform: mean and variance of 120,000 draws within 5 standard errors of 1/2 and 1/12; no lag correlation.
    assert abs(cohort.mean() - 0.5) < 5 * (1 / 12 / cohort.size) ** 0.5
    assert abs(cohort.var() - 1 / 12) < 5 * (1 / 180 / cohort.size) ** 0.5
    assert abs(np.corrcoef(cohort[:-1, 0], cohort[1:, 0])[0, 1]) < 5 / len(cohort) ** 0.5
    assert abs(np.corrcoef(cohort[:, 0], cohort[:, 1])[0, 1]) < 5 / len(cohort) ** 0.5


def test_a_sinusoid_clients_training_tasks_are_the_same_alone_or_in_a_cohort() -> None:
    fed = sinusoid_federation(num_train_clients=1_000_000, num_unseen_clients=2, window=0.2, seed=0)
    cohort = [5, 17, 999_999]

    ids, tasks = fed.cohort_episodes(0, "train", 3, cohort, 2, 5, 7)
    _, alone = fed.cohort_episodes(0, "train", 3, [17], 2, 5, 7)
    _, later = fed.cohort_episodes(0, "train", 4, [17], 2, 5, 7)

    assert ids == ["train-5", "train-17", "train-999999"] == [fed.train_clients[c].client_id for c in cohort]
    assert [len(t) for t in tasks] == [2, 2, 2]
    for a, b in zip(tasks[1], alone[0], strict=True):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("support_x", "support_y", "query_x", "query_y"))
    assert not torch.equal(tasks[1][0].support_x, tasks[1][1].support_x)  # two tasks, two draws
    assert not torch.equal(alone[0][0].support_x, later[0][0].support_x)  # another round, another draw
    for c, client_tasks in zip(cohort, tasks, strict=True):
        client = fed.train_clients[c]
        for task in client_tasks:
            assert task.support_x.shape == (5, 1) and task.query_y.shape == (7, 1)
            assert float(task.support_x.abs().max()) <= 5.0
            amplitude, phase = _fit_sine(
                torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
            )
            assert client.amplitude[0] - 1e-4 <= amplitude <= client.amplitude[1] + 1e-4
            assert client.phase[0] - 1e-4 <= phase <= client.phase[1] + 1e-4


def test_sinusoid_clients_own_different_windows_inside_the_family() -> None:
    fed = sinusoid_federation(num_train_clients=20, num_unseen_clients=5, window=0.2, seed=1)
    windows = {(c.amplitude, c.phase) for c in [*fed.train_clients, *fed.unseen_clients]}
    assert len(windows) == 25
    for c in fed.train_clients:
        assert AMPLITUDE[0] <= c.amplitude[0] < c.amplitude[1] <= AMPLITUDE[1]
        assert PHASE[0] <= c.phase[0] < c.phase[1] <= PHASE[1]
        assert c.amplitude[1] - c.amplitude[0] == pytest.approx(0.2 * (AMPLITUDE[1] - AMPLITUDE[0]))


def test_client_sampling_is_seeded_sorted_and_distinct() -> None:
    a = sample_clients(seed=0, round_index=5, num_clients=100, count=10)
    assert a == sample_clients(seed=0, round_index=5, num_clients=100, count=10)
    assert a != sample_clients(seed=0, round_index=6, num_clients=100, count=10)
    assert a == sorted(set(a)) and len(a) == 10
    with pytest.raises(ValueError, match="cannot sample 11 of 10"):
        sample_clients(seed=0, round_index=0, num_clients=10, count=11)


def test_fedavg_batches_travel_as_support_only_tasks() -> None:
    client = sinusoid_federation(num_train_clients=1, num_unseen_clients=1, window=0.5, seed=0).train_clients[0]
    batches = local_tasks(
        client, np.random.default_rng(0), data_kind="batches", num_tasks=3, ways=5, shots=1, queries=1, batch_size=16
    )
    assert len(batches) == 3 and batches[0].support_x.shape == (16, 1) and batches[0].query_x.shape[0] == 0


# -- Omniglot on a tiny synthetic archive with the official layout -------------------------------------------


def _write_zip(path: Path, split: str, alphabets: dict[str, int], drawers: int = 20, start_id: int = 1) -> None:
    rng = np.random.default_rng(len(alphabets))
    char_id = start_id
    with zipfile.ZipFile(path, "w") as archive:
        for alphabet, chars in alphabets.items():
            for c in range(1, chars + 1):
                for d in range(1, drawers + 1):
                    pixels = (rng.random((105, 105)) > 0.1).astype(np.uint8) * 255  # white paper, black ink
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).convert("1").save(buffer, format="PNG")
                    archive.writestr(
                        f"images_{split}/{alphabet}/character{c:02d}/{char_id:04d}_{d:02d}.png", buffer.getvalue()
                    )
                char_id += 1


@pytest.fixture
def tiny_omniglot(tmp_path: Path) -> Path:
    (tmp_path / "omniglot").mkdir()
    _write_zip(tmp_path / "omniglot" / "images_background.zip", "background", {"Alpha": 3, "Beta": 2})
    _write_zip(tmp_path / "omniglot" / "images_evaluation.zip", "evaluation", {"Gamma": 2}, start_id=6)
    return tmp_path


def test_omniglot_partitions_by_alphabet_and_by_drawer_group(tiny_omniglot: Path) -> None:
    by_alphabet = om.omniglot_federation(tiny_omniglot, partition="alphabet")
    by_drawers = om.omniglot_federation(tiny_omniglot, partition="alphabet-drawer", drawers_per_client=5)

    assert [c.client_id for c in by_alphabet.train_clients] == ["bg:Alpha", "bg:Beta"]
    assert [c.client_id for c in by_alphabet.unseen_clients] == ["eval:Gamma"]
    assert by_alphabet.num_global_outputs == 5 * 4
    assert len(by_drawers.train_clients) == 2 * 4 and len(by_drawers.unseen_clients) == 4
    assert by_drawers.train_clients[1].drawers == (5, 6, 7, 8, 9)


def test_omniglot_episodes_use_rotations_as_classes_and_only_the_clients_drawers(tiny_omniglot: Path) -> None:
    fed = om.omniglot_federation(tiny_omniglot, partition="alphabet-drawer", drawers_per_client=10)
    client = fed.train_clients[0]  # Alpha, drawers 0-9: 3 characters x 4 rotations = 12 classes
    task = client.sample_task(np.random.default_rng(0), ways=12, shots=2, queries=3)

    assert task.support_x.shape == (24, 1, 28, 28) and task.query_x.shape == (36, 1, 28, 28)
    assert task.support_y.tolist() == [c for c in range(12) for _ in range(2)]
    assert float(task.support_x.min()) >= 0 and float(task.support_x.max()) <= 1
    # Every image is a 90-degree rotation of a drawing by one of this client's drawers.
    own = client.split.images[list(client.characters)][:, list(client.drawers)].reshape(-1, 28, 28)
    own = torch.from_numpy(own).float() / 255
    rotated = [torch.rot90(own, k, dims=(1, 2)) for k in range(4)]
    for image in task.query_x[:, 0]:
        assert any((r - image).abs().flatten(1).max(1).values.min() < 1e-6 for r in rotated)
    with pytest.raises(DataError, match="holds 10 drawings per class; 6 shots \\+ 5 queries need 11"):
        client.sample_task(np.random.default_rng(0), ways=5, shots=6, queries=5)
    with pytest.raises(DataError, match="has 12 classes"):
        client.check_episode(ways=13, shots=1, queries=1)


def test_omniglot_images_are_rotated_per_image_as_the_class_says(tiny_omniglot: Path) -> None:
    client = om.omniglot_federation(tiny_omniglot).train_clients[0]
    characters = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    rotations = np.array([0, 1, 2, 3, 3, 2, 1, 0])
    drawers = np.array([0, 1, 2, 3, 4, 5, 6, 7])

    images = client._images(characters, rotations, drawers)

    raw = torch.from_numpy(client.split.images[characters, drawers]).float() / 255
    expected = torch.stack([torch.rot90(img, int(k), dims=(0, 1)) for img, k in zip(raw, rotations, strict=True)])
    assert torch.equal(images[:, 0], expected)


def test_omniglot_decodes_once_then_reads_the_cache(tiny_omniglot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = om.load_split(tiny_omniglot, "background")
    calls = []
    monkeypatch.setattr(om, "_decode_zip", lambda *a: calls.append(a))

    second = om.load_split(tiny_omniglot, "background")

    assert calls == [] and np.array_equal(first.images, second.images) and first.names == second.names
    assert first.images.shape == (5, 20, 28, 28) and first.alphabets == ("Alpha",) * 3 + ("Beta",) * 2


def test_missing_omniglot_names_the_path_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found: .*images_background\.zip.*fedmeta download omniglot"):
        om.omniglot_federation(tmp_path)


def test_corrupt_omniglot_zip_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "images_background.zip").write_bytes(b"this is not a zip")
    with pytest.raises(DataError, match=r"images_background\.zip is corrupt"):
        om.load_split(tmp_path, "background")


def test_incomplete_omniglot_zip_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "omniglot").mkdir()
    _write_zip(tmp_path / "omniglot" / "images_background.zip", "background", {"Alpha": 1}, drawers=3)
    with pytest.raises(DataError, match="lack some of the 20 drawings"):
        om.load_split(tmp_path, "background")


def test_download_fetches_both_archives_and_the_split_lists(tiny_omniglot: Path, tmp_path: Path) -> None:
    write_vinyals_lists(tiny_omniglot)
    target = tmp_path / "fresh"
    template = (tiny_omniglot / "omniglot").as_uri() + "/images_{split}.zip"
    lists = (tiny_omniglot / "omniglot" / "splits_vinyals").as_uri() + "/{name}.txt"

    written = om.download(target, url_template=template, list_template=lists)

    assert [p.name for p in written] == ["images_background.zip", "images_evaluation.zip", "trainval.txt", "test.txt"]
    assert om.load_split(target, "evaluation").names == ("Gamma/character01", "Gamma/character02")
    assert len(om.omniglot_federation(target, split="vinyals").unseen_clients[0].characters) == 2


ROTS = ("rot000", "rot090", "rot180", "rot270")


TRAINVAL = ("Alpha/character01", "Alpha/character02", "Alpha/character03", "Beta/character01", "Gamma/character02")


def write_vinyals_lists(
    root: Path, test: tuple[str, ...] = ("Beta/character02", "Gamma/character01"), train: tuple[str, ...] = TRAINVAL
) -> None:
    """By default train on Alpha's 3 characters, Beta's first and Gamma's second; test on the rest (alphabets
    mixed)."""
    lists = root / "omniglot" / "splits_vinyals"
    lists.mkdir(parents=True, exist_ok=True)
    for name, chars in (("trainval", train), ("test", test)):
        (lists / f"{name}.txt").write_text("".join(f"{c}/{r}\n" for c in chars for r in ROTS))


def test_vinyals_split_mixes_both_zips_and_tests_on_one_client(tiny_omniglot: Path) -> None:
    write_vinyals_lists(tiny_omniglot)

    by_alphabet = om.omniglot_federation(tiny_omniglot, split="vinyals")
    iid = om.omniglot_federation(tiny_omniglot, split="vinyals", partition="character", num_train_clients=2, seed=3)

    assert [c.client_id for c in by_alphabet.train_clients] == ["vinyals:Alpha", "vinyals:Beta", "vinyals:Gamma"]
    (test,) = by_alphabet.unseen_clients
    names = lambda c: sorted(c.split.names[i] for i in c.characters)  # noqa: E731
    assert names(test) == ["Beta/character02", "Gamma/character01"] and test.num_classes == 8
    assert by_alphabet.num_global_outputs == 5 * 4
    dealt = [names(c) for c in iid.train_clients]
    assert sorted(sum(dealt, [])) == sorted(sum((names(c) for c in by_alphabet.train_clients), []))
    assert sorted(len(d) for d in dealt) == [2, 3]
    again = om.omniglot_federation(tiny_omniglot, split="vinyals", partition="character", num_train_clients=2, seed=3)
    assert [names(c) for c in again.train_clients] == dealt  # seeded
    task = test.sample_task(np.random.default_rng(0), ways=8, shots=1, queries=1)
    assert task.support_x.shape == (8, 1, 28, 28)
    batch_x, batch_y = by_alphabet.train_clients[2].sample_batch(np.random.default_rng(0), 8)
    assert set(batch_y.tolist()) <= set(range(16, 20))  # Gamma/character02 is the 5th training character


def test_vinyals_lists_that_are_missing_or_malformed_are_clear_errors(tiny_omniglot: Path) -> None:
    with pytest.raises(DataError, match=r"Vinyals split list not found: .*trainval\.txt"):
        om.omniglot_federation(tiny_omniglot, split="vinyals")
    write_vinyals_lists(tiny_omniglot)
    lists = tiny_omniglot / "omniglot" / "splits_vinyals"
    (lists / "test.txt").write_text("Beta/character02/rot000\n")
    with pytest.raises(DataError, match="lack some of the 4 rotations"):
        om.omniglot_federation(tiny_omniglot, split="vinyals")
    write_vinyals_lists(tiny_omniglot, test=("Zeta/character09",))
    with pytest.raises(DataError, match="not in the zips, e.g. Zeta/character09"):
        om.omniglot_federation(tiny_omniglot, split="vinyals")
    (lists / "test.txt").write_text("garbage\n")
    with pytest.raises(DataError, match=r"test.txt:1: expected 'Alphabet/characterNN/rotXXX'"):
        om.omniglot_federation(tiny_omniglot, split="vinyals")


@pytest.mark.data
def test_real_omniglot_has_the_published_structure(omniglot_dir: Path) -> None:
    fed = om.omniglot_federation(omniglot_dir, partition="alphabet")
    fine = om.omniglot_federation(omniglot_dir, partition="alphabet-drawer", drawers_per_client=5)

    assert len(fed.train_clients) == 30 and len(fed.unseen_clients) == 20
    assert sum(len(c.characters) for c in fed.train_clients) == 964
    assert sum(len(c.characters) for c in fed.unseen_clients) == 659
    assert len(fine.train_clients) + len(fine.unseen_clients) == 200
    vinyals = om.omniglot_federation(omniglot_dir, split="vinyals")
    assert sum(len(c.characters) for c in vinyals.train_clients) == 1200
    assert len(vinyals.unseen_clients[0].characters) == 423 and vinyals.num_global_outputs == 4800
    task = fed.unseen_clients[0].sample_task(np.random.default_rng(0), ways=20, shots=1, queries=5)
    ink = float(task.support_x.mean())
    assert 0.03 < ink < 0.3, f"ink fraction {ink} is implausible for Omniglot (about 8% at 105x105)"


def test_train_ways_shapes_training_episodes_and_evaluation_keeps_ways(tiny_omniglot: Path) -> None:
    config = RunConfig().replace(
        **{
            "algorithm": "protonet",
            "data.dataset": "omniglot",
            "data.data_dir": str(tiny_omniglot),
            "episode.ways": 5,
            "episode.train_ways": 8,  # Beta: 2 characters x 4 rotations, every class
            "episode.shots": 1,
            "episode.queries": 2,
            "federation.clients_per_round": 2,
            "federation.tasks_per_client": 1,
        }
    )
    experiment = Experiment.from_config(config)
    seen = record_training_tasks(experiment.algorithm)
    experiment.cohort_update(experiment.initial_params(), [0, 1], 0)
    assert [int(t.support_y.max()) + 1 for t in seen] == [8, 8]
    assert experiment.eval_kwargs()["ways"] == 5

    with pytest.raises(DataError, match="has 8 classes .* cannot draw 9-way tasks"):
        Experiment.from_config(config.replace(**{"episode.train_ways": 9}))
    with pytest.raises(ConfigError, match="train_ways 8 differs from episode.ways 5: only the metric methods"):
        config.replace(**{"algorithm": "maml"})


def test_augment_distorts_training_episodes_only_on_their_own_stream(tiny_omniglot: Path) -> None:
    config = RunConfig().replace(
        **{
            "algorithm": "protonet",
            "data.dataset": "omniglot",
            "data.data_dir": str(tiny_omniglot),
            "episode.ways": 4,
            "episode.shots": 1,
            "episode.queries": 2,
            "federation.clients_per_round": 2,
            "federation.tasks_per_client": 2,
        }
    )

    def training_tasks(augment: float) -> list:
        experiment = Experiment.from_config(config.replace(**{"episode.augment": augment}))
        seen = record_training_tasks(experiment.algorithm)
        experiment.cohort_update(experiment.initial_params(), [0, 1], 3)
        return seen

    plain, distorted, again = training_tasks(0.0), training_tasks(1.0), training_tasks(1.0)
    assert len(plain) == len(distorted) == 4
    for p, d, a in zip(plain, distorted, again, strict=True):
        assert torch.equal(p.support_y, d.support_y) and torch.equal(p.query_y, d.query_y)  # the same episodes
        assert not torch.allclose(p.support_x, d.support_x) and not torch.allclose(p.query_x, d.query_x)
        torch.testing.assert_close(d.support_x, a.support_x)  # seeded: the same on every transport
    assert not torch.allclose(distorted[0].support_x, distorted[1].support_x)  # each task its own draws
    with pytest.raises(ConfigError, match="episode.augment distorts images: it applies to omniglot and femnist"):
        RunConfig().replace(**{"episode.augment": 0.5})
    with pytest.raises(ConfigError, match=r"augment must be a factor in \[0, 2\], got -1"):
        config.replace(**{"episode.augment": -1})


def test_joint_embedding_reaches_the_algorithm_and_is_refused_where_it_means_nothing() -> None:
    config = RunConfig().replace(**{"algorithm": "protonet", "data.dataset": "omniglot"})
    assert build_run_algorithm(
        config.replace(**{"episode.joint_embedding": True}), "classification", None
    ).joint_embedding
    assert not build_run_algorithm(config, "classification", None).joint_embedding
    with pytest.raises(ConfigError, match="episode.joint_embedding applies to the metric methods"):
        RunConfig().replace(**{"algorithm": "maml", "episode.joint_embedding": True})
    with pytest.raises(ConfigError, match="joint_embedding must be true or false, got 'yes'"):
        config.replace(**{"episode.joint_embedding": "yes"})
