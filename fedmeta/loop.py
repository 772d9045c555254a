"""The federated meta-learning run, written once for every transport.

`run` starts or resumes, then per round: sample clients -> the transport trains them -> outer step -> metrics
-> (every `eval.curve_every` rounds) the unseen-client learning curve -> checkpoint (every few seconds,
`fedmeta.checkpoint.Checkpointer`); then the FedAvg baseline as a run of its own algorithm through the same
rounds and transport, and the final personalised evaluation of every model, written to `summary.json`.

A transport only moves work to clients and results back (`Transport`): the in-process one calls the client
part directly (`fedmeta.inprocess`), the Flower one sends messages over a Grid (`server/grid_transport.py`,
for the Ray simulation and a deployment alike). Nothing here knows which one it drives, so a run gives the same
meta-parameters, metrics and summary on each.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from fedmeta.algorithms import BASELINES
from fedmeta.checkpoint import Checkpointer, save_checkpoint, start_or_resume
from fedmeta.config import ConfigError, RunConfig
from fedmeta.evaluation import make_summary, summarise
from fedmeta.experiment import (
    EvalProtocol,
    Outer,
    curve_protocol,
    eval_protocol,
    fedavg_config,
    initial_params,
    meta_algorithm,
)
from fedmeta.metrics import START, JsonlSink, write_json
from fedmeta.round import SecureSum, ServerState
from fedmeta.sampling import sample_clients
from fedmeta.types import ClientRows, ClientUpdate, CohortSum, Params

log = logging.getLogger(__name__)

# `federation.fit_rounds`: the rounds timed before fitting (the first, warming up, is left out of the rate), the
# least share of the budget they must span, and the share of the remaining budget planned for: on a shared
# machine the rounds' speed drifts by 10-25% within an hour (benchmarks/RESULTS.md, the Meta-SGD sections).
FIT_TIMED_ROUNDS = 10
FIT_MIN_SHARE = 0.02
FIT_MARGIN = 0.9
# After the first fit the plan is revisited as the training crosses these shares of the budget, at the pace of
# the rounds since the last fit, and changed when the rounds that fit differ by more than REFIT_CHANGE: a slow
# spell in the first rounds (another job beside them) otherwise leaves a third of the budget unspent
# (benchmarks/RESULTS.md, "ProtoNet with `--augment 0.5` past the plateau"). Not past half the budget, so that
# the schedule's annealed end is never moved.
REFIT_SHARES = (0.1, 0.2, 0.3, 0.4, 0.5)
REFIT_CHANGE = 0.05


@dataclass(frozen=True)
class FederationInfo:
    """What the server learns about the federation when it connects (it holds none of the data)."""

    num_train: int
    num_unseen: int
    # Labels of the global task (FedAvg's head); None when the federation does not have one.
    num_global_outputs: int | None


@dataclass
class Replies:
    """A round's results as they came back: the individual updates (pairs, or a cohort's rows), their sum
    (`compute.reply = "sum"`), or their secure sum, or None when too few clients answered for the round to
    count (the transport has said why)."""

    updates: list[tuple[str, ClientUpdate]] | ClientRows | CohortSum | SecureSum | None
    received: int
    absent: int = 0  # sampled, but no node holds that client
    failed: int = 0  # an error or a malformed reply
    timed_out: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class Transport(Protocol):
    """How client parts reach the clients. `config` is the run being trained (the meta-learning run or a
    baseline's); clients are indices into the training or the unseen clients."""

    def connect(self, config: RunConfig) -> FederationInfo: ...

    def train(self, config: RunConfig, params: Params, round_index: int, clients: Sequence[int]) -> Replies: ...

    def evaluate(
        self, config: RunConfig, models: Mapping[str, Params], clients: Sequence[int], protocol: EvalProtocol
    ) -> dict[str, np.ndarray]:
        """{model name: metric after 0..steps steps, array (clients that answered, tasks, steps + 1)}, in
        client order."""
        ...


def run(
    config: RunConfig, transport: Transport, out_dir: Path | str, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Meta-train, train the FedAvg baseline, evaluate every model on unseen clients; write all to `out_dir`.

    `resume`: continue from `out_dir`'s checkpoint (written every few seconds, `Checkpointer`) with the
    same config; the result is bit-identical to an uninterrupted run.
    """
    if config.algorithm in BASELINES:
        raise ConfigError(f"{config.algorithm} is a baseline, trained beside every run (eval.fedavg_rounds)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = transport.connect(config)
    algorithm = meta_algorithm(config, info.num_global_outputs)
    init = initial_params(algorithm, config.federation.seed)
    outer = Outer(config, info.num_train)
    outer.check()
    fresh = replace(outer.initial_state(init), run_id=uuid.uuid4().hex)
    state = start_or_resume(out, config, fresh, resume=resume)
    # The config, and what its automatic settings resolved to in this process.
    runtime = {"threads": torch.get_num_threads()}
    (out / "config.json").write_text(json.dumps({**config.to_dict(), "runtime": runtime}, indent=2))
    log.info("run config: %s", json.dumps(config.to_flat(), sort_keys=True))
    eval_clients = list(range(min(config.eval.eval_clients, info.num_unseen)))
    metric = algorithm.metric_name

    def curve(params: Params) -> dict[str, float]:
        curves = transport.evaluate(config, {"meta": params}, eval_clients, curve_protocol(config))
        return {f"unseen_{metric}": float(curves["meta"][:, :, config.inner.inner_steps].mean())}

    with JsonlSink(out / "metrics.jsonl", append=resume) as sink:
        if not resume:
            sink.write({"phase": START, "run_id": state.run_id, "algorithm": config.algorithm})
        state = train(
            config, transport, info, state, sink=sink, label="meta", checkpoint=out / "checkpoint.pt",
            progress=progress, curve=curve if config.eval.curve_every else None,
        )  # fmt: skip
        meta_seconds = time.perf_counter() - started
        models = {"meta": state.params, "random_init": init}
        baseline_privacy: dict[str, Any] = {}
        rounds = config.eval.fedavg_rounds
        if rounds is None:  # as many rounds as the meta-learning run did (fewer under a time budget)
            rounds = state.round if config.federation.time_budget is not None else config.federation.rounds
        if rounds > 0:
            baseline = fedavg_config(config, rounds)
            baseline_outer = Outer(baseline, info.num_train)
            start = baseline_outer.initial_state(
                initial_params(meta_algorithm(baseline, info.num_global_outputs), config.federation.seed)
            )
            baseline_state = train(baseline, transport, info, start, sink=sink, label="fedavg", progress=progress)
            models["fedavg"] = algorithm.transfer(baseline_state.params, init)
            report = baseline_outer.privacy_report(baseline_state)
            if report is not None:
                baseline_privacy = {"fedavg_epsilon": report["epsilon"]}
            save_checkpoint(out / "checkpoint.pt", config=config, state=state, baselines={"fedavg": models["fedavg"]})
        curves = transport.evaluate(config, models, eval_clients, eval_protocol(config))
        results = {name: summarise(curves[name], metric) for name in models}
        privacy = outer.privacy_report(state)
        summary = make_summary(
            config,
            results,
            rounds=state.round,
            meta_seconds=meta_seconds,
            total_seconds=time.perf_counter() - started,
            privacy={**privacy, **baseline_privacy} if privacy is not None else None,
        )
        summary["run_id"] = state.run_id
        sink.write(
            {
                "phase": "eval",
                **{f"{name}_{s['metric']}_final": s["over_tasks"][-1]["mean"] for name, s in results.items()},
            }
        )
    write_json(out / "summary.json", summary)
    return summary


def scheduled(config: RunConfig, state: ServerState) -> RunConfig:
    """`config` with the rounds its outer schedule spans: the fitted ones once `fit_rounds` has fitted them."""
    if not state.planned_rounds:
        return config
    return config.replace(**{"federation.rounds": state.planned_rounds})


def fit_rounds(config: RunConfig, state: ServerState, timed: Sequence[float]) -> tuple[int, float] | None:
    """The rounds that fit `config`'s time budget at the speed of the rounds timed in `timed`, at most
    `federation.rounds`, and that speed (seconds a round); None until enough rounds are timed to tell."""
    fed = config.federation
    budget = fed.time_budget * 60.0
    if len(timed) < FIT_TIMED_ROUNDS or state.elapsed < FIT_MIN_SHARE * budget:
        return None
    rate = sum(timed) / len(timed)
    more = int(max(0.0, budget - state.elapsed) / rate * FIT_MARGIN)
    return max(state.round, min(fed.rounds, state.round + more)), rate


def train(
    config: RunConfig,
    transport: Transport,
    info: FederationInfo,
    state: ServerState,
    *,
    sink: JsonlSink | None,
    label: str,
    checkpoint: Path | None = None,
    progress: bool = True,
    curve: Callable[[Params], dict[str, float]] | None = None,
) -> ServerState:
    """Rounds `state.round + 1 .. federation.rounds` of `config`'s run (or until its time budget is spent).

    With `federation.fit_rounds`, the rounds (and the outer schedule over them) are cut to those that fit the time
    budget at the speed of the first rounds, and fitted again at the pace since (`REFIT_SHARES`) until half the
    budget is spent; the fitted count is kept in the state. With `checkpoint`, the state is written there every few
    seconds (`Checkpointer`), and always when training stops, whatever stops it."""
    saver = Checkpointer(checkpoint, config, state)
    try:
        return _train_rounds(
            config, transport, info, state, saver, sink=sink, label=label, progress=progress, curve=curve
        )
    finally:
        saver.flush()


def _train_rounds(
    config: RunConfig,
    transport: Transport,
    info: FederationInfo,
    state: ServerState,
    saver: Checkpointer,
    *,
    sink: JsonlSink | None,
    label: str,
    progress: bool,
    curve: Callable[[Params], dict[str, float]] | None,
) -> ServerState:
    """`train`'s rounds; each round's state goes to `saver`."""
    plan = scheduled(config, state)
    outer = Outer(plan, info.num_train)
    every = config.eval.curve_every
    bar = tqdm(
        total=plan.federation.rounds,
        initial=state.round,
        desc=label,
        unit="round",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    timed: list[float] = []  # this process's rounds since the last fit (the very first, warming up, left out)
    budget = (config.federation.time_budget or 0.0) * 60.0
    refits = [share * budget for share in REFIT_SHARES if share * budget > state.elapsed]
    warm = True
    while state.round < plan.federation.rounds:
        if outer.over_budget(state):
            log.info("%s: time budget spent after %d rounds (%.1f min)", label, state.round, state.elapsed / 60)
            break
        round_index = state.round
        started = time.perf_counter()
        chosen = sample_clients(
            seed=plan.federation.seed, round_index=round_index, num_clients=info.num_train, count=outer.sampled
        )
        replies = transport.train(config, state.params, round_index, chosen)
        if replies.updates is None:
            state, round_metrics = replace(state, round=state.round + 1), {"skipped": 1}
        else:
            state, round_metrics = outer.step(state, replies.updates, round_index)
            round_metrics.update(replies.metrics)
        seconds = time.perf_counter() - started
        state = replace(state, elapsed=state.elapsed + seconds)
        metrics: dict[str, Any] = {
            "phase": label,
            "round": state.round,
            "seconds": seconds,  # this round's training time (the learning curve's scoring not included)
            "elapsed": state.elapsed,  # training seconds since round 1: the x-axis of time-to-accuracy
            "outer_lr": outer.optimizer.lr_at(state.opt_state["step"]),
            "sampled": len(chosen),
            "absent": replies.absent,
            "failed": replies.failed,
            "timed_out": replies.timed_out,
            **round_metrics,
        }
        if config.federation.fit_rounds:
            if warm:
                warm = False  # this process's first round warms up: not timed
            else:
                timed.append(seconds)
            due = not state.planned_rounds or (refits and state.elapsed >= refits[0])
            fitted = fit_rounds(config, state, timed) if due else None
            if fitted is not None:
                planned, rate = fitted
                refits = [mark for mark in refits if mark > state.elapsed]
                first = not state.planned_rounds
                if first or abs(planned - state.planned_rounds) > REFIT_CHANGE * state.planned_rounds:
                    state = replace(state, planned_rounds=planned)
                    plan = scheduled(config, state)
                    outer = Outer(plan, info.num_train)
                    bar.total = planned
                    metrics["planned_rounds"] = planned
                    log.info(
                        "%s: %d rounds fit the %g-minute budget (%.3f s a round over rounds %d-%d): the outer "
                        "schedule %s spans them",
                        label, planned, config.federation.time_budget, rate, state.round - len(timed) + 1,
                        state.round, "now" if first else "from here on",
                    )  # fmt: skip
                timed = []
        scored = curve is not None and (state.round % every == 0 or state.round == plan.federation.rounds)
        if scored:
            metrics.update(curve(state.params))
        if sink is not None:
            sink.write(metrics)
        saver.after_round(state, now=scored)
        shown = {k: v for k, v in metrics.items() if k.startswith(("query_", "unseen_"))}
        bar.update(1)
        if progress:
            bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
        else:
            log.info(
                "%s round %d/%d: %d/%d replies %s (%.2f s)",
                label,
                state.round,
                plan.federation.rounds,
                replies.received,
                len(chosen),
                " ".join(f"{k}={v:.4g}" for k, v in shown.items()),
                seconds,
            )
    bar.close()
    return state
