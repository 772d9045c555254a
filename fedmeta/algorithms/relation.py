"""Relation Network: Sung, Yang, Zhang, Xiang, Torr, Hospedales 2018, arXiv:1711.06025.

An embedding f and a learned relation module g: the relation score of a query x and class c is
r = g([f(x), e_c]) in (0, 1), with e_c the sum of the class's support embeddings (sec. 3.2, K-shot) and [.,.]
the concatenation of the two feature maps along channels; the network is trained with the mean squared error of
r against the one-hot match (eq. 3). The relation module is the paper's (sec. 4.1, fig. 2): two blocks of
[3x3 conv with 64 filters, batch norm, ReLU, 2x2 max-pool], then Linear(., 8) -> ReLU -> Linear(8, 1) ->
sigmoid. It reads the embedding's feature maps (`model.feature_map`, e.g. Conv4's 64x2x2 on 28x28 Omniglot;
a flat embedding is a map of 1x1); a pool is skipped once a map is 1 pixel wide. Batch norm uses each task's own
statistics over all its (query, class) pairs, as the embedding's batch norm does. Without the convolutional
blocks (a purely fully connected module on the concatenation) the scores collapse to the constant 1/ways, the
MSE optimum of a module that cannot compare the pair. No inner loop; evaluation is flat over steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.algorithms.metric import MetricBased
from fedmeta.models import init_params
from fedmeta.types import Params

PREFIX = "relation."
CHANNELS = 64  # the paper's relation module: 64 filters per conv block
HIDDEN = 8  # and 8 hidden units
BN_EPS = 1e-5


def _block(x: Tensor, module: Params, layer: int) -> Tensor:
    """[3x3 conv, batch norm over the task's pairs, ReLU, 2x2 max-pool] on (..., pairs, C, H, W)."""
    lead = x.shape[:-3]
    name = f"{PREFIX}{layer}."
    y = F.conv2d(x.reshape(-1, *x.shape[-3:]), module[name + "weight"], module[name + "bias"], padding=1)
    y = y.view(*lead, *y.shape[-3:])
    dims = (-4, -2, -1)  # per channel, over the task's pairs and pixels
    mean = y.mean(dims, keepdim=True)
    var = (y - mean).pow(2).mean(dims, keepdim=True)
    y = (y - mean) / torch.sqrt(var + BN_EPS)
    y = torch.relu(y * module[name + "bn.weight"][:, None, None] + module[name + "bn.bias"][:, None, None])
    if min(y.shape[-2:]) >= 2:
        y = F.max_pool2d(y.reshape(-1, *y.shape[-3:]), 2)
        y = y.view(*lead, *y.shape[-3:])
    return y


def relation_scores(
    query_emb: Tensor,
    support_emb: Tensor,
    support_y: Tensor,
    ways: int,
    module: Params,
    feature_map: tuple[int, int, int] | None = None,
) -> Tensor:
    """Relation scores (..., queries, ways) in (0, 1): g([f(query), sum of class c's support embeddings]).

    `feature_map`: the (channels, height, width) the flat embeddings (..., F) unflatten to; None: (F, 1, 1)."""
    features = query_emb.shape[-1]
    shape = feature_map or (features, 1, 1)
    one_hot = F.one_hot(support_y, ways).to(support_emb.dtype)  # (..., support, ways)
    classes = one_hot.transpose(-2, -1) @ support_emb  # (..., ways, features)
    queries = query_emb.shape[-2]
    q = query_emb.view(*query_emb.shape[:-2], queries, 1, *shape).expand(*query_emb.shape[:-2], queries, ways, *shape)
    c = classes.view(*classes.shape[:-2], 1, ways, *shape).expand(*classes.shape[:-2], queries, ways, *shape)
    pairs = torch.cat([q, c], dim=-3)  # (..., queries, ways, 2C, H, W)
    x = pairs.reshape(*pairs.shape[:-5], queries * ways, *pairs.shape[-3:])
    x = _block(_block(x, module, 0), module, 1).flatten(-3)  # (..., queries * ways, channels * h * w)
    hidden = torch.relu(x @ module[PREFIX + "2.weight"].T + module[PREFIX + "2.bias"])
    score = torch.sigmoid(hidden @ module[PREFIX + "3.weight"].T + module[PREFIX + "3.bias"]).squeeze(-1)
    return score.view(*score.shape[:-1], queries, ways)


def relation_loss(scores: Tensor, query_y: Tensor) -> Tensor:
    """Mean squared error against the one-hot match (eq. 3), per task (...,)."""
    target = F.one_hot(query_y, scores.shape[-1]).to(scores.dtype)
    return (scores - target).pow(2).mean((-2, -1))


def _pooled(size: int) -> int:
    return size // 2 if size >= 2 else size


class RelationNet(MetricBased):
    name = "relation"
    head_prefix = PREFIX  # the relation module
    channels = CHANNELS  # filters per conv block of the relation module (tests use fewer)

    def feature_map(self) -> tuple[int, int, int]:
        return tuple(getattr(self.model, "feature_map", None) or (self.embedding_size(), 1, 1))

    def init_params(self, generator: torch.Generator) -> Params:
        """The released code's init (github.com/floodsung/LearningToCompare_FSL, weights_init): conv weights
        N(0, 2 / (9 * filters)), conv biases 0, batch norm 1 and 0, linear weights N(0, 0.01) and biases 1."""
        weights = init_params(self.model, generator)
        dtype = next(iter(weights.values())).dtype
        channels, height, width = self.feature_map()
        flat = self.channels * _pooled(_pooled(height)) * _pooled(_pooled(width))
        normal = lambda std, *shape: std * torch.randn(*shape, generator=generator, dtype=dtype)  # noqa: E731
        module = {}
        for layer, inputs in ((0, 2 * channels), (1, self.channels)):
            name = f"{PREFIX}{layer}."
            module[name + "weight"] = normal(math.sqrt(2 / (9 * self.channels)), self.channels, inputs, 3, 3)
            module[name + "bias"] = torch.zeros(self.channels, dtype=dtype)
            module[name + "bn.weight"] = torch.ones(self.channels, dtype=dtype)
            module[name + "bn.bias"] = torch.zeros(self.channels, dtype=dtype)
        for layer, (outputs, inputs) in ((2, (HIDDEN, flat)), (3, (1, HIDDEN))):
            module[f"{PREFIX}{layer}.weight"] = normal(0.01, outputs, inputs)
            module[f"{PREFIX}{layer}.bias"] = torch.ones(outputs, dtype=dtype)
        return {**weights, **module}

    def scores(self, params: Params, query: Tensor, support: Tensor, support_y: Tensor, ways: int) -> Tensor:
        return relation_scores(query, support, support_y, ways, params, self.feature_map())

    def task_loss(self, scores: Tensor, query_y: Tensor, support_y: Tensor) -> Tensor:
        return relation_loss(scores, query_y)
