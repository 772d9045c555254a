"""Epsilon for the mechanism the code actually runs, computed with Google's dp-accounting (RDP).

What is accounted: each round samples exactly m of the N training clients without replacement (that is what
`fedmeta.sampling.sample_clients` does, so no Poisson amplification is claimed), and releases the sum of the m
clipped updates plus N(0, (z C)^2) noise. Neighbouring federations differ by *replacing* one client's data;
replacing one C-clipped update moves the sum by up to 2C, so the Gaussian mechanism's noise multiplier
(std / sensitivity) is z / 2. With adaptive clipping the round also releases a noised count; both parts are
folded into one effective multiplier (`update_noise_multiplier`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dp_accounting import dp_event

# dp-accounting is imported where epsilon is computed, not here: it pulls in scipy (about 2 s), and every
# deployed ClientApp - one fresh process per message in a Flower deployment - imports this package but never
# computes an epsilon.

REPLACE_ONE_SENSITIVITY = 2.0  # in units of the clip norm C


def round_event(*, noise_multiplier: float, sample_size: int, population: int) -> dp_event.DpEvent:
    """One round's release as a dp-accounting event (`noise_multiplier` = std / sensitivity)."""
    if not 0 < sample_size <= population:
        raise ValueError(f"cannot sample {sample_size} of {population} clients")
    from dp_accounting import dp_event

    gaussian = dp_event.GaussianDpEvent(noise_multiplier)
    if sample_size == population:
        return gaussian  # everyone takes part: no amplification by sampling
    return dp_event.SampledWithoutReplacementDpEvent(population, sample_size, gaussian)


def epsilon_spent(*, noise_multiplier: float, sample_size: int, population: int, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` rounds with update noise std `noise_multiplier` * C.

    `noise_multiplier` is z as the user sets it (std = z C); the replace-one sensitivity 2C is applied here.
    """
    return epsilon_of_releases([noise_multiplier] * rounds, sample_size=sample_size, population=population, delta=delta)


def epsilon_of_releases(noise_multipliers: list[float], *, sample_size: int, population: int, delta: float) -> float:
    """Epsilon at `delta` for a sequence of rounds, each with its own z (a distributed round whose clients
    did not all answer carries less noise than planned, and is accounted as such)."""
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    from dp_accounting import NeighboringRelation, rdp

    accountant = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    for z in sorted(set(noise_multipliers)):
        event = round_event(
            noise_multiplier=z / REPLACE_ONE_SENSITIVITY, sample_size=sample_size, population=population
        )
        accountant.compose(event, noise_multipliers.count(z))
    return float(accountant.get_epsilon(delta))


def update_noise_multiplier(noise_multiplier: float, *, count_noise_std: float | None) -> float:
    """The multiplier z_update for the vector sum such that sum and noised count together cost as much as a
    single Gaussian mechanism with multiplier z (Andrew et al. 2021, arXiv:1905.03871, Thm. 1, here for the
    replace-one sensitivities 2C of the sum and 1 of the count):  4 / z_update^2 + 1 / s^2 = 4 / z^2.
    Without adaptive clipping (`count_noise_std=None`) it is z itself.
    """
    if count_noise_std is None or noise_multiplier == 0:
        return noise_multiplier
    rest = 4.0 / noise_multiplier**2 - 1.0 / count_noise_std**2
    if rest <= 0:
        raise ValueError(
            f"adaptive clipping's count noise (std {count_noise_std:g}) is too small for noise multiplier "
            f"{noise_multiplier:g}; sample more clients per round or turn adaptive clipping off"
        )
    return 2.0 / math.sqrt(rest)
