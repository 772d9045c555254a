"""The Gaussian mechanism on client updates.

Flower ships DP strategy wrappers and client mods, but they wrap a `flwr.serverapp.Strategy` and clip the
difference between returned and sent *parameters*; fedmeta's clients return descent directions (meta-gradients
or pseudo-gradients) into its own loop, and `fedmeta/` must run without Flower. So the mechanism is written
here, in a few lines, and the accounting is delegated to dp-accounting.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedmeta.functional import tree_mean
from fedmeta.types import ClientUpdate, Params


def global_norm(params: Params) -> float:
    """L2 norm of all entries together, in float64."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in params.values()))


def clip_to_norm(params: Params, clip_norm: float) -> tuple[Params, float]:
    """Scale `params` down to L2 norm at most `clip_norm`; returns (clipped, norm before clipping).

    An all-zero update stays zero (no division by its zero norm); a non-finite norm is an error, since NaN
    updates must be rejected before they reach a mechanism.
    """
    norm = global_norm(params)
    if not math.isfinite(norm):
        raise ValueError(f"cannot clip an update of norm {norm}")
    if norm <= clip_norm:
        return dict(params), norm
    factor = clip_norm / norm
    return {k: v * factor for k, v in params.items()}, norm


def gaussian_like(params: Params, std: float, generator: torch.Generator) -> Params:
    """N(0, std^2) noise shaped like `params`, drawn in sorted-name order so that the same generator gives the
    same noise whatever order the dict arrived in (records from the network come back sorted)."""
    noise = {k: torch.randn(params[k].shape, generator=generator, dtype=params[k].dtype) * std for k in sorted(params)}
    return {k: noise[k] for k in params}


def noise_generator(*, reproducible: bool, seed: int, round_index: int, stream: int) -> torch.Generator:
    """Reproducible noise (seeded from the run) only when asked for; otherwise fresh operating-system entropy."""
    if reproducible:
        seed_value = int(np.random.SeedSequence([seed, round_index, stream]).generate_state(1, np.uint64)[0] >> 1)
    else:
        seed_value = secrets.randbits(63)
    return torch.Generator().manual_seed(seed_value)


@dataclass(frozen=True)
class ClientPrivacy:
    """What a client does before its update leaves it: clip, and in distributed/local mode add noise."""

    clip_norm: float
    noise_std: float  # per client: z C / sqrt(m) (distributed) or z C (local); 0 in central mode

    def privatize(self, update: ClientUpdate, generator: torch.Generator | None) -> ClientUpdate:
        clipped, norm = clip_to_norm(update.direction, self.clip_norm)
        if self.noise_std > 0:
            if generator is None:
                raise ValueError("a noised update needs a noise generator")
            noise = gaussian_like(clipped, self.noise_std, generator)
            clipped = {k: v + noise[k] for k, v in clipped.items()}
        return ClientUpdate(clipped, update.num_tasks, {**update.metrics, "update_norm": norm})


@dataclass(frozen=True)
class ServerPrivacy:
    """The server side of client-level DP: clip, sum, add the central noise, divide by m, adapt C.

    Every accepted client counts once (weights are equal: a task-count weight would let one client's
    influence exceed C). The sum is divided by the number of *sampled* clients m, fixed in advance, so the
    noise scale does not depend on who answered.
    """

    # central: the server clips and adds N(0, (z C)^2). distributed / local: the clients clipped and noised
    # their updates already (the server could not re-clip a noised update without distorting it).
    mode: str
    noise_multiplier: float  # z of the noise on the update sum (after the adaptive-clipping correction)
    accounted_multiplier: float  # z of the whole round's release (sum and noised count together)
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise_std: float = 0.0

    def release_multiplier(self, *, replied: int, sampled: int) -> float:
        """The noise multiplier this round's release actually had (what the accountant composes)."""
        if self.mode == "distributed":
            # Each client added z C / sqrt(m); with n < m replies the sum's noise is only z C sqrt(n / m).
            return self.accounted_multiplier * math.sqrt(replied / sampled)
        return self.accounted_multiplier  # central; local: each client's own release

    def release(
        self, mean: Params, *, replied: int, sampled: int, clip_norm: float, generator: torch.Generator
    ) -> Params:
        """The private release from the mean of `replied` clipped updates: (their sum + central noise) / m.

        Computed as the mean times n / m, so that with no noise and full participation it equals the
        non-private average bit for bit. Under secure aggregation this is all the server does: the clients
        clipped, and the server sees only the sum.
        """
        if replied != sampled:
            mean = {k: v * (replied / sampled) for k, v in mean.items()}
        if self.mode == "central" and self.noise_multiplier > 0:
            noise = gaussian_like(mean, self.noise_multiplier * clip_norm / sampled, generator)
            mean = {k: v + noise[k] for k, v in mean.items()}
        return mean

    def aggregate(
        self, directions: Sequence[Params], *, clip_norm: float, sampled: int, generator: torch.Generator
    ) -> tuple[Params, float, dict[str, float]]:
        """(noised mean direction, next round's clip norm, metrics)."""
        if self.mode == "central":
            clipped, norms = zip(*(clip_to_norm(d, clip_norm) for d in directions), strict=True)
        else:
            clipped, norms = tuple(directions), tuple(global_norm(d) for d in directions)
        mean = self.release(
            tree_mean(list(clipped)), replied=len(clipped), sampled=sampled, clip_norm=clip_norm, generator=generator
        )
        metrics = {"clip_norm": clip_norm, "clipped_fraction": sum(n > clip_norm for n in norms) / len(norms)}
        next_clip = clip_norm
        if self.adaptive:
            unclipped = (
                sum(n <= clip_norm for n in norms) + float(torch.randn((), generator=generator)) * self.count_noise_std
            )
            fraction = unclipped / sampled
            next_clip = clip_norm * math.exp(-self.clip_lr * (fraction - self.target_quantile))
            metrics["unclipped_fraction_noised"] = fraction
        return mean, next_clip, metrics
