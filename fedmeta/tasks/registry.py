"""Build the federation a `DataConfig` names."""

from __future__ import annotations

from fedmeta.config import DataConfig
from fedmeta.tasks.base import Federation
from fedmeta.tasks.femnist import femnist_federation
from fedmeta.tasks.omniglot import default_data_dir, omniglot_federation
from fedmeta.tasks.shakespeare import shakespeare_federation
from fedmeta.tasks.sinusoid import sinusoid_federation


def build_federation(data: DataConfig, *, seed: int) -> Federation:
    if data.dataset == "sinusoid":
        return sinusoid_federation(
            num_train_clients=data.num_train_clients,
            num_unseen_clients=data.num_unseen_clients,
            window=data.client_window,
            seed=seed,
        )
    if data.dataset == "femnist":
        return femnist_federation(
            data.data_dir or default_data_dir(),
            variant=data.femnist_variant,
            num_unseen_clients=data.num_unseen_clients,
            min_samples=data.min_samples,
            seed=seed,
        )
    if data.dataset == "shakespeare":
        return shakespeare_federation(
            data.data_dir or default_data_dir(),
            num_unseen_clients=data.num_unseen_clients,
            min_samples=data.min_samples,
            seed=seed,
        )
    return omniglot_federation(
        data.data_dir,
        partition=data.partition,
        drawers_per_client=data.drawers_per_client,
        split=data.split,
        num_train_clients=data.num_train_clients,
        num_unseen_clients=data.num_unseen_clients,
        seed=seed,
    )
