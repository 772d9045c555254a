"""One small metrics sink: JSON lines, one object per event, easy to plot with pandas or jq."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

START = "start"  # the first row of a run's metrics.jsonl: {"phase": "start", "run_id": ...}


class JsonlSink:
    """JSONL file; each `write` is flushed so a killed run keeps every finished round.

    A new run starts the file afresh (`append=False`), so two runs into one directory never mix their rows.
    """

    def __init__(self, path: Path | str, *, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(finite_or_null(record), sort_keys=True, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float (an infinite epsilon, a NaN loss) replaced by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def write_json(path: Path | str, value: Any) -> None:
    """Strict JSON (RFC 8259 has no Infinity or NaN: they are written as null, e.g. the epsilon of a run with
    noise multiplier 0), so that any JSON parser reads summary.json."""
    Path(path).write_text(json.dumps(finite_or_null(value), indent=2, allow_nan=False), encoding="utf-8")


def keep_rounds(path: Path | str, *, phase: str, last_round: int) -> int:
    """Before a resume: keep the rows of `phase` up to `last_round` (the checkpoint's), drop the rest - rounds
    logged after the last checkpoint and anything a killed run wrote later. Returns the rows kept."""
    path = Path(path)
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
    kept = [
        r
        for r in rows
        if r.get("phase") == START
        or (r.get("phase") == phase and isinstance(r.get("round"), int) and r["round"] <= last_round)
    ]
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), encoding="utf-8")
    partial.replace(path)
    return len(kept)


def run_id_of(path: Path | str) -> str | None:
    """The run id in the first row of a metrics.jsonl (None if there is no such file or row)."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        try:
            first = json.loads(f.readline() or "{}")
        except json.JSONDecodeError:
            return None
    return first.get("run_id") if first.get("phase") == START else None


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
