"""What a run's config implies - federation, model, algorithm, outer optimizer - built once, used by every
transport. The in-process loop, the Flower ServerApp and the Flower ClientApp all go through `Experiment`,
so a client computes the same update wherever it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch

from fedmeta.algorithms import ALGORITHMS, Algorithm, build_algorithm
from fedmeta.algorithms.maml import MamlPlusPlus
from fedmeta.config import ConfigError, RunConfig
from fedmeta.functional import InnerOptimizer
from fedmeta.models import build_model
from fedmeta.privacy import (
    ServerPrivacy,
    client_side_protection,
    epsilon_of_releases,
    noise_generator,
    protect_update,
    update_noise_multiplier,
)
from fedmeta.round import SecureSum, ServerState, apply_round, apply_secure_sum, apply_sum, init_state, sum_rows
from fedmeta.runtime import resolve_device
from fedmeta.sampling import local_tasks
from fedmeta.server_opt import OuterOptimizer
from fedmeta.tasks import Federation, build_federation, task_rng
from fedmeta.tasks.augment import distort_task
from fedmeta.types import ClientRows, ClientUpdate, CohortSum, Params, Task

log = logging.getLogger(__name__)


class EvalProtocol(TypedDict):
    """The evaluation's numbers, as keyword arguments of `fedmeta.evaluation`'s curve functions."""

    seed: int
    tasks_per_client: int
    ways: int
    shots: int
    queries: int
    steps: int
    support: float  # > 0: tasks are splits of a client's own data (episode.client_tasks); 0: episodes
    samples: int  # client tasks: samples drawn per task (0: all of the client's)


@dataclass(frozen=True)
class Outer:
    """The server part of a run, needing no data: outer optimizer, DP mechanism and accountant, sample size.

    The in-process loop and the Flower ServerApp both step through `Outer.step`, so privacy and aggregation
    are the same code on every transport.
    """

    config: RunConfig
    num_train_clients: int

    @property
    def sampled(self) -> int:
        """Clients asked per round (fixed-size sampling without replacement)."""
        return self.config.federation.clients_in_round(self.num_train_clients)

    @property
    def optimizer(self) -> OuterOptimizer:
        o = self.config.outer
        return OuterOptimizer(
            o.optimizer,
            o.outer_lr,
            o.beta1,
            o.beta2,
            o.eps,
            schedule=o.schedule,
            final_lr=o.final_lr,
            total_steps=self.config.federation.rounds,
        )

    def over_budget(self, state: ServerState) -> bool:
        """Whether the run's training time (`state.elapsed`) has used up `federation.time_budget` minutes."""
        budget = self.config.federation.time_budget
        return budget is not None and state.elapsed >= budget * 60.0

    @property
    def delta(self) -> float:
        given = self.config.privacy.delta
        return given if given is not None else 1.0 / self.num_train_clients**1.1

    @property
    def privacy(self) -> ServerPrivacy | None:
        p = self.config.privacy
        if not p.enabled:
            return None
        count_std = self.sampled / 20 if p.adaptive_clipping else None
        return ServerPrivacy(
            mode=p.mode,
            noise_multiplier=update_noise_multiplier(p.noise_multiplier, count_noise_std=count_std),
            accounted_multiplier=p.noise_multiplier,
            adaptive=p.adaptive_clipping,
            target_quantile=p.target_quantile,
            clip_lr=p.clip_lr,
            count_noise_std=count_std or 0.0,
        )

    def initial_state(self, params: Params) -> ServerState:
        p = self.config.privacy
        return init_state(params, self.optimizer, clip_norm=p.clip_norm if p.enabled else None)

    def step(
        self,
        state: ServerState,
        updates: Sequence[tuple[str, ClientUpdate]] | ClientRows | CohortSum | SecureSum,
        round_index: int,
    ) -> tuple[ServerState, dict[str, float]]:
        """One outer step from the round's individual updates, or from their secure sum under SecAgg+."""
        privacy = self.privacy
        generator = None
        if privacy is not None:
            generator = noise_generator(
                reproducible=self.config.privacy.reproducible_noise,
                seed=self.config.federation.seed,
                round_index=round_index,
                stream=0,
            )
        if isinstance(updates, CohortSum):
            state, metrics = apply_sum(
                state, updates, self.optimizer, privacy=privacy, sampled=self.sampled, generator=generator
            )
        elif isinstance(updates, SecureSum):
            state, metrics = apply_secure_sum(
                state, updates, self.optimizer, privacy=privacy, sampled=self.sampled, generator=generator
            )
        else:
            state, metrics = apply_round(
                state,
                updates,
                self.optimizer,
                privacy=privacy,
                sampled=self.sampled,
                generator=generator,
                robust=self.config.robust,
            )
        epsilon = self.epsilon(state)
        if epsilon is not None:
            metrics["epsilon"] = epsilon
            metrics["delta"] = self.delta
        return state, metrics

    def epsilon(self, state: ServerState, releases: Sequence[float] | None = None) -> float | None:
        """Epsilon spent so far at `delta` (None without DP). Local DP gets no amplification by sampling:
        the server sees every sampled client's own message."""
        if not self.config.privacy.enabled:
            return None
        releases = list(state.dp_releases if releases is None else releases)
        sample = self.num_train_clients if self.config.privacy.mode == "local" else self.sampled
        return epsilon_of_releases(releases, sample_size=sample, population=self.num_train_clients, delta=self.delta)

    def privacy_report(self, state: ServerState) -> dict[str, object] | None:
        """What a run spent, for summary.json (None without DP)."""
        p = self.config.privacy
        if not p.enabled:
            return None
        return {
            "mode": p.mode,
            "epsilon": self.epsilon(state),
            "delta": self.delta,
            "noise_multiplier": p.noise_multiplier,
            "clip_norm_initial": p.clip_norm,
            "clip_norm_final": state.clip_norm,
            "adaptive_clipping": p.adaptive_clipping,
            "private_rounds": len(state.dp_releases),
            "clients_per_round": self.sampled,
            "population": self.num_train_clients,
            "sampling": "fixed-size, without replacement" if p.mode != "local" else "none assumed (local DP)",
            "neighbouring": "replace one client (sensitivity 2C)",
            "accountant": "RDP, dp-accounting",
        }

    def check(self) -> None:
        """Everything about the server side that can be refused before round 1."""
        fed = self.config.federation
        if fed.client_fraction is None and fed.clients_per_round > self.num_train_clients:
            raise ConfigError(
                f"federation.clients_per_round is {fed.clients_per_round}, but the federation has only "
                f"{self.num_train_clients} training clients; ask for at most {self.num_train_clients} "
                "(or a --client-fraction)"
            )
        p = self.config.privacy
        if p.enabled and p.noise_multiplier == 0:
            log.warning(
                "privacy.mode %s with noise multiplier 0: updates are clipped but not noised, so epsilon is "
                "infinite (reported as null in summary.json)",
                p.mode,
            )
        self.check_budget()
        secagg = self.config.secagg
        if not secagg.enabled:
            return
        workers = self.config.compute.workers
        # One masked vector per node: a client's update, or a cohort worker's mean (each worker that has clients).
        masked = min(workers, self.sampled) if workers else self.sampled
        if not 2 <= masked <= secagg.max_clients():
            nodes = "cohort workers with clients" if workers else "clients per round"
            raise ConfigError(
                f"secure aggregation needs 2..{secagg.max_clients()} {nodes} at "
                f"secagg.quantization_range={secagg.quantization_range}, got {masked}"
            )
        p = self.config.privacy
        if p.enabled and p.clip_norm > secagg.clipping_range:
            log.warning(
                "privacy.clip_norm %g exceeds secagg.clipping_range %g: coordinates of a clipped update may be "
                "clipped again before quantisation",
                p.clip_norm,
                secagg.clipping_range,
            )

    def check_budget(self) -> None:
        """Refuse to start a run whose planned rounds would exceed `privacy.target_epsilon`."""
        target = self.config.privacy.target_epsilon
        if target is None:
            return
        rounds = self.config.federation.rounds
        planned = self.epsilon(ServerState({}, {}), [self.config.privacy.noise_multiplier] * rounds)
        assert planned is not None
        if planned > target:
            raise ConfigError(
                f"{rounds} rounds at noise multiplier {self.config.privacy.noise_multiplier:g} would spend "
                f"epsilon {planned:.3g} > target_epsilon {target:g} (delta {self.delta:.3g}); "
                "raise privacy.noise_multiplier or lower federation.rounds"
            )
        log.info(
            "privacy budget: %d rounds will spend epsilon %.3g of %g (delta %.3g)", rounds, planned, target, self.delta
        )


