"""FEMNIST (LEAF, Caldas et al. 2018, arXiv:1812.01097) as a federation of writers: one client per writer.

Reads LEAF's JSON files (`DIR/femnist/<variant>/{train,test}/*.json`, each `{"users": [...], "num_samples":
[...], "user_data": {writer: {"x": [[784 floats]], "y": [ints]}}}`) and pools each writer's train and test
samples: here a writer's data is split into support and query by the task sampler, not by LEAF. Images are
28x28 with 1.0 = background; they are inverted to ink = 1 like Omniglot's. 62 classes (10 digits, 26 upper-
and 26 lower-case letters) form the global label space.

Writers are dealt at random (seeded) into training writers, who shape the meta-model, and unseen writers,
held out entirely, on whom personalisation is measured (FedMeta, Chen et al. 2018, arXiv:1802.07876).
A task is either an N-way K-shot episode over one writer's classes, or the writer's own data split into a
support and a query part over all 62 classes (`sample_split`, FedMeta's formulation).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedmeta.tasks.base import DataError, Federation, SplitsOwnData, hold_out
from fedmeta.types import Task

log = logging.getLogger(__name__)

CLASSES = 62
IMAGE_SIZE = 28
DEFAULT_VARIANT = "leaf_niid_sf005"
HOW_TO_GET = (
    "FEMNIST comes from LEAF (https://github.com/TalwalkarLab/leaf): in leaf/data/femnist run "
    "`./preprocess.sh -s niid --sf 0.05 -k 0 -t sample` (--sf 1.0 for all 3,550 writers) and copy "
    "data/train and data/test to DIR/femnist/<variant>/; then pass --data-dir DIR"
)


@dataclass(frozen=True)
class WriterClient(SplitsOwnData):
    """One writer's samples: images (n, 1, 28, 28) with ink = 1, global labels (n,) in 0..61."""

    client_id: str
    x: Tensor
    y: Tensor
    noun = "writer"

    def __len__(self) -> int:
        return len(self.y)

    def _classes_with(self, count: int) -> np.ndarray:
        labels, counts = np.unique(self.y.numpy(), return_counts=True)
        return labels[counts >= count]

    def check_episode(self, *, ways: int, shots: int, queries: int) -> None:
        usable = len(self._classes_with(shots + queries))
        if usable < ways:
            raise DataError(
                f"writer {self.client_id} has {usable} classes with at least {shots + queries} samples; "
                f"cannot draw {ways}-way tasks with {shots} shots + {queries} queries"
            )

    def sample_task(self, rng: np.random.Generator, *, ways: int, shots: int, queries: int) -> Task:
        """An N-way K-shot episode over this writer's classes (labels 0..ways-1)."""
        self.check_episode(ways=ways, shots=shots, queries=queries)
        classes = rng.choice(self._classes_with(shots + queries), size=ways, replace=False)
        labels = self.y.numpy()
        picks = np.stack(
            [rng.choice(np.flatnonzero(labels == c), size=shots + queries, replace=False) for c in classes]
        )  # (ways, K+Q)

        def part(rows: np.ndarray) -> tuple[Tensor, Tensor]:
            n = rows.shape[1]
            return self.x[torch.from_numpy(rows.reshape(-1))], torch.arange(ways).repeat_interleave(n)

        support_x, support_y = part(picks[:, :shots])
        query_x, query_y = part(picks[:, shots:])
        return Task(support_x, support_y, query_x, query_y)

    def _take(self, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        index = torch.from_numpy(rows)
        return self.x[index], self.y[index]

    def sample_batch(self, rng: np.random.Generator, size: int) -> tuple[Tensor, Tensor]:
        rows = torch.from_numpy(rng.integers(len(self), size=size))
        return self.x[rows], self.y[rows]


def read_leaf_writers(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every writer in a LEAF JSON directory: {writer: (x (n, 784) float32, y (n,) int64)}."""
    if not directory.is_dir():
        raise DataError(f"FEMNIST directory not found: {directory}. {HOW_TO_GET}")
    files = sorted(directory.glob("*.json"))
    if not files:
        raise DataError(f"no LEAF .json files in {directory}. {HOW_TO_GET}")
    writers: dict[str, tuple[list, list]] = {}
    for path in files:
        try:
            content = json.loads(path.read_text())
            user_data = content["user_data"]
            for user in content["users"]:
                x, y = writers.setdefault(str(user), ([], []))
                x.extend(user_data[user]["x"])
                y.extend(user_data[user]["y"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{path} is not readable LEAF JSON: {error}") from None
        except (KeyError, TypeError) as error:
            raise DataError(f"{path} is not in LEAF's format (users / user_data / x / y): missing {error}") from None
    out = {}
    for user, (x, y) in writers.items():
        try:
            images = np.asarray(x, dtype=np.float32)
            labels = np.asarray(y, dtype=np.int64)
        except (ValueError, TypeError):
            raise DataError(f"writer {user} in {directory}: samples are not numbers") from None
        if images.ndim != 2 or images.shape[1] != IMAGE_SIZE * IMAGE_SIZE or len(images) != len(labels):
            raise DataError(
                f"writer {user} in {directory}: expected {len(labels)} images of {IMAGE_SIZE * IMAGE_SIZE} "
                f"pixels, got an array of shape {images.shape}"
            )
        if labels.size and not (labels.min() >= 0 and labels.max() < CLASSES):
            raise DataError(f"writer {user} in {directory}: labels must be in 0..{CLASSES - 1}")
        out[user] = (images, labels)
    return out


def femnist_federation(
    data_dir: str | Path,
    *,
    variant: str = DEFAULT_VARIANT,
    num_unseen_clients: int,
    min_samples: int,
    seed: int,
) -> Federation:
    """Writers with at least `min_samples` samples, `num_unseen_clients` of them (chosen by `seed`) held out."""
    root = Path(data_dir) / "femnist" / variant
    parts = [read_leaf_writers(root / split) for split in ("train", "test")]
    pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for part in parts:
        for user, data in part.items():
            pooled.setdefault(user, []).append(data)
    clients = []
    dropped = 0
    for user in sorted(pooled):
        x = np.concatenate([d[0] for d in pooled[user]])
        y = np.concatenate([d[1] for d in pooled[user]])
        if len(y) < min_samples:
            dropped += 1
            continue
        images = torch.from_numpy(1.0 - x).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)  # ink = 1
        clients.append(WriterClient(user, images, torch.from_numpy(y)))
    if dropped:
        log.info("FEMNIST: %d writers with fewer than %d samples left out", dropped, min_samples)
    why = f"FEMNIST in {root}, writers with at least {min_samples} samples"
    return hold_out("femnist", clients, num_unseen=num_unseen_clients, seed=seed, why=why, outputs=CLASSES)
