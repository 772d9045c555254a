"""Reptile's inner Adam step, fused (lerp, addcmul, addcdiv: `fedmeta.functional.InnerOptimizer.step`) against the
textbook lines it replaced, side by side in one process on the `omniglot-reptile` preset's client parts.

    python benchmarks/adam_step.py --data-dir ../shared/data --repeats 15

The textbook step is kept here only as this comparison's baseline. Candidates are timed in turn (A B A B ...) on
the same round's 5 clients; the row reports medians. Rows go to benchmarks/results/adam_step.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmeta.config import RunConfig  # noqa: E402
from fedmeta.experiment import Experiment  # noqa: E402
from fedmeta.functional import WEIGHT, InnerOptimizer, _lr  # noqa: E402
from fedmeta.runtime import cpu_description, tune_allocator  # noqa: E402
from simulations.cli import load_preset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "adam_step.jsonl"


def textbook_step(self: InnerOptimizer, fast, grads, inner_lr, state, t):  # type: ignore[no-untyped-def]
    """The Adam step as it was written before the fused form (Adam only; the baseline of this benchmark)."""
    new_state = dict(state)
    if WEIGHT in state:
        new_state[WEIGHT] = self.beta2 * state[WEIGHT] + (1 - self.beta2)
    updated = {}
    for k, g in grads.items():
        m = self.beta1 * state[f"m.{k}"] + (1 - self.beta1) * g
        v = self.beta2 * state[k] + (1 - self.beta2) * g * g
        m_hat = m / (1 - self.beta1**t)
        v_hat = v / (new_state[WEIGHT] if WEIGHT in state else 1 - self.beta2**t)
        updated[k] = fast[k] - _lr(inner_lr, k) * m_hat / (v_hat.sqrt() + self.eps)
        new_state[k], new_state[f"m.{k}"] = v, m
    return {**fast, **updated}, new_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDMETA_DATA_DIR", "../shared/data"))
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per candidate (after one warm-up)")
    args = parser.parse_args()
    tune_allocator()
    config = RunConfig.from_dict(load_preset("omniglot-reptile")).replace(**{"data.data_dir": args.data_dir})
    experiment = Experiment.from_config(config)
    params = experiment.initial_params()
    clients = list(range(config.federation.clients_per_round))
    fused = InnerOptimizer.step

    def round_part(step) -> float:  # type: ignore[no-untyped-def]
        InnerOptimizer.step = step  # type: ignore[method-assign]
        try:
            started = time.perf_counter()
            experiment.cohort_update(params, clients, round_index=0)
            return time.perf_counter() - started
        finally:
            InnerOptimizer.step = fused  # type: ignore[method-assign]

    candidates = {"fused": fused, "textbook": textbook_step}
    for step in candidates.values():
        round_part(step)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.repeats):
        for name, step in candidates.items():
            times[name].append(round_part(step))
    seconds = {name: statistics.median(t) for name, t in times.items()}
    row = {
        "preset": "omniglot-reptile",
        "clients": len(clients),
        "repeats": args.repeats,
        **{f"{name}_s": round(s, 4) for name, s in seconds.items()},
        "fused_vs_textbook": round(seconds["textbook"] / seconds["fused"], 3),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_description(),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(row), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
