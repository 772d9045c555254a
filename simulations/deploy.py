"""A real deployment on Flower's SuperLink and SuperNodes, wrapped for the common case.

`fedmeta server` runs a SuperLink, `fedmeta client` one SuperNode holding one client partition, and
`fedmeta run` submits the app with `flwr run` and then checks the run's final status (`flwr run` itself
can exit 0 for a run that failed). Each command prints the exact Flower command it runs, so nothing here
is needed to deploy by hand.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import IO

import tomli_w

APP_DIR = Path(__file__).resolve().parents[1]  # the repository root: pyproject.toml with [tool.flwr.app]


APP_PRESET = "sinusoid-loopback"  # the experiment of the app config
# Run-config keys that name paths: made absolute (against the caller's directory) before Flower sees them,
# since the ServerApp and ClientApps run in other working directories.
PATH_KEYS = ("server.out_dir", "data.data_dir")


SUBMIT_TIMEOUT = 60.0  # seconds for `flwr run` to hand the run to the SuperLink (it retries a dead address forever)


class DeployError(RuntimeError):
    """A deployment command failed for a reason the user can fix (reported in one line)."""


def parse_run_config(items: list[str]) -> dict[str, object]:
    """`KEY=VALUE` pairs as Flower parses them (VALUE is TOML), checked against the app config and validated as a
    fedmeta config before anything is submitted; path values made absolute."""
    from server.grid import parse_run_config as split

    known = app_config()
    overrides: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DeployError(f"--run-config {item!r} is not KEY=VALUE")
        if key not in known:
            close = sorted(k for k in known if k.split(".")[0] == key.split(".")[0]) or sorted(known)
            raise DeployError(f"unknown run-config key {key!r}; known keys here: {', '.join(close)}")
        try:
            value = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            raise DeployError(
                f'the value of {key} ({raw}) is not a TOML value; strings need quotes: {key}="{raw}"'
            ) from None
        if key in PATH_KEYS and isinstance(value, str) and value:
            value = str(Path(value).expanduser().resolve())
        overrides[key] = value
    try:
        split({**known, **overrides})  # the same checks and messages as `fedmeta simulate`
    except (ValueError, TypeError) as error:
        raise DeployError(f"bad run config: {error}") from None
    return overrides


def encode_run_config(overrides: dict[str, object]) -> list[str]:
    """Back to `KEY=VALUE` pairs (TOML values), as `flwr run --run-config` takes them."""
    return [f"{key}={tomli_w.dumps({'v': value}).removeprefix('v = ').strip()}" for key, value in overrides.items()]


def app_config() -> dict[str, object]:
    """What `[tool.flwr.app.config]` in pyproject.toml must hold, derived from the dataclasses alone: every
    RunConfig key (Flower refuses `--run-config` keys the app config lacks) with `APP_PRESET`'s values over the
    defaults, and every `server.*` option with its default; "" for an unset optional value (TOML has no null)."""
    from fedmeta.config import RunConfig
    from server.grid import SERVER_PREFIX, ServerOptions
    from simulations.cli import load_preset

    config = RunConfig.from_dict(load_preset(APP_PRESET))
    flat: dict[str, object] = {"algorithm": config.algorithm}
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": "" if v is None else v for k, v in values.items()})
    flat.update({SERVER_PREFIX + k: v for k, v in dataclasses.asdict(ServerOptions()).items()})
    return flat


def app_config_toml() -> str:
    """The app config table as TOML, to paste into pyproject.toml (`python -m simulations.deploy`)."""
    return "[tool.flwr.app.config]\n" + tomli_w.dumps(app_config())


def flower_env() -> dict[str, str]:
    """Flower's executables from this environment first on PATH; telemetry off unless the user set it."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def superlink_command(
    *, host: str, port: int, insecure: bool, certificates: Path | None = None, node_auth: bool = False
) -> list[str]:
    command = [
        "flower-superlink",
        "--host",
        host,
        "--port",
        str(port),
        # Never `uv sync` the app at run time: it could download a CUDA build of torch.
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        command.append("--insecure")
    elif certificates is not None:
        command += [
            "--ssl-ca-certfile",
            str(certificates / "ca.crt"),
            "--ssl-certfile",
            str(certificates / "server.pem"),
            "--ssl-keyfile",
            str(certificates / "server.key"),
        ]
    if node_auth:
        command.append("--enable-supernode-auth")
    return command


def supernode_command(
    *,
    superlink: str,
    partition: int,
    num_partitions: int,
    port: int,
    insecure: bool,
    data_dir: str | None = None,
    device: str | None = None,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    max_retries: int | None = None,
    max_wait: float | None = None,
) -> list[str]:
    if not 0 <= partition < num_partitions:
        raise ValueError(f"partition {partition} is out of range 0..{num_partitions - 1}")
    node_config = f"partition-id={partition} num-partitions={num_partitions}"
    if data_dir is not None:
        node_config += f' data-dir="{data_dir}"'
    if device is not None:
        node_config += f' device="{device}"'
    command = [
        "flower-supernode",
        "--superlink",
        superlink,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        node_config,
    ]
    if insecure:
        command.append("--insecure")
    elif root_certificates is not None:
        command += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait is not None:
        command += ["--max-wait-time", f"{max_wait:g}"]
    return command


def run_supernode(command: list[str], env: dict[str, str], *, superlink: str, port: int, auth_key: Path | None) -> int:
    """Run flower-supernode with its output passed through; when it fails, end with one line that says why.

    Flower's own words for a refused key are "could not establish a connection" (only the SuperLink's log
    names the reason), a port clash is a traceback, and a SuperNode that gives up leaves its SuperExec process
    behind, retrying for ever. So the wrapper stays the parent of a process group of its own: it relays the
    output, forwards SIGTERM/SIGINT/SIGHUP to the SuperNode, stops whatever the SuperNode left in its group
    when it exits, and returns its exit status."""
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    tail: collections.deque[str] = collections.deque(maxlen=400)
    relay = threading.Thread(target=_relay, args=(process.stdout, sys.stderr, tail), daemon=True)
    relay.start()
    forwarded = {sig: signal.signal(sig, lambda number, _: process.send_signal(number)) for sig in FORWARDED}
    try:
        code = process.wait()
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the group's leftovers (the pipe closes once they are gone)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
            relay.join(timeout=10)
            if not relay.is_alive():
                break
    if code not in (0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP):
        reason = supernode_failure("".join(tail), superlink=superlink, port=port, auth_key=auth_key)
        print(f"fedmeta: {reason}", file=sys.stderr, flush=True)
    return code if code >= 0 else 128 - code


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def supernode_failure(output: str, *, superlink: str, port: int, auth_key: Path | None) -> str:
    """One line naming why a SuperNode stopped, from what Flower printed."""
    if "must be registered" in output or "code: 2001" in output:
        return (
            f"the SuperLink at {superlink} refused this node: it admits only registered nodes (--node-auth); "
            "pass --auth-key with a key registered there (fedmeta register KEY.pub)"
        )
    if "Failed to activate SuperNode" in output or "code: 2004" in output:
        return (
            f"the SuperLink at {superlink} refused this node: its key {auth_key}.pub is not registered there "
            f"(register it with: fedmeta register {auth_key}.pub --root-certificates CA)"
        )
    if "failed to start" in output or "address already in use" in output.lower():
        return (
            f"this SuperNode's port 127.0.0.1:{port} is taken: another SuperNode with the same --partition on "
            "this machine? pass another --port"
        )
    if "Connection attempt failed" in output or "UNAVAILABLE" in output:
        return f"gave up on the SuperLink at {superlink}: no answer within the retries (--max-retries, --max-wait)"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return f"the SuperNode stopped: {lines[-1] if lines else 'no output'}"


def make_certificates(directory: Path, *, nodes: int = 0) -> list[Path]:
    """A local test PKI with openssl and ssh-keygen: a CA, a SuperLink certificate for 127.0.0.1/localhost,
    and `nodes` SuperNode key pairs (ECDSA P-384 in OpenSSH format, what Flower's node authentication takes).
    For loopback tests and trials; a real deployment uses certificates from its own CA."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DeployError(f"cannot create the certificate directory {directory}: {error.strerror}") from None
    d = str(directory)
    steps = [
        ["openssl", "genrsa", "-out", f"{d}/ca.key", "4096"],
        ["openssl", "req", "-new", "-x509", "-key", f"{d}/ca.key", "-sha256", "-days", "365",
         "-subj", "/O=fedmeta test CA", "-out", f"{d}/ca.crt"],
        ["openssl", "genrsa", "-out", f"{d}/server.key", "4096"],
        ["openssl", "req", "-new", "-key", f"{d}/server.key", "-subj", "/CN=localhost", "-out", f"{d}/server.csr"],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(step, check=True, capture_output=True)
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1\n")
    subprocess.run(
        ["openssl", "x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
         "-CAcreateserial", "-out", f"{d}/server.pem", "-days", "365", "-sha256", "-extfile", str(extensions)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    keys = []
    for i in range(nodes):
        key = directory / f"node-{i}"
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", "", "-f", str(key)],
            check=True,
            capture_output=True,
        )
        keys.append(key)
    return keys


def register_command(public_key: Path, connection: str) -> list[str]:
    return ["flwr", "supernode", "register", str(public_key), connection]


def register_connection(name: str, *, address: str, insecure: bool, root_certificates: Path | None = None) -> Path:
    """Add (or update) a SuperLink connection in $FLWR_HOME/config.toml for `flwr run`/`flwr ls`."""
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    config = tomllib.loads(path.read_text()) if path.is_file() else {}
    superlink = config.setdefault("superlink", {})
    superlink.setdefault("default", name)
    entry: dict[str, object] = {"address": address, "insecure": insecure}
    if root_certificates is not None:
        entry["root-certificates"] = str(root_certificates)
    superlink[name] = entry
    text = tomli_w.dumps(config).encode()
    if not path.is_file() or path.read_bytes() != text:  # rewrite only what changed
        path.write_bytes(text)
    return path


def run_command(connection: str, run_config: list[str], *, stream: bool = True) -> list[str]:
    command = ["flwr", "run", str(APP_DIR), connection, *(["--stream"] if stream else ["--format", "json"])]
    if run_config:
        # One --run-config with every pair: flwr 1.41 merges repeated --run-config options with dict.update
        # on nested keys, so "data.a=1" then "data.b=2" silently drops data.a.
        command += ["--run-config", " ".join(run_config)]
    return command


def run_status(connection: str, run_id: int, env: dict[str, str]) -> str:
    """The run's status string as the SuperLink reports it, e.g. 'finished:completed' or 'finished:failed',
    followed by ': <the reason>' when the SuperLink gives one (the ServerApp's exception, in one line)."""
    out = subprocess.run(
        ["flwr", "ls", connection, "--run-id", str(run_id), "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    runs = json.loads(out).get("runs", [])
    if not runs:
        raise RuntimeError(f"the SuperLink knows no run {run_id}")
    details = " ".join(str(runs[0].get("status-details") or "").split())
    return f"{runs[0]['status']}: {details}" if details else str(runs[0]["status"])


def submit_and_wait(
    connection: str, run_config: list[str], *, address: str = "", timeout: float = 3600.0
) -> tuple[int, str]:
    """Submit the app, stream its logs, then wait for and return (run id, final status)."""
    env = flower_env()
    try:
        submitted = subprocess.run(
            run_command(connection, run_config, stream=False),
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=SUBMIT_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise DeployError(
            f"the SuperLink at {address or connection} did not answer within {SUBMIT_TIMEOUT:g} s; is `fedmeta "
            "server` running there, and do --insecure / --root-certificates match how it was started?"
        ) from None
    try:
        run_id = int(json.loads(submitted.stdout)["run-id"])
    except (ValueError, KeyError, TypeError):
        raise DeployError(
            f"the SuperLink {address or connection} did not start the run: {_reason(submitted)}"
        ) from None
    logs = subprocess.Popen(
        ["flwr", "log", str(run_id), connection, "--stream"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    relay = threading.Thread(target=_relay, args=(logs.stdout, sys.stdout), daemon=True)
    relay.start()
    deadline = time.monotonic() + timeout
    status = run_status(connection, run_id, env)
    wait = 1.0
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(min(wait, max(deadline - time.monotonic(), 0.0)))
        wait = min(wait * 1.5, 15.0)  # back off: a long run is polled a few times a minute, not every second
        status = run_status(connection, run_id, env)
    logs.terminate()
    logs.wait(timeout=10)
    relay.join(timeout=5)
    return run_id, status


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def log_line(line: str, *, terminal: bool) -> str | None:
    """A line of the run's streamed log as `fedmeta run` shows it: as is on a terminal; in a file or pipe
    without colour codes and without Flower's DEBUG lines (None: drop it)."""
    if terminal:
        return line
    plain = ANSI.sub("", line)
    return None if plain.lstrip().startswith("DEBUG") else plain


def _relay(source: IO[str] | None, sink: IO[str], tail: collections.deque[str] | None = None) -> None:
    """Copy `source` to `sink` line by line (as `log_line` shows it); with `tail`, keep every line there too
    (colour codes removed, DEBUG lines included) for naming a failure afterwards. `tail` is the SuperNode's
    relay, which shows its DEBUG lines as well."""
    if source is None:
        return
    terminal = sink.isatty()
    for line in source:
        shown = log_line(line, terminal=terminal)
        if tail is not None:
            tail.append(ANSI.sub("", line))
            shown = line if terminal else tail[-1]
        if shown is not None:
            sink.write(shown)
            sink.flush()


def _reason(result: subprocess.CompletedProcess) -> str:
    """The one informative line of a failed Flower command's output (its JSON error message if it gave one)."""
    for text in (result.stdout, result.stderr):
        try:
            message = json.loads(text).get("error-message")
        except (ValueError, AttributeError):
            message = None
        if message:
            return " ".join(str(message).split())
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {result.returncode}"


def show(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)


if __name__ == "__main__":
    print(app_config_toml(), end="")
