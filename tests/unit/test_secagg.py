"""SecAgg+ through the real Flower workflow and client mod, over the in-process Grid: the server gets the mean
of the updates within the quantisation error, and no individual update reaches it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

import server.secagg
import wire
from client.client_app import app as client_app
from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import ConfigError
from fedmeta.experiment import Experiment
from server.grid import ServerOptions, serve
from server.secagg import secure_round
from simulations.inprocess import simulate
from tests.flower_fakes import InProcessGrid, meta_rows, restore_task_identity, set_task_identity, small
from wire.records import arrays_to_params

R = 8.0  # secagg.clipping_range (default)
STEP = 2 * R / 2**22  # one quantisation level; stochastic rounding errs by less than one level per client


@pytest.fixture(autouse=True)
def _task_identity():
    old = set_task_identity()
    yield
    restore_task_identity(old)


class RecordingGrid(InProcessGrid):
    """Keeps every reply the server receives, to inspect what left the clients."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def _stage(message: Message) -> str | None:
    records = message.content.config_records
    return str(records[RECORD_KEY_CONFIGS][Key.STAGE]) if RECORD_KEY_CONFIGS in records else None


def _updates(config, params, clients, round_index=0):
    experiment = Experiment.from_config(config)
    return {c: experiment.client_update(params, c, round_index).direction for c in clients}


def _round_one(grid, config, params):
    """Round 1 under SecAgg+ with the four training clients (nodes 1..4)."""
    flat = {**config.to_flat(), "round": 0}
    return secure_round(
        grid, params=params, config=flat, node_ids=[1, 2, 3, 4], secagg=config.secagg, round_number=1, timeout=10
    )


