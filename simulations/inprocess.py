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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedmeta.algorithms import Algorithm, build_algorithm
from fedmeta.checkpoint import load_checkpoint, save_checkpoint
from fedmeta.config import ConfigError, RunConfig
from fedmeta.evaluation import personalised_curves, summarise
from fedmeta.metrics import JsonlSink
from fedmeta.models import build_model
from fedmeta.round import ServerState, apply_round, init_state
from fedmeta.sampling import local_tasks, sample_clients
from fedmeta.server_opt import OuterOptimizer
from fedmeta.tasks import Federation, build_federation, task_rng

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    """The pieces of a run that follow from its config: federation, model, algorithm, optimizer."""

    config: RunConfig
    federation: Federation
    algorithm: Algorithm

    @classmethod
    def from_config(cls, config: RunConfig) -> Experiment:
        federation = build_federation(config.data, seed=config.federation.seed)
        ep = config.episode
        federation.check_episode(ways=ep.ways, shots=ep.shots, queries=ep.queries)
        return cls(config, federation, _algorithm(config, config.algorithm, federation))

    def optimizer(self) -> OuterOptimizer:
        o = self.config.outer
        return OuterOptimizer(o.optimizer, o.outer_lr, o.beta1, o.beta2, o.eps)

    def initial_params(self) -> dict[str, torch.Tensor]:
        return self.algorithm.init_params(torch.Generator().manual_seed(self.config.federation.seed))


def _algorithm(config: RunConfig, name: str, federation: Federation) -> Algorithm:
    if federation.kind == "regression":
        out: int | None = 1
    elif name == "protonet":
        out = None  # an embedding, no head
    elif name == "fedavg":
        out = federation.num_global_outputs
    else:
        out = config.episode.ways
    model = build_model(config.data.dataset, out_features=out)
    if name == "fedavg":
        return build_algorithm(name, model, kind=federation.kind, inner_lr=config.eval.fedavg_lr, inner_steps=1)
    return build_algorithm(
        name, model, kind=federation.kind, inner_lr=config.inner.inner_lr, inner_steps=config.inner.inner_steps
    )


def train(
    algorithm: Algorithm,
    federation: Federation,
    state: ServerState,
    optimizer: OuterOptimizer,
    *,
    config: RunConfig,
    rounds: int,
    tasks_per_client: int,
    sink: JsonlSink | None,
    label: str,
    checkpoint: Path | None = None,
    progress: bool = True,
    on_round: Callable[[ServerState], dict[str, float]] | None = None,
) -> ServerState:
    """Run rounds `state.round + 1 .. rounds` of federated training and return the final server state."""
    fed, ep = config.federation, config.episode
    clients = federation.train_clients
    per_round = fed.clients_in_round(len(clients))
    bar = tqdm(
        range(state.round, rounds), desc=label, unit="round", disable=not progress, dynamic_ncols=True, mininterval=1.0
    )
    for round_index in bar:
        started = time.perf_counter()
        chosen = sample_clients(seed=fed.seed, round_index=round_index, num_clients=len(clients), count=per_round)
        updates = []
        for c in chosen:
            rng = task_rng(fed.seed, f"{label}-data", round_index, c)
            tasks = local_tasks(
                clients[c],
                rng,
                data_kind=algorithm.data_kind,
                num_tasks=tasks_per_client,
                ways=ep.ways,
                shots=ep.shots,
                queries=ep.queries,
                batch_size=config.eval.fedavg_batch,
            )
            updates.append((clients[c].client_id, algorithm.client_update(state.params, tasks)))
        state, round_metrics = apply_round(state, updates, optimizer)
        metrics: dict[str, Any] = {
            "phase": label,
            "round": state.round,
            "seconds": time.perf_counter() - started,
            **round_metrics,
        }
        if on_round is not None:
            metrics.update(on_round(state))
        if sink is not None:
            sink.write(metrics)
        if checkpoint is not None:
            save_checkpoint(checkpoint, config=config, state=state)
        shown = {k: f"{v:.4g}" for k, v in metrics.items() if k.startswith(("query_", "unseen_"))}
        bar.set_postfix(shown)
    return state


