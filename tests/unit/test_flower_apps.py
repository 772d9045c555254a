"""The Flower adapters in-process: record encoding, run-config parsing, the ClientApp handlers, and the
ServerApp's loop over a Grid whose nodes are ClientApps in this process (see tests/flower_fakes.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.config import get_fused_config_from_dir

import wire
from client.client_app import app as client_app
from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import ConfigError, RunConfig
from fedmeta.experiment import Experiment
from fedmeta.metrics import read_jsonl
from fedmeta.types import ClientUpdate
from server.grid import ServerOptions, parse_run_config, serve
from simulations.inprocess import simulate
from tests.flower_fakes import (
    InProcessGrid,
    assert_same_rows,
    meta_rows,
    restore_task_identity,
    set_task_identity,
    small,
)
from wire.records import content_to_update, get_int, params_to_record, record_to_params, update_to_content


@pytest.fixture(autouse=True)
def _task_identity():
    old = set_task_identity()
    yield
    restore_task_identity(old)


def context(partition: int, num_partitions: int = 6, **extra) -> Context:
    node_config = {"partition-id": partition, "num-partitions": num_partitions, **extra}
    return Context(run_id=1, node_id=partition + 1, node_config=node_config, state=RecordDict(), run_config={})


def train_message(config: RunConfig, params, round_index: int = 0) -> Message:
    content = RecordDict(
        {
            wire.PARAMS: params_to_record(params),
            wire.CONFIG: ConfigRecord({**config.to_flat(), wire.ROUND: round_index}),
        }
    )
    return Message(content, dst_node_id=1, message_type="train")


def test_parameter_records_round_trip_bit_identically() -> None:
    params = {
        "b.weight": torch.randn(3, 4),
        "a": torch.randn(5, dtype=torch.float64),
        "n": torch.tensor([1, 2]),
        "scalar": torch.tensor(0.5),  # a 0-d parameter (Siamese's bias) stays 0-d
        "strided": torch.randn(4, 3).T,  # not contiguous
    }
    back = record_to_params(params_to_record(params))
    assert back.keys() == params.keys()
    assert all(torch.equal(back[k], params[k]) and back[k].dtype == params[k].dtype for k in params)
    assert all(back[k].shape == params[k].shape for k in params)


def test_update_records_round_trip() -> None:
    update = ClientUpdate(direction={"w": torch.randn(2, 2)}, num_tasks=7, metrics={"query_loss": 0.25})
    client_id, back = content_to_update(update_to_content(update, client_id="alpha"))
    assert client_id == "alpha" and back.num_tasks == 7 and back.metrics == {"query_loss": 0.25}
    assert torch.equal(back.direction["w"], update.direction["w"])
    with pytest.raises(TypeError, match="'num-tasks' must be an integer"):
        get_int(MetricRecord({"num-tasks": 2.5}), "num-tasks")


def test_run_config_splits_experiment_and_server_options() -> None:
    config, options = parse_run_config({**small().to_flat(), "server.out_dir": "x", "server.min_replies": 2})
    assert config == small() and options == ServerOptions(out_dir="x", min_replies=2)
    with pytest.raises(ConfigError, match=r"unknown server option\(s\) \['outdir'\]"):
        parse_run_config({"server.outdir": "x"})
    with pytest.raises(ConfigError, match="server.round_timeout must be a positive number of seconds, got -1"):
        parse_run_config({"server.round_timeout": -1})
    with pytest.raises(ConfigError, match="unknown config key 'inner.lr'"):
        parse_run_config({"inner.lr": 0.1})


def test_the_flower_app_config_in_pyproject_is_valid() -> None:
    run_config = get_fused_config_from_dir(Path(__file__).parents[2], {})
    config, options = parse_run_config(dict(run_config))
    assert config.data.num_train_clients + config.data.num_unseen_clients == 3
    assert options.out_dir == "runs/flower"
    assert config.privacy.delta is None and config.federation.client_fraction is None  # "" = unset
    # Flower refuses --run-config keys that the app config lacks: every option must be settable in a deployment.
    every_key = {f"{s}.{k}" for s, v in RunConfig().to_dict().items() if isinstance(v, dict) for k in v}
    server_keys = {f"server.{k}" for k in ServerOptions.__dataclass_fields__}
    assert set(run_config) == every_key | server_keys | {"algorithm"}


def test_client_app_train_reply_equals_the_client_part_called_directly() -> None:
    config = small(algorithm="maml")
    experiment = Experiment.from_config(config)
    params = experiment.initial_params()

    reply = client_app(train_message(config, params, round_index=2), context(partition=1))

    client_id, update = content_to_update(reply.content)
    direct = experiment.client_update(params, 1, 2)
    assert client_id == experiment.federation.train_clients[1].client_id and update.num_tasks == direct.num_tasks
    assert all(torch.equal(update.direction[k], direct.direction[k]) for k in params)


@pytest.mark.parametrize(
    "node_config, message",
    [
        ({"partition-id": 9, "num-partitions": 6}, "partition-id=9 is out of range 0..5"),
        ({"partition-id": 0, "num-partitions": 5}, "num-partitions=5, but the federation has 4 training \\+ 2 unseen"),
        ({"num-partitions": 6}, "node config lacks 'partition-id'"),
        ({"partition-id": 4, "num-partitions": 6}, "unseen client 0 was asked to train"),
    ],
)
def test_client_app_rejects_bad_partitions_with_a_clear_error(node_config: dict, message: str) -> None:
    config = small()
    ctx = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match=message):
        client_app(train_message(config, Experiment.from_config(config).initial_params()), ctx)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_node_configured_for_cuda_without_a_gpu_gets_a_clear_error() -> None:
    config = small()
    with pytest.raises(ValueError, match="compute.device is .cuda. but torch .* sees no GPU"):
        client_app(train_message(config, Experiment.from_config(config).initial_params()), context(0, device="cuda"))


def test_client_app_reports_missing_data(tmp_path: Path) -> None:
    config = small(**{"data.dataset": "omniglot", "algorithm": "protonet"})
    with pytest.raises(RuntimeError, match="Omniglot file not found"):
        client_app(train_message(config, {}), context(0, **{"data-dir": str(tmp_path)}))


@pytest.mark.parametrize("algorithm", ["reptile", "maml"])
def test_server_loop_over_a_grid_equals_the_in_process_loop(tmp_path: Path, algorithm: str) -> None:
    # The FedAvg baseline and the unseen-client learning curve included: one loop drives both transports.
    config = small(algorithm=algorithm, **{"eval.fedavg_rounds": 2, "eval.curve_every": 2})
    grid = InProcessGrid(client_app, num_partitions=6)

    summary = serve(grid, config, ServerOptions(out_dir=str(tmp_path / "flower")))
    reference = simulate(config, tmp_path / "local", progress=False)

    flower = load_checkpoint(tmp_path / "flower" / "checkpoint.pt")
    local = load_checkpoint(tmp_path / "local" / "checkpoint.pt")
    assert flower[1].round == local[1].round == 3
    assert all(torch.equal(flower[1].params[k], local[1].params[k]) for k in local[1].params)
    assert all(torch.equal(flower[2]["fedavg"][k], local[2]["fedavg"][k]) for k in local[2]["fedavg"])
    assert summary["results"].keys() == {"meta", "random_init", "fedavg"}
    assert summary["results"] == reference["results"]
    rows = read_jsonl(tmp_path / "flower" / "metrics.jsonl")
    assert_same_rows(rows, read_jsonl(tmp_path / "local" / "metrics.jsonl"))
    meta = [r for r in rows if r["phase"] == "meta"]
    assert [r["round"] for r in meta] == [1, 2, 3] and all(r["clients"] == 3 for r in meta)
    assert [r["round"] for r in meta if "unseen_mse" in r] == [2, 3]
    assert [r["round"] for r in rows if r["phase"] == "fedavg"] == [1, 2]
    assert json.loads((tmp_path / "flower" / "summary.json").read_text())["rounds"] == 3


def _failing(message: Message, ctx: Context) -> Message:
    """Joins the federation, then fails every training round."""
    if message.metadata.message_type == "train":
        raise RuntimeError("disk on fire")
    return client_app(message, ctx)


def test_too_few_nodes_is_a_clear_error_after_the_discovery_timeout(tmp_path: Path) -> None:
    def absent(message: Message, ctx: Context) -> None:
        return None  # never answers

    grid = InProcessGrid(client_app, num_partitions=6, handlers={6: absent})
    with pytest.raises(RuntimeError, match="only 5 of the 6 required nodes answered within 0.5 s"):
        serve(grid, small(), ServerOptions(out_dir=str(tmp_path), discovery_timeout=0.5))
    with pytest.raises(RuntimeError, match=r"only 0 SuperNodes answered within 0.5 s; .* lower server.min_nodes$"):
        serve(InProcessGrid(client_app, 0), small(), ServerOptions(out_dir=str(tmp_path), discovery_timeout=0.5))


def test_a_failing_node_is_logged_counted_and_the_round_goes_on(tmp_path: Path, caplog) -> None:
    config = small(**{"federation.clients_per_round": 4})  # every training client, node 2 among them
    grid = InProcessGrid(client_app, num_partitions=6, handlers={2: _failing})

    with caplog.at_level(logging.WARNING):
        serve(grid, config, ServerOptions(out_dir=str(tmp_path), min_replies=3))

    rows = meta_rows(tmp_path / "metrics.jsonl")
    assert all(r["failed"] == 1 and r["clients"] == 3 for r in rows)
    assert "node 2 failed: RuntimeError: disk on fire" in caplog.text


def test_a_round_with_too_few_replies_is_reported_and_not_applied(tmp_path: Path, caplog) -> None:
    config = small(**{"federation.clients_per_round": 4, "federation.rounds": 1})
    grid = InProcessGrid(client_app, num_partitions=6, handlers={2: _failing})

    with caplog.at_level(logging.WARNING):
        serve(grid, config, ServerOptions(out_dir=str(tmp_path)))  # min_replies: all 4 sampled

    state = load_checkpoint(tmp_path / "checkpoint.pt")[1]
    initial = Experiment.from_config(config).initial_params()
    assert all(torch.equal(state.params[k], initial[k]) for k in initial)
    assert meta_rows(tmp_path / "metrics.jsonl")[0]["skipped"] == 1
    assert "3 replies, fewer than the 4 required; meta-parameters unchanged" in caplog.text


def test_a_nan_update_from_a_node_is_rejected(tmp_path: Path, caplog) -> None:
    def poisoned(message: Message, ctx: Context) -> Message:
        reply = client_app(message, ctx)
        if message.metadata.message_type != "train":
            return reply
        _, update = content_to_update(reply.content)
        nan = ClientUpdate({k: torch.full_like(v, float("nan")) for k, v in update.direction.items()}, update.num_tasks)
        return Message(update_to_content(nan, client_id="poisoned"), reply_to=message)

    config = small(**{"federation.clients_per_round": 4, "federation.rounds": 1})
    with caplog.at_level(logging.WARNING):
        serve(
            InProcessGrid(client_app, num_partitions=6, handlers={3: poisoned}),
            config,
            ServerOptions(out_dir=str(tmp_path)),
        )

    row = meta_rows(tmp_path / "metrics.jsonl")[0]
    assert row["rejected"] == 1 and row["clients"] == 3
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "checkpoint.pt")[1].params.values())
    assert "rejected update from client poisoned" in caplog.text


def test_distributed_dp_over_flower_equals_the_in_process_loop(tmp_path: Path) -> None:
    # Clients clip and add their noise share inside the ClientApp; with reproducible noise both transports
    # draw the same noise, and the server's accountant reports the same epsilon.
    config = small(
        **{
            "privacy.mode": "distributed",
            "privacy.noise_multiplier": 1.5,
            "privacy.clip_norm": 0.5,
            "privacy.reproducible_noise": True,
        }
    )

    summary = serve(
        InProcessGrid(client_app, num_partitions=6), config, ServerOptions(out_dir=str(tmp_path / "flower"))
    )
    reference = simulate(config, tmp_path / "local", progress=False)

    flower = load_checkpoint(tmp_path / "flower" / "checkpoint.pt")[1]
    local = load_checkpoint(tmp_path / "local" / "checkpoint.pt")[1]
    assert all(torch.equal(flower.params[k], local.params[k]) for k in local.params)
    assert flower.dp_releases == local.dp_releases == (1.5,) * 3
    assert summary["privacy"]["epsilon"] == reference["privacy"]["epsilon"] > 0
    rows = meta_rows(tmp_path / "flower" / "metrics.jsonl")
    assert all(r["update_norm"] > 0 for r in rows) and [r["epsilon"] for r in rows] == sorted(
        r["epsilon"] for r in rows
    )


def test_a_node_that_dies_is_counted_and_its_restarted_successor_rejoins(tmp_path: Path, caplog) -> None:
    # Node 1 (client 0) goes silent in round 1; a new node 7 with the same partition appears, as a restarted
    # SuperNode would (new node id), and takes client 0 over from round 2 on.
    config = small(**{"federation.clients_per_round": 4})
    grid = InProcessGrid(client_app, num_partitions=6)

    def dies(message: Message, ctx: Context) -> Message | None:
        if message.metadata.message_type != "train":
            return client_app(message, ctx)
        grid.contexts[7] = context(partition=0)
        grid.handlers[7] = client_app
        return None  # never answers: the round goes on without it after the timeout

    grid.handlers[1] = dies
    with caplog.at_level(logging.INFO):
        serve(grid, config, ServerOptions(out_dir=str(tmp_path), min_replies=3, round_timeout=1))

    rows = meta_rows(tmp_path / "metrics.jsonl")
    assert [(r["clients"], r["timed_out"]) for r in rows] == [(3, 1), (4, 0), (4, 0)]
    assert "joined as node 7, replacing node 1" in caplog.text


def test_a_client_refuses_meta_parameters_that_do_not_fit_its_model() -> None:
    config = small()
    params = Experiment.from_config(config).initial_params()
    wrong = {**params, "body.0.weight": torch.zeros(3, 3)}
    with pytest.raises(
        ValueError, match=r"the server's model does not match this client's: body.0.weight: got \(3, 3\)"
    ):
        client_app(train_message(config, wrong), context(partition=0))
    missing = {k: v for k, v in params.items() if k != "body.0.bias"}
    with pytest.raises(ValueError, match=r"does not match this client's: keys differ .* missing \['body.0.bias'\]"):
        client_app(train_message(config, missing), context(partition=0))


def test_the_server_app_resumes_after_a_crash_to_the_same_meta_parameters(tmp_path: Path) -> None:
    class CrashingGrid(InProcessGrid):
        """The server process dies while sending round 3."""

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if any(m.metadata.group_id == "3" for m in messages):
                raise KeyboardInterrupt("server killed")
            return super().send_and_receive(messages, timeout=timeout)

    config = small(**{"federation.rounds": 4, "privacy.mode": "central", "privacy.reproducible_noise": True})
    with pytest.raises(KeyboardInterrupt):
        serve(CrashingGrid(client_app, 6), config, ServerOptions(out_dir=str(tmp_path / "a")))
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pt")[1].round == 2

    serve(InProcessGrid(client_app, 6), config, ServerOptions(out_dir=str(tmp_path / "a"), resume=True))
    serve(InProcessGrid(client_app, 6), config, ServerOptions(out_dir=str(tmp_path / "b")))

    resumed, whole = (load_checkpoint(tmp_path / d / "checkpoint.pt")[1] for d in ("a", "b"))
    assert resumed.round == whole.round == 4 and resumed.dp_releases == whole.dp_releases
    assert all(torch.equal(resumed.params[k], whole.params[k]) for k in whole.params)
    assert [r["round"] for r in meta_rows(tmp_path / "a" / "metrics.jsonl")] == [1, 2, 3, 4]
    # The accountant continued from the checkpoint: the same epsilon, round by round.
    epsilons = [[r["epsilon"] for r in meta_rows(tmp_path / d / "metrics.jsonl")] for d in ("a", "b")]
    assert epsilons[0] == epsilons[1] and epsilons[0] == sorted(epsilons[0])


@pytest.mark.parametrize("algorithm", ["reptile", "maml"])
def test_cohort_workers_over_a_grid_equal_the_in_process_loop(tmp_path: Path, algorithm: str) -> None:
    # Three worker nodes for 4 training and 2 unseen clients (client c on worker c mod 3): the same
    # meta-parameters, baseline, summary and metrics rows as the in-process loop.
    config = small(algorithm=algorithm, **{"compute.workers": 3, "eval.fedavg_rounds": 2, "eval.curve_every": 2})

    summary = serve(InProcessGrid(client_app, num_partitions=3), config, ServerOptions(out_dir=str(tmp_path / "w")))
    reference = simulate(config, tmp_path / "local", progress=False)

    workers, local = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("w", "local"))
    assert all(torch.equal(workers[1].params[k], local[1].params[k]) for k in local[1].params)
    assert all(torch.equal(workers[2]["fedavg"][k], local[2]["fedavg"][k]) for k in local[2]["fedavg"])
    assert summary["results"] == reference["results"] and summary["unseen_clients"] == 2
    assert_same_rows(read_jsonl(tmp_path / "w" / "metrics.jsonl"), read_jsonl(tmp_path / "local" / "metrics.jsonl"))


def test_cohort_workers_replying_with_sums_equal_the_in_process_loop(tmp_path: Path, caplog) -> None:
    # compute.reply = "sum" under central DP: each of three workers clips its clients and sends one total; the
    # server combines them, adds the noise and steps - the in-process loop's step from one cohort's sum (the
    # same to float64 rounding: three partial sums against one), with the same releases and refusals.
    config = small(
        algorithm="reptile",
        **{
            "compute.workers": 3,
            "compute.reply": "sum",
            "federation.clients_per_round": 4,
            "privacy.mode": "central",
            "privacy.noise_multiplier": 0.7,
            "privacy.clip_norm": 0.05,
            "privacy.reproducible_noise": True,
            "robust.max_update_norm": 1e3,
        },
    )

    serve(InProcessGrid(client_app, num_partitions=3), config, ServerOptions(out_dir=str(tmp_path / "w")))
    simulate(config, tmp_path / "local", progress=False)

    workers, local = (load_checkpoint(tmp_path / d / "checkpoint.pt")[1] for d in ("w", "local"))
    for k in local.params:
        torch.testing.assert_close(workers.params[k], local.params[k], rtol=1e-6, atol=1e-7)
    assert workers.dp_releases == local.dp_releases and len(local.dp_releases) == config.federation.rounds
    rows = [meta_rows(tmp_path / d / "metrics.jsonl") for d in ("w", "local")]
    for key in ("clients", "tasks", "clipped_fraction", "epsilon"):
        assert [r[key] for r in rows[0]] == pytest.approx([r[key] for r in rows[1]])
    assert all(r["clients"] == 4 and r["clipped_fraction"] > 0 for r in rows[0])


def test_a_failing_cohort_worker_counts_each_of_its_clients(tmp_path: Path, caplog) -> None:
    config = small(**{"federation.clients_per_round": 4, "compute.workers": 2})  # worker 2 holds clients 1 and 3
    grid = InProcessGrid(client_app, num_partitions=2, handlers={2: _failing})

    with caplog.at_level(logging.WARNING):
        serve(grid, config, ServerOptions(out_dir=str(tmp_path), min_replies=2))

    rows = meta_rows(tmp_path / "metrics.jsonl")
    assert all(r["failed"] == 2 and r["clients"] == 2 for r in rows)
    assert "worker node 2 failed: RuntimeError: disk on fire" in caplog.text


def test_a_cohort_worker_refuses_a_wrong_partition_count_and_other_workers_clients() -> None:
    config = small(**{"compute.workers": 2})
    params = Experiment.from_config(config).initial_params()
    with pytest.raises(ValueError, match="num-partitions=6, but compute.workers is 2: 2 cohort workers"):
        client_app(train_message(config, params), context(partition=0, num_partitions=6))
    asking = train_message(config, params)
    asking.content.config_records[wire.CONFIG][wire.CLIENTS] = [0, 1]
    with pytest.raises(ValueError, match="client 1 is not one of worker 0's \\(clients c with c mod 2 = 0\\)"):
        client_app(asking, context(partition=0, num_partitions=2))
    asking.content.config_records[wire.CONFIG][wire.CLIENTS] = "0,x"  # the SecAgg+ form, malformed
    with pytest.raises(TypeError, match="record field 'clients' must list client indices, got '0,x'"):
        client_app(asking, context(partition=0, num_partitions=2))
    with pytest.raises(ConfigError, match="secagg masks one update per node; .* or --cohort-reply sum"):
        config.replace(**{"secagg.enabled": True})
    assert config.replace(**{"secagg.enabled": True, "compute.reply": "sum"}).secagg.enabled


def test_the_simulation_grid_is_polled_for_replies_every_10_ms_not_every_100() -> None:
    # Flower's InMemoryGrid sleeps pull_interval between looks for replies (0.1 s by default): up to 0.1 s idle
    # in every round. Other grids (no such attribute) are left alone.
    import inspect

    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from server.grid import GridTransport

    assert inspect.signature(InMemoryGrid).parameters["pull_interval"].default == 0.1

    class PollingGrid:  # what GridTransport sees of an InMemoryGrid
        pull_interval = 0.1

    grid = PollingGrid()
    GridTransport(grid, ServerOptions(out_dir="unused"))  # type: ignore[arg-type]
    assert grid.pull_interval == 0.01
    other = InProcessGrid(client_app, num_partitions=1)
    GridTransport(other, ServerOptions(out_dir="unused"))
    assert not hasattr(other, "pull_interval")


def test_the_client_app_module_imports_no_privacy_accountant() -> None:
    # A deployed SuperNode starts a fresh `flwr-clientapp` process for every message, which imports this module:
    # dp-accounting (and the scipy under it, about 2 s) is for the server's epsilon only.
    import subprocess
    import sys

    code = "import sys, client.client_app; print(sorted({'dp_accounting', 'scipy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
