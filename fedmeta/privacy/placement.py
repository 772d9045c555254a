"""Where a client's update gets its privacy protection before it leaves the client, for each DP mode.

- off, or central DP with a server that sees each update: nothing (the server clips and adds the noise);
- central DP under secure aggregation: the client clips (the server cannot clip what it never sees) and the
  server adds the noise to the sum;
- distributed: each of the m sampled clients clips and adds 1/m of the noise variance;
- local: each client clips and adds all of the noise itself.
"""

from __future__ import annotations

from fedmeta.config import PrivacyConfig
from fedmeta.privacy.mechanism import ClientPrivacy, noise_generator
from fedmeta.types import ClientUpdate


def client_side_protection(privacy: PrivacyConfig, *, secure_aggregation: bool) -> bool:
    """Whether a client clips (and perhaps noises) its update before it leaves (`protect_update` changes it)."""
    return privacy.enabled and (privacy.mode != "central" or secure_aggregation)


def protect_update(
    update: ClientUpdate,
    privacy: PrivacyConfig,
    *,
    secure_aggregation: bool,
    sampled: int,
    seed: int,
    round_index: int,
    client_index: int,
) -> ClientUpdate:
    """The update as it leaves client `client_index` in round `round_index` (`sampled` clients that round)."""
    if not privacy.enabled:
        return update
    if privacy.mode == "central":
        return ClientPrivacy(privacy.clip_norm, 0.0).privatize(update, None) if secure_aggregation else update
    share = sampled if privacy.mode == "distributed" else 1
    client_dp = ClientPrivacy(
        clip_norm=privacy.clip_norm, noise_std=privacy.noise_multiplier * privacy.clip_norm / share**0.5
    )
    generator = noise_generator(
        reproducible=privacy.reproducible_noise, seed=seed, round_index=round_index, stream=client_index + 1
    )
    return client_dp.privatize(update, generator)
