"""Omniglot accuracy benchmark: federated meta-training on background alphabets, evaluation on unseen ones.

Runs each preset through the same `simulate` the CLI uses, then re-evaluates the saved meta-model on the
other episode shapes it supports, and appends one JSON line per (algorithm, episode shape) to
`benchmarks/results/omniglot.jsonl`. Usage (data from ../shared/data or $FEDMETA_DATA_DIR):

    python benchmarks/omniglot_accuracy.py --data-dir ../shared/data --algorithms protonet maml fomaml reptile
    python benchmarks/omniglot_accuracy.py --algorithms reptile --split vinyals --time-budget 30
    python benchmarks/omniglot_accuracy.py --algorithms relation --time-budget 10 --also-vinyals

`--also-vinyals` scores a Lake-trained model on the Vinyals test characters too: sound, because those all
come from evaluation alphabets, which Lake training never sees (`fedmeta evaluate --split vinyals`).

`--split vinyals` trains on the papers' 1,200 characters and evaluates as the papers do: 1,000 tasks from the
423 test characters for each of 5-way 1-shot, 5-way 5-shot, 20-way 1-shot and 20-way 5-shot (a head-based
model only at the number of ways it was trained for), mean and 95% CI over tasks.

Progress bars go to stderr; a run's per-round metrics (with the unseen-client learning curve) are in
runs/bench/<algorithm>/metrics.jsonl, and a Lake-split run's curve is appended to
benchmarks/results/omniglot_curves.jsonl (`python benchmarks/time_to_accuracy.py` draws them against the targets).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import time_to_accuracy  # benchmarks/time_to_accuracy.py: the curves file and its figure
import torch

from fedmeta.config import EMBEDDING_ALGORITHMS, RunConfig, parse_override
from fedmeta.evaluation import format_summary
from fedmeta.runtime import cpu_description
from simulations.cli import load_preset
from simulations.inprocess import evaluate_checkpoint, simulate

# Episode shapes evaluated after training: (ways, shots, queries). A head-based model only evaluates at the
# number of ways it was trained with; the metric-based methods (no head) evaluate at any.
SHAPES = {"5w1s": (5, 1, 15), "5w5s": (5, 5, 15), "20w1s": (20, 1, 5), "20w5s": (20, 5, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDMETA_DATA_DIR", "../shared/data"))
    parser.add_argument("--algorithms", nargs="+", default=["protonet", "maml", "fomaml", "reptile"])
    parser.add_argument("--rounds", type=int, help="override the presets' rounds")
    parser.add_argument("--ways", type=int, help="override the presets' training ways")
    parser.add_argument("--tag", default="", help="suffix for run directories and result rows")
    parser.add_argument("--split", choices=["lake", "vinyals"], default="lake", help="Omniglot split (see above)")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES", help="train for at most this long")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset value by its dotted key (e.g. outer.schedule=cosine); JSON values, repeatable",
    )
    parser.add_argument(
        "--also-vinyals",
        action="store_true",
        help="after Lake training, also score the model on the Vinyals test characters (1,000 tasks per shape)",
    )
    parser.add_argument("--eval-tasks", type=int, help="tasks per unseen client (default: preset; vinyals: 1000)")
    parser.add_argument("--out", default="benchmarks/results/omniglot.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # a line per round

    for algorithm in args.algorithms:
        config = RunConfig.from_dict(load_preset(f"omniglot-{algorithm}")).replace(**{"data.data_dir": args.data_dir})
        if args.rounds:
            config = config.replace(**{"federation.rounds": args.rounds})
        if args.ways:
            queries = 15 if args.ways <= 5 else 5
            config = config.replace(**{"episode.ways": args.ways, "episode.queries": queries})
        if args.time_budget:
            config = config.replace(**{"federation.time_budget": args.time_budget})
        if args.set:
            config = config.replace(**dict(parse_override(item) for item in args.set))
        eval_tasks = args.eval_tasks or (1000 if args.split == "vinyals" else None)
        config = config.replace(**{"data.split": args.split})
        if eval_tasks:
            config = config.replace(**{"eval.eval_tasks_per_client": eval_tasks})
        split_tag = "" if args.split == "lake" else "-vinyals"
        run_dir = Path("runs/bench") / f"{algorithm}-{config.episode.ways}w{split_tag}{args.tag}"
        started = time.perf_counter()
        summary = simulate(config, run_dir, progress=sys.stderr.isatty())  # plain log lines into a file
        wall = time.perf_counter() - started
        print(format_summary(summary), flush=True)
        if args.split == "lake":  # the learning curve against issue #10's targets (time_to_accuracy.py draws it)
            time_to_accuracy.record(run_dir, algorithm)
        evaluations = [(args.split, config.eval.eval_tasks_per_client)]
        if args.also_vinyals and args.split == "lake":
            evaluations.append(("vinyals", args.eval_tasks or 1000))  # the same model on the papers' test characters
        for split, tasks in evaluations:
            for shape, (ways, shots, queries) in SHAPES.items():
                if algorithm not in EMBEDDING_ALGORITHMS and ways != config.episode.ways:
                    continue
                episode = {"episode.ways": ways, "episode.shots": shots, "episode.queries": queries}
                if split == args.split and (ways, shots, queries) == (
                    config.episode.ways,
                    config.episode.shots,
                    config.episode.queries,
                ):
                    result = summary
                else:
                    result = evaluate_checkpoint(
                        run_dir / "checkpoint.pt",
                        run_dir / f"eval-{shape}{'' if split == args.split else '-' + split}",
                        progress=False,
                        overrides={**episode, "data.split": split, "eval.eval_tasks_per_client": tasks},
                    )
                row = _row(algorithm, config, summary, result, shape=shape, split=split, trained_on=args.split)
                row.update({"time_budget_minutes": args.time_budget, "train_wall_seconds": wall})
                row["run_dir"] = str(run_dir)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(split, shape, f"{100 * max(row['accuracy_by_step']):.2f}%", flush=True)


def _row(algorithm: str, config: RunConfig, summary: dict, result: dict, **where: str) -> dict:
    meta = result["results"]["meta"]["over_tasks"]
    return {
        "algorithm": algorithm,
        "split": where["split"],
        "trained_on": where["trained_on"],
        "shape": where["shape"],
        "trained": f"{config.episode.training_ways}w{config.episode.training_shots}s",
        "conv_downsample": config.data.conv_downsample,
        "augment": config.episode.augment,
        "joint_embedding": config.episode.joint_embedding,
        "rounds": summary["rounds"],
        "clients_per_round": config.federation.clients_per_round,
        "tasks_per_client": config.federation.tasks_per_client,
        "accuracy_by_step": [s["mean"] for s in meta],
        "ci95_by_step": [s["ci95"] for s in meta],
        "random_init_by_step": [s["mean"] for s in result["results"]["random_init"]["over_tasks"]],
        "unseen_clients": result["unseen_clients"],
        "tasks_per_unseen_client": result["config"]["eval"]["eval_tasks_per_client"],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
    }


if __name__ == "__main__":
    main()
