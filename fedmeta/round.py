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
from fedmeta.functional import rows_mean
from fedmeta.privacy.mechanism import ServerPrivacy, global_norm
from fedmeta.robust import coordinate_median, trimmed_mean
from fedmeta.server_opt import OptState, OuterOptimizer
from fedmeta.types import ClientRows, ClientUpdate, CohortSum, Params

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
    # The rounds the outer schedule spans when `federation.fit_rounds` fitted them to the time budget (0: not
    # fitted, the schedule spans `federation.rounds`). Fitted once, from the first rounds' speed; kept on resume.
    planned_rounds: int = 0
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
    check_structure(update.direction, params)
    for k, v in update.direction.items():
        if not torch.isfinite(v).all():
            raise RejectedUpdate(f"{k} holds NaN or Inf")
    if update.num_tasks <= 0:
        raise RejectedUpdate(f"num_tasks must be positive, got {update.num_tasks}")


def check_structure(direction: Params, params: Params, *, rows: bool = False) -> None:
    """Reject a direction whose keys, shapes or dtypes differ from the model's (`rows`: behind a leading
    client axis)."""
    if set(direction) != set(params):
        raise RejectedUpdate(
            f"keys differ from the model's: missing {sorted(set(params) - set(direction))}, "
            f"extra {sorted(set(direction) - set(params))}"
        )
    for k, v in direction.items():
        shape = v.shape[1:] if rows else v.shape
        if shape != params[k].shape or v.dtype != params[k].dtype:
            raise RejectedUpdate(
                f"{k}: got {tuple(shape)} {v.dtype}, expected {tuple(params[k].shape)} {params[k].dtype}"
            )


def init_state(params: Params, optimizer: OuterOptimizer, *, clip_norm: float | None = None) -> ServerState:
    return ServerState(params=params, opt_state=optimizer.init(params), round=0, clip_norm=clip_norm)


def apply_round(
    state: ServerState,
    updates: Sequence[tuple[str, ClientUpdate]] | ClientRows,
    optimizer: OuterOptimizer,
    *,
    privacy: ServerPrivacy | None = None,
    sampled: int | None = None,
    generator: torch.Generator | None = None,
    robust: RobustConfig | None = None,
) -> tuple[ServerState, dict[str, float]]:
    """One outer step from the round's updates - `(client_id, update)` pairs, or the rows of cohorts of
    clients - bad ones logged and left out. Either form gives the same bits: updates are ordered by client id
    and averaged row after row (`fedmeta.functional.rows_mean`).

    A round with no acceptable update leaves the state unchanged (and says so in the metrics) rather than
    stepping on an empty average. With `privacy`, accepted clients count equally, their clipped sum is noised
    and divided by `sampled` (the number of clients asked, fixed in advance), and the release is recorded.
    """
    received = len(updates)
    rows = accepted_rows(updates, state, robust)
    metrics: dict[str, float] = {"clients": len(rows), "rejected": received - len(rows)}
    if not len(rows):
        log.warning("round %d: no acceptable update; meta-parameters unchanged", state.round + 1)
        return replace(state, round=state.round + 1), metrics
    weights = [float(n) for n in rows.num_tasks]
    clip_norm, releases = state.clip_norm, state.dp_releases
    aggregator = robust.aggregator if robust is not None else "mean"
    if privacy is None and aggregator == "mean":
        direction = rows_mean(rows.directions, weights)
    elif privacy is None:
        directions = [rows.update(i).direction for i in range(len(rows))]
        if aggregator == "median":
            direction = coordinate_median(directions)
        else:
            direction = trimmed_mean(directions, robust.trim_fraction if robust is not None else 0.0)
    else:
        if clip_norm is None or generator is None:
            raise ValueError("a private round needs the state's clip norm and a noise generator")
        asked = sampled if sampled is not None else len(rows)
        direction, clip_norm, dp_metrics = privacy.aggregate(
            [rows.update(i).direction for i in range(len(rows))],
            clip_norm=clip_norm,
            sampled=asked,
            generator=generator,
        )
        releases = (*releases, privacy.release_multiplier(replied=len(rows), sampled=asked))
        metrics.update(dp_metrics)
        if privacy.mode != "central" and "update_norm" in rows.metrics:
            # The clients clipped before noising: what they were clipped at is in their reported norms, not in
            # the norms of the noised updates the server holds.
            reported = rows.metrics["update_norm"]
            metrics["clipped_fraction"] = sum(n > clip_norm for n in reported) / len(reported)
    metrics["tasks"] = sum(weights)
    for name, values in rows.metrics.items():
        metrics[name] = sum(w * m for w, m in zip(weights, values, strict=True)) / sum(weights)
    return _step(state, direction, optimizer, clip_norm, releases, metrics)


