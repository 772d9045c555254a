"""Relation Network: Sung, Yang, Zhang, Xiang, Torr, Hospedales 2018, arXiv:1711.06025.

An embedding f and a learned relation module g: the relation score of a query x and class c is
r = g([f(x), e_c]) in (0, 1), with e_c the sum of the class's support embeddings (sec. 3.2, K-shot), and the
network is trained with the mean squared error of r against the one-hot match (eq. 3). The paper's relation
module is two conv blocks and two fully connected layers (8 hidden units) on 64x5x5 feature maps; fedmeta's
Omniglot embedding is a flattened vector (Conv4), so the relation module here is its fully connected part:
Linear(2F, 8) -> ReLU -> Linear(8, 1) -> sigmoid. No inner loop; evaluation is flat over steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedmeta.algorithms.metric import MetricBased
from fedmeta.models import init_params, uniform_init
from fedmeta.types import Params

PREFIX = "relation."
HIDDEN = 8  # the paper's relation module: 8 hidden units


def relation_scores(query_emb: Tensor, support_emb: Tensor, support_y: Tensor, ways: int, module: Params) -> Tensor:
    """Relation scores (..., queries, ways) in (0, 1): g([f(query), sum of class c's support embeddings])."""
    one_hot = torch.nn.functional.one_hot(support_y, ways).to(support_emb.dtype)  # (..., support, ways)
    classes = one_hot.transpose(-2, -1) @ support_emb  # (..., ways, features)
    queries, features = query_emb.shape[-2], query_emb.shape[-1]
    pairs = torch.cat(
        [
            query_emb.unsqueeze(-2).expand(*query_emb.shape[:-1], ways, features),
            classes.unsqueeze(-3).expand(*classes.shape[:-2], queries, ways, features),
        ],
        dim=-1,
    )  # (..., queries, ways, 2F)
    hidden = torch.relu(pairs @ module[PREFIX + "0.weight"].T + module[PREFIX + "0.bias"])
    return torch.sigmoid(hidden @ module[PREFIX + "1.weight"].T + module[PREFIX + "1.bias"]).squeeze(-1)


def relation_loss(scores: Tensor, query_y: Tensor) -> Tensor:
    """Mean squared error against the one-hot match (eq. 3), per task (...,)."""
    target = torch.nn.functional.one_hot(query_y, scores.shape[-1]).to(scores.dtype)
    return (scores - target).pow(2).mean((-2, -1))


class RelationNet(MetricBased):
    name = "relation"
    head_prefix = PREFIX  # the relation module

    def init_params(self, generator: torch.Generator) -> Params:
        weights = init_params(self.model, generator)
        features = self.embedding_size()
        dtype = next(iter(weights.values())).dtype
        shapes = {  # name: (fan_in, shape)
            "0.weight": (2 * features, (HIDDEN, 2 * features)),
            "0.bias": (2 * features, (HIDDEN,)),
            "1.weight": (HIDDEN, (1, HIDDEN)),
            "1.bias": (HIDDEN, (1,)),
        }
        module = {PREFIX + k: uniform_init(generator, dtype, fan_in, *shape) for k, (fan_in, shape) in shapes.items()}
        return {**weights, **module}

    def scores(self, params: Params, query: Tensor, support: Tensor, support_y: Tensor, ways: int) -> Tensor:
        return relation_scores(query, support, support_y, ways, params)

    def task_loss(self, scores: Tensor, query_y: Tensor, support_y: Tensor) -> Tensor:
        return relation_loss(scores, query_y)
