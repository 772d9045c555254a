"""Siamese networks for one-shot learning: Koch, Zemel, Salakhutdinov 2015 (ICML Deep Learning Workshop).

Twin embeddings h(x1), h(x2) share their weights; a pair's logit of "same class" is the weighted L1 distance
sum_j alpha_j |h(x1)_j - h(x2)_j| + b (sec. 3.1, with alpha and b learned), trained with binary
cross-entropy on same/different pairs. Here the pairs come from the client's own task: every (query, support)
pair, labelled same when their classes agree. Koch et al. train on balanced pairs; a task has one positive per
N - 1 negatives, so the loss averages the positive and the negative pairs' cross-entropies separately (the
balanced objective). One-shot classification picks the class of the most similar support example (sec. 4.3):
a class's logit is the best pair logit among its support examples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedmeta.algorithms.metric import MetricBased
from fedmeta.models import init_params
from fedmeta.types import Params

ALPHA, BIAS = "siamese.alpha", "siamese.bias"


def pair_logits(query_emb: Tensor, support_emb: Tensor, alpha: Tensor, bias: Tensor) -> Tensor:
    """Logit of "same class" for every (query, support) pair, shape (..., queries, support)."""
    distance = (query_emb.unsqueeze(-2) - support_emb.unsqueeze(-3)).abs()  # (..., queries, support, features)
    return distance @ alpha + bias


def verification_loss(logits: Tensor, query_y: Tensor, support_y: Tensor) -> Tensor:
    """Balanced binary cross-entropy of the pairs, per task (...,): mean over positive pairs and mean over
    negative pairs, averaged."""
    same = (query_y.unsqueeze(-1) == support_y.unsqueeze(-2)).to(logits.dtype)
    per_pair = torch.nn.functional.binary_cross_entropy_with_logits(logits, same, reduction="none")
    dims = (-2, -1)
    positive = (per_pair * same).sum(dims) / same.sum(dims).clamp_min(1)
    negative = (per_pair * (1 - same)).sum(dims) / (1 - same).sum(dims).clamp_min(1)
    return (positive + negative) / 2


def class_logits(logits: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """Per class, the best pair logit among its support examples: (..., queries, ways)."""
    one_hot = torch.nn.functional.one_hot(support_y, ways).to(torch.bool)  # (..., support, ways)
    masked = logits.unsqueeze(-1).masked_fill(~one_hot.unsqueeze(-3), float("-inf"))  # (..., q, support, ways)
    return masked.amax(-2)


class Siamese(MetricBased):
    name = "siamese"
    head_prefix = "siamese."  # the pair scorer: alpha and b

    def init_params(self, generator: torch.Generator) -> Params:
        weights = init_params(self.model, generator)
        dtype = next(iter(weights.values())).dtype
        # alpha starts negative: a larger distance means "different" before any training.
        alpha = torch.full((self.embedding_size(),), -1.0 / self.embedding_size(), dtype=dtype)
        return {**weights, ALPHA: alpha, BIAS: torch.ones((), dtype=dtype)}

    def scores(self, params: Params, query: Tensor, support: Tensor, support_y: Tensor, ways: int) -> Tensor:
        return pair_logits(query, support, params[ALPHA], params[BIAS])

    def task_loss(self, scores: Tensor, query_y: Tensor, support_y: Tensor) -> Tensor:
        return verification_loss(scores, query_y, support_y)

    def class_scores(self, scores: Tensor, support_y: Tensor, ways: int) -> Tensor:
        return class_logits(scores, support_y, ways)
