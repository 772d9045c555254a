"""The meta-learning outer loop over a Flower `Grid`, in one readable function (`MetaServer.start`).

The loop owns nothing algorithmic: it samples clients with `fedmeta.sampling.sample_clients`, ships the
meta-parameters, decodes replies and hands them to `fedmeta.experiment.Outer.step` - the same calls as the
in-process loop, so both produce the same meta-parameters for the same seed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedmeta import wire
from fedmeta.checkpoint import save_checkpoint, start_or_resume
from fedmeta.config import ConfigError, RunConfig
from fedmeta.evaluation import format_summary, make_summary, summarise
from fedmeta.experiment import Outer, initial_params, meta_algorithm
from fedmeta.metrics import JsonlSink
from fedmeta.round import SecureSum, ServerState
from fedmeta.sampling import sample_clients
from fedmeta.types import ClientUpdate
from server.records import content_to_update, get_int, params_to_record
from server.secagg import secure_round

log = logging.getLogger(__name__)
SERVER_PREFIX = "server."


@dataclass(frozen=True)
class ServerOptions:
    """How the server runs over the network; not part of the experiment, so not in `RunConfig`."""

    out_dir: str = "runs/flower"
    # Nodes that must be connected before round 1 (0: every partition of the federation).
    min_nodes: int = 0
    # Replies a round needs to be applied (0: every sampled client). Fewer: the round is reported and skipped.
    min_replies: int = 0
    round_timeout: float = 600.0
    discovery_timeout: float = 120.0
    # Continue from out_dir's checkpoint (same config) instead of starting at round 0.
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("min_nodes", "min_replies"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"server.{name} must be a non-negative integer, got {value!r}")
        for name in ("round_timeout", "discovery_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"server.{name} must be a positive number of seconds, got {value!r}")


def parse_run_config(run_config: dict[str, Any]) -> tuple[RunConfig, ServerOptions]:
    """Split Flower's flat run config into the experiment (`RunConfig`) and `server.*` options."""
    server = {
        k.removeprefix(SERVER_PREFIX).replace("-", "_"): v for k, v in run_config.items() if k.startswith(SERVER_PREFIX)
    }
    known = ServerOptions.__dataclass_fields__
    unknown = sorted(set(server) - set(known))
    if unknown:
        raise ConfigError(f"unknown server option(s) {unknown}; known: {sorted(known)}")
    experiment = {k: v for k, v in run_config.items() if not k.startswith(SERVER_PREFIX)}
    return RunConfig.from_flat(experiment), ServerOptions(**server)


@dataclass(frozen=True)
class Node:
    node_id: int
    role: str
    index: int
    client_id: str


