"""Client-part throughput, side by side in one process: fedmeta batched, fedmeta's per-task reference, a plain
`torch.func` per-task loop and a `higher` per-task loop, each as a fraction of the FLOP bound.

    python benchmarks/speed.py                       # Conv4, 32 tasks, 5w1s/20w1s x 1/5 inner steps, CPU
    python benchmarks/speed.py --device cuda --tasks 32 --configs 5w1s-1 --algorithms maml
    python benchmarks/speed.py --memory              # peak memory per task of 2nd-order MAML (1/5/10 steps)

The FLOP bound of an algorithm is this machine's measured fp32 GEMM rate divided by the FLOPs of one task's
client part (counted by `torch.utils.flop_counter` on the reference path: convolutions, their backward and
double backward, matrix products). Tasks are random images of Omniglot's shape (28x28, one channel) unless
--data-dir is given: speed does not depend on pixel values. Rows go to benchmarks/results/speed.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmeta.algorithms import ALGORITHMS, Algorithm  # noqa: E402
from fedmeta.models import Conv4  # noqa: E402
from fedmeta.runtime import resolve_device, tune_allocator  # noqa: E402
from fedmeta.types import Task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "speed.jsonl"
# (ways, shots, queries per class, inner steps); 15 queries for 5-way as in MAML, 5 for 20-way (ProtoNet's).
CONFIGS = {
    "5w1s-1": (5, 1, 15, 1),
    "5w1s-5": (5, 1, 15, 5),
    "20w1s-1": (20, 1, 5, 1),
    "20w1s-5": (20, 1, 5, 5),
}
INNER_LR = 0.4


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_gflops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    a, b = (torch.rand(size, size, device=device) for _ in range(2))
    a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def make_tasks(count: int, ways: int, shots: int, queries: int, data_dir: str | None, seed: int = 0) -> list[Task]:
    if data_dir is not None:
        import numpy as np

        from fedmeta.tasks.omniglot import omniglot_federation

        clients = omniglot_federation(data_dir).train_clients
        rng = np.random.default_rng(seed)
        return [
            clients[i % len(clients)].sample_task(rng, ways=ways, shots=shots, queries=queries) for i in range(count)
        ]
    gen = torch.Generator().manual_seed(seed)

    def part(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(ways * per_class, 1, 28, 28, generator=gen), torch.arange(ways).repeat_interleave(per_class)

    return [Task(*part(shots), *part(queries)) for _ in range(count)]


# -- independent per-task loops (what a user would write without fedmeta) ---------------------------------------
def plain_loop(name: str, model: torch.nn.Module, params: dict, tasks: list[Task], steps: int) -> None:
    """A ten-line torch.func loop per task: MAML/FOMAML/ANIL (inner SGD), Reptile, ProtoNet."""

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def adapt(p: dict, x: torch.Tensor, y: torch.Tensor, keys: list[str]) -> dict:
        for _ in range(steps):
            g = grad(lambda q, p=p: loss({**p, **q}, x, y))({k: p[k] for k in keys})
            p = {**p, **{k: p[k] - INNER_LR * g[k] for k in keys}}
        return p

    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in tasks:
        if name in ("maml", "anil"):
            keys = [k for k in params if name == "maml" or k.startswith("head.")]
            g = grad(lambda p, t=t, keys=keys: loss(adapt(p, t.support_x, t.support_y, keys), t.query_x, t.query_y))(
                params
            )
        elif name == "fomaml":
            fast = adapt(params, t.support_x, t.support_y, list(params))
            g = grad(loss)(fast, t.query_x, t.query_y)
        elif name == "reptile":
            x, y = torch.cat([t.support_x, t.query_x]), torch.cat([t.support_y, t.query_y])
            fast = adapt(params, x, y, list(params))
            g = {k: params[k] - fast[k] for k in params}
        elif name == "protonet":

            def proto_loss(p: dict, t: Task = t) -> torch.Tensor:
                s, q = functional_call(model, p, (t.support_x,)), functional_call(model, p, (t.query_x,))
                ways = int(t.support_y.max()) + 1
                protos = torch.stack([s[t.support_y == c].mean(0) for c in range(ways)])
                return F.cross_entropy(-torch.cdist(q, protos).pow(2), t.query_y)

            g = grad(proto_loss)(params)
        else:
            raise ValueError(name)
        total = {k: total[k] + g[k] for k in total}


def higher_loop(name: str, model: torch.nn.Module, params: dict, tasks: list[Task], steps: int) -> None:
    """The same with `higher` (differentiable SGD over a monkeypatched module): MAML and FOMAML."""
    import higher

    for k, p in model.named_parameters():
        p.data.copy_(params[k])
    model.zero_grad()
    inner = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    for t in tasks:
        with higher.innerloop_ctx(model, inner, track_higher_grads=name == "maml") as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(t.support_x), t.support_y))
            query = F.cross_entropy(fmodel(t.query_x), t.query_y)
            if name == "maml":
                query.backward()
            else:
                torch.autograd.grad(query, fmodel.parameters(time=-1))


# -- measurement ------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object], device: torch.device, *, min_seconds: float, max_repeats: int) -> float:
    """Seconds per call: one warm-up call, then repeat until `min_seconds` or `max_repeats`."""
    fn()
    synchronize(device)
    times: list[float] = []
    while not times or (len(times) < max_repeats and sum(times) < min_seconds):
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


def algorithm(name: str, ways: int, steps: int, *, batched: bool, device: torch.device, **kw: object) -> Algorithm:
    model = Conv4(None if name == "protonet" else ways).to(device)
    return ALGORITHMS[name](
        model, kind="classification", inner_lr=INNER_LR, inner_steps=steps, batched=batched, device=device, **kw
    )


def flops_per_task(name: str, ways: int, steps: int, task: Task) -> float:
    algo = algorithm(name, ways, steps, batched=False, device=torch.device("cpu"))
    params = algo.init_params(torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        algo.client_update(params, [task])
    return float(counter.get_total_flops())


def run_speed(args: argparse.Namespace, device: torch.device) -> list[dict]:
    peak = gemm_gflops(device)
    print(f"fp32 GEMM: {peak:.0f} GFLOP/s on {device} ({torch.get_num_threads()} threads)", flush=True)
    rows = []
    for config in args.configs:
        ways, shots, queries, steps = CONFIGS[config]
        tasks = make_tasks(args.tasks, ways, shots, queries, args.data_dir)
        device_tasks = [Task(*(v.to(device) for v in (t.support_x, t.support_y, t.query_x, t.query_y))) for t in tasks]
        for name in args.algorithms:
            algo_steps = 0 if name == "protonet" else steps
            if name == "protonet" and config.endswith("-5"):
                continue  # no inner loop: the 5-step rows would repeat the 1-step ones
            flops = flops_per_task(name, ways, algo_steps, tasks[0])
            bound = peak * 1e9 / flops
            row: dict = {
                "config": config,
                "algorithm": name,
                "tasks": args.tasks,
                "device": str(device),
                "gemm_gflops": round(peak, 1),
                "gflop_per_task": round(flops / 1e9, 3),
                "bound_tasks_s": round(bound, 1),
            }
            batched = algorithm(name, ways, algo_steps, batched=True, device=device, task_chunk=args.task_chunk)
            reference = algorithm(name, ways, algo_steps, batched=False, device=device)
            params = batched.init_params(torch.Generator().manual_seed(0))
            device_params = {k: v.to(device) for k, v in params.items()}
            candidates: dict[str, Callable[[], object]] = {
                "batched": partial(batched.client_update, params, tasks),
                "reference": partial(reference.client_update, params, tasks),
            }
            if name in ("maml", "fomaml", "anil", "reptile", "protonet"):
                candidates["plain_loop"] = partial(
                    plain_loop, name, batched.model, device_params, device_tasks, algo_steps
                )
            if name in ("maml", "fomaml"):
                candidates["higher_loop"] = partial(
                    higher_loop, name, Conv4(ways).to(device), device_params, device_tasks, algo_steps
                )
            for label, fn in candidates.items():
                seconds = timed(fn, device, min_seconds=args.min_seconds, max_repeats=args.repeats)
                row[f"{label}_tasks_s"] = round(args.tasks / seconds, 1)
            row["batched_vs_plain"] = round(row["batched_tasks_s"] / row.get("plain_loop_tasks_s", float("nan")), 2)
            row["batched_vs_reference"] = round(row["batched_tasks_s"] / row["reference_tasks_s"], 2)
            row["batched_fraction_of_bound"] = round(row["batched_tasks_s"] / bound, 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def run_precision(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """bf16 autocast against fp32: speed and the meta-gradient's cosine similarity and relative error."""
    rows = []
    for name in ("maml", "fomaml", "protonet"):
        ways, shots, queries, steps = CONFIGS["5w1s-1"]
        steps = 0 if name == "protonet" else steps
        tasks = make_tasks(args.tasks, ways, shots, queries, args.data_dir)
        fp32 = algorithm(name, ways, steps, batched=True, device=device, task_chunk=args.task_chunk)
        bf16 = algorithm(name, ways, steps, batched=True, device=device, task_chunk=args.task_chunk, precision="bf16")
        params = fp32.init_params(torch.Generator().manual_seed(0))
        exact = fp32.client_update(params, tasks).direction
        rounded = bf16.client_update(params, tasks).direction
        a = torch.cat([exact[k].flatten() for k in exact])
        b = torch.cat([rounded[k].flatten() for k in exact])
        row = {
            "precision_check": name,
            "device": str(device),
            "cosine": round(float(F.cosine_similarity(a, b, dim=0)), 5),
            "relative_error": round(float((a - b).norm() / a.norm()), 5),
            **{
                f"{label}_tasks_s": round(
                    args.tasks
                    / timed(partial(algo.client_update, params, tasks), device, min_seconds=2, max_repeats=3),
                    1,
                )
                for label, algo in (("fp32", fp32), ("bf16", bf16))
            },
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def run_profile(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Where a batched 2nd-order MAML client part (5w1s, 1 step) spends its time: the top operators."""
    from torch.profiler import profile

    ways, shots, queries, steps = CONFIGS["5w1s-1"]
    tasks = make_tasks(args.tasks, ways, shots, queries, args.data_dir)
    algo = algorithm("maml", ways, steps, batched=True, device=device, task_chunk=args.task_chunk)
    params = algo.init_params(torch.Generator().manual_seed(0))
    algo.client_update(params, tasks)
    with profile(record_shapes=True) as prof:
        algo.client_update(params, tasks)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = []
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        row = {
            "profile": "maml 5w1s-1 batched",
            "op": e.key,
            "share": round(e.self_cpu_time_total / total, 3),
            "calls": e.count,
            "first_input": e.input_shapes[0] if e.input_shapes else None,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(steps: int, tasks: int, chunk: int, device_name: str) -> None:
    """In a fresh process: peak memory above the baseline while one client part of `tasks` tasks runs."""
    tune_allocator()
    device = resolve_device(device_name)
    ways, shots, queries, _ = CONFIGS["5w1s-1"]
    batch = make_tasks(tasks, ways, shots, queries, None)
    algo = algorithm("maml", ways, steps, batched=True, device=device, task_chunk=chunk)
    params = algo.init_params(torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        algo.client_update(params, batch)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        # Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) to the current one.
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
        algo.client_update(params, batch)
        peak = (_status_kib("VmHWM") - base) * 1024
    print(json.dumps({"peak_bytes": peak}))


def run_memory(args: argparse.Namespace) -> list[dict]:
    """Peak memory of one client part of `--tasks` tasks, all in one call and in chunks of 4 (fresh processes).

    Per task: the growth from 4 to all tasks in flight, divided by the extra tasks (fixed costs cancel).
    """

    def peak(steps: int, chunk: int) -> float:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(steps), str(args.tasks), str(chunk), args.device],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20

    rows = []
    for steps in (1, 5, 10):
        whole, chunked = peak(steps, args.tasks), peak(steps, 4)
        row = {
            "memory": "maml-2nd-order 5w1s",
            "inner_steps": steps,
            "tasks": args.tasks,
            "device": args.device,
            "peak_mib_all_in_one_call": round(whole, 1),
            "peak_mib_chunk_4": round(chunked, 1),
            "mib_per_task_in_flight": round((whole - chunked) / (args.tasks - 4), 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--tasks", type=int, default=32, help="meta-batch: tasks per client part")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--algorithms", nargs="*", default=["maml", "fomaml", "anil", "metasgd", "reptile", "protonet"])
    parser.add_argument("--task-chunk", type=int, default=0, help="batched engine's chunk (0: automatic)")
    parser.add_argument("--data-dir", help="sample real Omniglot tasks instead of random images")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="time each candidate at least this long")
    parser.add_argument("--repeats", type=int, default=3, help="at most this many timed calls per candidate")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory of 2nd-order MAML")
    parser.add_argument("--precision", action="store_true", help="also compare bf16 autocast with fp32")
    parser.add_argument("--profile", action="store_true", help="also list the top operators of batched MAML")
    parser.add_argument("--no-allocator-tuning", action="store_true", help="leave glibc's malloc thresholds alone")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        steps, tasks, chunk, device_name = args.memory_child
        peak_memory_child(int(steps), int(tasks), int(chunk), device_name)
        return
    if not args.no_allocator_tuning:
        tune_allocator()
    device = resolve_device(args.device)
    rows = run_speed(args, device) if args.algorithms else []
    if args.profile:
        rows += run_profile(args, device)
    if args.precision:
        rows += run_precision(args, device)
    if args.memory:
        rows += run_memory(args)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator_tuning": not args.no_allocator_tuning,
        "data": "omniglot" if args.data_dir else "random images",
        "command": " ".join(sys.argv),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as out:
        for row in rows:
            out.write(json.dumps({**meta, **row}) + "\n")


if __name__ == "__main__":
    main()
