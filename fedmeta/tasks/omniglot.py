"""Omniglot (Lake et al. 2015) as a federation of alphabets, or of (alphabet, drawer group) pairs.

Reads the two official zips (`images_background.zip`, `images_evaluation.zip`) from a data directory,
downsamples every 105x105 drawing to 28x28 once, and caches the arrays beside the user's other caches, so a
second run starts in about a second. Classes are (character, rotation) pairs: the four 90-degree rotations
of a character are four classes, as in Santoro et al. 2016 and every MAML-era paper.

Two splits. "lake" (the federated one, the default): the 30 background alphabets are training clients, the
20 evaluation alphabets are clients the meta-model never sees, and every task comes from one alphabet.
"vinyals" (the papers' standard protocol, Vinyals et al. 2016, arXiv:1606.04080): the 1,200 "trainval"
characters of the published split lists, drawn from both zips, are spread over the training clients, and the
423 test characters form one unseen client whose tasks mix alphabets - easier, and what published accuracies
are measured on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fedmeta.tasks.base import DataError, Federation, fetch
from fedmeta.types import Task

log = logging.getLogger(__name__)

SPLITS = ("background", "evaluation")
DRAWERS = 20
ROTATIONS = 4
IMAGE_SIZE = 28
DOWNLOAD_URL = "https://github.com/brendenlake/omniglot/raw/master/python/images_{split}.zip"
# The Vinyals split lists as distributed with the Prototypical Networks code (MIT licence).
SPLIT_LIST_URL = (
    "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals/{name}.txt"
)
VINYALS_LISTS = ("trainval", "test")
_ROTATION_NAMES = ("rot000", "rot090", "rot180", "rot270")
HOW_TO_GET = (
    "Get it with `fedmeta download omniglot --data-dir DIR` (or place the official "
    "images_background.zip and images_evaluation.zip in DIR/omniglot/), then pass --data-dir DIR "
    "or set FEDMETA_DATA_DIR=DIR."
)
_NAME = re.compile(
    r"^images_(?P<split>\w+)/(?P<alphabet>[^/]+)/character(?P<char>\d+)/(?P<id>\d{4})_(?P<drawer>\d{2})\.png$"
)
_CACHE_VERSION = 1


def default_data_dir() -> Path:
    return Path(os.environ.get("FEDMETA_DATA_DIR", "data"))


def cache_dir() -> Path:
    return Path(os.environ.get("FEDMETA_CACHE_DIR", Path.home() / ".cache" / "fedmeta"))


@dataclass(frozen=True)
class OmniglotSplit:
    """All drawings of one split: images[c, d] is character c drawn by drawer d (ink = 1.0)."""

    images: np.ndarray  # (characters, 20, 28, 28) uint8, 255 = ink
    alphabets: tuple[str, ...]  # alphabet name of each character
    names: tuple[str, ...]  # "Alphabet/characterNN" of each character


def _zip_path(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / "omniglot" / f"images_{split}.zip"


def _decode_zip(path: Path, split: str) -> OmniglotSplit:
    drawings: dict[str, dict[int, np.ndarray]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                match = _NAME.match(name)
                if match is None or match["split"] != split:
                    continue
                with Image.open(io.BytesIO(archive.read(name))) as image:
                    small = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
                key = f"{match['alphabet']}/character{match['char']}"
                # Ink is black (0) in the files; store ink as 255 so that zero padding means "no ink".
                drawings.setdefault(key, {})[int(match["drawer"]) - 1] = 255 - np.asarray(small, dtype=np.uint8)
    except (zipfile.BadZipFile, OSError, KeyError) as error:
        raise DataError(f"Omniglot archive {path} is corrupt or unreadable ({error}). {HOW_TO_GET}") from error
    if not drawings:
        raise DataError(
            f"Omniglot archive {path} holds no images_{split}/<alphabet>/characterNN/*.png files. {HOW_TO_GET}"
        )
    names = tuple(sorted(drawings))
    incomplete = [n for n in names if sorted(drawings[n]) != list(range(DRAWERS))]
    if incomplete:
        raise DataError(
            f"Omniglot archive {path}: {len(incomplete)} character(s) lack some of the {DRAWERS} "
            f"drawings, e.g. {incomplete[0]}. {HOW_TO_GET}"
        )
    images = np.stack([np.stack([drawings[n][d] for d in range(DRAWERS)]) for n in names])
    return OmniglotSplit(images=images, alphabets=tuple(n.split("/")[0] for n in names), names=names)


def load_split(data_dir: Path | str, split: str) -> OmniglotSplit:
    """Decoded arrays of one split, from the cache when the zip is unchanged."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = _zip_path(Path(data_dir), split)
    if not path.is_file():
        raise DataError(f"Omniglot file not found: {path}. {HOW_TO_GET}")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{_CACHE_VERSION}".encode()).hexdigest()[
        :16
    ]
    cached = cache_dir() / f"omniglot-{split}-{key}.npz"
    if cached.is_file():
        try:
            with np.load(cached) as arrays:
                return OmniglotSplit(
                    images=arrays["images"],
                    alphabets=tuple(arrays["alphabets"].tolist()),
                    names=tuple(arrays["names"].tolist()),
                )
        except (OSError, ValueError, KeyError) as error:
            log.warning("ignoring unreadable cache %s (%s); decoding %s again", cached, error, path)
    log.info("decoding %s once (cached afterwards in %s)", path, cached.parent)
    data = _decode_zip(path, split)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + f".{os.getpid()}.tmp.npz")
    np.savez(partial, images=data.images, alphabets=np.array(data.alphabets), names=np.array(data.names))
    partial.replace(cached)  # atomic: a killed run never leaves a half-written cache
    return data