@dataclass(frozen=True)
class Experiment:
    """A run's config bound to its federation's data: everything a client needs to compute its part."""

    config: RunConfig
    federation: Federation
    algorithm: Algorithm

    @classmethod
    def from_config(cls, config: RunConfig, *, federation: Federation | None = None) -> Experiment:
        """Build and check everything; pass `federation` to reuse already loaded data (built from `config.data`)."""
        if federation is None:
            federation = build_federation(config.data, seed=config.federation.seed)
        ep = config.episode
        if ep.client_tasks:
            federation.check_split(ep.support, ep.client_samples)
        else:
            federation.check_episode(ways=ep.ways, shots=ep.shots, queries=ep.queries)
            federation.check_episode(
                ways=ep.training_ways, shots=ep.training_shots, queries=ep.training_queries, train_only=True
            )
        Outer(config, len(federation.train_clients)).check()
        return cls(config, federation, build_run_algorithm(config, federation.kind, federation.num_global_outputs))

    @property
    def outer(self) -> Outer:
        return Outer(self.config, len(self.federation.train_clients))

    def initial_params(self) -> Params:
        return initial_params(self.algorithm, self.config.federation.seed)

    def eval_kwargs(self) -> EvalProtocol:
        return eval_protocol(self.config)

    def client_update(self, params: Params, client_index: int, round_index: int) -> ClientUpdate:
        """Training client `client_index`'s update in round `round_index` (0-based), as it leaves the client:
        a cohort of one (`cohort_update`), so that it is the same wherever the client is computed."""
        return self.cohort_update(params, [client_index], round_index).update(0)

    def cohort_update(self, params: Params, client_indices: Sequence[int], round_index: int) -> ClientRows:
        """The updates of training clients `client_indices` in round `round_index`, computed together (one
        vectorised call where the algorithm allows it), each as it leaves its client: every client draws its
        own tasks from its own seed and is clipped and noised with its own generator, exactly as if alone."""
        population = self.federation.train_clients
        for c in client_indices:
            if not 0 <= c < len(population):
                raise IndexError(f"training client index {c} out of range 0..{len(population) - 1}")
        ep, fed = self.config.episode, self.config.federation
        vectorised = self.federation.cohort_episodes
        if vectorised is not None and self.algorithm.data_kind == "episodes" and not ep.client_tasks:
            client_ids, tasks_by_client = vectorised(
                fed.seed,
                self.algorithm.data_stream,
                round_index,
                client_indices,
                fed.tasks_per_client,
                ep.training_shots,
                ep.training_queries,
            )
        else:
            client_ids, tasks_by_client = self._client_tasks(client_indices, round_index)
        if ep.augment and self.algorithm.data_kind == "episodes":
            # Its own stream per (round, client): the episodes drawn are those of an unaugmented run.
            rngs = [task_rng(fed.seed, "augment", round_index, c) for c in client_indices]
            tasks_by_client = [
                [distort_task(task, rng, ep.augment) for task in tasks]
                for rng, tasks in zip(rngs, tasks_by_client, strict=True)
            ]
        directions, metrics = self.algorithm.at_round(round_index).cohort_update(params, tasks_by_client)
        rows = ClientRows(tuple(client_ids), directions, tuple(len(tasks) for tasks in tasks_by_client), metrics)
        if not client_side_protection(self.config.privacy, secure_aggregation=self.config.secagg.enabled):
            return rows
        protected = [
            (
                rows.client_ids[i],
                protect_update(
                    rows.update(i),
                    self.config.privacy,
                    secure_aggregation=self.config.secagg.enabled,
                    sampled=self.outer.sampled,
                    seed=fed.seed,
                    round_index=round_index,
                    client_index=c,
                ),
            )
            for i, c in enumerate(client_indices)
        ]
        return ClientRows.of(protected)

    def _client_tasks(self, client_indices: Sequence[int], round_index: int) -> tuple[list[str], list[list[Task]]]:
        """Each client's own draw of its round's tasks: (client ids, tasks by client)."""
        population = self.federation.train_clients
        ep, fed = self.config.episode, self.config.federation
        clients = [population[c] for c in client_indices]
        tasks_by_client = []
        for c, client in zip(client_indices, clients, strict=True):
            # Tasks depend on (seed, stream, round, client) alone: a client draws the same ones on every transport.
            rng = task_rng(fed.seed, self.algorithm.data_stream, round_index, c)
            tasks_by_client.append(
                local_tasks(
                    client,
                    rng,
                    data_kind=self.algorithm.data_kind,
                    num_tasks=fed.tasks_per_client,
                    ways=ep.training_ways,
                    shots=ep.training_shots,
                    queries=ep.training_queries,
                    batch_size=self.config.eval.fedavg_batch,
                    support=float(ep.support) if ep.client_tasks else 0.0,
                    samples=ep.client_samples or 0,
                )
            )
        return [client.client_id for client in clients], tasks_by_client

    def cohort_sum(self, params: Params, client_indices: Sequence[int], round_index: int) -> CohortSum:
        """`cohort_update`'s rows reduced where they were computed (`compute.reply = "sum"`): checked and, under
        central DP, clipped as the server would (`fedmeta.round.sum_rows`), then summed."""
        rows = self.cohort_update(params, client_indices, round_index)
        p = self.config.privacy
        return sum_rows(
            rows,
            params,
            clip_norm=p.clip_norm if p.enabled and p.mode == "central" else None,
            equal_weights=p.enabled,
            max_norm=self.config.robust.max_update_norm,
            client_clip_norm=p.clip_norm if p.enabled and p.mode != "central" else None,
        )


