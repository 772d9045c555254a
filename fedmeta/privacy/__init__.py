"""Client-level differential privacy for the meta-update: clipping, Gaussian noise, adaptive clipping, and
epsilon from Google's `dp-accounting` (never a hand-rolled formula)."""

from fedmeta.privacy.accountant import epsilon_of_releases, epsilon_spent, update_noise_multiplier
from fedmeta.privacy.mechanism import ClientPrivacy, ServerPrivacy, clip_to_norm, global_norm, noise_generator
from fedmeta.privacy.placement import client_side_protection, protect_update

__all__ = [
    "ClientPrivacy",
    "ServerPrivacy",
    "client_side_protection",
    "clip_to_norm",
    "epsilon_of_releases",
    "epsilon_spent",
    "global_norm",
    "noise_generator",
    "protect_update",
    "update_noise_multiplier",
]
