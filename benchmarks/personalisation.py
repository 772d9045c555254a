"""Personalisation on real federations (issue #14): every meta-learner and every baseline on the same unseen
clients of FEMNIST (writers) or Shakespeare (speakers), FedMeta's client tasks.

Each algorithm runs the dataset's preset (`femnist-fedmeta`, `shakespeare-fedmeta`) with its own server step
where its paper has one (Reptile and Per-FedAvg average models: outer SGD at lr 1), for the same rounds or the
same time budget; the FedAvg baseline is trained once, in the first run, for as many rounds. The rows of the
table: the meta-model of each algorithm after k steps on the unseen clients' support sets; FedAvg at k=0 (no
adaptation) and after fine-tuning; local training alone (random_init after k steps). One JSON line per
(algorithm, model) in benchmarks/results/personalisation.jsonl. Usage:

    python benchmarks/personalisation.py --dataset femnist --data-dir ../shared/data --time-budget 8
    python benchmarks/personalisation.py --dataset shakespeare --set data.lstm_hidden=64 --time-budget 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

import torch

from fedmeta.config import RunConfig, parse_override
from fedmeta.evaluation import format_summary
from simulations.cli import load_preset
from simulations.inprocess import simulate

ALGORITHMS = ["maml", "fomaml", "metasgd", "reptile", "perfedavg", "perfedavg-hf", "fedrep"]
# Each algorithm's own settings over the preset (the paper's server step, its local work).
OVERRIDES: dict[str, dict[str, object]] = {
    "reptile": {"inner.inner_steps": 5, "outer.optimizer": "sgd", "outer.outer_lr": 1.0},
    "perfedavg": {"outer.optimizer": "sgd", "outer.outer_lr": 1.0, "federation.tasks_per_client": 4,
                  "perfedavg.local_lr": 0.02},
    "perfedavg-hf": {"outer.optimizer": "sgd", "outer.outer_lr": 1.0, "federation.tasks_per_client": 4,
                     "perfedavg.local_lr": 0.02},
    "fedrep": {"inner.inner_steps": 5},
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["femnist", "shakespeare"], default="femnist")
    parser.add_argument("--data-dir", default=os.environ.get("FEDMETA_DATA_DIR", "../shared/data"))
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--rounds", type=int, help="override the preset's rounds")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES", help="train each algorithm at most this long")
    parser.add_argument("--out", default="benchmarks/results/personalisation.jsonl")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config key over the preset")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # a line per round

    base = RunConfig.from_dict(load_preset(f"{args.dataset}-fedmeta")).replace(**{"data.data_dir": args.data_dir})
    base = base.replace(**dict(parse_override(item) for item in args.set))
    if args.rounds:
        base = base.replace(**{"federation.rounds": args.rounds})
    if args.time_budget:
        base = base.replace(**{"federation.time_budget": args.time_budget})
    for i, algorithm in enumerate(args.algorithms):
        fedavg = {} if i == 0 else {"eval.fedavg_rounds": 0}  # the baseline once, beside the first run
        config = base.replace(**{"algorithm": algorithm, **OVERRIDES.get(algorithm, {}), **fedavg})
        run_dir = Path("runs/bench") / f"{args.dataset}-{algorithm}"
        summary = simulate(config, run_dir, progress=sys.stderr.isatty())  # plain log lines into a file
        print(f"== {algorithm}\n{format_summary(summary)}", flush=True)
        for model, result in summary["results"].items():
            if i > 0 and model == "random_init":
                continue  # the same initial model in every run (one seed): reported once
            row = {
                "dataset": args.dataset,
                "algorithm": algorithm if model == "meta" else ("local only" if model == "random_init" else model),
                "model": model,
                "rounds": summary["rounds"],
                "train_seconds": summary["meta_train_seconds"],
                "time_budget_minutes": args.time_budget,
                "metric": result["metric"],
                "by_step": [s["mean"] for s in result["over_tasks"]],
                "ci95_by_step": [s["ci95"] for s in result["over_tasks"]],
                "ci95_over_clients_by_step": [s["ci95"] for s in result["over_clients"]],
                "unseen_clients": summary["unseen_clients"],
                "config": config.to_flat(),
                "run_dir": str(run_dir),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
            }
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
