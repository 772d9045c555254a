"""The Flower transport: `fedmeta.loop` over a Flower `Grid` (the Ray simulation and a deployment alike).

`GridTransport` finds out which node holds which client, sends each round's train messages (through SecAgg+
when it is on), lets nodes that restart take over their partition, and collects the unseen clients'
evaluation curves. It owns nothing algorithmic: the round itself is `fedmeta.loop.run`, the same code the
in-process transport drives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

import wire
from fedmeta.config import ConfigError, RunConfig
from fedmeta.evaluation import format_summary
from fedmeta.experiment import EvalProtocol
from fedmeta.loop import FederationInfo, Replies, run
from fedmeta.round import SecureSum
from fedmeta.types import ClientRows, ClientUpdate, CohortSum, Params
from server.secagg import SecureRound, secure_round
from wire.records import content_to_rows, content_to_sum, content_to_update, get_int, params_to_record

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


def _warn_out_of_range(result: SecureRound, config: RunConfig, round_index: int) -> None:
    if result.out_of_range > 0:
        log.warning(
            "round %d: %.2g of the update coordinates exceeded secagg.clipping_range %g and were clipped",
            round_index + 1,
            result.out_of_range,
            config.secagg.clipping_range,
        )


PULL_INTERVAL = 0.01  # seconds between looks for replies in the simulation's in-memory state


class GridTransport:
    """`fedmeta.loop.Transport` over a Flower Grid: clients are the nodes that answered discovery."""

    def __init__(self, grid: Grid, options: ServerOptions) -> None:
        self.grid = grid
        self.options = options
        if isinstance(getattr(grid, "pull_interval", None), float):
            # The simulation's InMemoryGrid sleeps pull_interval (0.1 s) between looks for replies: up to 0.1 s
            # of every round spent idle, most of Flower's per-round overhead at 1,000 clients per round
            # (benchmarks/population.py). Looking in the in-memory state every 10 ms costs next to nothing.
            grid.pull_interval = min(grid.pull_interval, PULL_INTERVAL)  # type: ignore[attr-defined]
        self.train_nodes: dict[int, Node] = {}
        self.unseen_nodes: dict[int, Node] = {}
        self.worker_nodes: dict[int, Node] = {}  # compute.workers > 0: cohort workers by partition
        # Learned from the nodes at discovery: the federation's partitions, and how many of them train.
        self._num_partitions: int | None = None
        self._info: FederationInfo | None = None
        self._joined: set[int] = set()  # every node that has said which client it is (replaced ones included)
        self._refused: set[int] = set()  # nodes that cannot join (bad partition); not asked again

    # -- Transport ----------------------------------------------------------------------------------------
    def connect(self, config: RunConfig) -> FederationInfo:
        """Wait for `min_nodes` nodes, then ask each which client it is."""
        deadline = time.monotonic() + self.options.discovery_timeout
        node_ids = list(self.grid.get_node_ids())
        wanted = self.options.min_nodes or None
        while True:
            replies = self.grid.send_and_receive(
                self._queries(config, node_ids), timeout=self.options.discovery_timeout
            )
            nodes = self._nodes(replies)
            expected = wanted or self._num_partitions
            if expected is not None and len(nodes) >= expected:
                break
            if time.monotonic() > deadline:
                wanted_text = f"of the {expected} required nodes " if expected is not None else "SuperNodes "
                raise RuntimeError(
                    f"only {len(nodes)} {wanted_text}answered within {self.options.discovery_timeout:g} s; start "
                    "more SuperNodes (fedmeta client ...) or lower server.min_nodes"
                )
            time.sleep(1.0)
            node_ids = list(self.grid.get_node_ids())
        self.train_nodes = {n.index: n for n in nodes if n.role == wire.ROLE_TRAIN}
        self.unseen_nodes = {n.index: n for n in nodes if n.role == wire.ROLE_UNSEEN}
        self.worker_nodes = {n.index: n for n in nodes if n.role == wire.ROLE_WORKER}
        assert self._info is not None  # set by _nodes from the first answer
        if self.worker_nodes:
            log.info(
                "federation: %d cohort workers connected for %d training and %d unseen clients",
                len(self.worker_nodes),
                self._info.num_train,
                self._info.num_unseen,
            )
        else:
            log.info(
                "federation: %d training and %d unseen clients connected",
                len(self.train_nodes),
                len(self.unseen_nodes),
            )
        return self._info

    def train(self, config: RunConfig, params: Params, round_index: int, clients: Sequence[int]) -> Replies:
        self.rejoin(config)
        if config.compute.workers:
            return self._train_cohorts(config, params, round_index, clients)
        present = [c for c in clients if c in self.train_nodes]
        node_ids = [self.train_nodes[c].node_id for c in present]
        if config.secagg.enabled:
            result = secure_round(
                self.grid,
                params=params,
                config={**config.to_flat(), wire.ROUND: round_index},
                node_ids=node_ids,
                secagg=config.secagg,
                round_number=round_index + 1,
                timeout=self.options.round_timeout,
            )
            received = result.secure.count if result.secure is not None else 0
            # SecAgg+ does not tell a timed-out client from a failed one: both are counted as failed.
            replies = Replies(
                result.secure,
                received=received,
                failed=len(present) - received,
                metrics={"secagg_out_of_range": result.out_of_range},
            )
            _warn_out_of_range(result, config, round_index)
        else:
            updates, failed = self._train_replies(config, params, round_index, node_ids)
            replies = Replies(
                updates, received=len(updates), failed=failed, timed_out=len(present) - len(updates) - failed
            )
        replies.absent = len(clients) - len(present)
        needed = self.options.min_replies or len(clients)
        if replies.updates is None or replies.received < needed:
            log.warning(
                "round %d: %d replies, fewer than the %d required; meta-parameters unchanged",
                round_index + 1,
                replies.received,
                needed,
            )
            replies.updates = None
        return replies

    def evaluate(
        self, config: RunConfig, models: Mapping[str, Params], clients: Sequence[int], protocol: EvalProtocol
    ) -> dict[str, np.ndarray]:
        """Personalised evaluation on those of `clients` (unseen client indices) that are connected."""
        content: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
            wire.PARAMS: params_to_record(models["meta"]),
            wire.PROTOCOL: ConfigRecord(dict(protocol)),
        }
        content.update({wire.BASELINE_PREFIX + k: params_to_record(v) for k, v in models.items() if k != "meta"})
        flat = config.to_flat()
        # Which clients each message asks for: one client per node, or a worker's share of them.
        asked: dict[int, list[int]] = {}
        if config.compute.workers:
            for c in clients:
                if (node := self.worker_nodes.get(c % config.compute.workers)) is not None:
                    asked.setdefault(node.node_id, []).append(c)
        else:
            asked = {self.unseen_nodes[i].node_id: [i] for i in clients if i in self.unseen_nodes}
        messages = [
            Message(
                RecordDict({**content, wire.CONFIG: ConfigRecord({**flat, wire.CLIENTS: indices})}),
                dst_node_id=node_id,
                message_type="evaluate",
            )
            for node_id, indices in asked.items()
        ]
        per_client: dict[int, dict[str, np.ndarray]] = {}
        steps = protocol["steps"]
        for reply in self.grid.send_and_receive(messages, timeout=self.options.round_timeout):
            if reply.has_error():
                log.warning("evaluation: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            metrics = reply.content.metric_records[wire.METRICS]
            indices = asked[reply.metadata.src_node_id]
            for name in models:
                values = np.array([metrics[wire.curve_key(name, s)] for s in range(steps + 1)], dtype=np.float64).T
                for i, part in zip(indices, np.split(values, len(indices)), strict=True):
                    per_client.setdefault(i, {})[name] = part
        if not per_client:
            raise RuntimeError("no unseen client answered the evaluation round")
        return {name: np.stack([per_client[i][name] for i in sorted(per_client)]) for name in models}

    # -- nodes --------------------------------------------------------------------------------------------
    def _queries(self, config: RunConfig, node_ids: Iterable[int]) -> list[Message]:
        flat = config.to_flat()
        return [
            Message(RecordDict({wire.CONFIG: ConfigRecord(flat)}), dst_node_id=n, message_type="query")
            for n in sorted(node_ids)
        ]

    def rejoin(self, config: RunConfig) -> None:
        """Before a round: ask nodes that connected since discovery which client they are. A restarted SuperNode
        comes back under a new node id; it takes over its partition from the dead one."""
        new = sorted(set(self.grid.get_node_ids()) - self._joined - self._refused)
        if not new:
            return
        replies = list(
            self.grid.send_and_receive(self._queries(config, new), timeout=min(self.options.discovery_timeout, 60.0))
        )
        # A node that cannot join (an error reply) is not asked again; a silent one is asked next round.
        self._refused |= {r.metadata.src_node_id for r in replies if r.has_error()}
        for node in self._nodes(replies):
            table = {
                wire.ROLE_TRAIN: self.train_nodes,
                wire.ROLE_UNSEEN: self.unseen_nodes,
                wire.ROLE_WORKER: self.worker_nodes,
            }[node.role]
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
            num_train = get_int(record, wire.NUM_TRAIN)
            outputs = get_int(record, wire.NUM_GLOBAL_OUTPUTS)
            self._info = FederationInfo(
                num_train=num_train,
                num_unseen=get_int(record, wire.NUM_UNSEEN),
                num_global_outputs=outputs if outputs > 0 else None,
            )
        duplicates = {
            (n.role, n.index) for n in nodes if sum((m.role, m.index) == (n.role, n.index) for m in nodes) > 1
        }
        if duplicates:
            raise RuntimeError(f"several nodes claim the same partition(s): {sorted(duplicates)}")
        return nodes

    def _train_cohorts(self, config: RunConfig, params: Params, round_index: int, clients: Sequence[int]) -> Replies:
        """A round over cohort workers: each computes its share of the sampled clients and returns their rows
        (or, with `compute.reply = "sum"`, their sum)."""
        workers = config.compute.workers
        sums = config.compute.reply == "sum"
        asked: dict[int, list[int]] = {}
        for c in clients:
            if (node := self.worker_nodes.get(c % workers)) is not None:
                asked.setdefault(node.node_id, []).append(c)
        if config.secagg.enabled:
            return self._train_cohorts_secure(config, params, round_index, clients, asked)
        record = params_to_record(params)
        flat = config.to_flat()
        messages = [
            Message(
                RecordDict(
                    {
                        wire.PARAMS: record,
                        wire.CONFIG: ConfigRecord({**flat, wire.ROUND: round_index, wire.CLIENTS: indices}),
                    }
                ),
                dst_node_id=node_id,
                message_type="train",
                group_id=str(round_index + 1),
            )
            for node_id, indices in asked.items()
        ]
        parts: list[ClientRows | CohortSum] = []
        failed = answered = 0
        for reply in self.grid.send_and_receive(messages, timeout=self.options.round_timeout):
            sent = len(asked.get(reply.metadata.src_node_id, []))
            answered += sent
            if reply.has_error():
                failed += sent
                log.warning(
                    "round %d: worker node %s failed: %s",
                    round_index + 1,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            try:
                part = content_to_sum(reply.content) if sums else content_to_rows(reply.content)
                replied = part.count + len(part.rejected) if isinstance(part, CohortSum) else len(part)
                if replied != sent:
                    raise ValueError(f"{replied} updates for {sent} clients")
                parts.append(part)
            except (KeyError, TypeError, ValueError) as error:
                failed += sent
                log.warning(
                    "round %d: malformed reply from worker node %s: %r",
                    round_index + 1,
                    reply.metadata.src_node_id,
                    error,
                )
        present = sum(len(v) for v in asked.values())
        rows: ClientRows | CohortSum | None = None
        received = 0
        if parts and sums:
            rows = CohortSum.combine([p for p in parts if isinstance(p, CohortSum)])
            received = rows.count + len(rows.rejected)
        elif parts:
            rows = ClientRows.concat([p for p in parts if isinstance(p, ClientRows)])
            received = len(rows)
        replies = Replies(
            rows, received=received, failed=failed, timed_out=present - answered, absent=len(clients) - present
        )
        needed = self.options.min_replies or len(clients)
        if rows is None or received < needed:
            log.warning(
                "round %d: %d replies, fewer than the %d required; meta-parameters unchanged",
                round_index + 1,
                received,
                needed,
            )
            replies.updates = None
        return replies

    def _train_cohorts_secure(
        self,
        config: RunConfig,
        params: Params,
        round_index: int,
        clients: Sequence[int],
        asked: dict[int, list[int]],
    ) -> Replies:
        """A SecAgg+ round over cohort workers: each masks its cohort's mean, weighted by its client count; the
        server learns only the mean over every client of the workers that completed the protocol. A worker one
        of whose clients' updates is refused fails whole, so the count of clients in the mean is exact."""
        result = secure_round(
            self.grid,
            params=params,
            config={**config.to_flat(), wire.ROUND: round_index},
            node_ids=list(asked),
            secagg=config.secagg,
            round_number=round_index + 1,
            timeout=self.options.round_timeout,
            # Legacy FitIns configs hold scalars only: a worker's clients travel as "c1,c2,...".
            node_config={node: {wire.CLIENTS: ",".join(map(str, indices))} for node, indices in asked.items()},
            max_weight=max((len(indices) for indices in asked.values()), default=1),
        )
        _warn_out_of_range(result, config, round_index)
        present = sum(len(indices) for indices in asked.values())
        secure = result.secure
        received = sum(len(asked[node]) for node in result.nodes) if secure is not None else 0
        if secure is not None:
            secure = SecureSum(secure.mean, received)
        replies = Replies(
            secure,
            received=received,
            failed=present - received,
            absent=len(clients) - present,
            metrics={"secagg_out_of_range": result.out_of_range},
        )
        needed = self.options.min_replies or len(clients)
        if secure is None or received < needed:
            log.warning(
                "round %d: %d replies, fewer than the %d required; meta-parameters unchanged",
                round_index + 1,
                received,
                needed,
            )
            replies.updates = None
        return replies

    def _train_replies(
        self, config: RunConfig, params: Params, round_index: int, node_ids: list[int]
    ) -> tuple[list[tuple[str, ClientUpdate]], int]:
        """Send the round's train messages; (decoded updates, number of failed or malformed replies)."""
        record = params_to_record(params)
        messages = [
            Message(
                RecordDict(
                    {wire.PARAMS: record, wire.CONFIG: ConfigRecord({**config.to_flat(), wire.ROUND: round_index})}
                ),
                dst_node_id=node_id,
                message_type="train",
                group_id=str(round_index + 1),
            )
            for node_id in node_ids
        ]
        updates: list[tuple[str, ClientUpdate]] = []
        failed = 0
        for reply in self.grid.send_and_receive(messages, timeout=self.options.round_timeout):
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


def serve(grid: Grid, config: RunConfig, options: ServerOptions) -> dict[str, Any]:
    """The whole ServerApp: `fedmeta.loop.run` over this Grid, its summary logged."""
    summary = run(config, GridTransport(grid, options), options.out_dir, resume=options.resume, progress=False)
    log.info("%s", format_summary(summary))
    return summary
