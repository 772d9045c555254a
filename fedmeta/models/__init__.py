"""The two architectures of the MAML paper (Finn et al. 2017, arXiv:1703.03400).

Both end in a layer named `head`, the part ANIL adapts and the part a transferred model replaces.
Batch norm keeps no running statistics: it always normalises with the statistics of the batch it sees, as in
the MAML and Reptile reference code (transductive), so the model is a pure function of its parameters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedmeta.functional import lstm_cell
from fedmeta.types import Params


class BodyHead(nn.Module):
    """A network that is `head(body(x))`: the contract ANIL, transfer and the batched engine rely on."""

    body: nn.Module
    head: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SinusoidMLP(BodyHead):
    """1-40-40-1 with ReLU, for sinusoid regression."""

    def __init__(self, hidden: int = 40) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 1)  # (n, 1) -> (n, 1)


# Conv4's ways of halving its maps (`data.conv_downsample`): how many of its four blocks end in a 2x2 max-pool.
POOLED_BLOCKS = {"stride": 0, "maxpool": 4, "maxpool3": 3}


def _conv_block(in_channels: int, channels: int, downsample: str, pool: bool) -> nn.Sequential:
    stride = 2 if downsample == "stride" else 1
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1),
        nn.BatchNorm2d(channels, track_running_stats=False),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(BodyHead):
    """4 x [3x3 conv, batch norm, ReLU, stride-2 conv or 2x2 max-pool], then a linear head.

    With `out_features=None` there is no head: the flattened features are the output (ProtoNet's embedding).
    On 28x28 inputs: stride gives 64x2x2 = 256 features (MAML's Omniglot net); maxpool gives 64x1x1 (the
    ProtoNet paper's); maxpool3, the same net without its last max-pool, 64x3x3 = 576.
    """

    def __init__(
        self,
        out_features: int | None,
        *,
        channels: int = 64,
        downsample: str = "stride",
        in_channels: int = 1,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        if downsample not in POOLED_BLOCKS:
            raise ValueError(f"downsample must be one of {tuple(POOLED_BLOCKS)}, got {downsample!r}")
        pools = POOLED_BLOCKS[downsample]
        self.body = nn.Sequential(
            *[_conv_block(in_channels if i == 0 else channels, channels, downsample, i < pools) for i in range(4)],
            nn.Flatten(),
        )
        with torch.no_grad():
            maps = self.body[:-1](torch.zeros(2, in_channels, image_size, image_size))
        self.feature_map = tuple(maps.shape[1:])  # (channels, height, width) before flattening
        self.num_features = maps[0].numel()
        # (n, 1, 28, 28) -> (n, out_features)
        self.head = nn.Linear(self.num_features, out_features) if out_features is not None else nn.Identity()


class CharLSTMBody(nn.Module):
    """Embedding, then stacked LSTM layers over the sequence; the last step's hidden state is the feature.

    Written with `fedmeta.functional.lstm_cell` rather than `nn.LSTM`, so that `torch.func` (functional_call,
    grad of grad, vmap over tasks) applies to it like to any other model. Gate order i, f, g, o (PyTorch's).
    """

    def __init__(self, vocab: int, embedding: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        self.hidden = hidden
        sizes = [embedding] + [hidden] * (layers - 1)
        self.w_ih = nn.ParameterList([nn.Parameter(torch.empty(4 * hidden, size)) for size in sizes])
        self.w_hh = nn.ParameterList([nn.Parameter(torch.empty(4 * hidden, hidden)) for _ in sizes])
        self.bias = nn.ParameterList([nn.Parameter(torch.empty(4 * hidden)) for _ in sizes])
        self.reset_parameters()

    def reset_parameters(self) -> None:  # nn.LSTM's: U(-1/sqrt(hidden), 1/sqrt(hidden))
        bound = 1 / math.sqrt(self.hidden)
        for p in [*self.w_ih, *self.w_hh, *self.bias]:
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:  # (n, length) character ids -> (n, hidden)
        sequence = self.embedding(x)
        for w_ih, w_hh, bias in zip(self.w_ih, self.w_hh, self.bias, strict=True):
            h = c = sequence.new_zeros(*sequence.shape[:-2], self.hidden)
            outputs = []
            for t in range(sequence.shape[-2]):
                h, c = lstm_cell(sequence[..., t, :], h, c, w_ih, w_hh, bias)
                outputs.append(h)
            sequence = torch.stack(outputs, dim=-2)
        return sequence[..., -1, :]


class CharLSTM(BodyHead):
    """LEAF's Shakespeare model (Caldas et al. 2018): embedding 8, 2 LSTM layers of 256, a linear layer over
    the vocabulary predicting the next character."""

    def __init__(self, vocab: int, *, embedding: int = 8, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.body = CharLSTMBody(vocab, embedding, hidden, layers)
        self.num_features = hidden
        self.head = nn.Linear(hidden, vocab)


def build_model(
    dataset: str,
    *,
    out_features: int | None,
    downsample: str = "stride",
    channels: int = 64,
    lstm_hidden: int = 256,
) -> nn.Module:
    if dataset == "sinusoid":
        return SinusoidMLP()
    if dataset in ("omniglot", "femnist"):  # both 28x28 grey images
        return Conv4(out_features, channels=channels, downsample=downsample)
    if dataset == "shakespeare":
        if out_features is None:
            raise ValueError("the Shakespeare model predicts characters: it needs the vocabulary size")
        return CharLSTM(out_features, hidden=lstm_hidden)
    raise ValueError(f"no model for dataset {dataset!r}")


def init_params(model: nn.Module, generator: torch.Generator) -> Params:
    """Freshly initialised parameters drawn from `generator` (PyTorch's default init, seeded explicitly)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and module is not model:
                reset()
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def uniform_init(generator: torch.Generator, dtype: torch.dtype, fan_in: int, *shape: int) -> Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) drawn from `generator`: PyTorch's default for Linear and LSTM
    weights, for the parameters an algorithm adds beside its model (a relation module, an LSTM)."""
    bound = 1 / math.sqrt(fan_in)
    return (torch.rand(*shape, generator=generator, dtype=dtype) * 2 - 1) * bound
