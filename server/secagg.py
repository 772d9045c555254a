"""One training round under Flower's SecAgg+: the server learns the mean of the updates, never one of them.

Flower 1.41 ships SecAgg+ as `SecAggPlusWorkflow`, written for its legacy `Strategy` API: it asks a
`LegacyContext`'s strategy which clients to train (`configure_fit`), runs the four protocol stages over the
`Grid`, and hands the unmasked aggregate to `aggregate_fit`. `secure_round` supplies the smallest legacy
pieces it needs - a strategy that returns our already sampled nodes and keeps the aggregate - so the protocol
itself (key agreement, secret sharing, masking, dropout recovery) is Flower's, unmodified.

The workflow computes a weighted average with the `num_examples` of each `FitRes` as weight; clients report
`num_examples = 1` and `max_weight` is 1, so the weights are exact and the result is the plain mean. A cohort
worker (`compute.workers` with `compute.reply = "sum"`) reports its cohort's mean with the number of clients in
it, so the aggregate is again the mean over clients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedmeta.config import SecAggConfig
from fedmeta.round import SecureSum
from fedmeta.types import Params
from wire.records import arrays_to_secure_mean

log = logging.getLogger(__name__)


@dataclass
class SecureRound:
    """What a SecAgg+ round produced: the secure mean (None if the protocol halted) and its bookkeeping."""

    secure: SecureSum | None
    failures: int
    out_of_range: float = 0.0
    nodes: tuple[int, ...] = ()  # the nodes whose updates are in the aggregate


class _Node(ClientProxy):
    """The legacy workflow addresses nodes through proxies; it only reads `node_id` from them."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def _unused(self, *args: object, **kwargs: object) -> object:
        raise NotImplementedError("fedmeta talks to nodes through the Grid, not through client proxies")

    get_properties = get_parameters = fit = evaluate = reconnect = _unused  # type: ignore[assignment]


class _Collect(Strategy):
    """`configure_fit` returns the round's instructions as given; `aggregate_fit` keeps the secure aggregate."""

    def __init__(self, instructions: list[tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = instructions
        self.aggregate: list[np.ndarray] | None = None
        self.nodes: tuple[int, ...] = ()
        self.count = 0
        self.failures = 0

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        # Each result's parameters were replaced by the unmasked aggregate; no individual update is here.
        self.count, self.failures = len(results), len(failures)
        self.nodes = tuple(proxy.node_id for proxy, _ in results)
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):  # type: ignore[no-untyped-def]
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        return None, {}

    def evaluate(self, server_round, parameters):  # type: ignore[no-untyped-def]
        return None


def secure_round(
    grid: Grid,
    *,
    params: Params,
    config: dict[str, int | float | str | bool],
    node_ids: list[int],
    secagg: SecAggConfig,
    round_number: int,
    timeout: float,
    node_config: dict[int, dict[str, int | float | str | bool]] | None = None,
    max_weight: float = 1.0,
) -> SecureRound:
    """Train `node_ids` on `params` under SecAgg+ and return the unmasked mean of their updates.

    `node_config`: entries added to `config` for each node (a cohort worker's clients). Nodes report a weight
    (FitRes.num_examples) of at most `max_weight`; the aggregate is the mean weighted by it: 1 for a client, the
    count of clients summed for a cohort worker."""
    parameters = ndarrays_to_parameters([params[k].detach().cpu().numpy() for k in sorted(params)])
    proxies = [_Node(n) for n in node_ids]
    manager = SimpleClientManager()
    for proxy in proxies:
        manager.register(proxy)
    extra = node_config or {}
    collect = _Collect([(proxy, FitIns(parameters, {**config, **extra.get(proxy.node_id, {})})) for proxy in proxies])
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1, round_timeout=timeout),
        strategy=collect,
        client_manager=manager,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_number})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # unused: the instructions carry params
    workflow = SecAggPlusWorkflow(
        num_shares=float(secagg.num_shares),
        reconstruction_threshold=float(secagg.reconstruction_threshold),
        max_weight=float(max_weight),
        clipping_range=float(secagg.clipping_range),  # Flower refuses an int here (e.g. 32 from a TOML file)
        quantization_range=secagg.quantization_range,
        timeout=timeout,
    )
    # The workflow logs four INFO lines per round on Flower's logger; the round's own line says what matters.
    flower_log = logging.getLogger("flwr")
    level = flower_log.level
    if not log.isEnabledFor(logging.DEBUG):
        flower_log.setLevel(logging.WARNING)
    try:
        workflow(grid, context)
    finally:
        flower_log.setLevel(level)
    if collect.aggregate is None:
        return SecureRound(None, failures=len(node_ids))
    mean, out_of_range = arrays_to_secure_mean(collect.aggregate, params, secagg.clipping_range)
    return SecureRound(
        SecureSum(mean, collect.count), failures=collect.failures, out_of_range=out_of_range, nodes=collect.nodes
    )
