"""The `fedmeta` command: simulate, evaluate, download.

Options map one-to-one onto `RunConfig` fields (see `OPTION_MAP`); a TOML preset supplies a base config and
command-line options override it. This is the one place where user input becomes a validated config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from fedmeta.checkpoint import CheckpointError
from fedmeta.config import DATASETS, OMNIGLOT_PARTITIONS, OPTIMIZERS, ConfigError, RunConfig
from fedmeta.tasks import DataError

# option dest -> dotted RunConfig field
OPTION_MAP = {
    "algorithm": "algorithm",
    "dataset": "data.dataset",
    "data_dir": "data.data_dir",
    "partition": "data.partition",
    "drawers_per_client": "data.drawers_per_client",
    "num_train_clients": "data.num_train_clients",
    "num_unseen_clients": "data.num_unseen_clients",
    "ways": "episode.ways",
    "shots": "episode.shots",
    "queries": "episode.queries",
    "inner_steps": "inner.inner_steps",
    "inner_lr": "inner.inner_lr",
    "eval_steps": "inner.eval_steps",
    "outer_optimizer": "outer.optimizer",
    "outer_lr": "outer.outer_lr",
    "rounds": "federation.rounds",
    "clients_per_round": "federation.clients_per_round",
    "client_fraction": "federation.client_fraction",
    "tasks_per_client": "federation.tasks_per_client",
    "seed": "federation.seed",
    "eval_clients": "eval.eval_clients",
    "eval_tasks": "eval.eval_tasks_per_client",
    "fedavg_rounds": "eval.fedavg_rounds",
    "curve_every": "eval.curve_every",
}


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset by name (simulations/presets/NAME.toml) or by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        resource = resources.files("simulations") / "presets" / f"{name_or_path}.toml"
        if not resource.is_file():
            known = sorted(
                p.name.removesuffix(".toml")
                for p in (resources.files("simulations") / "presets").iterdir()
                if p.name.endswith(".toml")
            )
            raise ConfigError(f"unknown preset {name_or_path!r}; known presets: {known}")
        return tomllib.loads(resource.read_text())
    if not path.is_file():
        raise ConfigError(f"preset file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"preset {path} is not valid TOML: {error}") from error


def config_from_args(args: argparse.Namespace) -> RunConfig:
    base = RunConfig.from_dict(load_preset(args.preset))
    overrides = {
        field: getattr(args, dest) for dest, field in OPTION_MAP.items() if getattr(args, dest, None) is not None
    }
    return base.replace(**overrides)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="sinusoid-reptile", help="TOML preset, by name or path (default: %(default)s)")
    p.add_argument("--algorithm", choices=["maml", "fomaml", "reptile", "metasgd", "anil", "protonet"])
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-dir", help="benchmark data directory (default: $FEDMETA_DATA_DIR, then ./data)")
    p.add_argument(
        "--partition", choices=OMNIGLOT_PARTITIONS, help="Omniglot clients: per alphabet or alphabet x drawers"
    )
    p.add_argument("--drawers-per-client", type=int)
    p.add_argument("--num-train-clients", type=int, help="sinusoid: number of training clients")
    p.add_argument("--num-unseen-clients", type=int, help="sinusoid: number of unseen clients")
    p.add_argument("--ways", type=int)
    p.add_argument("--shots", type=int)
    p.add_argument("--queries", type=int, help="query examples per class (regression: query points)")
    p.add_argument("--inner-steps", type=int)
    p.add_argument("--inner-lr", type=float)
    p.add_argument("--eval-steps", type=int, help="adaptation steps measured at evaluation")
    p.add_argument("--outer-optimizer", choices=OPTIMIZERS)
    p.add_argument("--outer-lr", type=float)
    p.add_argument("--rounds", type=int)
    p.add_argument("--clients-per-round", type=int)
    p.add_argument("--client-fraction", type=float, help="overrides --clients-per-round")
    p.add_argument("--tasks-per-client", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-clients", type=int)
    p.add_argument("--eval-tasks", type=int, help="tasks per unseen client at evaluation")
    p.add_argument("--fedavg-rounds", type=int, help="rounds of the FedAvg baseline (0 skips it)")
    p.add_argument("--curve-every", type=int, help="score unseen clients every N rounds (learning curve)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmeta", description="Federated meta-learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a federated meta-learning simulation and evaluate it on unseen clients")
    _add_run_options(sim)
    sim.add_argument("--engine", choices=["local"], default="local", help="in-process loop")
    sim.add_argument("--out", default="runs/latest", help="output directory (default: %(default)s)")
    sim.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("evaluate", help="personalised evaluation of a checkpoint on unseen clients")
    ev.add_argument("checkpoint")
    ev.add_argument("--out", help="where summary.json goes (default: beside the checkpoint)")
    ev.add_argument("--data-dir")
    ev.add_argument("--eval-steps", type=int)
    ev.add_argument("--eval-clients", type=int)
    ev.add_argument("--eval-tasks", type=int)
    ev.add_argument("--ways", type=int, help="evaluate on other episodes than trained on (ProtoNet: any ways)")
    ev.add_argument("--shots", type=int)
    ev.add_argument("--queries", type=int)
    ev.add_argument("--no-progress", action="store_true")

    dl = sub.add_parser("download", help="fetch benchmark data into a data directory")
    dl.add_argument("dataset", choices=["omniglot"])
    dl.add_argument("--data-dir", default=os.environ.get("FEDMETA_DATA_DIR", "data"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # Heavy imports after parsing, so `fedmeta --help` is instant.
    from fedmeta.evaluation import format_summary
    from simulations.inprocess import evaluate_checkpoint, simulate

    try:
        if args.command == "simulate":
            config = config_from_args(args)
            summary = simulate(config, args.out, progress=not args.no_progress)
            print(format_summary(summary))
            print(
                f"metrics: {Path(args.out) / 'metrics.jsonl'}  summary: {Path(args.out) / 'summary.json'}  "
                f"checkpoint: {Path(args.out) / 'checkpoint.pt'}"
            )
        elif args.command == "evaluate":
            overrides = {
                OPTION_MAP[d]: getattr(args, d)
                for d in ("data_dir", "eval_steps", "eval_clients", "eval_tasks", "ways", "shots", "queries")
                if getattr(args, d) is not None
            }
            summary = evaluate_checkpoint(args.checkpoint, args.out, progress=not args.no_progress, overrides=overrides)
            print(format_summary(summary))
        elif args.command == "download":
            from fedmeta.tasks.omniglot import download

            for path in download(args.data_dir):
                print(path)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"fedmeta: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
