"""An in-process stand-in for Flower's Grid: messages go straight to ClientApp handlers, no Ray, no network.

It lets the ServerApp's loop and the ClientApp be tested together in milliseconds, with nodes that fail or
misbehave on purpose. Real transports are covered by tests/integration (Ray) and tests/e2e (SuperLink).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedmeta.config import RunConfig

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
