"""The Flower ClientApp: decode the message, run the fedmeta client part on this node's own data, encode.

A node's data partition comes from its node config: `partition-id` and `num-partitions` (set by Flower's
simulation engine, or by `flower-supernode --node-config` in a deployment), optionally `data-dir` for where
this node keeps its data and `device` (cpu / cuda / auto) for where it computes. Partitions 0..T-1 are the
T training clients, T..T+U-1 the U unseen clients. With `compute.workers` = W the node is a cohort worker
instead: partition p of W computes every client c with c mod W = p, all of a round's in one call.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

import wire
from fedmeta.config import DataConfig, RunConfig
from fedmeta.evaluation import client_curves
from fedmeta.experiment import Experiment
from fedmeta.round import check_update
from fedmeta.runtime import apply_threads, tune_allocator
from fedmeta.tasks import Federation, build_federation
from fedmeta.types import ClientUpdate, Params
from wire.records import (
    arrays_to_params,
    get_int,
    get_int_list,
    record_to_params,
    rows_to_content,
    sum_to_content,
    update_to_arrays,
    update_to_content,
)

log = logging.getLogger(__name__)
tune_allocator()  # this process computes client parts: keep big temporaries mapped (fedmeta.runtime)
app = ClientApp()
_ROUNDING_STREAM = 0x5EC  # keeps the rounding draws apart from every other stream derived from the run seed
SECURE_PARAMS = "fitins.parameters"  # where a legacy FitIns (SecAgg+ rounds) keeps the meta-parameters


class PartitionError(ValueError):
    """The node's partition does not exist in the configured federation."""


class ModelMismatch(ValueError):
    """The meta-parameters the server sent do not fit the model this client builds from the config."""


@functools.lru_cache(maxsize=2)
def _federation(data: DataConfig, seed: int) -> Federation:
    # Cached per process because building a federation reads and decodes data (about a second for
    # Omniglot), which would otherwise dominate every round; the meta-learning run and its FedAvg baseline
    # share it.
    return build_federation(data, seed=seed)


@functools.lru_cache(maxsize=4)
def _experiment(config: RunConfig) -> Experiment:
    return Experiment.from_config(config, federation=_federation(config.data, config.federation.seed))


def _setup(message: Message, context: Context, flat: dict[str, Any] | None = None) -> tuple[Experiment, str, int]:
    """This node's experiment, role (train/unseen) and client index, from the message (or the given flat
    config) and the node config."""
    flat = dict(message.content.config_records[wire.CONFIG] if flat is None else flat)
    flat.pop(wire.ROUND, None)
    flat.pop(wire.CLIENTS, None)
    if "data-dir" in context.node_config:  # the node's own data location wins over the server's default
        flat["data.data_dir"] = str(context.node_config["data-dir"])
    if "device" in context.node_config:  # so does its own device (a GPU node among CPU nodes)
        flat["compute.device"] = str(context.node_config["device"])
    config = RunConfig.from_flat(flat)
    apply_threads(config, one_client_per_process=True)
    experiment = _experiment(config)
    train, unseen = len(experiment.federation.train_clients), len(experiment.federation.unseen_clients)
    workers = config.compute.workers
    partitions = workers or train + unseen
    try:
        partition = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise PartitionError(
            f"node config lacks {missing}; start the SuperNode with "
            f"--node-config 'partition-id=P num-partitions={partitions}'"
        ) from None
    if num_partitions != partitions:
        raise PartitionError(
            f"num-partitions={num_partitions}, but compute.workers is {workers}: {workers} cohort workers"
            if workers
            else f"num-partitions={num_partitions}, but the federation has {train} training + "
            f"{unseen} unseen clients = {train + unseen} partitions"
        )
    if not 0 <= partition < partitions:
        raise PartitionError(f"partition-id={partition} is out of range 0..{partitions - 1}")
    if workers:
        return experiment, wire.ROLE_WORKER, partition
    if partition < train:
        return experiment, wire.ROLE_TRAIN, partition
    return experiment, wire.ROLE_UNSEEN, partition - train


