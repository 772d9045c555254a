"""The client-data contract shared by every task family."""

from __future__ import annotations

import functools
import logging
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from torch import Tensor

from fedmeta.types import Task


class DataError(RuntimeError):
    """Benchmark data is missing, corrupt, or cannot supply the requested tasks."""


class ClientData(Protocol):
    """One client's private data, seen only through the tasks it samples."""

    @property
    def client_id(self) -> str:
        """A stable, unique name; the server sorts replies by it."""
        ...

    def sample_task(self, rng: np.random.Generator, *, ways: int, shots: int, queries: int) -> Task:
        """One episode: `ways` classes x (`shots` support + `queries` query) examples, or K-shot regression."""
        ...

    def sample_split(self, rng: np.random.Generator, support: float, samples: int | None = None) -> Task:
        """The client's own data as one task over the global labels: `samples` of its samples at random (all when
        None), a support part of them (a fraction < 1 or a count), the rest as query. Only naturally partitioned
        datasets (femnist, shakespeare) have it."""
        ...

    def sample_batch(self, rng: np.random.Generator, size: int) -> tuple[Tensor, Tensor]:
        """A plain supervised minibatch with global labels, for the FedAvg baseline."""
        ...

    def check_episode(self, *, ways: int, shots: int, queries: int) -> None:
        """Raise `DataError` if this client cannot supply such episodes."""
        ...


CohortEpisodes = Callable[[int, str, int, Sequence[int], int, int, int], tuple[list[str], list[list[Task]]]]


@dataclass(frozen=True)
class Federation:
    """Train clients (who shape the meta-model) and unseen clients (who only ever evaluate it)."""

    name: str
    kind: Literal["regression", "classification"]
    train_clients: Sequence[ClientData]
    unseen_clients: Sequence[ClientData]
    # Size of the FedAvg baseline's output layer: classes in the global label space, or 1 for regression.
    num_global_outputs: int
    # Training clients' episodes for a whole cohort in one go, where the family has a vectorised sampler:
    # (seed, stream, round, client indices, tasks per client, shots, queries) -> (client ids, tasks by client).
    # A client's tasks are the same drawn alone or in any cohort; None: each client samples its own.
    cohort_episodes: CohortEpisodes | None = None

    def check_episode(self, *, ways: int, shots: int, queries: int, train_only: bool = False) -> None:
        """Raise `DataError` if some client (only training clients: `train_only`) cannot supply such episodes."""
        for group in (self.train_clients,) if train_only else (self.train_clients, self.unseen_clients):
            if isinstance(group, Population):  # alike by construction: one client answers for all
                if len(group):
                    group[0].check_episode(ways=ways, shots=shots, queries=queries)
                continue
            for client in group:
                client.check_episode(ways=ways, shots=shots, queries=queries)

    def check_split(self, support: float, samples: int | None = None) -> None:
        for client in [*self.train_clients, *self.unseen_clients]:
            check = getattr(client, "check_split", None)
            if check is None:
                raise DataError(f"{self.name} clients cannot split their own data into tasks (episode.client_tasks)")
            check(support, samples)


class Population(Sequence[ClientData]):
    """`size` clients, client i made by `make(i)` only when asked for: a federation of a million clients costs
    no memory until some are sampled. `make` must be a pure function of i (a client is derived from the run
    seed and its index), so a client is the same whenever and wherever it is made; the last `cache` clients
    made are kept."""

    def __init__(self, size: int, make: Callable[[int], ClientData], *, cache: int = 4096) -> None:
        if size < 0:
            raise ValueError(f"a population cannot have {size} clients")
        self._size = size
        self._make = functools.lru_cache(maxsize=cache)(make)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> ClientData:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("a population is indexed one client at a time")
        position = index + self._size if index < 0 else index
        if not 0 <= position < self._size:
            raise IndexError(f"client {index} of a population of {self._size}")
        return self._make(position)

    def __iter__(self) -> Iterator[ClientData]:
        return (self[i] for i in range(self._size))


def support_count(samples: int, support: float) -> int:
    """Support samples of a client with `samples`: a fraction (0 < s < 1) rounded, or a count (s >= 1)."""
    return int(round(samples * support)) if support < 1 else int(support)


