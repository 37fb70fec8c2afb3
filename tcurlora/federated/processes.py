"""Starting and stopping Flower's own processes (``flower-superlink``, ``flower-supernode``, ``flwr``).

Flower keeps its state (``config.toml`` with the SuperLink connection, installed app bundles) under
``FLWR_HOME``; each launcher points it at a folder of its own, so nothing is read from or written to the
user's ``~/.flwr``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Tuple

from ..errors import TCURLoRAError

LOOPBACK = "127.0.0.1"


def flower_command(name: str) -> str:
    """A Flower executable: the one installed beside this Python (its venv), else the one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise TCURLoRAError(f"{name}: Flower's command is not installed; pip install \"tcurlora[federated]\"")
    return found


def flower_env(home) -> dict:
    """The environment of Flower's processes: Flower state in ``home``, no telemetry, and this Python's
    ``bin`` first on PATH (the SuperLink and SuperNode start ``flower-superexec``/``flwr-*app`` by name)."""
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def split_address(address: str, what: str) -> Tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TCURLoRAError(f"{what} {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def free_port() -> int:
    """A TCP port nothing listens on now (for a SuperNode's local runtime API)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Return once ``host:port`` accepts connections; fail if ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise TCURLoRAError(f"{what} stopped at start (exit status {proc.returncode}; its log is above)")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TCURLoRAError(f"{what} is not listening on {host}:{port} after {timeout:.0f} s") from None
            time.sleep(0.2)


def wait_closed(host: str, port: int, timeout: float) -> bool:
    """Wait until ``host:port`` refuses connections (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                pass
        except OSError:
            return True
        time.sleep(0.5)
    return False


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a Flower process (and the app processes it started in its process group) if still running."""
    if proc.poll() is not None:
        return
    group = hasattr(os, "killpg")  # POSIX: the whole process group; elsewhere the process alone

    def send(sig):
        try:
            os.killpg(proc.pid, sig) if group else (proc.terminate() if sig == signal.SIGTERM else proc.kill())
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        send(getattr(signal, "SIGKILL", signal.SIGTERM))
        proc.wait()


def start(cmd, home, what: str) -> subprocess.Popen:
    """Start a Flower process in its own process group (so ``stop`` ends its app subprocesses too); its output
    goes to this process's stderr."""
    try:
        return subprocess.Popen(cmd, env=flower_env(home), stdout=sys.stderr, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as exc:
        raise TCURLoRAError(f"{what}: cannot start {cmd[0]} ({exc.strerror or exc})") from None
