"""The server part shared by every algorithm and every transport: `apply_round(state, updates)`.

Aggregate the clients' directions weighted by task count, then take one outer-optimizer step. Updates are
sorted by client id first, so the float result does not depend on the order in which replies arrived.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from fedmeta.config import RobustConfig
from fedmeta.functional import tree_mean
from fedmeta.privacy.mechanism import ServerPrivacy, global_norm
from fedmeta.robust import coordinate_median, trimmed_mean
from fedmeta.server_opt import OptState, OuterOptimizer
from fedmeta.types import ClientUpdate, Params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerState:
    """Everything the server must keep between rounds; checkpointed whole."""

    params: Params
    opt_state: OptState
    round: int = 0
    # Differential privacy: the current clip norm (adaptive clipping moves it), and the effective noise
    # multiplier of every private release so far - the accountant's whole state.
    clip_norm: float | None = None
    dp_releases: tuple[float, ...] = ()
    # Training seconds spent so far (the clock of `federation.time_budget`; survives a resume).
    elapsed: float = 0.0
    # Names the run this state belongs to, so that a resume cannot continue another run's metrics.
    run_id: str = ""


@dataclass(frozen=True)
class SecureSum:
    """All the server learns from a round under secure aggregation: the mean of `count` updates, no single one.

    Under SecAgg+ every client counts once (the weight is not sent in the clear), which equals the task-count
    weighting whenever clients train on the same number of tasks - as fedmeta's clients do.
    """

    mean: Params
    count: int


class RejectedUpdate(ValueError):
    """A client update that must not reach the meta-parameters."""


def check_update(update: ClientUpdate, params: Params) -> None:
    """Reject updates whose keys, shapes or dtypes differ from the model's, or that hold NaN/Inf."""
    if set(update.direction) != set(params):
        raise RejectedUpdate(
            f"keys differ from the model's: missing {sorted(set(params) - set(update.direction))}, "
            f"extra {sorted(set(update.direction) - set(params))}"
        )
    for k, v in update.direction.items():
        if v.shape != params[k].shape or v.dtype != params[k].dtype:
            raise RejectedUpdate(
                f"{k}: got {tuple(v.shape)} {v.dtype}, expected {tuple(params[k].shape)} {params[k].dtype}"
            )
        if not torch.isfinite(v).all():
            raise RejectedUpdate(f"{k} holds NaN or Inf")
    if update.num_tasks <= 0:
        raise RejectedUpdate(f"num_tasks must be positive, got {update.num_tasks}")


def init_state(params: Params, optimizer: OuterOptimizer, *, clip_norm: float | None = None) -> ServerState:
    return ServerState(params=params, opt_state=optimizer.init(params), round=0, clip_norm=clip_norm)


def apply_round(
    state: ServerState,
    updates: Sequence[tuple[str, ClientUpdate]],
    optimizer: OuterOptimizer,
    *,
    privacy: ServerPrivacy | None = None,
    sampled: int | None = None,
    generator: torch.Generator | None = None,
    robust: RobustConfig | None = None,
) -> tuple[ServerState, dict[str, float]]:
    """One outer step from `(client_id, update)` pairs; bad updates are logged and left out.

    A round with no acceptable update leaves the state unchanged (and says so in the metrics) rather than
    stepping on an empty average. With `privacy`, accepted clients count equally, their clipped sum is noised
    and divided by `sampled` (the number of clients asked, fixed in advance), and the release is recorded.
    """
    accepted: list[tuple[str, ClientUpdate]] = []
    for client_id, update in sorted(updates, key=lambda pair: pair[0]):
        try:
            check_update(update, state.params)
            if robust is not None and robust.max_update_norm is not None:
                norm = global_norm(update.direction)
                if norm > robust.max_update_norm:
                    raise RejectedUpdate(f"norm {norm:.4g} exceeds robust.max_update_norm {robust.max_update_norm:g}")
        except RejectedUpdate as reason:
            log.warning("round %d: rejected update from client %s: %s", state.round + 1, client_id, reason)
            continue
        accepted.append((client_id, update))
    metrics: dict[str, float] = {"clients": len(accepted), "rejected": len(updates) - len(accepted)}
    if not accepted:
        log.warning("round %d: no acceptable update; meta-parameters unchanged", state.round + 1)
        return replace(state, round=state.round + 1), metrics
    weights = [float(u.num_tasks) for _, u in accepted]
    clip_norm, releases = state.clip_norm, state.dp_releases
    if privacy is None:
        directions = [u.direction for _, u in accepted]
        aggregator = robust.aggregator if robust is not None else "mean"
        if aggregator == "median":
            direction = coordinate_median(directions)
        elif aggregator == "trimmed-mean":
            direction = trimmed_mean(directions, robust.trim_fraction if robust is not None else 0.0)
        else:
            direction = tree_mean(directions, weights)
    else:
        if clip_norm is None or generator is None:
            raise ValueError("a private round needs the state's clip norm and a noise generator")
        asked = sampled if sampled is not None else len(accepted)
        direction, clip_norm, dp_metrics = privacy.aggregate(
            [u.direction for _, u in accepted], clip_norm=clip_norm, sampled=asked, generator=generator
        )
        releases = (*releases, privacy.release_multiplier(replied=len(accepted), sampled=asked))
        metrics.update(dp_metrics)
    metrics["tasks"] = sum(weights)
    for name in accepted[0][1].metrics:
        metrics[name] = sum(w * u.metrics[name] for w, (_, u) in zip(weights, accepted, strict=True)) / sum(weights)
    return _step(state, direction, optimizer, clip_norm, releases, metrics)


def apply_secure_sum(
    state: ServerState,
    secure: SecureSum,
    optimizer: OuterOptimizer,
    *,
    privacy: ServerPrivacy | None = None,
    sampled: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[ServerState, dict[str, float]]:
    """One outer step from a securely aggregated mean (the clients clipped, and noised if distributed).

    The mean is checked like an update (keys, shapes, finiteness); a bad one leaves the state unchanged.
    """
    try:
        check_update(ClientUpdate(secure.mean, max(secure.count, 1), {}), state.params)
        if secure.count <= 0:
            raise RejectedUpdate(f"a secure sum of {secure.count} updates")
    except RejectedUpdate as reason:
        log.warning("round %d: rejected the secure aggregate: %s", state.round + 1, reason)
        return replace(state, round=state.round + 1), {"clients": 0, "rejected": 1}
    metrics: dict[str, float] = {"clients": secure.count, "rejected": 0}
    clip_norm, releases = state.clip_norm, state.dp_releases
    direction = secure.mean
    if privacy is not None:
        if clip_norm is None or generator is None:
            raise ValueError("a private round needs the state's clip norm and a noise generator")
        asked = sampled if sampled is not None else secure.count
        direction = privacy.release(
            direction, replied=secure.count, sampled=asked, clip_norm=clip_norm, generator=generator
        )
        releases = (*releases, privacy.release_multiplier(replied=secure.count, sampled=asked))
        metrics["clip_norm"] = clip_norm
    return _step(state, direction, optimizer, clip_norm, releases, metrics)


def _step(
    state: ServerState,
    direction: Params,
    optimizer: OuterOptimizer,
    clip_norm: float | None,
    releases: tuple[float, ...],
    metrics: dict[str, float],
) -> tuple[ServerState, dict[str, float]]:
    params, opt_state = optimizer.step(state.params, direction, state.opt_state)
    metrics["direction_norm"] = global_norm(direction)
    new = replace(state, params=params, opt_state=opt_state, round=state.round + 1, clip_norm=clip_norm)
    return replace(new, dp_releases=releases), metrics