def accepted_rows(
    updates: Sequence[tuple[str, ClientUpdate]] | ClientRows, state: ServerState, robust: RobustConfig | None
) -> ClientRows:
    """The acceptable updates as rows ordered by client id; each refused one logged with its reason.

    Rows from one cohort share keys and shapes: those are checked once for the whole cohort, finiteness and
    norms row by row.
    """
    max_norm = robust.max_update_norm if robust is not None else None

    def refuse(client_id: str, reason: object) -> None:
        log.warning("round %d: rejected update from client %s: %s", state.round + 1, client_id, reason)

    if not isinstance(updates, ClientRows):
        accepted = []
        for client_id, update in sorted(updates, key=lambda pair: pair[0]):
            try:
                check_update(update, state.params)
                _check_norm(update.direction, max_norm)
            except RejectedUpdate as reason:
                refuse(client_id, reason)
                continue
            accepted.append((client_id, update))
        return ClientRows.of(accepted) if accepted else _no_rows(state.params)
    order = sorted(range(len(updates)), key=lambda i: updates.client_ids[i])
    try:
        check_structure(updates.directions, state.params, rows=True)
    except RejectedUpdate as reason:  # the whole cohort has the wrong model
        for i in order:
            refuse(updates.client_ids[i], reason)
        return _no_rows(state.params)
    finite = torch.ones(len(updates), dtype=torch.bool)
    for v in updates.directions.values():
        finite &= torch.isfinite(v.reshape(len(updates), -1)).all(1)
    kept = []
    for i in order:
        client_id = updates.client_ids[i]
        try:
            if not finite[i]:
                raise RejectedUpdate("holds NaN or Inf")
            if updates.num_tasks[i] <= 0:
                raise RejectedUpdate(f"num_tasks must be positive, got {updates.num_tasks[i]}")
            if max_norm is not None:
                _check_norm(updates.update(i).direction, max_norm)
        except RejectedUpdate as reason:
            refuse(client_id, reason)
            continue
        kept.append(i)
    return updates if kept == list(range(len(updates))) else updates.take(kept)


def _check_norm(direction: Params, max_norm: float | None) -> None:
    if max_norm is not None:
        norm = global_norm(direction)
        if norm > max_norm:
            raise RejectedUpdate(f"norm {norm:.4g} exceeds robust.max_update_norm {max_norm:g}")


def _no_rows(params: Params) -> ClientRows:
    return ClientRows((), {k: v.new_empty((0, *v.shape)) for k, v in params.items()}, ())


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
    direction, releases = _release(state, secure.mean, secure.count, privacy, sampled, generator)
    if privacy is not None:
        metrics["clip_norm"] = state.clip_norm  # type: ignore[assignment]
    return _step(state, direction, optimizer, state.clip_norm, releases, metrics)


def _release(
    state: ServerState,
    mean: Params,
    count: int,
    privacy: ServerPrivacy | None,
    sampled: int | None,
    generator: torch.Generator | None,
) -> tuple[Params, tuple[float, ...]]:
    """The mean of `count` already clipped updates as released (noised under central DP), and the state's
    releases with this one added; the mean unchanged without privacy."""
    if privacy is None:
        return mean, state.dp_releases
    if state.clip_norm is None or generator is None:
        raise ValueError("a private round needs the state's clip norm and a noise generator")
    asked = sampled if sampled is not None else count
    released = privacy.release(mean, replied=count, sampled=asked, clip_norm=state.clip_norm, generator=generator)
    return released, (*state.dp_releases, privacy.release_multiplier(replied=count, sampled=asked))


