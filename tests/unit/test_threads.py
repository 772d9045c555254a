"""The thread policy (issue #12): torch's thread count is chosen for the work and recorded in config.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmeta.runtime import choose_threads
from simulations.inprocess import simulate
from tests.flower_fakes import small

ROOT = Path(__file__).resolve().parents[2]


def test_threads_are_chosen_for_the_work() -> None:
    cores = len(os.sched_getaffinity(0))
    assert choose_threads(small()) == 1  # the sinusoid MLP
    omniglot = small(**{"data.dataset": "omniglot", "algorithm": "protonet"})
    assert choose_threads(omniglot) == cores
    assert choose_threads(omniglot, one_client_per_process=True) == 1  # a Ray actor or a SuperNode's ClientApp
    assert choose_threads(omniglot.replace(**{"compute.threads": 3}), one_client_per_process=True) == 3


def test_the_thread_count_used_is_recorded_in_config_json(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        simulate(small(**{"federation.rounds": 1, "compute.threads": 2}), tmp_path, progress=False)
        assert torch.get_num_threads() == 2
        written = json.loads((tmp_path / "config.json").read_text())
        assert written["runtime"]["threads"] == 2 and written["compute"]["threads"] == 2
    finally:
        torch.set_num_threads(before)


_ALLOCATION_PROBE = """
import os, sys, tempfile
import torch
from simulations.inprocess import simulate
from tests.flower_fakes import small

def resident_after_free():  # MiB still resident after a 256 MiB tensor is written and freed
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page >> 20
    before = rss()
    x = torch.ones(64 << 20)
    del x
    return rss() - before

untuned = resident_after_free()
simulate(small(**{"federation.rounds": 1}), tempfile.mkdtemp(), progress=False)
print(untuned, resident_after_free())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator thresholds")
def test_simulate_keeps_big_freed_tensors_mapped_for_the_next_round() -> None:
    # Called as a library function (as benchmarks/omniglot_accuracy.py does), not only through the CLI:
    # without it, every big temporary is unmapped on free and page-faulted in again (fedmeta.runtime).
    out = subprocess.run(
        [sys.executable, "-c", _ALLOCATION_PROBE], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    untuned, tuned = (int(v) for v in out.split()[-2:])
    assert untuned < 16 and tuned >= 200, out
