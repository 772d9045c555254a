"""Seconds per round of the Omniglot presets, end to end (task sampling, client parts, server step, learning
curve), for this checkout's batched engine, its per-task reference path, and optionally an older commit.

    python benchmarks/round_time.py --data-dir ../shared/data --rounds 10
    python benchmarks/round_time.py --data-dir ../shared/data --rounds 10 --before 4179cf4   # + the old code
    python benchmarks/round_time.py --data-dir ../shared/data --rounds 10 --profile          # where time goes
    python benchmarks/round_time.py --data-dir ../shared/data --presets omniglot-reptile --rounds 400 \
        --curve-every 0 --before b5486d2 --repeats 3 --no-reference     # one change, in turn, three times

Every variant runs `fedmeta simulate` in its own process, one after another, with the preset's own
settings except: `--rounds` rounds, the learning curve (20 unseen clients x 2 tasks) every `--curve-every`
rounds (5; 0: none), no FedAvg baseline, and a final evaluation of 1 task per unseen client (not counted).
`--repeats` runs the variants in turn that many times (A B A B ...), for ratios on a noisy machine. Seconds
per round are the median of rounds 2..N of the `seconds` column of metrics.jsonl (training only: the loop
scores the learning curve after it), with round 1's warm-up reported apart; the learning curve's cost is in
the profile.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "round_time.jsonl"
PRESETS = ["omniglot-maml", "omniglot-fomaml", "omniglot-reptile", "omniglot-protonet"]
# The pieces of a round, by the functions that do them: the largest cumulative time among a stage's functions
# (a round's clients go through `cohort_update` together, which calls `client_update` only for clients that
# cannot be stacked; the per-task reference path calls `client_update` alone).
STAGES = {
    "sample tasks": [("sampling.py", "local_tasks")],
    "client parts": [("base.py", "cohort_update"), ("base.py", "client_update")],
    "server step": [("experiment.py", "step")],
    "learning curve": [("evaluation.py", "personalised_curves")],
}


def simulate_args(
    preset: str, rounds: int, data_dir: str, out: Path, extra: list[str], curve_every: int = 5
) -> list[str]:
    return [
        "simulate",
        "--preset",
        preset,
        "--data-dir",
        data_dir,
        "--rounds",
        str(rounds),
        "--curve-every",
        str(curve_every),
        "--fedavg-rounds",
        "0",
        "--eval-tasks",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def round_seconds(out: Path) -> tuple[float, float]:
    """(median seconds of rounds 2..N, seconds of round 1): steady state, and the first round's warm-up."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in rows if r.get("phase") == "meta"]
    return statistics.median(seconds[1:]), seconds[0]


def run_variant(label: str, preset: str, args: argparse.Namespace, *, cwd: Path, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [
            sys.executable,
            "-m",
            "simulations.cli",
            *simulate_args(preset, args.rounds, args.data_dir, out, extra, args.curve_every),
        ]
        # PYTHONPATH first: an older checkout's packages win over this checkout's editable install.
        subprocess.run(
            command, cwd=cwd, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"}, check=True, capture_output=True
        )
        steady, first = round_seconds(out)
        row = {
            "preset": preset,
            "variant": label,
            "rounds": args.rounds,
            "seconds_per_round": steady,
            "first_round": first,
        }
    print(json.dumps(row), flush=True)
    return row


def profile_round(preset: str, args: argparse.Namespace) -> dict:
    """Where the batched engine's round time goes: cumulative seconds per stage over `--rounds` rounds."""
    from simulations.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        profiler = cProfile.Profile()
        profiler.runcall(main, simulate_args(preset, args.rounds, args.data_dir, Path(tmp) / "run", []))
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    row: dict = {"preset": preset, "profile_rounds": args.rounds}
    for stage, functions in STAGES.items():
        row[stage] = round(
            max(
                sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(filename) and fn == function)
                for filename, function in functions
            ),
            2,
        )
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--before", help="also time this git commit (checked out into a temporary worktree)")
    parser.add_argument("--profile", action="store_true", help="also profile the batched engine's rounds")
    parser.add_argument("--curve-every", type=int, default=5, help="learning-curve interval in rounds (0: none)")
    parser.add_argument("--repeats", type=int, default=1, help="run the variants in turn this many times")
    parser.add_argument("--no-reference", action="store_true", help="leave out the per-task reference path")
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    rows = []
    worktree = None
    if args.before:
        worktree = Path(tempfile.mkdtemp()) / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(worktree), args.before],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    try:
        for preset in args.presets:
            for _ in range(args.repeats):
                if worktree is not None:
                    rows.append(run_variant(f"before ({args.before})", preset, args, cwd=worktree, extra=[]))
                if not args.no_reference:
                    rows.append(run_variant("per-task reference", preset, args, cwd=ROOT, extra=["--task-loop"]))
                rows.append(run_variant("batched", preset, args, cwd=ROOT, extra=[]))
            if args.profile:
                rows.append(profile_round(preset, args))
    finally:
        if worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as out:
        for row in rows:
            out.write(json.dumps({**row, "command": " ".join(sys.argv)}) + "\n")


if __name__ == "__main__":
    main()
