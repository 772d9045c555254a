"""Soak: many clients for many rounds in the in-process engine, watching the process's resident memory.

Every round all `--clients` clients train (Reptile on sinusoid, `--tasks` tasks of `--steps` inner steps), the
server applies the round and writes metrics and a checkpoint - the full loop. RSS (psutil) is logged after
every round into the run's metrics.jsonl; growth is measured from the end of the warm-up rounds to the end.

    python benchmarks/soak.py --clients 1000 --rounds 50 --out benchmarks/results/soak.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import psutil
import torch

from fedmeta.config import RunConfig
from fedmeta.experiment import Outer, initial_params, meta_algorithm
from fedmeta.inprocess import InProcess
from fedmeta.loop import train
from fedmeta.metrics import JsonlSink, read_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/soak.jsonl")
    args = parser.parse_args()
    config = RunConfig().replace(
        **{
            "data.num_train_clients": args.clients,
            "data.num_unseen_clients": 1,
            "federation.rounds": args.rounds,
            "federation.clients_per_round": args.clients,
            "federation.tasks_per_client": args.tasks,
            "inner.inner_steps": args.steps,
            "eval.fedavg_rounds": 0,
            "eval.curve_every": 1,  # the "curve" here is the process's memory, after every round
        }
    )
    run = Path(tempfile.mkdtemp(prefix="fm-soak-", dir="/tmp"))
    process = psutil.Process()
    transport = InProcess(progress=False)
    info = transport.connect(config)
    start = Outer(config, info.num_train).initial_state(initial_params(meta_algorithm(config), 0))
    started = time.perf_counter()
    with JsonlSink(run / "metrics.jsonl") as sink:
        train(
            config,
            transport,
            info,
            start,
            sink=sink,
            label="meta",
            checkpoint=run / "checkpoint.pt",
            curve=lambda params: {"rss_mb": process.memory_info().rss / 2**20},
        )
    wall = time.perf_counter() - started
    rss = [r["rss_mb"] for r in read_jsonl(run / "metrics.jsonl")]
    base = rss[args.warmup - 1]
    row = {
        "clients": args.clients,
        "clients_per_round": args.clients,
        "rounds": args.rounds,
        "tasks_per_client": args.tasks,
        "inner_steps": args.steps,
        "warmup_rounds": args.warmup,
        "rss_mb_after_round_1": rss[0],
        "rss_mb_after_warmup": base,
        "rss_mb_final": rss[-1],
        "rss_mb_max_after_warmup": max(rss[args.warmup - 1 :]),
        "growth_after_warmup": max(rss[args.warmup - 1 :]) / base - 1,
        "seconds": wall,
        "seconds_per_round": wall / args.rounds,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "metrics": str(run / "metrics.jsonl"),
    }
    print(json.dumps(row, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