def eval_protocol(config: RunConfig) -> EvalProtocol:
    """The final evaluation's numbers, for `fedmeta.evaluation` (the same on every transport)."""
    return {
        "seed": config.federation.seed,
        "tasks_per_client": config.eval.eval_tasks_per_client,
        "ways": config.episode.ways,
        "shots": config.episode.shots,
        "queries": config.episode.queries,
        "steps": config.inner.eval_steps,
        "support": float(config.episode.support) if config.episode.client_tasks else 0.0,
        "samples": config.episode.client_samples or 0,
    }


def curve_protocol(config: RunConfig) -> EvalProtocol:
    """The learning curve's: the final protocol on fewer, different tasks (seed + 1), scored at the training
    number of inner steps."""
    return {
        **eval_protocol(config),
        "seed": config.federation.seed + 1,
        "tasks_per_client": config.eval.curve_tasks_per_client,
        "steps": config.inner.inner_steps,
    }


def fedavg_config(config: RunConfig, rounds: int) -> RunConfig:
    """The FedAvg baseline's run: `rounds` rounds of `eval.fedavg_local_steps` local SGD steps at
    `eval.fedavg_lr` on minibatches of `eval.fedavg_batch`, outer SGD at lr 1 (so the server step is exactly
    FedAvg's average), on the same clients with the same privacy protection as the meta-learning run."""
    return config.replace(
        **{
            "algorithm": "fedavg",
            "federation.rounds": rounds,
            "federation.tasks_per_client": config.eval.fedavg_local_steps,
            "federation.time_budget": None,
            "federation.fit_rounds": False,
            "inner.inner_lr": config.eval.fedavg_lr,
            "inner.inner_steps": 1,
            "inner.inner_optimizer": "sgd",
            "inner.inner_batch": 0,
            "inner.adam_state": "task",
            "episode.train_ways": None,
            "episode.train_shots": None,
            "episode.train_queries": None,
            "outer.optimizer": "sgd",
            "outer.outer_lr": 1.0,
            "outer.schedule": "constant",
            "eval.curve_every": 0,
            # The algorithm-specific options of the meta-learning run do not apply to FedAvg.
            **{
                f"{sec}.{k}": v
                for sec in ("maml", "matching", "perfedavg")
                for k, v in RunConfig().to_dict()[sec].items()
            },
        }
    )


