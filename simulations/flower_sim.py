"""Run a federation through Flower's simulation engine (Ray): one virtual SuperNode per client partition, or
one per cohort worker (`compute.workers`), each computing its share of a round's clients in one call.

The ServerApp and ClientApp are the same ones a real deployment runs; only the transport differs from the
in-process loop.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedmeta.config import RunConfig
from fedmeta.experiment import Experiment

log = logging.getLogger(__name__)


def simulate_flower(
    config: RunConfig,
    out_dir: Path | str,
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    ray_address: str | None = None,
    resume: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Meta-train over Flower's Ray simulation engine; returns the summary the ServerApp wrote.

    `ray_address`: run the virtual SuperNodes on an existing Ray cluster (`ray start --head` on one machine,
    `ray start --address HEAD:PORT` on the others) instead of a private one on this machine.
    """
    import json

    # Before Flower is imported: it reads the telemetry switch once, at import time.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower's usage telemetry stays off unless asked for
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server.grid import ServerOptions
    from server.server_app import make_server_app

    # Build (and check) the federation here, so a bad config fails before Ray starts.
    federation = Experiment.from_config(config).federation
    num_partitions = config.compute.workers or len(federation.train_clients) + len(federation.unseen_clients)
    if not verbose:  # one line per round from fedmeta; Flower's and Ray's internals only when they warn
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)
    options = ServerOptions(out_dir=str(out_dir), resume=resume)
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "init_args": {
            "logging_level": "WARNING" if not verbose else "INFO",
            "log_to_driver": verbose,
            "include_dashboard": False,
            **({"address": ray_address} if ray_address else {}),
        },
    }
    log.info(
        "Flower simulation: %d virtual SuperNodes (%s for %d training and %d unseen clients)",
        num_partitions,
        "cohort workers" if config.compute.workers else "one per client",
        len(federation.train_clients),
        len(federation.unseen_clients),
    )
    run_simulation(
        server_app=make_server_app(config, options),
        client_app=client_app,
        num_supernodes=num_partitions,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    summary_path = Path(out_dir) / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the Flower simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())