class MetaServer:
    """Discover nodes, run the rounds, evaluate on unseen clients, write metrics/checkpoint/summary."""

    def __init__(self, config: RunConfig, options: ServerOptions) -> None:
        self.config = config
        self.options = options
        self.algorithm = meta_algorithm(config)
        self.out = Path(options.out_dir)
        # Learned from the nodes at discovery: partitions in the federation, and how many of them train.
        self._num_partitions: int | None = None
        self._num_train = 0
        self._joined: set[int] = set()  # every node that has said which client it is (replaced ones included)
        self._refused: set[int] = set()  # nodes that cannot join (bad partition); not asked again

    # -- the whole outer loop ---------------------------------------------------------------------------
    def start(self, grid: Grid) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        log.info("run config: %s", json.dumps(self.config.to_flat(), sort_keys=True))
        train_nodes, unseen_nodes = self.discover(grid)
        init = initial_params(self.algorithm, self.config.federation.seed)
        outer = Outer(self.config, self._num_train)
        outer.check()
        state = start_or_resume(self.out, self.config, outer.initial_state(init), resume=self.options.resume)
        started = time.perf_counter()
        with JsonlSink(self.out / "metrics.jsonl", append=self.options.resume) as sink:
            for round_index in range(state.round, self.config.federation.rounds):
                if outer.over_budget(state):
                    log.info("time budget spent after %d rounds (%.1f min)", state.round, state.elapsed / 60)
                    break
                self.rejoin(grid, train_nodes, unseen_nodes)
                state, metrics = self.train_round(grid, outer, state, round_index, train_nodes)
                sink.write(metrics)
                save_checkpoint(self.out / "checkpoint.pt", config=self.config, state=state)
            meta_seconds = time.perf_counter() - started
            results = self.evaluate(grid, {"meta": state.params, "random_init": init}, unseen_nodes)
        summary = make_summary(
            self.config,
            results,
            rounds=state.round,
            meta_seconds=meta_seconds,
            privacy=outer.privacy_report(state),
            total_seconds=time.perf_counter() - started,
        )
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("%s", format_summary(summary))
        return summary

    # -- steps --------------------------------------------------------------------------------------------
    def _config_record(self, **extra: int) -> ConfigRecord:
        return ConfigRecord({**self.config.to_flat(), **extra})

    def discover(self, grid: Grid) -> tuple[dict[int, Node], dict[int, Node]]:
        """Wait for `min_nodes` nodes, then ask each which client it is: {client index: node} per role."""
        deadline = time.monotonic() + self.options.discovery_timeout
        node_ids = list(grid.get_node_ids())
        wanted = self.options.min_nodes or None
        while True:
            query = [
                Message(RecordDict({wire.CONFIG: self._config_record()}), dst_node_id=n, message_type="query")
                for n in sorted(node_ids)
            ]
            nodes = self._nodes(grid.send_and_receive(query, timeout=self.options.discovery_timeout))
            expected = wanted or self._num_partitions
            if expected is not None and len(nodes) >= expected:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} of the {expected} required nodes answered within "
                    f"{self.options.discovery_timeout:g} s; start more SuperNodes or lower "
                    "server.min-nodes"
                )
            time.sleep(1.0)
            node_ids = list(grid.get_node_ids())
        train = {n.index: n for n in nodes if n.role == wire.ROLE_TRAIN}
        unseen = {n.index: n for n in nodes if n.role == wire.ROLE_UNSEEN}
        log.info("federation: %d training and %d unseen clients connected", len(train), len(unseen))
        return train, unseen

    def rejoin(self, grid: Grid, train: dict[int, Node], unseen: dict[int, Node]) -> None:
        """Before a round: ask nodes that connected since discovery which client they are. A restarted SuperNode
        comes back under a new node id; it takes over its partition from the dead one."""
        new = sorted(set(grid.get_node_ids()) - self._joined - self._refused)
        if not new:
            return
        query = [
            Message(RecordDict({wire.CONFIG: self._config_record()}), dst_node_id=n, message_type="query") for n in new
        ]
        replies = list(grid.send_and_receive(query, timeout=min(self.options.discovery_timeout, 60.0)))
        # A node that cannot join (an error reply) is not asked again; a silent one is asked next round.
        self._refused |= {r.metadata.src_node_id for r in replies if r.has_error()}
        for node in self._nodes(replies):
            table = train if node.role == wire.ROLE_TRAIN else unseen
            previous = table.get(node.index)
            table[node.index] = node
            log.info(
                "%s client %d (%s) joined as node %d%s",
                node.role,
                node.index,
                node.client_id,
                node.node_id,
                f", replacing node {previous.node_id}" if previous else "",
            )

    def _nodes(self, replies: Iterable[Message]) -> list[Node]:
        nodes = []
        for reply in replies:
            if reply.has_error():
                log.warning("node %s cannot join: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            record = reply.content.config_records[wire.CLIENT]
            nodes.append(
                Node(
                    reply.metadata.src_node_id,
                    str(record[wire.ROLE]),
                    get_int(record, wire.INDEX),
                    str(record[wire.CLIENT_ID]),
                )
            )
            self._joined.add(reply.metadata.src_node_id)
            self._num_partitions = get_int(record, wire.NUM_PARTITIONS)
            self._num_train = get_int(record, wire.NUM_TRAIN)
        duplicates = {
            (n.role, n.index) for n in nodes if sum((m.role, m.index) == (n.role, n.index) for m in nodes) > 1
        }
        if duplicates:
            raise RuntimeError(f"several nodes claim the same partition(s): {sorted(duplicates)}")
        return nodes

    def train_round(
        self,
        grid: Grid,
        outer: Outer,
        state: ServerState,
        round_index: int,
        nodes: dict[int, Node],
    ) -> tuple[ServerState, dict[str, Any]]:
        started = time.perf_counter()
        fed = self.config.federation
        chosen = sample_clients(
            seed=fed.seed,
            round_index=round_index,
            num_clients=self._num_train,
            count=fed.clients_in_round(self._num_train),
        )
        present = [c for c in chosen if c in nodes]
        payload: list[tuple[str, ClientUpdate]] | SecureSum | None
        if self.config.secagg.enabled:
            result = secure_round(
                grid,
                params=state.params,
                config={**self.config.to_flat(), wire.ROUND: round_index},
                node_ids=[nodes[c].node_id for c in present],
                secagg=self.config.secagg,
                round_number=round_index + 1,
                timeout=self.options.round_timeout,
            )
            payload = result.secure
            replies = payload.count if payload is not None else 0
            # SecAgg+ does not tell a timed-out client from a failed one: both are counted as failed.
            failed, timed_out = len(present) - replies, 0
            extra = {"secagg_out_of_range": result.out_of_range}
            if result.out_of_range > 0:
                log.warning(
                    "round %d: %.2g of the update coordinates exceeded secagg.clipping_range %g and were clipped",
                    round_index + 1,
                    result.out_of_range,
                    self.config.secagg.clipping_range,
                )
        else:
            payload, failed = self._train_replies(grid, state, round_index, [nodes[c].node_id for c in present])
            replies, extra = len(payload), {}
            timed_out = len(present) - replies - failed
        needed = self.options.min_replies or len(chosen)
        counts = {
            "sampled": len(chosen),
            "absent": len(chosen) - len(present),
            "failed": failed,
            "timed_out": timed_out,
        }
        if payload is None or replies < needed:
            log.warning(
                "round %d: %d replies, fewer than the %d required; meta-parameters unchanged",
                round_index + 1,
                replies,
                needed,
            )
            round_metrics: dict[str, float] = {"skipped": 1}
            state = replace(state, round=state.round + 1)
        else:
            state, round_metrics = outer.step(state, payload, round_index)
            round_metrics.update(extra)
        seconds = time.perf_counter() - started
        state = replace(state, elapsed=state.elapsed + seconds)
        metrics = {
            "phase": "meta",
            "round": state.round,
            "seconds": seconds,
            "elapsed": state.elapsed,
            "outer_lr": outer.optimizer.lr_at(state.opt_state["step"]),
            **counts,
            **round_metrics,
        }
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k != "seconds")
        log.info(
            "round %d/%d: %d/%d replies %s (%.2f s)",
            state.round,
            fed.rounds,
            replies,
            len(chosen),
            shown,
            metrics["seconds"],
        )
        return state, metrics

    def _train_replies(
        self, grid: Grid, state: ServerState, round_index: int, node_ids: list[int]
    ) -> tuple[list[tuple[str, ClientUpdate]], int]:
        """Send the round's train messages; (decoded updates, number of failed or malformed replies)."""
        params = params_to_record(state.params)
        messages = [
            Message(
                RecordDict({wire.PARAMS: params, wire.CONFIG: self._config_record(**{wire.ROUND: round_index})}),
                dst_node_id=node_id,
                message_type="train",
                group_id=str(round_index + 1),
            )
            for node_id in node_ids
        ]
        updates: list[tuple[str, ClientUpdate]] = []
        failed = 0
        for reply in grid.send_and_receive(messages, timeout=self.options.round_timeout):
            if reply.has_error():
                failed += 1
                log.warning(
                    "round %d: node %s failed: %s", round_index + 1, reply.metadata.src_node_id, reply.error.reason
                )
                continue
            try:
                updates.append(content_to_update(reply.content))
            except (KeyError, TypeError, ValueError) as error:
                failed += 1
                log.warning(
                    "round %d: malformed reply from node %s: %r", round_index + 1, reply.metadata.src_node_id, error
                )
        return updates, failed

    def evaluate(self, grid: Grid, models: dict[str, Any], nodes: dict[int, Node]) -> dict[str, Any]:
        """Personalised evaluation on the first `eval_clients` unseen clients that are connected."""
        indices = sorted(nodes)[: self.config.eval.eval_clients]
        content: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            wire.PARAMS: params_to_record(models["meta"]),
            wire.CONFIG: self._config_record(),
        }
        content.update({wire.BASELINE_PREFIX + k: params_to_record(v) for k, v in models.items() if k != "meta"})
        messages = [
            Message(RecordDict(content), dst_node_id=nodes[i].node_id, message_type="evaluate") for i in indices
        ]
        per_client: dict[int, dict[str, np.ndarray]] = {}
        steps = self.config.inner.eval_steps
        for reply in grid.send_and_receive(messages, timeout=self.options.round_timeout):
            if reply.has_error():
                log.warning("evaluation: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            metrics = reply.content.metric_records[wire.METRICS]
            index = get_int(reply.content.config_records[wire.CLIENT], wire.INDEX)
            per_client[index] = {
                name: np.array([metrics[wire.curve_key(name, s)] for s in range(steps + 1)]).T for name in models
            }
        if not per_client:
            raise RuntimeError("no unseen client answered the evaluation round")
        order = sorted(per_client)
        metric = self.algorithm.metric_name
        return {name: summarise(np.stack([per_client[i][name] for i in order]), metric) for name in models}
