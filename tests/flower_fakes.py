"""An in-process stand-in for Flower's Grid: messages go straight to ClientApp handlers, no Ray, no network.

It lets the ServerApp's loop and the ClientApp be tested together in milliseconds, with nodes that fail or
misbehave on purpose. Real transports are covered by tests/integration (Ray) and tests/e2e (SuperLink).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedmeta.config import RunConfig
from fedmeta.metrics import read_jsonl

Handler = Callable[[Message, Context], Message]

# A federation of 4 training + 2 unseen sinusoid clients, small enough for a whole run in well under a second.
SMALL = {
    "data.num_train_clients": 4,
    "data.num_unseen_clients": 2,
    "federation.rounds": 3,
    "federation.clients_per_round": 3,
    "federation.tasks_per_client": 2,
    "eval.eval_clients": 2,
    "eval.eval_tasks_per_client": 3,
    "inner.eval_steps": 2,
    "eval.fedavg_rounds": 0,
}


def small(**overrides: object) -> RunConfig:
    return RunConfig().replace(**{**SMALL, **overrides})


WALL_CLOCK = ("seconds", "elapsed", "run_id")  # and the run id, which names each run


def assert_same_results(results: dict[str, Any], reference: dict[str, Any], *, rel: float = 1e-12) -> None:
    """Two summaries' `results` (every model, every k-step figure) agree, floats within `rel`."""

    def walk(a: object, b: object, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            assert a.keys() == b.keys(), where
            for key in a:
                walk(a[key], b[key], f"{where}.{key}")
        elif isinstance(a, list) and isinstance(b, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{where}[{i}]")
        elif isinstance(a, float) and isinstance(b, float):
            assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-15), (where, a, b)
        else:
            assert a == b, (where, a, b)

    walk(results, reference, "results")


def meta_rows(path: Path) -> list[dict[str, Any]]:
    """The meta-learning rounds of a run's metrics.jsonl (without the baseline's rounds and the final row)."""
    return [row for row in read_jsonl(path) if row["phase"] == "meta"]


def assert_same_rows(rows: list[dict[str, Any]], reference: list[dict[str, Any]], *, rel: float = 1e-12) -> None:
    """Two runs' metrics.jsonl rows are the same: same keys, same values, floats within `rel` (a norm over an
    array decoded from a message may sum in another order), wall-clock fields and run ids left out."""
    assert len(rows) == len(reference)
    for row, ref in zip(rows, reference, strict=True):
        assert row.keys() == ref.keys()
        for key, value in row.items():
            if key in WALL_CLOCK:
                continue
            if isinstance(value, float):
                assert math.isclose(value, ref[key], rel_tol=rel), (key, value, ref[key])
            else:
                assert value == ref[key], (key, value, ref[key])


class InProcessGrid(Grid):
    """Nodes 1..N with partition ids 0..N-1; `handlers` may replace a node's ClientApp (to make it fail)."""

    def __init__(self, client_app: ClientApp, num_partitions: int, handlers: dict[int, Handler] | None = None) -> None:
        self.contexts = {
            p + 1: Context(
                run_id=1,
                node_id=p + 1,
                node_config={"partition-id": p, "num-partitions": num_partitions},
                state=RecordDict(),
                run_config={},
            )
            for p in range(num_partitions)
        }
        self.handlers: dict[int, Handler] = {n: client_app for n in self.contexts}
        self.handlers.update(handlers or {})
        self.sent: list[Message] = []

    def set_run(self, run: object) -> None:  # pragma: no cover - not used by MetaServer
        raise NotImplementedError

    @property
    def run(self) -> object:  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            try:
                # Each node gets its own copy, as over a network (handlers may modify what they receive).
                reply = self.handlers[node](copy.deepcopy(message), self.contexts[node])
            except Exception as error:  # noqa: BLE001 - what Flower's SuperNode does: the error travels back
                reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            if reply is not None:  # None: the node never answers (a timeout)
                replies.append(reply)
        return replies


def set_task_identity() -> tuple[object, object, object]:
    """Flower creates messages inside a run; outside one its TaskIdentity must be set by hand."""
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return old


def restore_task_identity(old: tuple[object, object, object]) -> None:
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old  # type: ignore[assignment]
