"""Byzantine-robust aggregation of client updates: coordinate-wise median and trimmed mean.

Yin et al. 2018 (arXiv:1803.01498): with a fraction of arbitrary (malicious or broken) clients below 1/2
(median) or below the trimmed fraction (trimmed mean), every coordinate of the aggregate stays within the
range of the honest clients' values. Every client counts once; weights would let a liar inflate its own.
"""

from __future__ import annotations

import math

import torch

from fedmeta.types import Params


def _sorted_stack(trees: list[Params], key: str) -> torch.Tensor:
    return torch.stack([t[key].double() for t in trees]).sort(dim=0).values


def coordinate_median(trees: list[Params]) -> Params:
    """Per-coordinate median (the mean of the two middle values for an even count)."""
    if not trees:
        raise ValueError("cannot aggregate an empty list of updates")
    n = len(trees)
    out = {}
    for k, ref in trees[0].items():
        s = _sorted_stack(trees, k)
        middle = s[(n - 1) // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        out[k] = middle.to(ref.dtype)
    return out


def trimmed_mean(trees: list[Params], fraction: float) -> Params:
    """Per-coordinate mean after dropping the floor(fraction * n) largest and smallest values."""
    n = len(trees)
    cut = math.floor(fraction * n)
    if n - 2 * cut < 1:
        raise ValueError(f"trimming {cut} from each end of {n} updates leaves nothing")
    return {k: _sorted_stack(trees, k)[cut : n - cut].mean(dim=0).to(ref.dtype) for k, ref in trees[0].items()}
