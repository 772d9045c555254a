"""The in-process federation: every client runs in this process, one after another.

This is the reference transport. It calls exactly what Flower's ClientApp and ServerApp call -
`algorithm.client_update` on each sampled client, `apply_round` on the server - so a run here and a run
over Flower differ only in how the updates travel.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedmeta.checkpoint import load_checkpoint, save_checkpoint, start_or_resume
from fedmeta.config import ConfigError, RunConfig
from fedmeta.evaluation import make_summary, personalised_curves, summarise
from fedmeta.experiment import Experiment, task_kind
from fedmeta.metrics import JsonlSink
from fedmeta.round import ServerState
from fedmeta.sampling import sample_clients
from fedmeta.types import Params

log = logging.getLogger(__name__)


def train(
    experiment: Experiment,
    state: ServerState,
    *,
    sink: JsonlSink | None,
    label: str,
    checkpoint: Path | None = None,
    progress: bool = True,
    on_round: Callable[[ServerState], dict[str, float]] | None = None,
) -> ServerState:
    """Run rounds `state.round + 1 .. experiment.rounds` of federated training; return the final state."""
    if experiment.config.secagg.enabled:
        raise ConfigError(
            "secure aggregation hides updates from a server; the in-process loop has none. "
            "Use --engine ray or a deployment (fedmeta server/client/run)"
        )
    seed = experiment.config.federation.seed
    clients = experiment.federation.train_clients
    outer = experiment.outer
    bar = tqdm(
        range(state.round, experiment.rounds),
        desc=label,
        unit="round",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    for round_index in bar:
        if outer.over_budget(state):
            log.info("%s: time budget spent after %d rounds (%.1f min)", label, state.round, state.elapsed / 60)
            break
        started = time.perf_counter()
        chosen = sample_clients(seed=seed, round_index=round_index, num_clients=len(clients), count=outer.sampled)
        updates = [(clients[c].client_id, experiment.client_update(state.params, c, round_index)) for c in chosen]
        state, round_metrics = outer.step(state, updates, round_index)
        seconds = time.perf_counter() - started
        state = replace(state, elapsed=state.elapsed + seconds)
        metrics: dict[str, Any] = {
            "phase": label,
            "round": state.round,
            "seconds": seconds,  # this round's training time (the learning curve's scoring not included)
            "elapsed": state.elapsed,  # training seconds since round 1: the x-axis of time-to-accuracy
            "outer_lr": outer.optimizer.lr_at(state.opt_state["step"]),
            **round_metrics,
        }
        if on_round is not None:
            metrics.update(on_round(state))
        if sink is not None:
            sink.write(metrics)
        if checkpoint is not None:
            save_checkpoint(checkpoint, config=experiment.config, state=state)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k.startswith(("query_", "unseen_"))})
    return state


def evaluate(experiment: Experiment, models: dict[str, Params], *, progress: bool = True) -> dict[str, Any]:
    """Personalised evaluation of each named model on the unseen clients, on the very same tasks."""
    cfg = experiment.config
    clients = experiment.federation.unseen_clients[: cfg.eval.eval_clients]
    with tqdm(total=len(clients), desc="evaluate", unit="client", disable=not progress, dynamic_ncols=True) as bar:
        curves = personalised_curves(
            experiment.algorithm, models, clients, on_client=bar.update, **experiment.eval_kwargs()
        )
    metric = experiment.algorithm.metric_name
    return {name: summarise(curve, metric) for name, curve in curves.items()}


def _curve(experiment: Experiment) -> Callable[[ServerState], dict[str, float]] | None:
    """Unseen-client score every `curve_every` rounds, at the training number of inner steps."""
    cfg = experiment.config
    every, steps = cfg.eval.curve_every, cfg.inner.inner_steps
    if every == 0:
        return None
    clients = experiment.federation.unseen_clients[: cfg.eval.eval_clients]
    metric = experiment.algorithm.metric_name

    def score(state: ServerState) -> dict[str, float]:
        if state.round % every != 0 and state.round != cfg.federation.rounds:
            return {}
        # The final evaluation's protocol on fewer, different tasks (seed + 1), scored at the training steps.
        protocol = experiment.eval_kwargs()
        protocol["seed"] = cfg.federation.seed + 1
        protocol["tasks_per_client"] = cfg.eval.curve_tasks_per_client
        protocol["steps"] = steps
        curves = personalised_curves(experiment.algorithm, {"meta": state.params}, clients, **protocol)
        return {f"unseen_{metric}": float(curves["meta"][:, :, steps].mean())}

    return score


def simulate(config: RunConfig, out_dir: Path | str, *, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Meta-train, train the FedAvg baseline, evaluate all on unseen clients; write everything to `out_dir`.

    `resume`: continue from `out_dir`'s checkpoint (written after every round) with the same config; the
    result is bit-identical to an uninterrupted run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    experiment = Experiment.from_config(config)
    init = experiment.initial_params()
    state = start_or_resume(out, config, experiment.outer.initial_state(init), resume=resume)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    with JsonlSink(out / "metrics.jsonl", append=resume) as sink:
        state = train(
            experiment,
            state,
            sink=sink,
            label="meta",
            checkpoint=out / "checkpoint.pt",
            progress=progress,
            on_round=_curve(experiment),
        )
        meta_seconds = time.perf_counter() - started
        baselines = {"random_init": init}
        fedavg_config = config
        if config.federation.time_budget is not None and config.eval.fedavg_rounds is None:
            # "As many rounds as the meta-learning run": the rounds the budget allowed.
            fedavg_config = config.replace(**{"eval.fedavg_rounds": state.round})
        fedavg = Experiment.from_config(fedavg_config, algorithm="fedavg", federation=experiment.federation)
        if fedavg.rounds > 0:
            fedavg_state = train(
                fedavg,
                fedavg.outer.initial_state(fedavg.initial_params()),
                sink=sink,
                label="fedavg",
                progress=progress,
            )
            baselines["fedavg"] = experiment.algorithm.transfer(fedavg_state.params, init)
        save_checkpoint(
            out / "checkpoint.pt",
            config=config,
            state=state,
            baselines={"fedavg": baselines["fedavg"]} if "fedavg" in baselines else {},
        )
        results = evaluate(experiment, {"meta": state.params, **baselines}, progress=progress)
        summary = make_summary(
            config,
            results,
            rounds=state.round,
            meta_seconds=meta_seconds,
            total_seconds=time.perf_counter() - started,
            privacy=experiment.outer.privacy_report(state),
        )
        sink.write(
            {
                "phase": "eval",
                **{f"{name}_{s['metric']}_final": s["over_tasks"][-1]["mean"] for name, s in results.items()},
            }
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_checkpoint(
    path: Path | str,
    out_dir: Path | str | None = None,
    *,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`fedmeta evaluate`: personalised evaluation of a saved meta-model (and its saved baselines)."""
    config, state, baselines = load_checkpoint(path)
    if overrides:
        config = config.replace(**overrides)
    head = state.params.get("head.weight")
    if head is not None and task_kind(config.data.dataset) == "classification" and head.shape[0] != config.episode.ways:
        raise ConfigError(
            f"this {config.algorithm} model has a {head.shape[0]}-way head; evaluate it with "
            f"--ways {head.shape[0]} (only protonet evaluates at any number of ways)"
        )
    experiment = Experiment.from_config(config)
    models = {"meta": state.params, "random_init": experiment.initial_params(), **baselines}
    started = time.perf_counter()
    results = evaluate(experiment, models, progress=progress)
    summary = make_summary(
        config,
        results,
        rounds=state.round,
        meta_seconds=None,
        total_seconds=time.perf_counter() - started,
        privacy=experiment.outer.privacy_report(state),
    )
    target = Path(out_dir) if out_dir is not None else Path(path).parent
    target.mkdir(parents=True, exist_ok=True)
    (target / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
