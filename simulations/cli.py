"""The `fedmeta` command: simulate, evaluate, download, and the deployment commands.

The run options are built from `RunConfig`'s fields (`fedmeta.config.option`: flag, help, default, choices),
so a field and its option cannot drift apart; a TOML preset supplies a base config and command-line options
override it. This is the one place where user input becomes a validated config.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from fedmeta.config import ALGORITHM_NAMES, DEVICES, ConfigError, RunConfig

# The `fedmeta evaluate` options that change the evaluation of a saved run.
EVALUATE_KEYS = (
    "data.data_dir",
    "data.split",
    "inner.eval_steps",
    "inner.inner_lr",
    "eval.eval_clients",
    "eval.eval_tasks_per_client",
    "episode.ways",
    "episode.shots",
    "episode.queries",
)
TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def config_options() -> list[tuple[str, str, dataclasses.Field]]:
    """(flag, dotted config key, field) for every RunConfig field that has a command-line flag, in the order
    the dataclasses declare them: the parser, its help and its choices are built from these alone."""
    options = []
    defaults = RunConfig()
    for outer in dataclasses.fields(RunConfig):
        value = getattr(defaults, outer.name)
        inner = (
            [(f"{outer.name}.{f.name}", f) for f in dataclasses.fields(value)]
            if dataclasses.is_dataclass(value)
            else []
        )
        for key, f in inner or [(outer.name, outer)]:
            if f.metadata.get("flag"):
                options.append((f.metadata["flag"], key, f))
    return options


def _add_config_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    key: str,
    f: dataclasses.Field,
    *,
    saved: bool = False,
) -> None:
    """The option for config field `f`; `saved`: unset, it keeps a saved run's value (`fedmeta evaluate`)."""
    kind = TYPES[str(f.type).split("|")[0].strip()]
    choices = ALGORITHM_NAMES if key == "algorithm" else f.metadata.get("choices")
    if saved:
        shown = " (default: the checkpoint's)"
    elif f.default is None:  # an unset default is explained in the help
        shown = ""
    else:
        shown = f" (default: {f.default})"
    if kind is bool:  # a flag turns the default around: --secagg turns on, --task-loop turns batching off
        parser.add_argument(
            flag, dest=key, action="store_false" if f.default else "store_true", default=None, help=f.metadata["help"]
        )
        return
    parser.add_argument(
        flag,
        dest=key,
        type=kind,
        choices=choices,
        default=None,
        metavar=None if choices else flag.removeprefix("--").replace("-", "_").upper(),
        help=f.metadata["help"] + shown,
    )


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
    overrides = {key: getattr(args, key) for _, key, _ in config_options() if getattr(args, key, None) is not None}
    return base.replace(**overrides)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="sinusoid-reptile", help="TOML preset, by name or path (default: %(default)s)")
    maml = p.add_argument_group("MAML++ (arXiv:1810.09502), options of --algorithm maml")
    for flag, key, f in config_options():
        _add_config_option(maml if key.startswith("maml.") else p, flag, key, f)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmeta", description="Federated meta-learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its line")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a federated meta-learning simulation and evaluate it on unseen clients")
    _add_run_options(sim)
    sim.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: in-process loop; ray: Flower's simulation engine, one virtual SuperNode per client (or per "
        "cohort worker, --workers)",
    )
    sim.add_argument(
        "--num-clients", dest="data.num_train_clients", type=int, metavar="N", help="alias of --num-train-clients"
    )
    sim.add_argument("--cpus-per-client", type=float, default=1.0, help="ray engine: CPUs per virtual client")
    sim.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        help="ray engine: GPU fraction per virtual client (with --workers, each worker's GPU share serves its cohort)",
    )
    sim.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="ray engine: attach to a running Ray cluster (its head, from `ray start --head`) instead of starting "
        "one on this machine - the way beyond one machine",
    )
    sim.add_argument("--out", default="runs/latest", help="output directory (default: %(default)s)")
    sim.add_argument(
        "--no-progress", action="store_true", help="log lines instead of progress bars (automatic when not a terminal)"
    )
    sim.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    ev = sub.add_parser("evaluate", help="personalised evaluation of a checkpoint on unseen clients")
    ev.add_argument("checkpoint")
    ev.add_argument("--out", help="where summary.json goes (default: beside the checkpoint)")
    for flag, key, f in config_options():
        if key in EVALUATE_KEYS:  # the saved run's value unless given (ProtoNet evaluates at any --ways)
            _add_config_option(ev, flag, key, f, saved=True)
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
        help="training + unseen clients of the federation (3 for the default app config), or the run's compute.workers",
    )
    cli.add_argument("--data-dir", help="where this node keeps its data (default: the run config's)")
    cli.add_argument("--device", choices=DEVICES, help="where this node computes (default: the run config's)")
    cli.add_argument("--port", type=int, help="this node's local runtime API port (default: 9100 + partition)")
    cli.add_argument("--auth-key", type=Path, help="this node's private key (fedmeta certs) for node authentication")
    cli.add_argument(
        "--max-retries", type=int, default=100, help="reconnection attempts before giving up (default: %(default)s)"
    )
    cli.add_argument(
        "--max-wait",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up after this long without the SuperLink (default: %(default)s)",
    )
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

    rep = sub.add_parser("report", help="PNG plots and a markdown page from one or more run directories")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by simulate (or a deployment)")
    rep.add_argument("--out", help="where to write the report (default: RUN_DIR/report for one run, else runs/report)")

    dl = sub.add_parser("download", help="fetch benchmark data into a data directory")
    dl.add_argument("dataset", choices=["omniglot", "shakespeare"], help="FEMNIST comes from LEAF's scripts (README)")
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

    # Flower resolves paths against other working directories (its config file's, its own processes'):
    # every path the user gives is made absolute here, against the directory the command runs in.
    for name in ("certificates", "root_certificates", "auth_key", "public_key", "directory"):
        if getattr(args, name, None) is not None:
            setattr(args, name, Path(getattr(args, name)).expanduser().resolve())
    if getattr(args, "data_dir", None) is not None:
        args.data_dir = str(Path(args.data_dir).expanduser().resolve())
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
                port=(port := args.port or 9100 + args.partition),
                insecure=args.insecure,
                data_dir=args.data_dir,
                device=args.device,
                root_certificates=args.root_certificates,
                auth_key=args.auth_key,
                max_retries=args.max_retries,
                max_wait=args.max_wait,
            )
            print(
                f"fedmeta: connecting to the SuperLink at {args.superlink} (giving up after {args.max_retries} "
                f"retries or {args.max_wait:g} s without it)",
                file=sys.stderr,
            )
        print(f"fedmeta: running {deploy.show(command)}", file=sys.stderr, flush=True)
        if args.command == "client":  # stays the parent, to name the reason when the SuperNode fails
            return deploy.run_supernode(command, env, superlink=args.superlink, port=port, auth_key=args.auth_key)
        os.execvpe(command[0], command, env)  # replace this process: its PID is the Flower process's PID
    if args.command == "run":  # refuse a bad run config before anything is written or submitted
        run_config = deploy.encode_run_config(deploy.parse_run_config(args.run_config))
    path = deploy.register_connection(
        args.connection, address=args.superlink, insecure=args.insecure, root_certificates=args.root_certificates
    )
    print(f"fedmeta: connection {args.connection!r} -> {args.superlink} in {path}", file=sys.stderr)
    if args.command == "register":
        command = deploy.register_command(args.public_key, args.connection)
        print(f"fedmeta: running {deploy.show(command)}", file=sys.stderr, flush=True)
        return subprocess.run(command, env=env).returncode
    print(f"fedmeta: running {deploy.show(deploy.run_command(args.connection, run_config))}", file=sys.stderr)
    run_id, status = deploy.submit_and_wait(args.connection, run_config, address=args.superlink, timeout=args.timeout)
    print(f"fedmeta: run {run_id} {status}")
    return 0 if status.startswith("finished:completed") else 1


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal; one plain log line per round into a file or pipe (or with --no-progress)."""
    return not args.no_progress and sys.stderr.isatty()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state database announces its plugins
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font cache announces itself
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower's usage telemetry is opt-in here
    from fedmeta.runtime import tune_allocator

    tune_allocator()
    # Heavy imports after parsing, so `fedmeta --help` is instant.
    from fedmeta.checkpoint import CheckpointError
    from fedmeta.evaluation import format_summary
    from fedmeta.tasks import DataError
    from simulations import deploy
    from simulations.inprocess import evaluate_checkpoint, simulate

    try:
        if args.command in ("server", "client", "run", "register", "certs"):
            return _deploy(args)
        if args.command == "simulate":
            config = config_from_args(args)
            if args.engine == "ray":
                from simulations.flower_sim import simulate_flower

                summary = simulate_flower(
                    config,
                    args.out,
                    num_cpus=args.cpus_per_client,
                    num_gpus=args.gpus_per_client,
                    ray_address=args.ray_address,
                    verbose=args.verbose,
                    resume=args.resume,
                )
            else:
                summary = simulate(config, args.out, progress=_progress(args), resume=args.resume)
            print(format_summary(summary))
            from fedmeta.report import write_personalisation_plot

            plot = write_personalisation_plot(summary, Path(args.out) / "personalisation.png")
            print(
                f"metrics: {Path(args.out) / 'metrics.jsonl'}  summary: {Path(args.out) / 'summary.json'}  "
                f"checkpoint: {Path(args.out) / 'checkpoint.pt'}  plot: {plot}"
            )
        elif args.command == "evaluate":
            overrides = {key: getattr(args, key) for key in EVALUATE_KEYS if getattr(args, key) is not None}
            summary = evaluate_checkpoint(args.checkpoint, args.out, progress=_progress(args), overrides=overrides)
            print(format_summary(summary))
        elif args.command == "report":
            from fedmeta.report import write_report

            out = args.out or (Path(args.runs[0]) / "report" if len(args.runs) == 1 else Path("runs/report"))
            print(f"report: {write_report(args.runs, out)}")
        elif args.command == "download":
            from fedmeta.tasks import omniglot, shakespeare

            fetchers = {"omniglot": omniglot.download, "shakespeare": shakespeare.download}
            for path in fetchers[args.dataset](args.data_dir):
                print(path)
    # ReportError is a ValueError.
    except (ConfigError, DataError, CheckpointError, ValueError, deploy.DeployError, OSError) as error:
        if args.debug:
            raise
        print(f"fedmeta: error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:  # a tool we ran (openssl, flwr ls) failed
        if args.debug:
            raise
        detail = (
            (error.stderr or b"").decode(errors="replace").strip().splitlines()
            if isinstance(error.stderr, bytes)
            else str(error.stderr or "").strip().splitlines()
        )
        print(
            f"fedmeta: error: {deploy.show(list(map(str, error.cmd)))} failed: {detail[-1] if detail else error}",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