def task_kind(dataset: str) -> str:
    return "regression" if dataset == "sinusoid" else "classification"


def meta_algorithm(config: RunConfig, num_global_outputs: int | None = None) -> Algorithm:
    """The configured algorithm without touching any data: what a server needs to hold its parameters
    (FedAvg's global head needs the federation's label count)."""
    return build_run_algorithm(config, task_kind(config.data.dataset), num_global_outputs)


def initial_params(algorithm: Algorithm, seed: int) -> Params:
    """The meta-model's starting point, a function of the run seed alone (the same on every transport)."""
    return algorithm.init_params(torch.Generator().manual_seed(seed))


def build_run_algorithm(config: RunConfig, kind: str, num_global_outputs: int | None) -> Algorithm:
    """`config.algorithm` with its model, inner loop and compute settings."""
    name = config.algorithm
    if kind == "regression":
        out: int | None = 1
    elif name in ALGORITHMS and ALGORITHMS[name].embedding_only:
        out = None  # an embedding, no head
    elif name == "fedavg" or config.episode.client_tasks:  # over the global label space
        if num_global_outputs is None:
            raise ValueError(f"{name} over the global labels needs the federation's label count")
        out = num_global_outputs
    else:
        out = config.episode.ways
    model = build_model(
        config.data.dataset,
        out_features=out,
        downsample=config.data.conv_downsample,
        channels=config.data.conv_channels,
        lstm_hidden=config.data.lstm_hidden,
    )
    c = config.compute
    compute = {
        "batched": c.batched,
        "task_chunk": c.task_chunk,
        "device": resolve_device(c.device),
        "precision": c.precision,
    }
    inner = InnerOptimizer(config.inner.inner_optimizer, batch=config.inner.inner_batch)
    if name == "maml":
        m = config.maml
        compute["plus"] = MamlPlusPlus(
            multi_step_loss=m.multi_step_loss,
            msl_anneal_rounds=m.msl_anneal_rounds,
            per_step_lr=m.per_step_lr,
            per_step_bn=m.per_step_bn,
            first_order_rounds=m.first_order_rounds,
        )
    if name == "reptile":
        compute["carry_state"] = config.inner.adam_state == "carried"
    if name.startswith("perfedavg"):
        compute["local_lr"] = config.perfedavg.local_lr
    if config.episode.joint_embedding:
        compute["joint_embedding"] = True
    if name == "matching" and config.matching.fce:
        compute["fce_steps"] = config.matching.fce_steps
    if name == "matching":
        compute["scale"] = config.matching.scale
    return build_algorithm(
        name,
        model,
        kind=kind,
        inner_lr=config.inner.inner_lr,
        inner_steps=config.inner.inner_steps,
        inner_optimizer=inner,
        **compute,
    )
