"""Meta-SGD: Li, Zhou, Chen, Li 2017, arXiv:1707.09835.

Besides the initial weights, the meta-parameters hold one learning rate per weight entry (`inner_lr.<name>`,
same shape as `<name>`). The inner step is `w' = w - alpha * grad` (elementwise), and both `w` and `alpha`
receive the second-order meta-gradient of the query loss.
"""

from __future__ import annotations

import torch

from fedmeta.algorithms.maml import MAML
from fedmeta.models import init_params
from fedmeta.types import Params

LR_PREFIX = "inner_lr."


class MetaSGD(MAML):
    name = "metasgd"

    def init_params(self, generator: torch.Generator) -> Params:
        weights = init_params(self.model, generator)
        return {**weights, **{LR_PREFIX + k: torch.full_like(v, self.inner_lr) for k, v in weights.items()}}

    def model_params(self, params: Params) -> Params:
        return {k: v for k, v in params.items() if not k.startswith(LR_PREFIX)}

    def adaptation_lr(self, params: Params) -> Params:
        return {k[len(LR_PREFIX) :]: v for k, v in params.items() if k.startswith(LR_PREFIX)}