def test_the_server_gets_the_mean_and_never_an_individual_update(monkeypatch) -> None:
    config = small(**{"secagg.enabled": True, "federation.clients_per_round": 4})
    params = Experiment.from_config(config).initial_params()
    seen_by_strategy: list[list[np.ndarray]] = []
    original = server.secagg._Collect.aggregate_fit

    def spy(self, server_round, results, failures):
        seen_by_strategy.extend(server.secagg.parameters_to_ndarrays(fitres.parameters) for _, fitres in results)
        return original(self, server_round, results, failures)

    monkeypatch.setattr(server.secagg._Collect, "aggregate_fit", spy)
    grid = RecordingGrid(client_app, num_partitions=6)

    result = _round_one(grid, config, params)

    updates = _updates(config, params, range(4))
    expected = {k: torch.stack([u[k] for u in updates.values()]).mean(0) for k in params}
    assert result.secure is not None and result.secure.count == 4 and result.failures == 0
    assert result.out_of_range == 0
    for k in params:
        assert torch.allclose(result.secure.mean[k], expected[k], rtol=0, atol=STEP)
    # The strategy saw four copies of the aggregate and nothing else; every client's own update is far from it.
    assert len(seen_by_strategy) == 4
    for arrays in seen_by_strategy:
        assert all(np.array_equal(a, b) for a, b in zip(arrays, seen_by_strategy[0], strict=True))
    gap = min(max(float((u[k] - expected[k]).abs().max()) for k in params) for u in updates.values())
    assert gap > 1000 * STEP
    # What the clients sent: no plain arrays, and masked vectors that decode to noise, not to the update.
    masked = [r for r in grid.replies if Key.MASKED_PARAMETERS in r.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    assert len(masked) == 4
    for reply in masked:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        vectors = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        decoded = dequantize(vectors[1:], R, 2**22)  # [0] is the weight factor
        own = updates[int(reply.metadata.src_node_id) - 1]
        nearest = min(float(np.abs(d - own[k].numpy()).mean()) for d, k in zip(decoded, sorted(own), strict=False))
        assert nearest > 1.0  # uniformly masked: about R away on average


def test_a_client_dropping_out_mid_protocol_is_recovered() -> None:
    # Node 2 completes key sharing, then dies before sending its masked update: SecAgg+ reconstructs its
    # masks from the others' shares, and the mean is over the three that contributed.
    def drops_at_upload(message: Message, ctx: Context) -> Message:
        if _stage(message) == Stage.COLLECT_MASKED_VECTORS:
            raise RuntimeError("connection lost")
        return client_app(message, ctx)

    config = small(**{"secagg.enabled": True, "federation.clients_per_round": 4})
    params = Experiment.from_config(config).initial_params()
    grid = InProcessGrid(client_app, num_partitions=6, handlers={2: drops_at_upload})

    result = _round_one(grid, config, params)

    updates = _updates(config, params, [0, 2, 3])
    assert result.secure is not None and result.secure.count == 3
    for k in params:
        expected = torch.stack([u[k] for u in updates.values()]).mean(0)
        assert torch.allclose(result.secure.mean[k], expected, rtol=0, atol=STEP)


def _assert_same_run_within_quantisation(tmp_path: Path, plain: dict, secure: dict, *, private: bool) -> None:
    """tmp_path/plain and tmp_path/sa: the same 3 rounds, meta-parameters within quantisation, same releases."""
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")[1]
    b = load_checkpoint(tmp_path / "sa" / "checkpoint.pt")[1]
    assert b.round == 3 and a.dp_releases == b.dp_releases
    for k in a.params:
        assert torch.allclose(a.params[k], b.params[k], rtol=0, atol=1e-4)
    assert not all(torch.equal(a.params[k], b.params[k]) for k in a.params)  # quantisation did happen
    if private:
        assert secure["privacy"]["epsilon"] == plain["privacy"]["epsilon"] > 0


@pytest.mark.parametrize("mode", ["off", "central", "distributed"])
def test_a_secagg_run_matches_the_plain_run_within_quantisation(tmp_path: Path, mode: str) -> None:
    # Central DP under SecAgg+: the clients clip, the server adds the noise to the sum. Distributed: the clients
    # add their shares. With reproducible noise both runs draw the same noise; only quantisation differs.
    dp = {"privacy.mode": mode, "privacy.clip_norm": 0.5, "privacy.reproducible_noise": True} if mode != "off" else {}
    config = small(**{**dp, "outer.optimizer": "sgd", "outer.outer_lr": 0.5})

    plain = simulate(config, tmp_path / "plain", progress=False)
    secure = serve(
        InProcessGrid(client_app, num_partitions=6),
        config.replace(**{"secagg.enabled": True}),
        ServerOptions(out_dir=str(tmp_path / "sa")),
    )

    _assert_same_run_within_quantisation(tmp_path, plain, secure, private=mode != "off")
    rows = meta_rows(tmp_path / "sa" / "metrics.jsonl")
    assert all(r["clients"] == 3 and r["secagg_out_of_range"] == 0 for r in rows)
    assert not any("query_loss" in r for r in rows)  # per-client metrics do not leave the clients in the clear


@pytest.mark.parametrize("workers", [0, 2])
def test_a_secure_run_is_reproducible_whatever_numpys_global_state(tmp_path: Path, workers: int) -> None:
    # SecAgg+'s stochastic rounding draws from numpy's global generator; the clients seed it from (run seed,
    # round, client or worker), so the same seed gives the same meta-parameters, bit for bit.
    cohorts = {"compute.workers": 2, "compute.reply": "sum", "federation.clients_per_round": 4} if workers else {}
    config = small(**{**cohorts, "secagg.enabled": True, "outer.optimizer": "sgd", "outer.outer_lr": 0.5})
    params = []
    for run, state in enumerate((1, 2)):
        np.random.seed(state)
        serve(
            InProcessGrid(client_app, num_partitions=workers or 6),
            config,
            ServerOptions(out_dir=str(tmp_path / f"{run}")),
        )
        params.append(load_checkpoint(tmp_path / f"{run}" / "checkpoint.pt")[1].params)
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])


@pytest.mark.parametrize("mode", ["off", "distributed"])
def test_secagg_over_cohort_workers_matches_the_plain_run_within_quantisation(tmp_path: Path, mode: str) -> None:
    # Two cohort workers with sum replies: each masks its cohort's mean, weighted by its client count, so the
    # server learns only the mean over the round's clients - the in-process sums' step, up to quantisation. With
    # distributed DP each client of a cohort adds its own noise share; the releases are those of the plain run.
    dp = {"privacy.mode": mode, "privacy.clip_norm": 0.5, "privacy.reproducible_noise": True} if mode != "off" else {}
    config = small(
        **{
            **dp,
            "outer.optimizer": "sgd",
            "outer.outer_lr": 0.5,
            "compute.workers": 2,
            "compute.reply": "sum",
            "federation.clients_per_round": 4,
        }
    )
    grid = RecordingGrid(client_app, num_partitions=2)

    plain = simulate(config, tmp_path / "plain", progress=False)
    secure = serve(grid, config.replace(**{"secagg.enabled": True}), ServerOptions(out_dir=str(tmp_path / "sa")))

    _assert_same_run_within_quantisation(tmp_path, plain, secure, private=mode != "off")
    assert all(
        r["clients"] == 4 and r["secagg_out_of_range"] == 0 for r in meta_rows(tmp_path / "sa" / "metrics.jsonl")
    )
    # The workers' replies carried masked vectors only: no rows, no sum, no direction in the clear.
    trained = [r for r in grid.replies if r.metadata.message_type == "train" and not r.has_error()]
    assert trained and all(wire.DIRECTION not in r.content.array_records for r in trained)
    assert all(len(record) == 0 for r in trained for record in r.content.array_records.values())