@dataclass(frozen=True)
class OmniglotClient:
    """A set of characters (times 4 rotations) and the drawers whose drawings this client holds."""

    client_id: str
    split: OmniglotSplit
    characters: tuple[int, ...]  # rows of split.images
    drawers: tuple[int, ...]
    # Offset of this client's characters in the global label space of the FedAvg baseline.
    global_class: dict[int, int]

    @property
    def num_classes(self) -> int:
        return len(self.characters) * ROTATIONS

    def check_episode(self, *, ways: int, shots: int, queries: int) -> None:
        if ways > self.num_classes:
            raise DataError(
                f"client {self.client_id} has {self.num_classes} classes "
                f"({len(self.characters)} characters x {ROTATIONS} rotations); cannot draw {ways}-way tasks"
            )
        if shots + queries > len(self.drawers):
            raise DataError(
                f"client {self.client_id} holds {len(self.drawers)} drawings per class; "
                f"{shots} shots + {queries} queries need {shots + queries}"
            )

    def _images(self, characters: np.ndarray, rotations: np.ndarray, drawers: np.ndarray) -> Tensor:
        x = torch.from_numpy(self.split.images[characters, drawers]).float().div_(255.0)  # (n, 28, 28)
        # One rot90 per rotation present (at most three calls), not one per image.
        for k in np.unique(rotations):
            if k:
                where = torch.from_numpy(np.flatnonzero(rotations == k))
                x[where] = torch.rot90(x[where], int(k), dims=(1, 2))
        return x.unsqueeze(1)  # (n, 1, 28, 28)

    def sample_task(self, rng: np.random.Generator, *, ways: int, shots: int, queries: int) -> Task:
        self.check_episode(ways=ways, shots=shots, queries=queries)
        classes = rng.choice(self.num_classes, size=ways, replace=False)
        per_class = shots + queries
        drawers = np.stack(
            [rng.choice(self.drawers, size=per_class, replace=False) for _ in range(ways)]
        )  # (ways, K+Q)
        characters = np.asarray(self.characters)[classes // ROTATIONS]
        rotations = classes % ROTATIONS

        def part(cols: slice) -> tuple[Tensor, Tensor]:
            d = drawers[:, cols]
            n = d.shape[1]
            x = self._images(np.repeat(characters, n), np.repeat(rotations, n), d.reshape(-1))
            y = torch.arange(ways).repeat_interleave(n)
            return x, y

        support_x, support_y = part(slice(0, shots))
        query_x, query_y = part(slice(shots, per_class))
        return Task(support_x=support_x, support_y=support_y, query_x=query_x, query_y=query_y)

    def sample_batch(self, rng: np.random.Generator, size: int) -> tuple[Tensor, Tensor]:
        classes = rng.integers(self.num_classes, size=size)
        characters = np.asarray(self.characters)[classes // ROTATIONS]
        rotations = classes % ROTATIONS
        drawers = rng.choice(self.drawers, size=size)
        labels = [self.global_class[int(c)] * ROTATIONS + int(r) for c, r in zip(characters, rotations, strict=True)]
        return self._images(characters, rotations, drawers), torch.tensor(labels, dtype=torch.int64)


def _clients(
    split: OmniglotSplit,
    prefix: str,
    *,
    partition: str,
    drawers_per_client: int,
    num_clients: int,
    seed: int,
    characters: list[int] | None = None,
) -> list[OmniglotClient]:
    """Clients over `characters` (default: all of `split`) by alphabet, alphabet x drawers, or character."""
    characters = list(range(len(split.names))) if characters is None else characters
    # The FedAvg baseline's label space: the training characters in order, times 4 rotations.
    global_class = {c: i for i, c in enumerate(characters)}
    if partition == "character":
        if not 0 < num_clients <= len(characters):
            raise DataError(f"cannot deal {len(characters)} characters to {num_clients} clients")
        order = np.random.default_rng([seed, 7]).permutation(characters)
        return [
            OmniglotClient(
                f"{prefix}clients{i}",
                split,
                tuple(sorted(int(c) for c in order[i::num_clients])),
                tuple(range(DRAWERS)),
                global_class,
            )
            for i in range(num_clients)
        ]
    by_alphabet: dict[str, list[int]] = {}
    for index in characters:
        by_alphabet.setdefault(split.alphabets[index], []).append(index)
    groups = (
        [tuple(range(DRAWERS))]
        if partition == "alphabet"
        else [tuple(range(start, start + drawers_per_client)) for start in range(0, DRAWERS, drawers_per_client)]
    )
    clients = []
    for alphabet, rows in sorted(by_alphabet.items()):
        for g, drawers in enumerate(groups):
            suffix = "" if partition == "alphabet" else f"/drawers{g}"
            clients.append(OmniglotClient(f"{prefix}{alphabet}{suffix}", split, tuple(rows), drawers, global_class))
    return clients


def omniglot_federation(
    data_dir: Path | str | None,
    *,
    partition: str = "alphabet",
    drawers_per_client: int = 5,
    split: str = "lake",
    num_train_clients: int = 100,
    num_unseen_clients: int = 20,
    seed: int = 0,
) -> Federation:
    """Training clients and unseen clients of one of the two splits (module docstring).

    `partition`: one client per alphabet, per (alphabet, group of `drawers_per_client` drawers), or
    ("character") the training characters dealt at random into `num_train_clients` clients (IID by
    character). Under the Vinyals split the unseen side is always one client holding every test character.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    background = load_split(root, "background")
    evaluation = load_split(root, "evaluation")
    if split == "lake":
        train = _clients(
            background,
            "bg:",
            partition=partition,
            drawers_per_client=drawers_per_client,
            num_clients=num_train_clients,
            seed=seed,
        )
        unseen = _clients(
            evaluation,
            "eval:",
            partition=partition,
            drawers_per_client=drawers_per_client,
            num_clients=num_unseen_clients,
            seed=seed,
        )
        return Federation("omniglot", "classification", train, unseen, len(background.names) * ROTATIONS)
    if split != "vinyals":
        raise ValueError(f"Omniglot split must be 'lake' or 'vinyals', got {split!r}")
    both = _concatenate(background, evaluation)
    lists = {name: _read_vinyals_list(root, name, both) for name in VINYALS_LISTS}
    train = _clients(
        both,
        "vinyals:",
        partition=partition,
        drawers_per_client=drawers_per_client,
        num_clients=num_train_clients,
        seed=seed,
        characters=lists["trainval"],
    )
    test = OmniglotClient("vinyals:test", both, tuple(lists["test"]), tuple(range(DRAWERS)), {})
    return Federation("omniglot", "classification", train, [test], len(lists["trainval"]) * ROTATIONS)


def character_names(clients: list[OmniglotClient]) -> set[str]:
    """The characters ("Alphabet/characterNN") the clients hold: what a model trained on them has seen."""
    return {client.split.names[row] for client in clients for row in client.characters}


def _concatenate(a: OmniglotSplit, b: OmniglotSplit) -> OmniglotSplit:
    return OmniglotSplit(
        images=np.concatenate([a.images, b.images]), alphabets=a.alphabets + b.alphabets, names=a.names + b.names
    )


def _read_vinyals_list(root: Path, name: str, split: OmniglotSplit) -> list[int]:
    """Rows of `split` named by DIR/omniglot/splits_vinyals/NAME.txt (lines `Alphabet/characterNN/rotXXX`).

    Every character must be listed with all four rotations: fedmeta's classes are a character's rotations.
    """
    path = root / "omniglot" / "splits_vinyals" / f"{name}.txt"
    if not path.is_file():
        raise DataError(f"Vinyals split list not found: {path}. {HOW_TO_GET}")
    rotations: dict[str, set[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        character, _, rotation = line.strip().rpartition("/")
        if not character or rotation not in _ROTATION_NAMES:
            raise DataError(f"{path}:{number}: expected 'Alphabet/characterNN/rotXXX', got {line!r}")
        rotations.setdefault(character, set()).add(rotation)
    partial = [c for c, r in rotations.items() if len(r) != ROTATIONS]
    if partial:
        raise DataError(f"{path}: {len(partial)} character(s) lack some of the 4 rotations, e.g. {partial[0]}")
    index = {n: i for i, n in enumerate(split.names)}
    missing = [c for c in rotations if c not in index]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed character(s) are not in the zips, e.g. {missing[0]}")
    return sorted(index[c] for c in rotations)


def download(
    data_dir: Path | str, *, url_template: str = DOWNLOAD_URL, list_template: str = SPLIT_LIST_URL
) -> list[Path]:
    """Fetch the two official zips and the Vinyals split lists into DATA_DIR/omniglot/ (skipping files there)."""
    target = Path(data_dir) / "omniglot"
    target.mkdir(parents=True, exist_ok=True)
    wanted = [(_zip_path(Path(data_dir), s), url_template.format(split=s)) for s in SPLITS]
    wanted += [(target / "splits_vinyals" / f"{n}.txt", list_template.format(name=n)) for n in VINYALS_LISTS]
    return [fetch(url, path) for path, url in wanted]
