"""Checkpoints: the meta-parameters, the outer optimizer state, the round and the run config, in one file.

Written atomically (temporary file, then rename), read back with `torch.load(weights_only=True)` so a
checkpoint can never execute code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fedmeta.config import RunConfig
from fedmeta.round import ServerState
from fedmeta.types import Params

FORMAT = "fedmeta-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or was written by something else."""


def save_checkpoint(
    path: Path | str, *, config: RunConfig, state: ServerState, baselines: dict[str, Params] | None = None
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "config": config.to_dict(),
        "round": state.round,
        "params": state.params,
        "opt_state": state.opt_state,
        "clip_norm": state.clip_norm,
        "dp_releases": list(state.dp_releases),
        "baselines": baselines or {},
    }
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path | str) -> tuple[RunConfig, ServerState, dict[str, Params]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload: dict[str, Any] = torch.load(path, weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fedmeta checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    config = RunConfig.from_dict(payload["config"])
    state = ServerState(
        params=payload["params"],
        opt_state=payload["opt_state"],
        round=payload["round"],
        clip_norm=payload.get("clip_norm"),
        dp_releases=tuple(payload.get("dp_releases", ())),
    )
    return config, state, payload["baselines"]
