"""Shakespeare by speaker (issue #14): the speech parser, next-character windows, clear errors, and LEAF's
character LSTM checked against torch.nn.LSTM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedmeta.config import ConfigError, RunConfig
from fedmeta.models import CharLSTM, build_model
from fedmeta.tasks.base import DataError
from fedmeta.tasks.shakespeare import SEQUENCE, parse_speakers, shakespeare_federation

PLAY = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\nIs't a verdict?\n\n"
    "MENENIUS:\nNot rash like his accusers, and thus answer'd:\nWhich makes me sweat with wrath.\n\n"
)


def test_speeches_are_grouped_by_speaker() -> None:
    speakers = parse_speakers(PLAY)
    assert speakers == {
        "First Citizen": "Before we proceed any further, hear me speak.\n"
        "You are all resolved rather to die than to famish?\nIs't a verdict?",
        "All": "Speak, speak.",
        "MENENIUS": "Not rash like his accusers, and thus answer'd:\nWhich makes me sweat with wrath.",
    }


def _write_play(root: Path, text: str) -> Path:
    (root / "shakespeare").mkdir(parents=True)
    (root / "shakespeare" / "input.txt").write_text(text)
    return root


def test_speakers_become_clients_of_next_character_windows(tmp_path: Path) -> None:
    long = "".join(f"SPEAKER{i}:\n" + ("to be or not to be, " * (6 + i)) + "\n\n" for i in range(5))
    root = _write_play(tmp_path, long + "Short:\nHi.\n\n")
    fed = shakespeare_federation(root, num_unseen_clients=1, min_samples=20, seed=0)

    clients = [*fed.train_clients, *fed.unseen_clients]
    assert sorted(c.client_id for c in clients) == [f"SPEAKER{i}" for i in range(5)]  # "Short" left out
    vocabulary = sorted(set(long + "Short:\nHi.\n\n"))
    assert fed.num_global_outputs == len(vocabulary)
    client = clients[0]
    speech = parse_speakers(long)[client.client_id]
    assert len(client) == len(speech) - SEQUENCE
    task = client.sample_split(np.random.default_rng(0), 0.5, samples=10)
    assert task.support_x.shape == (5, SEQUENCE) and task.query_x.shape == (5, SEQUENCE)
    decode = lambda ids: "".join(vocabulary[int(i)] for i in ids)  # noqa: E731
    for x, y in zip(task.support_x, task.support_y, strict=True):
        window = decode(x)
        start = speech.find(window + decode([y]))
        assert start >= 0  # a real window of this speaker's text, labelled by the character after it


def test_missing_or_empty_text_and_episodes_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Shakespeare text not found: .*shakespeare/input\.txt"):
        shakespeare_federation(tmp_path, num_unseen_clients=1, min_samples=1, seed=0)
    root = _write_play(tmp_path, "no speeches here")
    with pytest.raises(DataError, match="has no speeches"):
        shakespeare_federation(root, num_unseen_clients=1, min_samples=1, seed=0)
    with pytest.raises(ConfigError, match="shakespeare's tasks are a speaker's own text: set episode.client_tasks"):
        RunConfig().replace(**{"data.dataset": "shakespeare"})


def test_the_character_lstm_equals_torch_lstm_with_the_same_weights() -> None:
    torch.manual_seed(0)
    model = CharLSTM(12, embedding=3, hidden=5, layers=2).double()
    reference = nn.LSTM(3, 5, num_layers=2, batch_first=True).double()
    with torch.no_grad():
        for layer in range(2):
            getattr(reference, f"weight_ih_l{layer}").copy_(model.body.w_ih[layer])
            getattr(reference, f"weight_hh_l{layer}").copy_(model.body.w_hh[layer])
            getattr(reference, f"bias_ih_l{layer}").copy_(model.body.bias[layer])
            getattr(reference, f"bias_hh_l{layer}").zero_()
    x = torch.randint(12, (4, 7))

    features = model.body(x)

    expected = reference(model.body.embedding(x))[0][:, -1]
    torch.testing.assert_close(features, expected, rtol=1e-12, atol=1e-12)
    assert model(x).shape == (4, 12)
    assert isinstance(build_model("shakespeare", out_features=65), CharLSTM)


def test_the_lstm_width_is_a_config_option() -> None:
    from fedmeta.experiment import initial_params, meta_algorithm

    config = RunConfig().replace(
        **{"data.dataset": "shakespeare", "episode.client_tasks": True, "data.lstm_hidden": 16}
    )
    params = initial_params(meta_algorithm(config, num_global_outputs=65), seed=0)
    assert params["body.w_hh.1"].shape == (64, 16) and params["head.weight"].shape == (65, 16)
    with pytest.raises(ConfigError, match="lstm_hidden must be a positive integer, got 0"):
        config.replace(**{"data.lstm_hidden": 0})


def test_download_fetches_the_text_once(tmp_path: Path) -> None:
    from fedmeta.tasks.shakespeare import download

    source = tmp_path / "source.txt"
    source.write_text(PLAY)

    written = download(tmp_path / "data", url=source.as_uri())
    source.write_text("changed")
    again = download(tmp_path / "data", url=source.as_uri())  # already there: kept, not fetched

    assert written == again == [tmp_path / "data" / "shakespeare" / "input.txt"]
    assert written[0].read_text() == PLAY
    assert not list((tmp_path / "data" / "shakespeare").glob("*.part"))
