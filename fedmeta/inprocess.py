"""The in-process transport: every client runs in this process, one after another.

It calls exactly what Flower's ClientApp calls (`Experiment.client_update`, `fedmeta.evaluation.client_curves`),
so a run here and a run over Flower differ only in how the work travels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from fedmeta.config import ConfigError, RunConfig
from fedmeta.evaluation import client_curves
from fedmeta.experiment import EvalProtocol, Experiment
from fedmeta.loop import FederationInfo, Replies
from fedmeta.tasks import Federation, build_federation
from fedmeta.types import Params


class InProcess:
    """The reference transport (`fedmeta.loop.Transport`); the federation's data is loaded once."""

    def __init__(self, *, progress: bool = True, federation: Federation | None = None) -> None:
        self.progress = progress
        self._federation = federation
        self._experiments: dict[RunConfig, Experiment] = {}

    def experiment(self, config: RunConfig) -> Experiment:
        """`config`'s run on this process's federation (built on first use, shared by every run)."""
        if config not in self._experiments:
            if self._federation is None:
                self._federation = build_federation(config.data, seed=config.federation.seed)
            self._experiments[config] = Experiment.from_config(config, federation=self._federation)
        return self._experiments[config]

    def connect(self, config: RunConfig) -> FederationInfo:
        if config.secagg.enabled:
            raise ConfigError(
                "secure aggregation hides updates from a server; the in-process loop has none. "
                "Use --engine ray or a deployment (fedmeta server/client/run)"
            )
        federation = self.experiment(config).federation
        return FederationInfo(
            num_train=len(federation.train_clients),
            num_unseen=len(federation.unseen_clients),
            num_global_outputs=federation.num_global_outputs,
        )

    def train(self, config: RunConfig, params: Params, round_index: int, clients: Sequence[int]) -> Replies:
        experiment = self.experiment(config)
        if config.compute.cohorts and config.compute.reply == "sum":
            return Replies(experiment.cohort_sum(params, clients, round_index), received=len(clients))
        if config.compute.cohorts:  # every sampled client in one cohort: one vectorised call where possible
            rows = experiment.cohort_update(params, clients, round_index)
            return Replies(rows, received=len(rows))
        train_clients = experiment.federation.train_clients
        updates = [(train_clients[c].client_id, experiment.client_update(params, c, round_index)) for c in clients]
        return Replies(updates, received=len(updates))

    def evaluate(
        self, config: RunConfig, models: Mapping[str, Params], clients: Sequence[int], protocol: EvalProtocol
    ) -> dict[str, np.ndarray]:
        experiment = self.experiment(config)
        unseen = experiment.federation.unseen_clients
        per_client = []
        show = self.progress and protocol == experiment.eval_kwargs()  # the final evaluation, not the curve
        for index in tqdm(clients, desc="evaluate", unit="client", disable=not show, dynamic_ncols=True):
            curves = client_curves(experiment.algorithm, models, unseen[index], index, **protocol)
            per_client.append({name: np.asarray(curve, dtype=np.float64) for name, curve in curves.items()})
        return {name: np.stack([c[name] for c in per_client]) for name in models}
