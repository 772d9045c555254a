"""The one encoding between fedmeta values and Flower records, used by both the ServerApp and the ClientApp.

Parameters travel by name (an ArrayRecord keyed like the parameter dict), never by position, and keep their
dtype and shape exactly: decode(encode(p)) is bit-identical to p.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

import wire
from fedmeta.types import ClientRows, ClientUpdate, CohortSum, Params


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    # C order, shape kept: np.ascontiguousarray would turn a 0-d parameter (a scalar bias) into shape (1,).
    return np.require(tensor.detach().cpu().numpy(), requirements="C")


def params_to_record(params: Params) -> ArrayRecord:
    return ArrayRecord({k: Array(_to_numpy(v)) for k, v in sorted(params.items())})


def record_to_params(record: ArrayRecord) -> Params:
    return {k: torch.from_numpy(np.array(record[k].numpy(), copy=True)) for k in record}


def update_to_content(update: ClientUpdate, *, client_id: str) -> RecordDict:
    metrics = MetricRecord({**{k: float(v) for k, v in update.metrics.items()}, wire.NUM_TASKS: update.num_tasks})
    return RecordDict(
        {
            wire.DIRECTION: params_to_record(update.direction),
            wire.METRICS: metrics,
            wire.CLIENT: ConfigRecord({wire.CLIENT_ID: client_id}),
        }
    )


def content_to_update(content: RecordDict) -> tuple[str, ClientUpdate]:
    """Decode a train reply; raises KeyError/TypeError/ValueError on a malformed one."""
    metrics = dict(content.metric_records[wire.METRICS])
    num_tasks = metrics.pop(wire.NUM_TASKS)
    if not isinstance(num_tasks, int):
        raise TypeError(f"{wire.NUM_TASKS} must be an integer, got {num_tasks!r}")
    update = ClientUpdate(
        direction=record_to_params(content.array_records[wire.DIRECTION]),
        num_tasks=num_tasks,
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
    )
    return str(content.config_records[wire.CLIENT][wire.CLIENT_ID]), update


def rows_to_content(rows: ClientRows) -> RecordDict:
    """A cohort worker's train reply: every client's row."""
    metrics = MetricRecord(
        {**{k: [float(x) for x in v] for k, v in rows.metrics.items()}, wire.NUM_TASKS: list(rows.num_tasks)}
    )
    return RecordDict(
        {
            wire.DIRECTION: params_to_record(rows.directions),
            wire.METRICS: metrics,
            wire.CLIENT: ConfigRecord({wire.CLIENT_IDS: list(rows.client_ids)}),
        }
    )


def content_to_rows(content: RecordDict) -> ClientRows:
    """Decode a cohort worker's train reply; raises KeyError/TypeError/ValueError on a malformed one."""
    metrics = dict(content.metric_records[wire.METRICS])
    num_tasks = metrics.pop(wire.NUM_TASKS)
    client_ids = content.config_records[wire.CLIENT][wire.CLIENT_IDS]
    if not isinstance(num_tasks, list) or not all(isinstance(n, int) for n in num_tasks):
        raise TypeError(f"{wire.NUM_TASKS} must be a list of integers, got {num_tasks!r}")
    if not isinstance(client_ids, list):
        raise TypeError(f"{wire.CLIENT_IDS} must be a list, got {client_ids!r}")
    return ClientRows(
        tuple(str(c) for c in client_ids),
        record_to_params(content.array_records[wire.DIRECTION]),
        tuple(num_tasks),
        {k: tuple(float(x) for x in v) for k, v in metrics.items() if isinstance(v, list)},
    )


def sum_to_content(cohort: CohortSum) -> RecordDict:
    """A cohort worker's train reply under `compute.reply = "sum"`: one model-sized total for all its clients."""
    counts = {wire.NUM_TASKS: cohort.tasks, wire.WEIGHT: cohort.weight, wire.COUNT: cohort.count}
    return RecordDict(
        {
            wire.DIRECTION: params_to_record(cohort.total),
            wire.METRICS: MetricRecord({**cohort.metrics, **counts, wire.CLIPPED: cohort.clipped}),
            wire.CLIENT: ConfigRecord(
                {
                    wire.FIRST_ID: cohort.first_id,
                    wire.REJECTED_IDS: [c for c, _ in cohort.rejected],
                    wire.REJECTED_REASONS: [reason for _, reason in cohort.rejected],
                }
            ),
        }
    )


