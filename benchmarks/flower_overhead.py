"""Round time of the in-process loop beside Flower's Ray simulation, for 10 / 100 / 1000 clients, in one run.

Every client takes part in every round with one task and one inner step of Reptile on sinusoid, so the work
per client is small and the difference between the two transports is Flower's overhead per client. The first
round of a Ray run includes Ray's start-up and each actor's first import; steady-state rounds exclude it.

    python benchmarks/flower_overhead.py --clients 10 100 1000 --rounds 4 --out benchmarks/results/flower_overhead.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import population  # benchmarks/population.py: the same runs, cohorts among them
import torch

from fedmeta.config import RunConfig
from fedmeta.metrics import read_jsonl
from simulations.flower_sim import simulate_flower
from simulations.inprocess import simulate


def config_for(clients: int, rounds: int) -> RunConfig:
    """Every client of a `clients`-client federation in every round (one Flower node per client)."""
    return population.config_for("ray-nodes", clients, rounds, population=clients, workers=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/flower_overhead.jsonl")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fm-bench-", dir="/tmp"))
    os.environ.setdefault("RAY_TMPDIR", str(root / "ray"))
    os.environ.setdefault("FLWR_HOME", str(root / "flwr"))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    for clients in args.clients:
        config = config_for(clients, args.rounds)
        row: dict[str, object] = {
            "clients": clients,
            "rounds": args.rounds,
            "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        }
        for engine in ("inprocess", "ray"):
            out = root / f"{engine}-{clients}"
            started = time.perf_counter()
            if engine == "ray":
                threads = torch.get_num_threads()
                simulate_flower(config, out, num_cpus=1)
                torch.set_num_threads(threads)
            else:
                simulate(config, out, progress=False)
            wall = time.perf_counter() - started
            seconds = [r["seconds"] for r in read_jsonl(out / "metrics.jsonl") if r.get("phase") == "meta"]
            steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
            row[engine] = {"wall_seconds": wall, "first_round_seconds": seconds[0], "steady_round_seconds": steady}
            print(
                engine,
                clients,
                f"first round {seconds[0]:.2f} s, steady {steady:.3f} s/round, wall {wall:.1f} s",
                flush=True,
            )
        ray, local = row["ray"], row["inprocess"]
        assert isinstance(ray, dict) and isinstance(local, dict)
        row["overhead_ms_per_client"] = 1000 * (ray["steady_round_seconds"] - local["steady_round_seconds"]) / clients
        print(f"overhead {row['overhead_ms_per_client']:.2f} ms per client per round", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
