"""Checkpoints: the meta-parameters, the outer optimizer state, the round and the run config, in one file.

Written atomically (temporary file, then rename), read back with `torch.load(weights_only=True)` so a
checkpoint can never execute code.

What a resumed run needs is all here: fedmeta keeps no random-number-generator state between rounds (client
sampling, task draws and reproducible DP noise are functions of (seed, round, client)), and the privacy
accountant's whole state is the list of noise multipliers released so far (`dp_releases`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from fedmeta.config import RunConfig
from fedmeta.metrics import keep_rounds, run_id_of
from fedmeta.round import ServerState
from fedmeta.types import Params

FORMAT = "fedmeta-checkpoint-v1"
# A run's checkpoint is written after its process's first round, then once this many seconds have passed since
# the last write, after every learning-curve point, and when training stops (the end, the budget, an exception
# such as Ctrl-C): a killed run resumes at most this far behind, to the same bits. Written after every round, it
# cost 5% of a Reptile round on Omniglot (benchmarks/RESULTS.md). With differential privacy it is still written
# after every round: the rounds a resume repeats would release fresh noise (unless `reproducible_noise`) on
# top of what clients already received, which the accountant would not count.
CHECKPOINT_SECONDS = 5.0
log = logging.getLogger(__name__)


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
        "elapsed": state.elapsed,
        "planned_rounds": state.planned_rounds,
        "run_id": state.run_id,
        "baselines": baselines or {},
    }
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, partial)
    os.replace(partial, path)


class Checkpointer:
    """A run's checkpoint as training goes (`CHECKPOINT_SECONDS`; every round with differential privacy):
    `after_round` with each round's state (`now`: write it whatever the time), `flush` when training stops.
    Without a path it writes nothing."""

    def __init__(self, path: Path | None, config: RunConfig, state: ServerState) -> None:
        self.path, self.config, self.latest = path, config, state
        self.saved_round, self.saved_at = state.round, float("-inf")

    def after_round(self, state: ServerState, *, now: bool = False) -> None:
        self.latest = state
        interval = 0.0 if self.config.privacy.enabled else CHECKPOINT_SECONDS
        if self.path is not None and (now or time.monotonic() - self.saved_at >= interval):
            self._save()

    def flush(self) -> None:
        if self.path is not None and self.latest.round != self.saved_round:
            self._save()

    def _save(self) -> None:
        assert self.path is not None
        save_checkpoint(self.path, config=self.config, state=self.latest)
        self.saved_round, self.saved_at = self.latest.round, time.monotonic()


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
        elapsed=float(payload.get("elapsed", 0.0)),
        planned_rounds=int(payload.get("planned_rounds", 0)),
        run_id=str(payload.get("run_id", "")),
    )
    return config, state, payload["baselines"]


def load_for_resume(path: Path | str, config: RunConfig) -> ServerState:
    """The state to continue a run from; a clear error if the checkpoint is unreadable or from another run."""
    saved, state, _ = load_checkpoint(path)
    if saved != config:
        now, then = config.to_flat(), saved.to_flat()
        keys = [k for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
        diffs = [f"{k}: checkpoint {then.get(k)!r}, now {now.get(k)!r}" for k in keys]
        raise CheckpointError(
            f"{path} was written by another configuration ({'; '.join(diffs)}); resume with the same options, "
            "or start afresh in another output directory"
        )
    return state


def start_or_resume(out: Path, config: RunConfig, fresh: ServerState, *, resume: bool) -> ServerState:
    """`fresh` (round 0), or with `resume` the state of `out`/checkpoint.pt, with metrics.jsonl cut back to it."""
    checkpoint = out / "checkpoint.pt"
    if resume:
        state = load_for_resume(checkpoint, config)
        logged = run_id_of(out / "metrics.jsonl")
        if state.run_id and logged is not None and logged != state.run_id:
            raise CheckpointError(
                f"{checkpoint} belongs to run {state.run_id} but {out / 'metrics.jsonl'} to run {logged}; resume "
                "only from the checkpoint the run in this directory wrote"
            )
        kept = keep_rounds(out / "metrics.jsonl", phase="meta", last_round=state.round)
        log.info("resuming from %s after round %d (%d metric rows kept)", checkpoint, state.round, kept)
        return state
    if checkpoint.exists():
        log.warning("starting afresh: %s of an earlier run will be replaced (pass --resume to continue it)", checkpoint)
    return fresh
