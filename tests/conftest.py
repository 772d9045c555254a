"""Shared fixtures: tiny tasks in float64 for gradient checks, and the location of the real benchmark data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmeta.tasks.sinusoid import SinusoidClient
from fedmeta.types import Task

SHARED_DATA = Path(
    os.environ.get("FEDMETA_TEST_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never write into the user's ~/.cache from a test; share one cache per test session (decoding is slow).
    monkeypatch.setenv("FEDMETA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fedmeta-cache"))


def double_task(seed: int = 0, shots: int = 5, queries: int = 7) -> Task:
    client = SinusoidClient("c", (1.0, 4.0), (0.0, 3.0))
    t = client.sample_task(np.random.default_rng(seed), ways=1, shots=shots, queries=queries)
    return Task(*(v.double() for v in (t.support_x, t.support_y, t.query_x, t.query_y)))


def to_double(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in params.items()}


def record_training_tasks(algorithm) -> list[Task]:
    """Wrap `algorithm.cohort_update` so that every task the round gives it is also appended to the list returned."""
    seen: list[Task] = []
    original = algorithm.cohort_update

    def spy(params, tasks_by_client):
        seen.extend(task for tasks in tasks_by_client for task in tasks)
        return original(params, tasks_by_client)

    algorithm.cohort_update = spy
    return seen


@pytest.fixture
def omniglot_dir() -> Path:
    if not (SHARED_DATA / "omniglot" / "images_background.zip").is_file():
        pytest.skip(f"real Omniglot data not found under {SHARED_DATA}")
    return SHARED_DATA
