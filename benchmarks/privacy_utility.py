"""Privacy-utility trade-off: personalised error on unseen clients versus epsilon, for Reptile and FOMAML.

For each target epsilon the noise multiplier is the smallest z (found by bisection with the project's own
accountant, fedmeta.privacy.epsilon_spent) whose planned rounds stay within the budget; infinity means no DP.
Central DP, fixed clip norm, m clients sampled per round. Two federations: sinusoid with thousands of clients
(error = MSE), and Omniglot's finest partition that still holds a 5-way 1-shot task with a query - one client
per (alphabet, pair of drawers): 300 training clients, unseen alphabets for evaluation (error = accuracy).

    python benchmarks/privacy_utility.py --clients 2000 --per-round 100 --rounds 100 --epsilons 1 2 4 8 inf
    python benchmarks/privacy_utility.py --dataset omniglot --data-dir ../shared/data --per-round 30 --rounds 100
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from fedmeta.config import RunConfig, parse_override
from fedmeta.privacy import epsilon_spent
from fedmeta.tasks import build_federation
from simulations.cli import load_preset
from simulations.flower_sim import simulate_flower
from simulations.inprocess import simulate


def noise_for(epsilon: float, *, rounds: int, sample: int, population: int, delta: float) -> float:
    """Smallest noise multiplier (to 0.1%) whose `rounds` rounds spend at most `epsilon`."""
    lo, hi = 0.05, 100.0
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        spent = epsilon_spent(
            noise_multiplier=mid, sample_size=sample, population=population, rounds=rounds, delta=delta
        )
        lo, hi = (lo, mid) if spent <= epsilon else (mid, hi)
    return hi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="sinusoid", choices=["sinusoid", "omniglot"])
    parser.add_argument("--data-dir", help="omniglot: the benchmark data directory")
    parser.add_argument("--clients", type=int, default=2000, help="sinusoid: training clients")
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clip-norm", type=float, default=0.5)
    parser.add_argument("--algorithms", nargs="+", default=["reptile", "fomaml"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1, 2, 4, 8, math.inf])
    parser.add_argument("--out", help="default: benchmarks/results/privacy_utility[_omniglot].jsonl")
    parser.add_argument(
        "--secagg-workers",
        type=int,
        default=0,
        metavar="W",
        help="run on Flower's Ray engine with SecAgg+ over W cohort workers (--cohort-reply sum), distributed DP",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for every run, e.g. outer.eps=1e-3 outer.optimizer=sgd (values read as JSON)",
    )
    args = parser.parse_args()
    if args.out is None:
        suffix = "_omniglot" if args.dataset == "omniglot" else ""
        args.out = f"benchmarks/results/privacy_utility{suffix}.jsonl"
    if args.dataset == "omniglot":
        data = {
            "data.dataset": "omniglot",
            "data.partition": "alphabet-drawer",
            "data.drawers_per_client": 2,
            "episode.ways": 5,
            "episode.shots": 1,
            "episode.queries": 1,
            "eval.eval_clients": 20,
            "eval.eval_tasks_per_client": 10,
            **({"data.data_dir": args.data_dir} if args.data_dir else {}),
        }
        population = len(build_federation(RunConfig().replace(**data).data, seed=0).train_clients)
    else:
        data = {"data.num_train_clients": args.clients, "data.num_unseen_clients": 20}
        population = args.clients
    delta = 1 / population**1.1
    extra = dict(parse_override(item) for item in args.set)
    for algorithm in args.algorithms:
        for epsilon in args.epsilons:
            overrides = {
                **data,
                "algorithm": algorithm,
                "federation.rounds": args.rounds,
                "federation.clients_per_round": args.per_round,
                "federation.tasks_per_client": 1,
                "eval.fedavg_rounds": 0,
            }
            z = None
            if math.isfinite(epsilon):
                z = noise_for(epsilon, rounds=args.rounds, sample=args.per_round, population=population, delta=delta)
                overrides.update(
                    {
                        "privacy.mode": "central",
                        "privacy.noise_multiplier": z,
                        "privacy.clip_norm": args.clip_norm,
                        "privacy.delta": delta,
                    }
                )
            if algorithm == "fomaml" and args.dataset == "sinusoid":
                overrides.update({"inner.inner_steps": 1, "inner.inner_lr": 0.02})
            # Omniglot: the algorithm's recipe from simulations/presets (as in benchmarks/omniglot_accuracy.py).
            base = (
                RunConfig.from_dict(load_preset(f"omniglot-{algorithm}")) if args.dataset == "omniglot" else RunConfig()
            )
            if args.secagg_workers:
                secure = {"secagg.enabled": True, "compute.workers": args.secagg_workers, "compute.reply": "sum"}
                if z is not None:
                    secure["privacy.mode"] = "distributed"
                overrides.update(secure)
            config = base.replace(**{"eval.curve_every": 0, **overrides, **extra})
            started = time.perf_counter()
            tag = f"-secagg{args.secagg_workers}" if args.secagg_workers else ""
            out = Path("runs/privacy") / f"{args.dataset}-{algorithm}-eps{epsilon:g}{tag}"
            if args.secagg_workers:
                summary = simulate_flower(config, out, num_cpus=1)
            else:
                summary = simulate(config, out, progress=False)
            meta = summary["results"]["meta"]["over_tasks"]
            metric = "accuracy" if args.dataset == "omniglot" else "mse"
            last = config.inner.eval_steps
            steps = sorted({0, 1, last // 2, last})
            row = {
                "dataset": args.dataset,
                "algorithm": algorithm,
                "target_epsilon": None if math.isinf(epsilon) else epsilon,
                "spent_epsilon": summary["privacy"]["epsilon"] if summary["privacy"] else None,
                "delta": delta,
                "noise_multiplier": z,
                "clip_norm": args.clip_norm if z else None,
                "clients": population,
                "clients_per_round": args.per_round,
                "rounds": args.rounds,
                **{f"{metric}_k{k}": meta[k]["mean"] for k in steps},
                f"ci95_k{last}": meta[last]["ci95"],
                f"random_init_k{last}": summary["results"]["random_init"]["over_tasks"][last]["mean"],
                **({"overrides": extra} if extra else {}),
                **(
                    {"secagg_workers": args.secagg_workers, "privacy_mode": config.privacy.mode}
                    if args.secagg_workers
                    else {}
                ),
                "seconds": time.perf_counter() - started,
            }
            print(json.dumps(row), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
