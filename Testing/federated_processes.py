"""Processes for the federation tests: someone else's Flower App, a Flower CLI pointed at a SuperLink, and
starting and ending processes (a test helper, not a test)."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import SUBPROCESS_ENV

STRANGER_APP = {  # someone else's Flower App: its ClientApp would read a site's inputs and leave a mark
    "pyproject.toml": """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "strangerapp"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "stranger"

[tool.flwr.app.components]
serverapp = "strangerapp.server:app"
clientapp = "strangerapp.client:app"

[tool.flwr.app.config]
out = ""
""",
    "strangerapp/__init__.py": "",
    "strangerapp/server.py": """
import json, time
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    for _ in range(120):
        nodes = list(grid.get_node_ids())
        if nodes:
            break
        time.sleep(0.5)
    replies = grid.send_and_receive(
        [Message(RecordDict({"c": ConfigRecord({"x": 1})}), n, MessageType.QUERY) for n in nodes], timeout=120)
    answers = [r.error.reason if r.has_error() else "answered" for r in replies]
    open(str(context.run_config["out"]), "w").write(json.dumps({"nodes": len(nodes), "answers": answers}))
""",
    "strangerapp/client.py": """
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    Path(str(context.node_config["out"])).with_name("STRANGER-CODE-RAN").write_text(str(dict(context.node_config)))
    return Message(RecordDict(), reply_to=message)
""",
}


def stranger_app(folder: Path) -> Path:
    for name, text in STRANGER_APP.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text.lstrip())
    return folder


def flower_env_at(folder: Path) -> dict:
    """The environment of Flower's processes with their state in ``folder`` (and the tests' thread count)."""
    from tcurlora.federated.processes import flower_env

    folder.mkdir(parents=True, exist_ok=True)
    return dict(flower_env(folder), OMP_NUM_THREADS=SUBPROCESS_ENV.get("OMP_NUM_THREADS", "1"))


def flower_home(folder: Path, address: str, ca=None) -> dict:
    """The environment of a Flower CLI whose default SuperLink is ``address`` (TLS verified by ``ca``)."""
    env = flower_env_at(folder)
    connection = f'root-certificates = "{ca}"' if ca else "insecure = true"
    (folder / "config.toml").write_text(f'[superlink]\ndefault = "x"\n[superlink.x]\naddress = "{address}"\n'
                                        f"{connection}\n")
    return env


def start_group(cmd, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen([os.fspath(c) for c in cmd], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def interrupt(proc: subprocess.Popen) -> None:
    """End a `tcurlora federated` command as Ctrl-C does (it then stops the Flower processes it started)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_port(port: int, procs, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "nothing listened"
            time.sleep(0.2)