class SplitsOwnData:
    """FedMeta's client tasks for a client whose samples are indexable (`__len__`, `_take`): a random subset
    of its samples, cut into a support part and a query part over the global labels."""

    client_id: str
    noun: str = "client"  # how errors name it ("writer", "speaker")

    def __len__(self) -> int:
        raise NotImplementedError

    def _take(self, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        """Samples `rows` as (inputs, global labels)."""
        raise NotImplementedError

    def check_split(self, support: float, samples: int | None = None) -> None:
        total = min(len(self), samples) if samples else len(self)
        count = support_count(total, support)
        if not 0 < count < total:
            raise DataError(
                f"{self.noun} {self.client_id} has {total} samples; a support part of {support:g} leaves "
                f"{count} support and {total - count} query samples (each needs at least 1)"
            )

    def sample_split(self, rng: np.random.Generator, support: float, samples: int | None = None) -> Task:
        """`samples` of the client's samples at random (all when None): a `support` part (a fraction < 1, or a
        count >= 1) to adapt on, the rest as query."""
        self.check_split(support, samples)
        total = min(len(self), samples) if samples else len(self)
        rows = rng.permutation(len(self))[:total]
        count = support_count(total, support)
        support_x, support_y = self._take(rows[:count])
        query_x, query_y = self._take(rows[count:])
        return Task(support_x, support_y, query_x, query_y)


def hold_out(
    name: str, clients: Sequence[ClientData], *, num_unseen: int, seed: int, why: str, outputs: int
) -> Federation:
    """A natural federation: `num_unseen` of `clients`, chosen by `seed`, held out as unseen clients (both
    sides keep the clients' order). `why` says which clients these are, for the error when too few remain."""
    if len(clients) <= num_unseen:
        raise DataError(f"{why}: {len(clients)} clients; {num_unseen} unseen ones would leave none to train on")
    order = np.random.default_rng([seed, len(clients)]).permutation(len(clients))
    unseen = sorted(int(i) for i in order[:num_unseen])
    train = sorted(int(i) for i in order[num_unseen:])
    return Federation(name, "classification", [clients[i] for i in train], [clients[i] for i in unseen], outputs)


def fetch(url: str, path: Path) -> Path:
    """Download `url` to `path` (through a .part file, so a broken download never looks complete); a file
    already there is kept. A .zip that is not a zip archive is an error."""
    if path.is_file():
        logging.getLogger(__name__).info("%s already present", path)
        return path
    logging.getLogger(__name__).info("downloading %s", url)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with urllib.request.urlopen(url) as response, open(partial, "wb") as out:  # noqa: S310 (fixed https URLs)
        while chunk := response.read(1 << 20):
            out.write(chunk)
    if path.suffix == ".zip" and not zipfile.is_zipfile(partial):
        partial.unlink()
        raise DataError(f"download of {url} did not yield a zip archive")
    partial.replace(path)
    return path


def _stream_id(stream: str) -> int:
    return int.from_bytes(stream.encode()[:8].ljust(8, b"\0"), "little")


def task_rng(seed: int, stream: str, *indices: int) -> np.random.Generator:
    """A generator determined by (run seed, purpose, round, client, ...), never by call order.

    `stream` separates purposes (training tasks, evaluation tasks, client sampling) so that drawing more of
    one never shifts another.
    """
    return np.random.default_rng([seed, _stream_id(stream), *indices])


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea, Flood 2014), elementwise on uint64 (arithmetic modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def counter_uniforms(seed: int, stream: str, indices: Sequence[int | np.ndarray], count: int) -> np.ndarray:
    """Uniforms in [0, 1), shape (n, count): row r is determined by (seed, stream, indices[0][r], ...) alone.

    `task_rng` for a whole cohort at once: a counter-based generator (SplitMix64 over a key hashed from the
    indices) needs no generator object per client, so drawing ten thousand clients' tasks is a few array
    operations, and a client's draws are the same whether it is drawn alone or among others."""
    columns = [np.asarray(i, dtype=np.int64).astype(np.uint64).reshape(-1) for i in indices]
    n = max((c.size for c in columns), default=1)
    key = np.full(n, _mix64(np.array([seed & (2**64 - 1)], dtype=np.uint64))[0] ^ np.uint64(_stream_id(stream)))
    for column in columns:
        key = _mix64((key + _GOLDEN) ^ column)
    counters = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
    bits = _mix64(key[:, None] + counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
