"""The `fedmeta` command: simulate, evaluate, download.

Options map one-to-one onto `RunConfig` fields (see `OPTION_MAP`); a TOML preset supplies a base config and
command-line options override it. This is the one place where user input becomes a validated config.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from fedmeta.checkpoint import CheckpointError
from fedmeta.config import (
    DATASETS,
    DEVICES,
    INNER_OPTIMIZERS,
    OMNIGLOT_PARTITIONS,
    OMNIGLOT_SPLITS,
    OPTIMIZERS,
    PRECISIONS,
    PRIVACY_MODES,
    SCHEDULES,
    ConfigError,
    RunConfig,
)
from fedmeta.robust import AGGREGATORS
from fedmeta.tasks import DataError

# option dest -> dotted RunConfig field
OPTION_MAP = {
    "algorithm": "algorithm",
    "dataset": "data.dataset",
    "data_dir": "data.data_dir",
    "partition": "data.partition",
    "split": "data.split",
    "drawers_per_client": "data.drawers_per_client",
    "num_train_clients": "data.num_train_clients",
    "num_unseen_clients": "data.num_unseen_clients",
    "ways": "episode.ways",
    "shots": "episode.shots",
    "queries": "episode.queries",
    "inner_steps": "inner.inner_steps",
    "inner_lr": "inner.inner_lr",
    "eval_steps": "inner.eval_steps",
    "inner_optimizer": "inner.inner_optimizer",
    "inner_batch": "inner.inner_batch",
    "train_shots": "episode.train_shots",
    "train_queries": "episode.train_queries",
    "outer_optimizer": "outer.optimizer",
    "outer_lr": "outer.outer_lr",
    "outer_schedule": "outer.schedule",
    "final_outer_lr": "outer.final_lr",
    "time_budget": "federation.time_budget",
    "rounds": "federation.rounds",
    "clients_per_round": "federation.clients_per_round",
    "client_fraction": "federation.client_fraction",
    "tasks_per_client": "federation.tasks_per_client",
    "seed": "federation.seed",
    "eval_clients": "eval.eval_clients",
    "eval_tasks": "eval.eval_tasks_per_client",
    "fedavg_rounds": "eval.fedavg_rounds",
    "curve_every": "eval.curve_every",
    "dp": "privacy.mode",
    "clip_norm": "privacy.clip_norm",
    "noise_multiplier": "privacy.noise_multiplier",
    "adaptive_clipping": "privacy.adaptive_clipping",
    "delta": "privacy.delta",
    "target_epsilon": "privacy.target_epsilon",
    "secagg": "secagg.enabled",
    "secagg_clipping_range": "secagg.clipping_range",
    "aggregator": "robust.aggregator",
    "trim_fraction": "robust.trim_fraction",
    "max_update_norm": "robust.max_update_norm",
    "multi_step_loss": "maml.multi_step_loss",
    "msl_anneal_rounds": "maml.msl_anneal_rounds",
    "per_step_lr": "maml.per_step_lr",
    "per_step_bn": "maml.per_step_bn",
    "first_order_rounds": "maml.first_order_rounds",
    "device": "compute.device",
    "batched": "compute.batched",
    "task_chunk": "compute.task_chunk",
    "precision": "compute.precision",
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
        "--partition",
        choices=OMNIGLOT_PARTITIONS,
        help="Omniglot clients: per alphabet, alphabet x drawers, or character (IID, --num-train-clients of them)",
    )
    p.add_argument("--drawers-per-client", type=int)
    p.add_argument(
        "--split",
        choices=OMNIGLOT_SPLITS,
        help="Omniglot: lake (unseen alphabets, the default) or vinyals (the papers' character split)",
    )
    p.add_argument("--num-train-clients", type=int, help="sinusoid: number of training clients")
    p.add_argument("--num-unseen-clients", type=int, help="sinusoid: number of unseen clients")
    p.add_argument("--ways", type=int)
    p.add_argument("--shots", type=int)
    p.add_argument("--queries", type=int, help="query examples per class (regression: query points)")
    p.add_argument("--inner-steps", type=int)
    p.add_argument("--inner-lr", type=float)
    p.add_argument("--eval-steps", type=int, help="adaptation steps measured at evaluation")
    p.add_argument("--inner-optimizer", choices=INNER_OPTIMIZERS, help="sgd, or adam (beta1 0, per task: Reptile)")
    p.add_argument("--inner-batch", type=int, help="examples per inner step (0: all)")
    p.add_argument("--train-shots", type=int, help="shots of training episodes (default: --shots)")
    p.add_argument("--train-queries", type=int, help="queries of training episodes (default: --queries)")
    p.add_argument("--outer-optimizer", choices=OPTIMIZERS)
    p.add_argument("--outer-lr", type=float)
    p.add_argument("--outer-schedule", choices=SCHEDULES, help="outer lr over the rounds: constant, linear, cosine")
    p.add_argument("--final-outer-lr", type=float, help="the outer lr that linear/cosine anneal to (default 0)")
    p.add_argument(
        "--time-budget", type=float, metavar="MINUTES", help="stop after the round that crosses this much training"
    )
    p.add_argument("--rounds", type=int)
    p.add_argument("--clients-per-round", type=int)
    p.add_argument("--client-fraction", type=float, help="overrides --clients-per-round")
    p.add_argument("--tasks-per-client", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-clients", type=int)
    p.add_argument("--eval-tasks", type=int, help="tasks per unseen client at evaluation")
    p.add_argument("--fedavg-rounds", type=int, help="rounds of the FedAvg baseline (0 skips it)")
    p.add_argument("--curve-every", type=int, help="score unseen clients every N rounds (learning curve)")
    p.add_argument("--dp", choices=PRIVACY_MODES, help="client-level differential privacy: where the noise is added")
    p.add_argument("--clip-norm", type=float, help="DP: L2 bound C of every client update")
    p.add_argument("--noise-multiplier", type=float, help="DP: noise std on the sum is z * C (default 1.0)")
    p.add_argument("--adaptive-clipping", action="store_true", default=None, help="DP: adapt C to the median norm")
    p.add_argument("--delta", type=float, help="DP: delta of the reported epsilon (default 1/N^1.1)")
    p.add_argument("--target-epsilon", type=float, help="DP: refuse to start if the run would spend more")
    p.add_argument(
        "--secagg",
        action="store_true",
        default=None,
        help="secure aggregation with Flower's SecAgg+: the server sees only the sum (ray engine / deployment)",
    )
    p.add_argument("--secagg-clipping-range", type=float, help="SecAgg+: each coordinate is clipped to [-R, R]")
    p.add_argument(
        "--aggregator", choices=AGGREGATORS, help="robust aggregation against malicious clients (default: mean)"
    )
    p.add_argument("--trim-fraction", type=float, help="trimmed-mean: fraction dropped at each end per coordinate")
    p.add_argument("--max-update-norm", type=float, help="reject (and log) client updates with a larger L2 norm")
    maml = p.add_argument_group("MAML++ (arXiv:1810.09502), options of --algorithm maml")
    maml.add_argument("--multi-step-loss", action="store_true", default=None, help="MSL: loss after every step")
    maml.add_argument("--msl-anneal-rounds", type=int, help="MSL: rounds until only the last step counts")
    maml.add_argument("--per-step-lr", action="store_true", default=None, help="LSLR: learned per-layer per-step lrs")
    maml.add_argument("--per-step-bn", action="store_true", default=None, help="BNWB: batch-norm weights per step")
    maml.add_argument("--first-order-rounds", type=int, help="DA: first-order meta-gradients for N rounds")
    p.add_argument("--device", choices=DEVICES, help="where clients compute: cpu, cuda, or auto (default: cpu)")
    p.add_argument(
        "--task-loop",
        dest="batched",
        action="store_false",
        default=None,
        help="compute each client's tasks one by one (the reference path) instead of in one vectorised call",
    )
    p.add_argument(
        "--task-chunk",
        type=int,
        help="at most N tasks per vectorised call, to bound memory (default 0: 8 on a CPU, all on a GPU)",
    )
    p.add_argument("--precision", choices=PRECISIONS, help="bf16: forward passes under bfloat16 autocast")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmeta", description="Federated meta-learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a federated meta-learning simulation and evaluate it on unseen clients")
    _add_run_options(sim)
    sim.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: in-process loop; ray: Flower's simulation engine, one virtual SuperNode per client",
    )
    sim.add_argument("--num-clients", type=int, help="sinusoid: training clients (alias of --num-train-clients)")
    sim.add_argument("--cpus-per-client", type=float, default=1.0, help="ray engine: CPUs per virtual client")
    sim.add_argument("--gpus-per-client", type=float, default=0.0, help="ray engine: GPU fraction per virtual client")
    sim.add_argument("--out", default="runs/latest", help="output directory (default: %(default)s)")
    sim.add_argument("--no-progress", action="store_true")
    sim.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

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

    srv = sub.add_parser("server", help="start a Flower SuperLink for a real deployment (runs in the foreground)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    srv.add_argument("--port", type=int, default=9092)
    _add_security_options(srv, certificates=True)
    srv.add_argument(
        "--node-auth",
        action="store_true",
        help="admit only SuperNodes whose public key was registered (fedmeta register); needs --certificates",
    )

    cli = sub.add_parser("client", help="start a Flower SuperNode holding one client partition (foreground)")
    cli.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    cli.add_argument("--partition", type=int, required=True, help="this node's partition id (0-based)")
    cli.add_argument(
        "--num-partitions",
        type=int,
        required=True,
        help="training + unseen clients of the federation (3 for the default app config)",
    )
    cli.add_argument("--data-dir", help="where this node keeps its data (default: the run config's)")
    cli.add_argument("--device", choices=DEVICES, help="where this node computes (default: the run config's)")
    cli.add_argument("--port", type=int, help="this node's local runtime API port (default: 9100 + partition)")
    cli.add_argument("--auth-key", type=Path, help="this node's private key (fedmeta certs) for node authentication")
    _add_security_options(cli, certificates=False)

    reg = sub.add_parser("register", help="register a SuperNode's public key with a SuperLink run with --node-auth")
    reg.add_argument("public_key", type=Path, help="the node's public key (node-N.pub from fedmeta certs)")
    reg.add_argument("--superlink", default="127.0.0.1:9092", help="HOST:PORT of the SuperLink")
    reg.add_argument("--connection", default="fedmeta-local", help="name of the connection in $FLWR_HOME/config.toml")
    _add_security_options(reg, certificates=False)

    certs = sub.add_parser("certs", help="create a local test CA, SuperLink certificate and SuperNode key pairs")
    certs.add_argument("directory", type=Path)
    certs.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to create (node-0, node-1, ...)")

    run = sub.add_parser("run", help="submit the fedmeta app to a SuperLink and wait for its final status")
    run.add_argument("--superlink", default="127.0.0.1:9092", help="HOST:PORT of the SuperLink")
    run.add_argument("--connection", default="fedmeta-local", help="name of the connection in $FLWR_HOME/config.toml")
    run.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='override the app config, e.g. --run-config "federation.rounds=50" (repeatable)',
    )
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run to finish")
    _add_security_options(run, certificates=False)

    dl = sub.add_parser("download", help="fetch benchmark data into a data directory")
    dl.add_argument("dataset", choices=["omniglot"])
    dl.add_argument("--data-dir", default=os.environ.get("FEDMETA_DATA_DIR", "data"))
    return parser


def _add_security_options(p: argparse.ArgumentParser, *, certificates: bool) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--insecure", action="store_true", help="plain-text connections (local tests only)")
    if certificates:
        group.add_argument("--certificates", type=Path, help="directory with ca.crt, server.pem, server.key")
    else:
        group.add_argument("--root-certificates", type=Path, help="CA certificate to verify the SuperLink")


def _require_security_choice(args: argparse.Namespace) -> None:
    chosen = args.insecure or getattr(args, "certificates", None) or getattr(args, "root_certificates", None)
    if not chosen:
        raise ConfigError("choose --insecure (plain text, for a local test) or TLS certificates")
    if args.insecure:
        print(
            "fedmeta: WARNING: insecure mode - traffic is not encrypted and nodes are not authenticated; "
            "use it on loopback only",
            file=sys.stderr,
        )


def _deploy(args: argparse.Namespace) -> int:
    """`fedmeta server|client|run`: wrap Flower's own commands, printing each before it runs."""
    from simulations import deploy

    if args.command == "certs":
        keys = deploy.make_certificates(args.directory, nodes=args.nodes)
        print(f"fedmeta: CA {args.directory / 'ca.crt'}, SuperLink certificate {args.directory / 'server.pem'}")
        for key in keys:
            print(f"fedmeta: SuperNode key {key} (register {key}.pub with: fedmeta register {key}.pub ...)")
        return 0
    _require_security_choice(args)
    env = deploy.flower_env()
    if args.command in ("server", "client"):
        if args.command == "server":
            if args.node_auth and args.insecure:
                raise ConfigError("--node-auth needs TLS (--certificates): Flower refuses it in insecure mode")
            command = deploy.superlink_command(
                host=args.host,
                port=args.port,
                insecure=args.insecure,
                certificates=args.certificates,
                node_auth=args.node_auth,
            )
        else:
            command = deploy.supernode_command(
                superlink=args.superlink,
                partition=args.partition,
                num_partitions=args.num_partitions,
                port=args.port or 9100 + args.partition,
                insecure=args.insecure,
                data_dir=args.data_dir,
                device=args.device,
                root_certificates=args.root_certificates,
                auth_key=args.auth_key,
            )
        print(f"fedmeta: running {deploy.show(command)}", file=sys.stderr, flush=True)
        os.execvpe(command[0], command, env)  # replace this process: its PID is the Flower process's PID
    path = deploy.register_connection(
        args.connection, address=args.superlink, insecure=args.insecure, root_certificates=args.root_certificates
    )
    print(f"fedmeta: connection {args.connection!r} -> {args.superlink} in {path}", file=sys.stderr)
    if args.command == "register":
        command = deploy.register_command(args.public_key, args.connection)
        print(f"fedmeta: running {deploy.show(command)}", file=sys.stderr, flush=True)
        return subprocess.run(command, env=env).returncode
    print(f"fedmeta: running {deploy.show(deploy.run_command(args.connection, args.run_config))}", file=sys.stderr)
    run_id, status = deploy.submit_and_wait(args.connection, args.run_config, timeout=args.timeout)
    print(f"fedmeta: run {run_id} {status}")
    return 0 if status == "finished:completed" else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state database announces its plugins
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower's usage telemetry is opt-in here
    from fedmeta.runtime import tune_allocator

    tune_allocator()
    # Heavy imports after parsing, so `fedmeta --help` is instant.
    from fedmeta.evaluation import format_summary
    from simulations.inprocess import evaluate_checkpoint, simulate

    try:
        if args.command in ("server", "client", "run", "register", "certs"):
            return _deploy(args)
        if args.command == "simulate":
            if args.num_clients is not None:
                args.num_train_clients = args.num_clients
            config = config_from_args(args)
            if args.engine == "ray":
                from simulations.flower_sim import simulate_flower

                summary = simulate_flower(
                    config,
                    args.out,
                    num_cpus=args.cpus_per_client,
                    num_gpus=args.gpus_per_client,
                    verbose=args.verbose,
                    resume=args.resume,
                )
            else:
                summary = simulate(config, args.out, progress=not args.no_progress, resume=args.resume)
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
    except (ConfigError, DataError, CheckpointError, ValueError) as error:
        print(f"fedmeta: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
