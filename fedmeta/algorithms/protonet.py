"""Prototypical Networks: Snell, Swersky, Zemel 2017, arXiv:1703.05175.

No inner loop: a class prototype is the mean embedding of its support examples, and a query's logits are
minus its squared Euclidean distances to the prototypes. The client returns the gradient of the query
cross-entropy. "Adaptation steps" do not exist, so the evaluation curve is flat over steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedmeta.algorithms.metric import MetricBased
from fedmeta.types import Params


def prototype_logits(support_emb: Tensor, support_y: Tensor, query_emb: Tensor, ways: int) -> Tensor:
    """Logits (..., queries, ways) = -||query - prototype_c||^2, prototypes = per-class mean support embedding.

    Any leading dimensions (tasks) are batch dimensions: support_emb (..., support, features).
    """
    one_hot = torch.nn.functional.one_hot(support_y, ways).to(support_emb.dtype)  # (..., support, ways)
    prototypes = (one_hot.transpose(-2, -1) @ support_emb) / one_hot.sum(-2).unsqueeze(-1)  # (..., ways, features)
    return -torch.cdist(query_emb, prototypes).pow(2)


class ProtoNet(MetricBased):
    name = "protonet"
    has_task_directions = True  # no head parameters: a cohort of clients is one vectorised call

    def scores(self, params: Params, query: Tensor, support: Tensor, support_y: Tensor, ways: int) -> Tensor:
        return prototype_logits(support, support_y, query, ways)
