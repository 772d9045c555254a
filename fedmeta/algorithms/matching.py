"""Matching Networks: Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra 2016, arXiv:1606.04080.

No inner loop: a query's label distribution is an attention-weighted sum of the support labels,
P(y = c | x) = sum_i a(x, x_i) [y_i = c], with a(x, x_i) the softmax over the support set of the cosine
similarity between the embeddings f(x) and g(x_i) (eq. 1-2; here f = g: the full-context embeddings of
sec. 2.1.2 are not built yet). The client returns the gradient of the query negative log-likelihood (the
cross-entropy of the log-probabilities, which sum to one). Like ProtoNet, evaluation is flat over
"adaptation steps".
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedmeta.algorithms.metric import MetricBased
from fedmeta.types import Params

EPS = 1e-8  # in the cosine's norms, and under the log of a class probability


def matching_log_probs(support_emb: Tensor, support_y: Tensor, query_emb: Tensor, ways: int) -> Tensor:
    """log P(y = c | query), shape (..., queries, ways): attention (softmax over the support set of the cosine
    similarities) summed per support label. Leading dimensions (tasks) are batch dimensions."""
    support = support_emb / support_emb.norm(dim=-1, keepdim=True).clamp_min(EPS)
    query = query_emb / query_emb.norm(dim=-1, keepdim=True).clamp_min(EPS)
    attention = torch.softmax(query @ support.transpose(-2, -1), dim=-1)  # (..., queries, support)
    one_hot = torch.nn.functional.one_hot(support_y, ways).to(attention.dtype)  # (..., support, ways)
    return (attention @ one_hot).clamp_min(EPS).log()


class MatchingNet(MetricBased):
    name = "matching"

    def scores(self, params: Params, query: Tensor, support: Tensor, support_y: Tensor, ways: int) -> Tensor:
        # Log-probabilities: their cross-entropy (the default task loss) is the NLL, since they sum to one.
        return matching_log_probs(support, support_y, query, ways)
