"""Round time of a preset through `simulations.inprocess.simulate`, with and without glibc's allocator thresholds
raised (`fedmeta.runtime.tune_allocator`), side by side: each condition in its own fresh process (the
thresholds are process-wide and cannot be lowered again), alternating, nothing else running.

    python benchmarks/allocator_rounds.py --data-dir ../shared/data --preset omniglot-protonet \
        --set data.conv_downsample=maxpool --rounds 25 --repeats 2

Prints the mean round time of each condition (rounds after the third) and the ratio. Linux/glibc only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, sys
from pathlib import Path
import simulations.inprocess as inprocess
from fedmeta.config import RunConfig, parse_override
from simulations.cli import load_preset

condition, preset, data_dir, rounds, out, *overrides = sys.argv[1:]
if condition == "untuned":
    inprocess.tune_allocator = lambda: False  # what benchmarks/omniglot_accuracy.py ran with before 7819886
config = RunConfig.from_dict(load_preset(preset)).replace(
    **{"data.data_dir": data_dir, "federation.rounds": int(rounds), "federation.time_budget": None,
       "eval.curve_every": 0, "eval.eval_clients": 1, "eval.eval_tasks_per_client": 1},
    **dict(parse_override(o) for o in overrides),
)
inprocess.simulate(config, Path(out), progress=False)
"""


def round_seconds(condition: str, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-c", _CHILD, condition, args.preset, args.data_dir, str(args.rounds), out]
        subprocess.run([*command, *args.set], check=True, cwd=ROOT, capture_output=True)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return float(np.mean([r["seconds"] for r in rows if r.get("phase") == "meta"][3:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--preset", default="omniglot-protonet")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"untuned": [], "tuned": []}
    for repeat in range(args.repeats):
        for condition in times:
            times[condition].append(round_seconds(condition, args))
            print(f"repeat {repeat + 1}: {condition} {times[condition][-1]:.3f} s a round", flush=True)
    untuned, tuned = (float(np.mean(times[c])) for c in ("untuned", "tuned"))
    print(f"{args.preset} {' '.join(args.set)}: untuned {untuned:.3f} s, tuned {tuned:.3f} s, {untuned / tuned:.2f}x")


if __name__ == "__main__":
    main()
