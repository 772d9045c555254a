"""The thread policy (issue #12): the default demo's round time with another process busy on one core.

Runs the main command's config (`sinusoid-reptile`, in-process) for a few rounds with torch at 2 threads
(what torch picks on a 2-core machine) and with the automatic policy (1 thread for the sinusoid MLP), first
on an idle machine, then beside a process that keeps one core busy. Prints and appends one JSON line:

    python benchmarks/thread_policy.py --rounds 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedmeta.config import RunConfig
from fedmeta.metrics import read_jsonl
from simulations.inprocess import simulate


def _spin(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        pass


def median_round(threads: int, rounds: int) -> float:
    config = RunConfig().replace(
        **{"federation.rounds": rounds, "eval.fedavg_rounds": 0, "eval.eval_clients": 1, "compute.threads": threads}
    )
    with tempfile.TemporaryDirectory() as out:
        simulate(config, out, progress=False)
        seconds = [r["seconds"] for r in read_jsonl(Path(out) / "metrics.jsonl") if r["phase"] == "meta"]
    return statistics.median(seconds[1:])  # the first round pays for warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/thread_policy.jsonl")
    args = parser.parse_args()
    auto = 0  # compute.threads 0: the policy (1 thread for sinusoid)
    row: dict = {"rounds": args.rounds, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__}
    row["idle_2_threads_s"] = median_round(2, args.rounds)
    row["idle_auto_s"] = median_round(auto, args.rounds)
    stop = multiprocessing.Event()
    busy = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
    busy.start()
    try:
        time.sleep(0.5)
        row["busy_2_threads_s"] = median_round(2, args.rounds)
        row["busy_auto_s"] = median_round(auto, args.rounds)
    finally:
        stop.set()
        busy.join(timeout=5)
    row["busy_speedup_auto_vs_2_threads"] = row["busy_2_threads_s"] / row["busy_auto_s"]
    row["python"] = platform.python_version()
    print(json.dumps(row, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
