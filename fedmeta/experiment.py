"""What a run's config implies - federation, model, algorithm, outer optimizer - built once, used by every
transport. The in-process loop, the Flower ServerApp and the Flower ClientApp all go through `Experiment`,
so a client computes the same update wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmeta.algorithms import Algorithm, build_algorithm
from fedmeta.config import RunConfig
from fedmeta.models import build_model
from fedmeta.sampling import round_tasks
from fedmeta.server_opt import OuterOptimizer
from fedmeta.tasks import Federation, build_federation
from fedmeta.types import ClientUpdate, Params


@dataclass(frozen=True)
class Experiment:
    config: RunConfig
    federation: Federation
    algorithm: Algorithm

    @classmethod
    def from_config(
        cls, config: RunConfig, *, algorithm: str | None = None, federation: Federation | None = None
    ) -> Experiment:
        """Build (and check) everything; `algorithm="fedavg"` gives the FedAvg baseline on the same clients."""
        if federation is None:
            federation = build_federation(config.data, seed=config.federation.seed)
            ep = config.episode
            federation.check_episode(ways=ep.ways, shots=ep.shots, queries=ep.queries)
        name = algorithm or config.algorithm
        return cls(config, federation, _build_algorithm(config, name, federation.kind, federation.num_global_outputs))

    @property
    def is_baseline(self) -> bool:
        return self.algorithm.name == "fedavg"

    @property
    def tasks_per_client(self) -> int:
        return self.config.eval.fedavg_local_steps if self.is_baseline else self.config.federation.tasks_per_client

    @property
    def rounds(self) -> int:
        if not self.is_baseline:
            return self.config.federation.rounds
        fedavg_rounds = self.config.eval.fedavg_rounds
        return self.config.federation.rounds if fedavg_rounds is None else fedavg_rounds

    def optimizer(self) -> OuterOptimizer:
        if self.is_baseline:
            return OuterOptimizer("sgd", lr=1.0)  # outer SGD at lr 1 on (params - local) is exactly FedAvg
        o = self.config.outer
        return OuterOptimizer(o.optimizer, o.outer_lr, o.beta1, o.beta2, o.eps)

    def initial_params(self) -> Params:
        return initial_params(self.algorithm, self.config.federation.seed)

    def clients_in_round(self) -> int:
        return self.config.federation.clients_in_round(len(self.federation.train_clients))

    def client_update(self, params: Params, client_index: int, round_index: int) -> ClientUpdate:
        """Training client `client_index`'s update in round `round_index` (0-based)."""
        clients = self.federation.train_clients
        if not 0 <= client_index < len(clients):
            raise IndexError(f"training client index {client_index} out of range 0..{len(clients) - 1}")
        ep = self.config.episode
        tasks = round_tasks(
            clients[client_index],
            client_index,
            seed=self.config.federation.seed,
            round_index=round_index,
            stream="fedavg" if self.is_baseline else "meta",
            data_kind=self.algorithm.data_kind,
            num_tasks=self.tasks_per_client,
            ways=ep.ways,
            shots=ep.shots,
            queries=ep.queries,
            batch_size=self.config.eval.fedavg_batch,
        )
        return self.algorithm.client_update(params, tasks)


def task_kind(dataset: str) -> str:
    return "regression" if dataset == "sinusoid" else "classification"


def meta_algorithm(config: RunConfig) -> Algorithm:
    """The configured algorithm without touching any data: what a server needs to hold meta-parameters."""
    return _build_algorithm(config, config.algorithm, task_kind(config.data.dataset), num_global_outputs=None)


def initial_params(algorithm: Algorithm, seed: int) -> Params:
    """The meta-model's starting point, a function of the run seed alone (the same on every transport)."""
    return algorithm.init_params(torch.Generator().manual_seed(seed))


def _build_algorithm(config: RunConfig, name: str, kind: str, num_global_outputs: int | None) -> Algorithm:
    if kind == "regression":
        out: int | None = 1
    elif name == "protonet":
        out = None  # an embedding, no head
    elif name == "fedavg":
        if num_global_outputs is None:
            raise ValueError("the FedAvg baseline needs the federation's global label count")
        out = num_global_outputs
    else:
        out = config.episode.ways
    model = build_model(config.data.dataset, out_features=out)
    if name == "fedavg":
        return build_algorithm(name, model, kind=kind, inner_lr=config.eval.fedavg_lr, inner_steps=1)
    return build_algorithm(name, model, kind=kind, inner_lr=config.inner.inner_lr, inner_steps=config.inner.inner_steps)