def sum_rows(
    rows: ClientRows,
    params: Params,
    *,
    clip_norm: float | None = None,
    equal_weights: bool = False,
    max_norm: float | None = None,
    client_clip_norm: float | None = None,
) -> CohortSum:
    """A cohort's rows reduced where they were computed to what a mean-aggregating server needs (`CohortSum`).

    Each row is checked as the server checks it (`accepted_rows`: the model's keys and shapes, finite,
    positive task count, at most `max_norm` long) and the refused ones are named; under central DP each
    accepted row is clipped to `clip_norm`, as the server would. Rows weigh their task count, or 1 each with
    `equal_weights` (under DP). Sums are taken in float64 in one matrix product, so the mean differs from the
    row-by-row mean of `apply_round` only by float64 rounding. `client_clip_norm`: the clients clipped to it
    themselves (distributed or local DP) and reported their norms before clipping; those longer are counted.
    """
    count = len(rows)
    first_id = min(rows.client_ids) if count else ""
    try:
        check_structure(rows.directions, params, rows=True)
    except RejectedUpdate as reason:  # the whole cohort has the wrong model
        rejected = tuple((client_id, str(reason)) for client_id in sorted(rows.client_ids))
        zeros = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in params.items()}
        return CohortSum(zeros, 0.0, 0, 0, {}, 0, rejected, first_id)
    flat = torch.cat([rows.directions[k].reshape(count, params[k].numel()).double() for k in params], 1)
    norms = flat.norm(dim=1)
    all_tasks = torch.tensor(rows.num_tasks, dtype=torch.float64)
    ok = torch.isfinite(norms) & (all_tasks > 0)
    if max_norm is not None:
        ok &= norms <= max_norm
    rejected = []
    for i in sorted((~ok).nonzero().flatten().tolist(), key=lambda i: rows.client_ids[i]):
        if not torch.isfinite(norms[i]):
            reason = "holds NaN or Inf"
        elif rows.num_tasks[i] <= 0:
            reason = f"num_tasks must be positive, got {rows.num_tasks[i]}"
        else:
            reason = f"norm {float(norms[i]):.4g} exceeds robust.max_update_norm {max_norm:g}"
        rejected.append((rows.client_ids[i], reason))
    keep = ok.nonzero().flatten()
    if len(keep) == count:  # the usual case: no copy of the rows
        kept, kept_norms, tasks = flat, norms, all_tasks
    else:
        kept, kept_norms, tasks = flat.index_select(0, keep), norms.index_select(0, keep), all_tasks[keep]
    weights = torch.ones_like(tasks) if equal_weights else tasks
    clipped = 0
    if clip_norm is not None:
        over = kept_norms > clip_norm
        clipped = int(over.sum())
        factor = torch.where(over, clip_norm / kept_norms.clamp_min(1e-300), torch.ones_like(kept_norms))
        weights = weights * factor
    elif client_clip_norm is not None and "update_norm" in rows.metrics:
        reported = torch.tensor(rows.metrics["update_norm"], dtype=torch.float64).index_select(0, keep)
        clipped = int((reported > client_clip_norm).sum())
    total = weights @ kept
    metrics = {
        name: float(torch.tensor(values, dtype=torch.float64).index_select(0, keep) @ tasks)
        for name, values in rows.metrics.items()
    }
    sizes = [params[k].numel() for k in params]
    return CohortSum(
        {k: part.reshape(params[k].shape) for k, part in zip(params, torch.split(total, sizes), strict=True)},
        float(len(keep)) if equal_weights else float(tasks.sum()),
        len(keep),
        int(tasks.sum()),
        metrics,
        clipped,
        tuple(rejected),
        first_id,
    )


def apply_sum(
    state: ServerState,
    cohort: CohortSum,
    optimizer: OuterOptimizer,
    *,
    privacy: ServerPrivacy | None = None,
    sampled: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[ServerState, dict[str, float]]:
    """One outer step from cohorts' sums (`sum_rows`): the step `apply_round` takes from the same rows.

    The refusals the workers made are logged here; a sum of the wrong shape or not finite is refused whole and
    leaves the state unchanged. Under central DP the workers clipped; the server adds the noise to the mean of
    the `count` clipped updates and records the release, as for rows.
    """
    for client_id, reason in cohort.rejected:
        log.warning("round %d: rejected update from client %s: %s", state.round + 1, client_id, reason)
    metrics: dict[str, float] = {"clients": cohort.count, "rejected": len(cohort.rejected)}
    if cohort.count <= 0:
        log.warning("round %d: no acceptable update; meta-parameters unchanged", state.round + 1)
        return replace(state, round=state.round + 1), metrics
    try:
        if set(cohort.total) != set(state.params) or any(
            cohort.total[k].shape != v.shape for k, v in state.params.items()
        ):
            raise RejectedUpdate("its keys or shapes differ from the model's")
        if not all(torch.isfinite(v).all() for v in cohort.total.values()) or not cohort.weight > 0:
            raise RejectedUpdate(f"it holds NaN or Inf, or a weight of {cohort.weight}")
    except RejectedUpdate as reason:
        log.warning("round %d: rejected the cohorts' sum: %s", state.round + 1, reason)
        return replace(state, round=state.round + 1), {"clients": 0, "rejected": cohort.count}
    if privacy is not None and privacy.adaptive:
        raise ValueError("adaptive clipping needs each client's clipped bit: use cohort rows, not sums")
    mean = {k: (cohort.total[k] / cohort.weight).to(v.dtype) for k, v in state.params.items()}
    direction, releases = _release(state, mean, cohort.count, privacy, sampled, generator)
    if privacy is not None:
        metrics.update({"clip_norm": state.clip_norm, "clipped_fraction": cohort.clipped / cohort.count})  # type: ignore[dict-item]
    metrics["tasks"] = float(cohort.tasks)
    for name, total in cohort.metrics.items():
        metrics[name] = total / cohort.tasks
    return _step(state, direction, optimizer, state.clip_norm, releases, metrics)


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
