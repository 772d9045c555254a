"""Matching Networks: Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra 2016, arXiv:1606.04080.

No inner loop: a query's label distribution is an attention-weighted sum of the support labels,
P(y = c | x) = sum_i a(x, x_i) [y_i = c], with a(x, x_i) the softmax over the support set of the cosine
similarity between the embeddings f(x) and g(x_i) (eq. 1-2). The client returns the gradient of the query
negative log-likelihood (the cross-entropy of the log-probabilities, which sum to one). Like ProtoNet,
evaluation is flat over "adaptation steps".

Full-context embeddings (sec. 2.1.2 and appendix A.2; option `fce`): on top of the shared embedding g' = f',
a bidirectional LSTM reads the support set, g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i), and the query embedding
is refined by an attention LSTM for K processing steps:

    r_{k-1} = sum_i softmax_i(h_{k-1} . g(x_i, S)) g(x_i, S)
    h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})
    h_k = h^_k + f'(x)                                      f(x, S) = h_K

with h_0 = c_0 = 0. The LSTMs' weights are meta-parameters under `fce.`, updated by the outer loop.

Metric scaling (option `scale`, Oreshkin, Rodriguez, Lacoste 2018, TADAM, arXiv:1805.10123 sec. 2.1): the
attention is the softmax of `scale` x cosine. The paper's attention is scale 1, whose logits are bounded: with
the non-negative embeddings of a ReLU network (cosines in [0, 1]) a 20-way 1-shot query's probability of its
own class can never pass e / (e + 19) = 0.125, so the loss saturates and the embedding stops learning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedmeta.algorithms.metric import MetricBased
from fedmeta.functional import lstm_cell
from fedmeta.models import init_params, uniform_init
from fedmeta.types import Params

EPS = 1e-8  # in the cosine's norms, and under the log of a class probability
FCE_PREFIX = "fce."
LSTMS = ("support_fwd", "support_bwd", "query")  # fce.<lstm>.{w_ih, w_hh, bias}


def matching_log_probs(
    support_emb: Tensor, support_y: Tensor, query_emb: Tensor, ways: int, scale: float = 1.0
) -> Tensor:
    """log P(y = c | query), shape (..., queries, ways): attention (softmax over the support set of `scale` x
    the cosine similarities) summed per support label. Leading dimensions (tasks) are batch dimensions."""
    support = support_emb / support_emb.norm(dim=-1, keepdim=True).clamp_min(EPS)
    query = query_emb / query_emb.norm(dim=-1, keepdim=True).clamp_min(EPS)
    attention = torch.softmax(scale * (query @ support.transpose(-2, -1)), dim=-1)  # (..., queries, support)
    one_hot = torch.nn.functional.one_hot(support_y, ways).to(attention.dtype)  # (..., support, ways)
    return (attention @ one_hot).clamp_min(EPS).log()


def _lstm(params: Params, name: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(params[f"{FCE_PREFIX}{name}.{k}"] for k in ("w_ih", "w_hh", "bias"))  # type: ignore[return-value]


def support_context(support: Tensor, params: Params) -> Tensor:
    """g(x_i, S): the bidirectional LSTM's two hidden states added to g'(x_i); support (..., S, F)."""
    count = support.shape[-2]
    zero = support.new_zeros(*support.shape[:-2], support.shape[-1])
    context = support
    for name, order in (("support_fwd", range(count)), ("support_bwd", range(count - 1, -1, -1))):
        h, c, hidden = zero, zero, [zero] * count
        for i in order:
            h, c = lstm_cell(support[..., i, :], h, c, *_lstm(params, name))
            hidden[i] = h
        context = context + torch.stack(hidden, dim=-2)
    return context


def query_context(query: Tensor, context: Tensor, params: Params, steps: int) -> Tensor:
    """f(x, S) = h_K of the attention LSTM over the full-context support `context` (..., S, F); query (..., Q, F)."""
    h = torch.zeros_like(query)
    c = torch.zeros_like(query)
    for _ in range(steps):
        read = torch.softmax(h @ context.transpose(-2, -1), dim=-1) @ context  # (..., Q, F)
        h, c = lstm_cell(query, torch.cat([h, read], dim=-1), c, *_lstm(params, "query"))
        h = h + query
    return h


class MatchingNet(MetricBased):
    name = "matching"

    def __init__(self, *args: object, fce_steps: int = 0, scale: float = 1.0, **kwargs: object) -> None:
        """`fce_steps`: the attention LSTM's processing steps K; 0 turns full-context embeddings off. `scale`:
        the factor on the cosine similarities (1: the paper's attention)."""
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fce_steps = fce_steps
        self.scale = scale
        self.head_prefix = FCE_PREFIX if fce_steps else None

    def init_params(self, generator: torch.Generator) -> Params:
        weights = init_params(self.model, generator)
        if not self.fce_steps:
            return weights
        size, dtype = self.embedding_size(), next(iter(weights.values())).dtype
        lstms: Params = {}
        for name in LSTMS:
            hidden_in = 2 * size if name == "query" else size  # the attention LSTM's state is [h, r]
            shapes = {"w_ih": (4 * size, size), "w_hh": (4 * size, hidden_in), "bias": (4 * size,)}
            lstms |= {f"{FCE_PREFIX}{name}.{k}": uniform_init(generator, dtype, size, *s) for k, s in shapes.items()}
        return weights | lstms

    def scores(self, params: Params, query: Tensor, support: Tensor, support_y: Tensor, ways: int) -> Tensor:
        if self.fce_steps:
            support = support_context(support, params)
            query = query_context(query, support, params, self.fce_steps)
        # Log-probabilities: their cross-entropy (the default task loss) is the NLL, since they sum to one.
        return matching_log_probs(support, support_y, query, ways, self.scale)
