"""Start and stop real processes in tests: loopback ports, private Flower/Ray homes, stop by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

FEDMETA = [sys.executable, "-m", "simulations.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited with {process.returncode} before opening port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process and every descendant (Flower starts SuperExec helpers), then SIGKILL leftovers."""
    victims: list[psutil.Process] = []
    for process in processes:
        try:
            parent = psutil.Process(process.pid)
            victims += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for victim in victims:
        with suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(victims, timeout=10)
    for victim in alive:
        with suppress(psutil.NoSuchProcess):
            victim.kill()
    psutil.wait_procs(alive, timeout=5)
    for process in processes:
        process.wait(timeout=5)


@contextmanager
def private_homes() -> Iterator[dict[str, str]]:
    """An environment whose FLWR_HOME and RAY_TMPDIR are fresh temporary directories (short paths for Ray)."""
    with tempfile.TemporaryDirectory(prefix="fm-", dir="/tmp") as root:
        env = dict(
            os.environ,
            FLWR_HOME=str(Path(root) / "flwr"),
            RAY_TMPDIR=str(Path(root) / "ray"),
            FLWR_TELEMETRY_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
        Path(env["FLWR_HOME"]).mkdir()
        Path(env["RAY_TMPDIR"]).mkdir()
        yield env