def _worker_clients(experiment: Experiment, worker: int, config: Any, population: int) -> list[int]:
    """The clients a cohort worker is asked to compute: each must be one of its own (c mod W = worker)."""
    if isinstance(config.get(wire.CLIENTS), str):  # under SecAgg+ (legacy FitIns configs hold scalars only)
        text = config[wire.CLIENTS]
        try:
            clients = [int(c) for c in text.split(",")] if text else []
        except ValueError:
            raise TypeError(f"record field {wire.CLIENTS!r} must list client indices, got {text!r}") from None
    else:
        clients = get_int_list(config, wire.CLIENTS)
    workers = experiment.config.compute.workers
    for c in clients:
        if not 0 <= c < population or c % workers != worker:
            raise PartitionError(
                f"client {c} is not one of worker {worker}'s (clients c with c mod {workers} = {worker})"
            )
    return clients


def _client_record(experiment: Experiment, role: str, index: int) -> ConfigRecord:
    fed = experiment.federation
    clients = fed.train_clients if role == wire.ROLE_TRAIN else fed.unseen_clients
    workers = experiment.config.compute.workers
    return ConfigRecord(
        {
            wire.ROLE: role,
            wire.INDEX: index,
            wire.CLIENT_ID: f"worker-{index}" if role == wire.ROLE_WORKER else clients[index].client_id,
            wire.NUM_TRAIN: len(fed.train_clients),
            wire.NUM_UNSEEN: len(fed.unseen_clients),
            wire.NUM_PARTITIONS: workers or len(fed.train_clients) + len(fed.unseen_clients),
            wire.NUM_GLOBAL_OUTPUTS: fed.num_global_outputs,
        }
    )


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which client this node is."""
    experiment, role, index = _setup(message, context)
    return Message(RecordDict({wire.CLIENT: _client_record(experiment, role, index)}), reply_to=message)


def secure_aggregation_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's SecAgg+ client protocol for train messages that carry its stage (the server enabled
    secure aggregation); plain train messages go straight to `train`."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


@app.train(mods=[secure_aggregation_mod])
def train(message: Message, context: Context) -> Message:
    """The client part: meta-parameters + this client's tasks for the round -> an update.

    Under SecAgg+ the request is the legacy `FitIns` (positional arrays) and the reply a `FitRes` whose arrays
    `secaggplus_mod` quantises and masks before anything leaves the node.
    """
    secure = SECURE_PARAMS in message.content.array_records
    fit = compat.recorddict_to_fitins(message.content, keep_input=True) if secure else None
    experiment, role, index = _setup(message, context, dict(fit.config) if fit else None)
    if role == wire.ROLE_UNSEEN:
        raise PartitionError(
            f"unseen client {index} was asked to train; only partitions below "
            f"{len(experiment.federation.train_clients)} train"
        )
    config = message.content.config_records[wire.CONFIG] if fit is None else fit.config
    round_index = get_int(config, wire.ROUND)
    template = experiment.initial_params()
    try:
        if fit is None:
            params = record_to_params(message.content.array_records[wire.PARAMS])
            check_update(ClientUpdate(params, 1), template)
        else:
            params = arrays_to_params(parameters_to_ndarrays(fit.parameters), template)
    except ValueError as error:  # RejectedUpdate included
        raise ModelMismatch(f"the server's model does not match this client's: {error}") from None
    weight = 1
    if role == wire.ROLE_WORKER:
        clients = _worker_clients(experiment, index, config, len(experiment.federation.train_clients))
        if fit is not None:  # SecAgg+ over cohort workers: this cohort's mean, weighted by its client count
            update, weight = _secure_cohort_mean(experiment, params, clients, round_index)
        elif experiment.config.compute.reply == "sum":
            return Message(sum_to_content(experiment.cohort_sum(params, clients, round_index)), reply_to=message)
        else:
            return Message(rows_to_content(experiment.cohort_update(params, clients, round_index)), reply_to=message)
    else:
        update = experiment.client_update(params, index, round_index)
    if fit is None:
        client_id = experiment.federation.train_clients[index].client_id
        return Message(update_to_content(update, client_id=client_id), reply_to=message)
    arrays = update_to_arrays(update, experiment.config.secagg.clipping_range)
    # Weight 1 for a client (the workflow's max_weight is 1): the server gets the plain mean; a cohort worker's
    # weight is its client count, so the mean is again over clients. No metrics in the clear.
    reply = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples=weight, metrics={})
    _seed_stochastic_rounding(experiment.config.federation.seed, round_index, index)
    return Message(compat.fitres_to_recorddict(reply, keep_input=False), reply_to=message)


def _secure_cohort_mean(
    experiment: Experiment, params: Params, clients: list[int], round_index: int
) -> tuple[ClientUpdate, int]:
    """A cohort's mean update and its client count, for SecAgg+. The server learns only the count of clients
    per worker it asked, so a cohort with a refused update fails whole rather than send a mean of fewer."""
    cohort = experiment.cohort_sum(params, clients, round_index)
    if cohort.rejected:
        client_id, reason = cohort.rejected[0]
        raise ValueError(f"{len(cohort.rejected)} of this cohort's updates refused (client {client_id}: {reason})")
    mean = {k: (v / cohort.weight).to(params[k].dtype) for k, v in cohort.total.items()}
    return ClientUpdate(mean, cohort.tasks), cohort.count


def _seed_stochastic_rounding(seed: int, round_index: int, index: int) -> None:
    """Seed the draws of SecAgg+'s stochastic rounding from (run seed, round, this node's client or worker).

    `secaggplus_mod` quantises the reply with stochastic rounding drawn from numpy's global generator, which
    nothing seeds: two runs with the same seed would then differ by a level here and there, and a level can move
    a later round's update across a ReLU's kink (a CI run once differed by 3e-4 after three MAML rounds). Seeded,
    a secure run is reproducible. The rounding stays unbiased - the draws do not depend on the update - and the
    masks come from their own generators, seeded by the key agreement, not from this one."""
    np.random.seed(int(np.random.SeedSequence([seed, round_index, index, _ROUNDING_STREAM]).generate_state(1)[0]))


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Personalised evaluation on this (unseen) client's own tasks, for the meta-model and each baseline."""
    experiment, role, index = _setup(message, context)
    records = message.content.array_records
    models = {"meta": record_to_params(records[wire.PARAMS])}
    models.update(
        {
            k.removeprefix(wire.BASELINE_PREFIX): record_to_params(v)
            for k, v in records.items()
            if k.startswith(wire.BASELINE_PREFIX)
        }
    )
    clients = experiment.federation.train_clients if role == wire.ROLE_TRAIN else experiment.federation.unseen_clients
    protocol = dict(message.content.config_records[wire.PROTOCOL])
    if role == wire.ROLE_WORKER:  # its unseen clients, asked for by index; curves concatenated in that order
        config = message.content.config_records[wire.CONFIG]
        indices = _worker_clients(experiment, index, config, len(experiment.federation.unseen_clients))
        clients = experiment.federation.unseen_clients
    else:
        indices = [index]
    per_client = [
        client_curves(experiment.algorithm, models, clients[i], i, **protocol)  # type: ignore[arg-type]
        for i in indices
    ]
    metrics = MetricRecord(
        {
            wire.curve_key(name, step): [x for curves in per_client for x in curves[name][:, step].tolist()]
            for name in models
            for step in range(per_client[0][name].shape[1])
        }
    )
    return Message(
        RecordDict({wire.METRICS: metrics, wire.CLIENT: _client_record(experiment, role, index)}), reply_to=message
    )
