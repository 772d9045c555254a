"""What SecAgg+ costs per round: server-side round time and bytes on the wire, with and without it.

The rounds run through the real ServerApp loop, Flower's SecAggPlusWorkflow and the ClientApp with
`secaggplus_mod`, over an in-process Grid (tests/flower_fakes.py) so that the protocol's compute cost is not
hidden behind Ray's scheduling. Bytes are the protobuf sizes of every message sent and received
(`flwr.common.serde.message_to_proto`), i.e. what a SuperLink would relay. Every sampled client trains one
task per round; `--algorithm` and `--dataset` pick the model (sinusoid MLP: 1,761 parameters; Omniglot Conv4:
about 112k, needs the data).

    python benchmarks/secagg_cost.py --clients 5 10 20 50 --rounds 3 --out benchmarks/results/secagg_cost.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.common.serde import message_to_proto  # noqa: E402

from client.client_app import app as client_app  # noqa: E402
from fedmeta.config import RunConfig  # noqa: E402
from fedmeta.metrics import read_jsonl  # noqa: E402
from server.grid import ServerOptions, serve  # noqa: E402
from tests.flower_fakes import InProcessGrid, set_task_identity  # noqa: E402


class CountingGrid(InProcessGrid):
    """Adds up the serialised size of every training message in both directions (all SecAgg+ stages are
    "train" messages; discovery and evaluation are left out)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bytes_down = self.bytes_up = self.messages = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        train = [m for m in [*messages, *replies] if m.metadata.message_type == "train"]
        self.bytes_down += sum(message_to_proto(m).ByteSize() for m in train if m in messages)
        self.bytes_up += sum(message_to_proto(m).ByteSize() for m in train if m in replies)
        self.messages += len(train)
        return replies


def config_for(args: argparse.Namespace, clients: int, secagg: bool) -> RunConfig:
    overrides = {
        "algorithm": args.algorithm,
        "data.dataset": args.dataset,
        "federation.rounds": args.rounds,
        "federation.clients_per_round": clients,
        "federation.tasks_per_client": 1,
        "inner.inner_steps": 1,
        "eval.eval_clients": 1,
        "eval.eval_tasks_per_client": 1,
        "inner.eval_steps": 1,
        "eval.fedavg_rounds": 0,
        "secagg.enabled": secagg,
        "secagg.num_shares": args.num_shares,
    }
    if args.dataset == "sinusoid":
        overrides.update({"data.num_train_clients": clients, "data.num_unseen_clients": 1})
    else:
        overrides.update({"data.partition": "alphabet-drawer", "data.drawers_per_client": 2, "episode.shots": 1})
        if args.data_dir:
            overrides["data.data_dir"] = args.data_dir
    return RunConfig().replace(**overrides)


def measure(config: RunConfig, out: Path, partitions: int | None) -> dict[str, float]:
    from fedmeta.tasks import build_federation

    if partitions is None:
        federation = build_federation(config.data, seed=config.federation.seed)
        partitions = len(federation.train_clients) + len(federation.unseen_clients)
    grid = CountingGrid(client_app, num_partitions=partitions)
    serve(grid, config, ServerOptions(out_dir=str(out)))
    seconds = [r["seconds"] for r in read_jsonl(out / "metrics.jsonl") if r.get("phase") == "meta"]
    rounds = len(seconds)
    return {
        "first_round_seconds": seconds[0],
        "steady_round_seconds": statistics.median(seconds[1:]) if rounds > 1 else seconds[0],
        "bytes_down_per_round": grid.bytes_down / rounds,
        "bytes_up_per_round": grid.bytes_up / rounds,
        "messages_per_round": grid.messages / rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--algorithm", default="reptile")
    parser.add_argument("--dataset", default="sinusoid", choices=["sinusoid", "omniglot"])
    parser.add_argument("--data-dir")
    parser.add_argument("--num-shares", type=float, default=1.0, help="SecAgg+ neighbourhood (fraction of a round)")
    parser.add_argument("--out", default="benchmarks/results/secagg_cost.jsonl")
    args = parser.parse_args()
    set_task_identity()  # the in-process Grid builds messages outside a Flower run
    root = Path(tempfile.mkdtemp(prefix="fm-secagg-", dir="/tmp"))
    for clients in args.clients:
        row: dict[str, object] = {
            "dataset": args.dataset,
            "algorithm": args.algorithm,
            "clients_per_round": clients,
            "rounds": args.rounds,
            "num_shares": args.num_shares,
            "cores": os.cpu_count(),
        }
        for secagg in (False, True):
            config = config_for(args, clients, secagg)
            name = "secagg" if secagg else "plain"
            row[name] = measure(config, root / f"{name}-{clients}", None)
            r = row[name]
            assert isinstance(r, dict)
            print(
                f"{name:6s} {clients:4d} clients: {r['steady_round_seconds']:.3f} s/round, "
                f"down {r['bytes_down_per_round'] / 1e3:.1f} kB, up {r['bytes_up_per_round'] / 1e3:.1f} kB, "
                f"{r['messages_per_round']:.0f} messages per round",
                flush=True,
            )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
