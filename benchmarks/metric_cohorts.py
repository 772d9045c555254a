"""ProtoNet's client parts, side by side in one process: a round's cohort of clients as one vectorised call
(per-task directions) or client after client, each with convolutions on channels-last or contiguous (NCHW)
memory. The shapes are the `omniglot-protonet` preset's: 5 clients a round, one 56-way 1-shot episode each with
5 queries per class; evaluation is 5-way 1-shot with 15 queries, 20 tasks per call.

    python benchmarks/metric_cohorts.py                    # max-pooled and stride-2 Conv4
    python benchmarks/metric_cohorts.py --repeats 8 --downsample maxpool

Candidates are timed in turn, round after round (A B C D A B C D ...), and each row reports the median, so a
slower spell of a shared machine falls on all of them. Rows go to benchmarks/results/metric_cohorts.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmeta.algorithms import ALGORITHMS  # noqa: E402
from fedmeta.models import Conv4  # noqa: E402
from fedmeta.runtime import cpu_description, tune_allocator  # noqa: E402
from fedmeta.types import Task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "metric_cohorts.jsonl"


def episode(gen: torch.Generator, ways: int, shots: int, queries: int) -> Task:
    def part(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(ways * per_class, 1, 28, 28, generator=gen), torch.arange(ways).repeat_interleave(per_class)

    return Task(*part(shots), *part(queries))


def candidates(downsample: str, clients: int, ways: int, queries: int) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    tasks_by_client = [[episode(gen, ways, 1, queries)] for _ in range(clients)]
    eval_tasks = [episode(gen, 5, 1, 15) for _ in range(20)]
    out: dict[str, Callable[[], object]] = {}
    for cohort in (False, True):
        for channels_last in (False, True):
            algo = ALGORITHMS["protonet"](
                Conv4(None, downsample=downsample), kind="classification", inner_lr=0.1, inner_steps=0, batched=True
            )
            algo.has_task_directions = cohort  # type: ignore[misc]
            algo.channels_last = channels_last
            params = algo.init_params(torch.Generator().manual_seed(1))
            layout = "channels_last" if channels_last else "nchw"
            name = f"{'cohort' if cohort else 'per_client'}_{layout}"
            out[name] = lambda a=algo, p=params: a.cohort_update(p, tasks_by_client)
            if cohort:  # evaluation has no cohorts: one row per layout
                out[f"eval_{layout}"] = lambda a=algo, p=params: a.evaluate_curves(p, eval_tasks, 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--downsample", nargs="+", default=["maxpool", "stride"], choices=["maxpool", "stride"])
    parser.add_argument("--clients", type=int, default=5, help="clients per round (one episode each)")
    parser.add_argument("--ways", type=int, default=56, help="training episode's classes")
    parser.add_argument("--queries", type=int, default=5, help="training queries per class")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per candidate (after one warm-up)")
    args = parser.parse_args()
    tune_allocator()
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_description()}
    print(json.dumps(meta), flush=True)
    rows = []
    for downsample in args.downsample:
        fns = candidates(downsample, args.clients, args.ways, args.queries)
        for fn in fns.values():
            fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
        seconds = {name: statistics.median(t) for name, t in times.items()}
        row = {
            "downsample": downsample,
            "clients": args.clients,
            "ways": args.ways,
            "queries": args.queries,
            "repeats": args.repeats,
            **{f"{name}_s": round(s, 3) for name, s in seconds.items()},
            "cohort_cl_vs_per_client_nchw": round(seconds["per_client_nchw"] / seconds["cohort_channels_last"], 2),
            "per_client_cl_vs_nchw": round(seconds["per_client_nchw"] / seconds["per_client_channels_last"], 2),
            "cohort_vs_per_client_nchw": round(seconds["per_client_nchw"] / seconds["cohort_nchw"], 2),
            "eval_cl_vs_nchw": round(seconds["eval_nchw"] / seconds["eval_channels_last"], 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as out:
        for row in rows:
            out.write(json.dumps({**meta, **row, "command": " ".join(sys.argv)}) + "\n")


if __name__ == "__main__":
    main()
