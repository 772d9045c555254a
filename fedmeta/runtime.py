"""Process-level settings of the compute engine: which device, how many threads, and how the C allocator
treats big tensors."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

import torch

from fedmeta.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def resolve_device(name: str) -> torch.device:
    """cpu, cuda or auto (cuda if this torch build sees a GPU); a clear error when cuda is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(
            f"compute.device is 'cuda' but torch {torch.__version__} ({build}) sees no GPU; "
            "use --device cpu or auto, or install a CUDA build of torch on a machine with a GPU"
        )
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"compute.device must be one of ('cpu', 'cuda', 'auto'), got {name!r}")
    return torch.device(name)


def choose_threads(config: RunConfig, *, one_client_per_process: bool = False) -> int:
    """torch's intra-op threads for this process's work: `compute.threads` when set, else 1 for a process that
    computes one Flower client (Ray or a SuperNode: the clients are the parallelism) and for the tiny sinusoid
    MLP (a second thread only adds synchronisation, and spins against any other busy process), else every core
    this process may use (Conv4 on Omniglot)."""
    if config.compute.threads:
        return config.compute.threads
    if one_client_per_process or config.data.dataset == "sinusoid":
        return 1
    return usable_cores()


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def apply_threads(config: RunConfig, *, one_client_per_process: bool = False) -> int:
    """Set torch's thread count by `choose_threads`; returns it."""
    threads = choose_threads(config, one_client_per_process=one_client_per_process)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def tune_allocator() -> bool:
    """Keep freed tensor memory in the process instead of returning it to the OS after every operation.

    glibc serves large allocations with mmap and unmaps them on free, so each of the engine's big temporaries
    is page-faulted in afresh: the batched MAML step on Conv4 runs 1.22x faster, ProtoNet 1.33x, with the
    thresholds raised (benchmarks/RESULTS.md).
    Raising the mmap and trim thresholds (as jemalloc/tcmalloc would behave) removes that. Linux/glibc only;
    elsewhere a no-op. Returns whether the thresholds were set.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    _tuned = ok
    log.debug("allocator thresholds %s", "raised" if ok else "unchanged")
    return ok


def cpu_description() -> str:
    """The CPU's model name, its core count and the vector instructions torch's kernels use here, e.g. "AMD EPYC,
    2 cores, AVX2": benchmark rows carry it, since the same code runs several times faster on one machine than
    another (AVX-512 or not, another tenant or none)."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {usable_cores()} cores, {torch.backends.cpu.get_cpu_capability()}"