def test_secagg_over_a_cohort_with_a_refused_update_fails_that_worker_whole(tmp_path: Path, caplog) -> None:
    # The server knows only how many clients it asked each worker for, so a worker whose cohort holds a refused
    # update must not send a mean over fewer: it fails, and its clients count as failed.
    config = small(
        **{
            "secagg.enabled": True,
            "compute.workers": 2,
            "compute.reply": "sum",
            "federation.clients_per_round": 4,
            "federation.rounds": 1,
            "robust.max_update_norm": 1e-9,  # every update is refused
        }
    )
    with caplog.at_level(logging.WARNING):
        serve(InProcessGrid(client_app, num_partitions=2), config, ServerOptions(out_dir=str(tmp_path)))

    (row,) = meta_rows(tmp_path / "metrics.jsonl")
    assert row["failed"] == 4 and row.get("skipped") == 1
    assert "fewer than the 4 required; meta-parameters unchanged" in caplog.text


def test_coordinates_beyond_the_clipping_range_are_counted_and_logged(tmp_path: Path, caplog) -> None:
    config = small(**{"secagg.enabled": True, "secagg.clipping_range": 1e-4, "federation.rounds": 1})
    with caplog.at_level(logging.WARNING):
        serve(InProcessGrid(client_app, num_partitions=6), config, ServerOptions(out_dir=str(tmp_path)))
    assert meta_rows(tmp_path / "metrics.jsonl")[0]["secagg_out_of_range"] > 0.5
    assert "exceeded secagg.clipping_range 0.0001 and were clipped" in caplog.text


def test_an_integer_clipping_range_as_a_toml_file_writes_it_runs(tmp_path: Path) -> None:
    # `clipping_range = 32` in a preset or run config is an int; Flower's SecAgg+ accepts only a float there.
    config = small(**{"secagg.enabled": True, "secagg.clipping_range": 32, "federation.rounds": 1})
    serve(InProcessGrid(client_app, num_partitions=6), config, ServerOptions(out_dir=str(tmp_path)))
    (row,) = meta_rows(tmp_path / "metrics.jsonl")
    assert row["clients"] == 3 and row["failed"] == 0


def test_secagg_configuration_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the in-process loop has none. Use --engine ray"):
        simulate(small(**{"secagg.enabled": True}), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="adaptive_clipping cannot be combined with secagg"):
        small(**{"secagg.enabled": True, "privacy.mode": "central", "privacy.adaptive_clipping": True})
    with pytest.raises(ConfigError, match=r"needs 2\.\.2 clients per round at secagg.quantization_range=2147483647"):
        Experiment.from_config(small(**{"secagg.enabled": True, "secagg.quantization_range": 2**31 - 1}))
    # Over cohort workers one vector per worker is masked: 2,000 clients per round fit behind 2 workers.
    cohorts = {"secagg.enabled": True, "compute.reply": "sum", "data.num_train_clients": 4000}
    Experiment.from_config(small(**cohorts, **{"compute.workers": 2, "federation.clients_per_round": 2000}))
    with pytest.raises(ConfigError, match=r"needs 2\.\.1023 cohort workers with clients .* got 1"):
        Experiment.from_config(small(**cohorts, **{"compute.workers": 1, "federation.clients_per_round": 2000}))
    with pytest.raises(ConfigError, match=r"secagg.num_shares must be a fraction in \(0, 1\]"):
        small(**{"secagg.num_shares": 3})


def test_a_client_whose_model_differs_from_the_servers_says_so() -> None:
    template = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"a: got shape \(3, 2\), expected \(2, 3\)"):
        arrays_to_params([np.zeros((3, 2), np.float32), np.zeros(4, np.float32)], template)
    with pytest.raises(ValueError, match=r"expected 2 arrays \(a, b\), got 1"):
        arrays_to_params([np.zeros((2, 3), np.float32)], template)
