"""One small metrics sink: JSON lines, one object per event, easy to plot with pandas or jq."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class JsonlSink:
    """JSONL file; each `write` is flushed so a killed run keeps every finished round.

    A new run starts the file afresh (`append=False`), so two runs into one directory never mix their rows.
    """

    def __init__(self, path: Path | str, *, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    kept = [r for r in rows if r.get("phase") == phase and isinstance(r.get("round"), int) and r["round"] <= last_round]
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), encoding="utf-8")
    partial.replace(path)
    return len(kept)


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
