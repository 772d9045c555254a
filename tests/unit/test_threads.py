"""The thread policy (issue #12): torch's thread count is chosen for the work and recorded in config.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fedmeta.runtime import choose_threads
from simulations.inprocess import simulate
from tests.flower_fakes import small


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
