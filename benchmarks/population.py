"""Round time and per-logical-client cost against clients per round, for four ways of running the clients, side
by side in one run: in-process one client at a time (`--client-loop`), in-process cohorts (the default), Flower's
Ray engine with one virtual SuperNode per client, and Ray with cohort workers (`--workers`); the `-sums` modes
are cohorts that send the server their sum instead of every client's row (`--cohort-reply sum`).

Sinusoid Reptile, one task and one inner step per client, drawn from a lazily made population of a million
clients (Ray one-node-per-client needs as many virtual nodes as clients, so its population is the sample itself
and it runs only where that is feasible). The first round includes start-up (Ray, actors' imports); the steady
round time is the median of the others. Each mode's cost per logical client is its steady round time divided by
the clients per round; Flower's overhead per client is the Ray mode's time minus the in-process time of the same
computation (cohorts against cohorts, one-by-one against one-by-one), per client.

    python benchmarks/population.py --clients 1000 10000 100000 --out benchmarks/results/population.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedmeta.config import RunConfig
from fedmeta.metrics import read_jsonl
from simulations.flower_sim import simulate_flower
from simulations.inprocess import simulate

MODES = ("inprocess-loop", "inprocess-cohorts", "inprocess-sums", "ray-nodes", "ray-cohorts", "ray-sums")
log = logging.getLogger("population")


def config_for(mode: str, clients: int, rounds: int, population: int, workers: int) -> RunConfig:
    return RunConfig().replace(
        **{
            "algorithm": "reptile",
            "data.num_train_clients": clients if mode == "ray-nodes" else population,
            "data.num_unseen_clients": 1,
            "federation.rounds": rounds,
            "federation.clients_per_round": clients,
            "federation.tasks_per_client": 1,
            "inner.inner_steps": 1,
            "eval.eval_clients": 1,
            "eval.eval_tasks_per_client": 1,
            "inner.eval_steps": 1,
            "eval.fedavg_rounds": 0,
            "compute.cohorts": mode != "inprocess-loop",
            "compute.workers": workers if mode in ("ray-cohorts", "ray-sums") else 0,
            "compute.reply": "sum" if mode.endswith("-sums") else "rows",
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rounds", type=int, default=4, help="rounds per measurement (the first is start-up)")
    parser.add_argument("--population", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="ray-cohorts: cohort workers")
    parser.add_argument(
        "--max-loop-clients", type=int, default=100_000, help="skip one-by-one modes above this many clients"
    )
    parser.add_argument(
        "--max-ray-nodes", type=int, default=1000, help="skip ray-nodes above this many clients (one node each)"
    )
    parser.add_argument("--out", default="benchmarks/results/population.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = Path(tempfile.mkdtemp(prefix="fm-bench-", dir="/tmp"))
    os.environ.setdefault("RAY_TMPDIR", str(root / "ray"))
    os.environ.setdefault("FLWR_HOME", str(root / "flwr"))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    for clients in args.clients:
        row: dict[str, object] = {
            "clients_per_round": clients,
            "population": args.population,
            "rounds": args.rounds,
            "workers": args.workers,
            "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        }
        for mode in args.modes:
            if mode == "ray-nodes" and clients > args.max_ray_nodes:
                log.info("%s %d: skipped (one virtual node per client)", mode, clients)
                continue
            if mode in ("inprocess-loop",) and clients > args.max_loop_clients:
                log.info("%s %d: skipped", mode, clients)
                continue
            config = config_for(mode, clients, args.rounds, args.population, args.workers)
            out = root / f"{mode}-{clients}"
            started = time.perf_counter()
            threads = torch.get_num_threads()
            if mode.startswith("ray"):
                simulate_flower(config, out, num_cpus=1)
            else:
                simulate(config, out, progress=False)
            torch.set_num_threads(threads)
            wall = time.perf_counter() - started
            seconds = [r["seconds"] for r in read_jsonl(out / "metrics.jsonl") if r.get("phase") == "meta"]
            steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
            row[mode] = {
                "first_round_seconds": seconds[0],
                "steady_round_seconds": steady,
                "ms_per_client": 1000 * steady / clients,
                "wall_seconds": wall,
            }
            log.info(
                "%s %d clients: first round %.2f s, steady %.3f s/round (%.4f ms per client), wall %.0f s",
                mode, clients, seconds[0], steady, 1000 * steady / clients, wall,
            )  # fmt: skip
        pairs = (("ray-cohorts", "inprocess-cohorts"), ("ray-sums", "inprocess-sums"), ("ray-nodes", "inprocess-loop"))
        for ray, local in pairs:
            if isinstance(row.get(ray), dict) and isinstance(row.get(local), dict):
                extra = row[ray]["steady_round_seconds"] - row[local]["steady_round_seconds"]  # type: ignore[index]
                row[f"{ray}_overhead_ms_per_client"] = 1000 * extra / clients
                log.info("%s overhead over %s: %.4f ms per client per round", ray, local, 1000 * extra / clients)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
