"""Privacy-utility trade-off: personalised error on unseen clients versus epsilon, for Reptile and FOMAML.

For each target epsilon the noise multiplier is the smallest z (found by bisection with the project's own
accountant, fedmeta.privacy.epsilon_spent) whose planned rounds stay within the budget; infinity means no DP.
Central DP, fixed clip norm; the federation is sinusoid with thousands of clients, m sampled per round.

    python benchmarks/privacy_utility.py --clients 2000 --per-round 100 --rounds 100 --epsilons 1 2 4 8 inf
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from fedmeta.config import RunConfig
from fedmeta.privacy import epsilon_spent
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
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clip-norm", type=float, default=0.5)
    parser.add_argument("--algorithms", nargs="+", default=["reptile", "fomaml"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1, 2, 4, 8, math.inf])
    parser.add_argument("--out", default="benchmarks/results/privacy_utility.jsonl")
    args = parser.parse_args()
    delta = 1 / args.clients**1.1
    for algorithm in args.algorithms:
        for epsilon in args.epsilons:
            overrides = {
                "algorithm": algorithm,
                "data.num_train_clients": args.clients,
                "data.num_unseen_clients": 20,
                "federation.rounds": args.rounds,
                "federation.clients_per_round": args.per_round,
                "federation.tasks_per_client": 1,
                "eval.fedavg_rounds": 0,
            }
            z = None
            if math.isfinite(epsilon):
                z = noise_for(epsilon, rounds=args.rounds, sample=args.per_round, population=args.clients, delta=delta)
                overrides.update(
                    {
                        "privacy.mode": "central",
                        "privacy.noise_multiplier": z,
                        "privacy.clip_norm": args.clip_norm,
                        "privacy.delta": delta,
                    }
                )
            if algorithm == "fomaml":
                overrides.update({"inner.inner_steps": 1, "inner.inner_lr": 0.02})
            config = RunConfig().replace(**overrides)
            started = time.perf_counter()
            summary = simulate(config, Path("runs/privacy") / f"{algorithm}-eps{epsilon:g}", progress=False)
            meta = summary["results"]["meta"]["over_tasks"]
            row = {
                "algorithm": algorithm,
                "target_epsilon": None if math.isinf(epsilon) else epsilon,
                "spent_epsilon": summary["privacy"]["epsilon"] if summary["privacy"] else None,
                "delta": delta,
                "noise_multiplier": z,
                "clip_norm": args.clip_norm if z else None,
                "clients": args.clients,
                "clients_per_round": args.per_round,
                "rounds": args.rounds,
                "mse_k0": meta[0]["mean"],
                "mse_k5": meta[5]["mean"],
                "mse_k10": meta[10]["mean"],
                "ci95_k10": meta[10]["ci95"],
                "random_init_k10": summary["results"]["random_init"]["over_tasks"][10]["mean"],
                "seconds": time.perf_counter() - started,
            }
            print(json.dumps(row), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
