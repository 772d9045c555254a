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


class LocalDeployment:
    """A SuperLink and SuperNodes as real processes on 127.0.0.1 (`fedmeta server` / `fedmeta client`), each
    logging to its own file under `logs`. `stop_all()` stops every process and its descendants by PID."""

    def __init__(self, env: dict[str, str], logs: Path, cwd: Path, extra: list[str] | None = None) -> None:
        self.env, self.logs, self.cwd = env, logs, cwd
        self.extra = extra if extra is not None else ["--insecure"]
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[int, subprocess.Popen] = {}
        self._all: list[subprocess.Popen] = []

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.logs / log_name, "a")  # noqa: SIM115 - lives as long as the process
        process = subprocess.Popen([*FEDMETA, *args], cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own descriptor
        self._all.append(process)
        return process

    def start_superlink(self, *args: str) -> None:
        self.superlink = self._start(["server", *self.extra, "--port", str(self.port), *args], "superlink.log")
        wait_for_port(self.port, self.superlink)

    def start_supernode(self, partition: int, num_partitions: int, *args: str) -> subprocess.Popen:
        process = self._start(
            [
                "client",
                *self.extra,
                "--superlink",
                self.address,
                "--partition",
                str(partition),
                "--num-partitions",
                str(num_partitions),
                "--port",
                str(free_port()),
                *args,
            ],
            f"supernode{partition}.log",
        )
        self.supernodes[partition] = process
        return process

    def stop_all(self) -> None:
        stop(self._all)
