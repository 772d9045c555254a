"""`fedmeta simulate` (local engine) and `fedmeta evaluate`: the run of `fedmeta.loop` over the in-process
transport, where every client runs in this process, one after another."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import ConfigError, RunConfig
from fedmeta.evaluation import make_summary, summarise
from fedmeta.experiment import Outer, task_kind
from fedmeta.inprocess import InProcess
from fedmeta.loop import run
from fedmeta.metrics import write_json
from fedmeta.runtime import apply_threads, tune_allocator
from fedmeta.tasks.base import Federation
from fedmeta.tasks.omniglot import character_names
from fedmeta.tasks.registry import build_federation


def _set_up_process(config: RunConfig) -> None:
    """The engine's process settings (allocator thresholds, torch threads), set here and not only by the CLI:
    benchmarks and notebooks call `simulate` and `evaluate_checkpoint` directly."""
    tune_allocator()
    apply_threads(config)


def simulate(config: RunConfig, out_dir: Path | str, *, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Meta-train, train the FedAvg baseline, evaluate all on unseen clients; write everything to `out_dir`."""
    _set_up_process(config)
    return run(config, InProcess(progress=progress), out_dir, resume=resume, progress=progress)


def evaluate_checkpoint(
    path: Path | str,
    out_dir: Path | str | None = None,
    *,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`fedmeta evaluate`: personalised evaluation of a saved meta-model (and its saved baselines)."""
    trained, state, baselines = load_checkpoint(path)
    config = trained.replace(**overrides) if overrides else trained
    head = state.params.get("head.weight")
    if head is not None and task_kind(config.data.dataset) == "classification" and head.shape[0] != config.episode.ways:
        raise ConfigError(
            f"this {config.algorithm} model has a {head.shape[0]}-way head; evaluate it with "
            f"--ways {head.shape[0]} (only metric-based methods - protonet, matching - evaluate at any number of ways)"
        )
    _set_up_process(config)
    transport = InProcess(progress=progress)
    experiment = transport.experiment(config)
    if config.inner.inner_lr != trained.inner.inner_lr:
        refusal = experiment.algorithm.fixed_rate_refusal(state.params)
        if refusal is not None:
            raise ConfigError(f"--inner-lr does not apply to this {config.algorithm} model: {refusal}")
    if config.data.split != trained.data.split:
        _refuse_seen_characters(trained, config, experiment.federation)
    models = {"meta": state.params, "random_init": experiment.initial_params(), **baselines}
    started = time.perf_counter()
    clients = range(min(config.eval.eval_clients, len(experiment.federation.unseen_clients)))
    curves = transport.evaluate(config, models, clients, experiment.eval_kwargs())
    metric = experiment.algorithm.metric_name
    summary = make_summary(
        config,
        {name: summarise(curve, metric) for name, curve in curves.items()},
        rounds=state.round,
        meta_seconds=None,
        total_seconds=time.perf_counter() - started,
        privacy=Outer(config, len(experiment.federation.train_clients)).privacy_report(state),
    )
    target = Path(out_dir) if out_dir is not None else Path(path).parent
    target.mkdir(parents=True, exist_ok=True)
    write_json(target / "summary.json", summary)
    return summary


def _refuse_seen_characters(trained: RunConfig, config: RunConfig, evaluated: Federation) -> None:
    """Evaluating under another Omniglot split is sound only when the model never trained on a character it is
    tested on: a Lake-split model (background alphabets) may be scored on the Vinyals test characters (all from
    evaluation alphabets), not the other way round."""
    if config.data.dataset != "omniglot":
        return
    seen = character_names(build_federation(trained.data, seed=trained.federation.seed).train_clients)
    leaked = seen & character_names(evaluated.unseen_clients)
    if leaked:
        raise ConfigError(
            f"this model was trained on the {trained.data.split!r} split, whose training clients hold "
            f"{len(leaked)} of the characters the {config.data.split!r} split tests on (e.g. {min(leaked)}): "
            f"evaluate it with --split {trained.data.split}"
        )