def evaluate(
    experiment: Experiment,
    models: dict[str, dict[str, torch.Tensor]],
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Personalised evaluation of each named model on the unseen clients, on the very same tasks."""
    cfg, fed = experiment.config, experiment.federation
    clients = fed.unseen_clients[: cfg.eval.eval_clients]
    with tqdm(total=len(clients), desc="evaluate", unit="client", disable=not progress, dynamic_ncols=True) as bar:
        curves = personalised_curves(
            experiment.algorithm,
            models,
            clients,
            seed=cfg.federation.seed,
            tasks_per_client=cfg.eval.eval_tasks_per_client,
            ways=cfg.episode.ways,
            shots=cfg.episode.shots,
            queries=cfg.episode.queries,
            steps=cfg.inner.eval_steps,
            on_client=bar.update,
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
        curves = personalised_curves(
            experiment.algorithm,
            {"meta": state.params},
            clients,
            seed=cfg.federation.seed + 1,
            tasks_per_client=cfg.eval.curve_tasks_per_client,
            ways=cfg.episode.ways,
            shots=cfg.episode.shots,
            queries=cfg.episode.queries,
            steps=steps,
        )
        return {f"unseen_{metric}": float(curves["meta"][:, :, steps].mean())}

    return score


def simulate(config: RunConfig, out_dir: Path | str, *, progress: bool = True) -> dict[str, Any]:
    """Meta-train, train the FedAvg baseline, evaluate all on unseen clients; write everything to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    experiment = Experiment.from_config(config)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    init = experiment.initial_params()
    with JsonlSink(out / "metrics.jsonl") as sink:
        state = train(
            experiment.algorithm,
            experiment.federation,
            init_state(init, experiment.optimizer()),
            experiment.optimizer(),
            config=config,
            rounds=config.federation.rounds,
            tasks_per_client=config.federation.tasks_per_client,
            sink=sink,
            label="meta",
            checkpoint=out / "checkpoint.pt",
            progress=progress,
            on_round=_curve(experiment),
        )
        meta_seconds = time.perf_counter() - started
        baselines = {"random_init": init}
        fedavg_rounds = config.eval.fedavg_rounds if config.eval.fedavg_rounds is not None else config.federation.rounds
        if fedavg_rounds > 0:
            fedavg = _algorithm(config, "fedavg", experiment.federation)
            fedavg_init = fedavg.init_params(torch.Generator().manual_seed(config.federation.seed))
            sgd = OuterOptimizer("sgd", lr=1.0)  # outer SGD at lr 1 on params - local == FedAvg
            fedavg_state = train(
                fedavg,
                experiment.federation,
                init_state(fedavg_init, sgd),
                sgd,
                config=config,
                rounds=fedavg_rounds,
                tasks_per_client=config.eval.fedavg_local_steps,
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
        summary = _summary(
            config, results, rounds=state.round, meta_seconds=meta_seconds, total_seconds=time.perf_counter() - started
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
    if head is not None and experiment_kind(config) == "classification" and head.shape[0] != config.episode.ways:
        raise ConfigError(
            f"this {config.algorithm} model has a {head.shape[0]}-way head; evaluate it with "
            f"--ways {head.shape[0]} (only protonet evaluates at any number of ways)"
        )
    experiment = Experiment.from_config(config)
    models = {"meta": state.params, "random_init": experiment.initial_params(), **baselines}
    started = time.perf_counter()
    results = evaluate(experiment, models, progress=progress)
    summary = _summary(
        config, results, rounds=state.round, meta_seconds=None, total_seconds=time.perf_counter() - started
    )
    target = Path(out_dir) if out_dir is not None else Path(path).parent
    target.mkdir(parents=True, exist_ok=True)
    (target / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def experiment_kind(config: RunConfig) -> str:
    return "regression" if config.data.dataset == "sinusoid" else "classification"


def _summary(
    config: RunConfig, results: dict[str, Any], *, rounds: int, meta_seconds: float | None, total_seconds: float
) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "rounds": rounds,
        "meta_train_seconds": meta_seconds,
        "total_seconds": total_seconds,
        "unseen_clients": results[next(iter(results))]["over_clients"][0]["n"],
        "results": results,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A small table: the query metric after 0, 1, the training number and the maximum of adaptation steps."""
    results = summary["results"]
    first = next(iter(results.values()))
    metric, last = first["metric"], first["steps"][-1]
    train_steps = summary["config"]["inner"]["inner_steps"]
    steps = sorted({0, min(1, last), min(train_steps, last), last})
    scale, unit, digits = (100.0, "%", 1) if metric == "accuracy" else (1.0, "", 3)
    lines = [
        f"Personalised {metric} on {summary['unseen_clients']} unseen clients "
        f"(mean +- 95% CI over tasks), after k adaptation steps on each task's support set:"
    ]
    lines.append(f"  {'model':<12}" + "".join(f"{'k=' + str(s):>18}" for s in steps))
    for name, res in results.items():
        cells = [res["over_tasks"][s] for s in steps]
        lines.append(
            f"  {name:<12}"
            + "".join(
                f"{c['mean'] * scale:.{digits}f}{unit} +- {c['ci95'] * scale:.{digits}f}".rjust(18) for c in cells
            )
        )
    best = "higher" if metric == "accuracy" else "lower"
    lines.append(
        f"  ({best} is better; meta = the federated meta-model, random_init = its untrained start, "
        f"fedavg = a FedAvg model with a fresh head)"
    )
    return "\n".join(lines)


__all__ = ["Experiment", "evaluate_checkpoint", "format_summary", "simulate", "train"]
