"""The Flower ClientApp: decode the message, run the fedmeta client part on this node's own data, encode.

A node's data partition comes from its node config: `partition-id` and `num-partitions` (set by Flower's
simulation engine, or by `flower-supernode --node-config` in a deployment), optionally `data-dir` for where
this node keeps its data. Partitions 0..T-1 are the T training clients, T..T+U-1 the U unseen clients.
"""

from __future__ import annotations

import functools
import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmeta import wire
from fedmeta.config import RunConfig
from fedmeta.evaluation import client_curves
from fedmeta.experiment import Experiment
from server.records import get_int, record_to_params, update_to_content

log = logging.getLogger(__name__)
app = ClientApp()


class PartitionError(ValueError):
    """The node's partition does not exist in the configured federation."""


@functools.lru_cache(maxsize=4)
def _experiment(config: RunConfig) -> Experiment:
    # Cached per process because building a federation reads and decodes data (about a second for
    # Omniglot), which would otherwise dominate every round. The key is the whole frozen config.
    return Experiment.from_config(config)


def _setup(message: Message, context: Context) -> tuple[Experiment, str, int]:
    """This node's experiment, role (train/unseen) and client index, from the message and the node config."""
    flat = dict(message.content.config_records[wire.CONFIG])
    flat.pop(wire.ROUND, None)
    if "data-dir" in context.node_config:  # the node's own data location wins over the server's default
        flat["data.data_dir"] = str(context.node_config["data-dir"])
    experiment = _experiment(RunConfig.from_flat(flat))
    train, unseen = len(experiment.federation.train_clients), len(experiment.federation.unseen_clients)
    try:
        partition = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise PartitionError(
            f"node config lacks {missing}; start the SuperNode with "
            f"--node-config 'partition-id=P num-partitions={train + unseen}'"
        ) from None
    if num_partitions != train + unseen:
        raise PartitionError(
            f"num-partitions={num_partitions}, but the federation has {train} training + "
            f"{unseen} unseen clients = {train + unseen} partitions"
        )
    if not 0 <= partition < train + unseen:
        raise PartitionError(f"partition-id={partition} is out of range 0..{train + unseen - 1}")
    if partition < train:
        return experiment, wire.ROLE_TRAIN, partition
    return experiment, wire.ROLE_UNSEEN, partition - train


def _client_record(experiment: Experiment, role: str, index: int) -> ConfigRecord:
    fed = experiment.federation
    clients = fed.train_clients if role == wire.ROLE_TRAIN else fed.unseen_clients
    return ConfigRecord(
        {
            wire.ROLE: role,
            wire.INDEX: index,
            wire.CLIENT_ID: clients[index].client_id,
            wire.NUM_TRAIN: len(fed.train_clients),
            wire.NUM_PARTITIONS: len(fed.train_clients) + len(fed.unseen_clients),
        }
    )


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which client this node is."""
    experiment, role, index = _setup(message, context)
    return Message(RecordDict({wire.CLIENT: _client_record(experiment, role, index)}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """The client part: meta-parameters + this client's tasks for the round -> an update."""
    experiment, role, index = _setup(message, context)
    if role != wire.ROLE_TRAIN:
        raise PartitionError(
            f"unseen client {index} was asked to train; only partitions below "
            f"{len(experiment.federation.train_clients)} train"
        )
    params = record_to_params(message.content.array_records[wire.PARAMS])
    round_index = get_int(message.content.config_records[wire.CONFIG], wire.ROUND)
    update = experiment.client_update(params, index, round_index)
    client_id = experiment.federation.train_clients[index].client_id
    return Message(update_to_content(update, client_id=client_id), reply_to=message)


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
    curves = client_curves(experiment.algorithm, models, clients[index], index, **experiment.eval_kwargs())
    metrics = MetricRecord(
        {
            wire.curve_key(name, step): curve[:, step].tolist()
            for name, curve in curves.items()
            for step in range(curve.shape[1])
        }
    )
    return Message(
        RecordDict({wire.METRICS: metrics, wire.CLIENT: _client_record(experiment, role, index)}), reply_to=message
    )
