"""Shakespeare as a federation of speakers (LEAF's Shakespeare task, Caldas et al. 2018, arXiv:1812.01097):
one client per speaking role, next-character prediction from the previous 80 characters.

Reads a plain text in the "tiny Shakespeare" layout: speeches separated by blank lines, each opening with the
speaker's name on a line of its own ending in ':'. A speaker's speeches, joined by newlines, are the client's
text; every window of 80 characters is a sample whose label is the character after it. The vocabulary is
every character of the file, sorted (LEAF uses a fixed 80-character alphabet; this text has fewer). Roles are
keyed by name alone: the same name in two plays is one client (LEAF splits by play and role).

Speakers with fewer than `min_samples` windows are left out; `num_unseen_clients` of the rest, chosen by the
seed, are held out for evaluation. Tasks are always the client's own windows split into support and query
(`episode.client_tasks`): N-way K-shot episodes over characters are not a task anyone trains on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedmeta.tasks.base import DataError, Federation, SplitsOwnData, fetch, hold_out
from fedmeta.types import Task

log = logging.getLogger(__name__)

SEQUENCE = 80  # LEAF's window
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HOW_TO_GET = (
    f"the tiny Shakespeare text with `fedmeta download shakespeare --data-dir DIR` (or save {URL} as "
    "DIR/shakespeare/input.txt), then pass --data-dir DIR"
)


@dataclass(frozen=True)
class SpeakerClient(SplitsOwnData):
    """One role's text as character ids; sample i is text[i : i + 80] -> text[i + 80]."""

    client_id: str
    text: Tensor  # (characters,) int64
    noun = "speaker"

    def __len__(self) -> int:
        return len(self.text) - SEQUENCE

    def _take(self, starts: np.ndarray) -> tuple[Tensor, Tensor]:
        index = torch.from_numpy(starts)[:, None] + torch.arange(SEQUENCE + 1)
        windows = self.text[index]
        return windows[:, :SEQUENCE], windows[:, SEQUENCE]

    def check_episode(self, *, ways: int, shots: int, queries: int) -> None:
        raise DataError("shakespeare tasks are a speaker's own text: use --client-tasks (episode.client_tasks)")

    def sample_task(self, rng: np.random.Generator, *, ways: int, shots: int, queries: int) -> Task:
        self.check_episode(ways=ways, shots=shots, queries=queries)
        raise AssertionError  # unreachable

    def sample_batch(self, rng: np.random.Generator, size: int) -> tuple[Tensor, Tensor]:
        return self._take(rng.integers(len(self), size=size))


def parse_speakers(text: str) -> dict[str, str]:
    """{speaker: their speeches joined by newlines}, from blocks separated by blank lines, each opening 'NAME:'."""
    speeches: dict[str, list[str]] = {}
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = block.strip("\n").split("\n")
        name, body = lines[0].strip(), "\n".join(lines[1:])
        if len(lines) < 2 or not name.endswith(":") or not body.strip():
            continue
        speeches.setdefault(name[:-1], []).append(body)
    return {name: "\n".join(parts) for name, parts in speeches.items()}


def shakespeare_federation(data_dir: str | Path, *, num_unseen_clients: int, min_samples: int, seed: int) -> Federation:
    path = Path(data_dir) / "shakespeare" / "input.txt"
    if not path.is_file():
        raise DataError(f"Shakespeare text not found: {path}. Get {HOW_TO_GET}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not a readable UTF-8 text: {error}") from None
    speakers = parse_speakers(text)
    if not speakers:
        raise DataError(f"{path} has no speeches ('NAME:' on a line of its own, then the speech, then a blank line)")
    vocabulary = sorted(set(text))
    ids = {ch: i for i, ch in enumerate(vocabulary)}
    clients = [
        SpeakerClient(name, torch.tensor([ids[ch] for ch in speech], dtype=torch.int64))
        for name, speech in sorted(speakers.items())
        if len(speech) - SEQUENCE >= min_samples
    ]
    log.info("Shakespeare: %d of %d speakers have at least %d samples", len(clients), len(speakers), min_samples)
    why = f"Shakespeare in {path}, speakers with at least {min_samples} samples"
    return hold_out("shakespeare", clients, num_unseen=num_unseen_clients, seed=seed, why=why, outputs=len(vocabulary))


def download(data_dir: str | Path, *, url: str = URL) -> list[Path]:
    """Fetch the tiny-Shakespeare text into DATA_DIR/shakespeare/input.txt (kept if already there)."""
    return [fetch(url, Path(data_dir) / "shakespeare" / "input.txt")]
