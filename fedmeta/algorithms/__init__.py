"""Meta-learning algorithms as client parts over parameter dicts; the server part is shared (`fedmeta.round`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from fedmeta.algorithms.base import Algorithm
from fedmeta.algorithms.maml import ANIL, FOMAML, MAML, FedRep
from fedmeta.algorithms.matching import MatchingNet
from fedmeta.algorithms.meta_lstm import MetaLSTM
from fedmeta.algorithms.meta_sgd import MetaSGD
from fedmeta.algorithms.per_fedavg import PerFedAvg, PerFedAvgHF
from fedmeta.algorithms.protonet import ProtoNet
from fedmeta.algorithms.relation import RelationNet
from fedmeta.algorithms.reptile import FedAvg, Reptile
from fedmeta.algorithms.siamese import Siamese

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (
        MAML,
        FOMAML,
        ANIL,
        MetaSGD,
        Reptile,
        ProtoNet,
        MatchingNet,
        Siamese,
        RelationNet,
        MetaLSTM,
        PerFedAvg,
        PerFedAvgHF,
        FedRep,
    )
}
BASELINES: dict[str, type[Algorithm]] = {FedAvg.name: FedAvg}


def build_algorithm(
    name: str, model: nn.Module, *, kind: str, inner_lr: float, inner_steps: int, **compute: Any
) -> Algorithm:
    """`compute`: how the client part runs (batched, task_chunk, device, precision; see `Algorithm`)."""
    registry = {**ALGORITHMS, **BASELINES}
    if name not in registry:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return registry[name](model, kind=kind, inner_lr=inner_lr, inner_steps=inner_steps, **compute)


__all__ = [
    "ALGORITHMS",
    "ANIL",
    "FOMAML",
    "MAML",
    "MatchingNet",
    "MetaLSTM",
    "Algorithm",
    "FedAvg",
    "FedRep",
    "MetaSGD",
    "PerFedAvg",
    "PerFedAvgHF",
    "ProtoNet",
    "RelationNet",
    "Reptile",
    "Siamese",
    "build_algorithm",
]