def content_to_sum(content: RecordDict) -> CohortSum:
    """Decode a cohort worker's sum; raises KeyError/TypeError/ValueError on a malformed one."""
    metrics = dict(content.metric_records[wire.METRICS])
    tasks, count, clipped = (get_int(metrics, key) for key in (wire.NUM_TASKS, wire.COUNT, wire.CLIPPED))
    weight = metrics[wire.WEIGHT]
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        raise TypeError(f"record field {wire.WEIGHT!r} must be a number, got {weight!r}")
    client = content.config_records[wire.CLIENT]
    ids, reasons = client[wire.REJECTED_IDS], client[wire.REJECTED_REASONS]
    if not isinstance(ids, list) or not isinstance(reasons, list) or len(ids) != len(reasons):
        raise TypeError(f"{wire.REJECTED_IDS} and {wire.REJECTED_REASONS} must be lists of one length")
    names = (wire.NUM_TASKS, wire.WEIGHT, wire.COUNT, wire.CLIPPED)
    return CohortSum(
        record_to_params(content.array_records[wire.DIRECTION]),
        float(weight),
        count,
        tasks,
        {k: float(v) for k, v in metrics.items() if k not in names and isinstance(v, int | float)},
        clipped,
        tuple((str(c), str(r)) for c, r in zip(ids, reasons, strict=True)),
        str(client[wire.FIRST_ID]),
    )


def get_int_list(record: Mapping[str, Any], key: str) -> list[int]:
    """A list-of-integers field of a record, or a TypeError naming the field."""
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"record field {key!r} must be a list of integers, got {value!r}")
    return value


def get_int(record: Mapping[str, Any], key: str) -> int:
    """An integer field of a record, or a TypeError naming the field (records from the network are untrusted)."""
    value = record[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"record field {key!r} must be an integer, got {value!r}")
    return value


# -- SecAgg+: updates travel as a positional list of arrays (Flower's legacy `Parameters`) -----------------------


def update_to_arrays(update: ClientUpdate, clipping_range: float) -> list[np.ndarray]:
    """A client's direction in sorted-name order, then one statistic the secure sum averages for free: the
    fraction of coordinates outside [-R, R], which SecAgg+ clips before quantising (so the server can warn)."""
    arrays = [_to_numpy(update.direction[k]) for k in sorted(update.direction)]
    entries = sum(a.size for a in arrays)
    outside = sum(int((np.abs(a) > clipping_range).sum()) for a in arrays)
    # Sent as fraction * R, inside the range every coordinate is clipped to.
    return [*arrays, np.array([clipping_range * outside / max(entries, 1)], dtype=np.float32)]


def arrays_to_params(arrays: list[np.ndarray], template: Params) -> Params:
    """Name positional arrays after `template` (sorted names), checking count and shapes; cast to its dtypes."""
    names = sorted(template)
    if len(arrays) != len(names):
        raise ValueError(f"expected {len(names)} arrays ({', '.join(names)}), got {len(arrays)}")
    params = {}
    for name, array in zip(names, arrays, strict=True):
        if tuple(array.shape) != tuple(template[name].shape):
            raise ValueError(f"{name}: got shape {tuple(array.shape)}, expected {tuple(template[name].shape)}")
        params[name] = torch.from_numpy(np.array(array, copy=True)).to(template[name].dtype)
    return params


def arrays_to_secure_mean(arrays: list[np.ndarray], template: Params, clipping_range: float) -> tuple[Params, float]:
    """Inverse of `update_to_arrays` on the securely averaged list: (mean direction, mean out-of-range fraction)."""
    if not arrays:
        raise ValueError("empty secure aggregate")
    *direction, stats = arrays
    return arrays_to_params(direction, template), float(np.asarray(stats).reshape(-1)[0]) / clipping_range
