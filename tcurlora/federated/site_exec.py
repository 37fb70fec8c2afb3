"""A site's task launcher: Flower's ClientApp process runs only for the federation's own app, pinned by hash.

Flower's SuperNode runs whatever Flower App Bundle (FAB) a run names: its default launcher
(``flower-superexec``) starts ``flwr-clientapp``, which installs the FAB and imports the ClientApp the FAB's
``pyproject.toml`` names, code included.  ``tcurlora federated client`` starts its SuperNode with
``--isolation process`` instead, and this launcher in its place: it takes each task from the SuperNode's
Runtime API (on 127.0.0.1) and starts Flower's ``flwr-clientapp`` for it only when the task's FAB hash is
:func:`app_hash` (the SHA-256 of the FAB ``flwr run`` builds from this tcurlora's ``flower_app``, which holds
configuration only and names the installed ``tcurlora.federated.client_app``).  The SuperNode keeps a FAB
under the SHA-256 of its content and refuses one that does not match, so the hash pins the content.  Any
other task is answered with an error (``INVALID_FAB``) naming both hashes; its FAB is never installed or
imported.

Run as ``python -m tcurlora.federated.site_exec --runtime-api-address 127.0.0.1:PORT --app-hash HEX``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import re
import subprocess
import sys
import time

from . import APP_DIR

POLL_S = 0.5
SHA256 = re.compile(r"[0-9a-f]{64}")


@functools.lru_cache(maxsize=1)
def app_hash() -> str:
    """SHA-256 of the federation's FAB, built by Flower's own builder (what ``flwr run`` submits)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(APP_DIR)).hexdigest()


def runtime_client(address: str, token: str = ""):
    """A client of the SuperNode's Runtime API (plain HTTP on loopback), as Flower's own launcher makes it."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def launch_clientapp(address: str, token: str) -> subprocess.Popen:
    """Flower's ClientApp process for one task (runtime dependencies are never installed)."""
    from .processes import flower_command

    return subprocess.Popen([flower_command("flwr-clientapp"), "--runtime-api-address", address, "--token", token,
                             "--insecure"])


def refuse(address: str, token: str, reason: str) -> None:
    """Answer a task with an error reply and end it as failed, without installing or importing its FAB."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = runtime_client(address, token)
    context = None
    try:
        message, context, _, _ = pull_task_input(client)  # the FAB comes back as bytes; nothing reads it
        push_message(client, Message(Error(ErrorCode.INVALID_FAB, reason), reply_to=message), context)
    finally:
        push_task_output(client, context, SubStatus.FAILED, reason)
        client.close()


def serve(address: str, expected: str, log=print, launch=launch_clientapp) -> None:
    """Take the SuperNode's tasks one by one until killed: ``launch(address, token)`` for the federation's
    app, :func:`refuse` for any other.  (The ClientApp processes stay in this process's group: stopping the
    launcher's group stops them too.)"""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType

    client = runtime_client(address)
    while True:
        answer = client.AcquireTask(AcquireTaskRequest(supported_task_types=[str(t) for t in TaskType]))
        if answer.HasField("task") and answer.token:
            task = answer.task
            if task.type == TaskType.CLIENT_APP and task.fab_hash == expected:
                launch(address, answer.token)
            else:
                named = task.fab_hash[:12] if SHA256.fullmatch(task.fab_hash) else "(not a hash)"
                reason = (f"this site runs only the tcurlora federation's ClientApp (app {expected[:12]}), "
                          f"not {task.type} of app {named}; refused")
                log(f"run {task.run_id}: {reason}")
                try:
                    refuse(address, answer.token, reason)
                except Exception as exc:  # noqa: BLE001 - Flower's own expiry answers the task then
                    log(f"run {task.run_id}: the refusal did not reach the SuperNode ({type(exc).__name__})")
        time.sleep(POLL_S)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tcurlora.federated.site_exec", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", required=True, metavar="127.0.0.1:PORT",
                        help="the SuperNode's Runtime API")
    parser.add_argument("--app-hash", required=True, metavar="HEX", help="the only FAB hash whose tasks run")
    args = parser.parse_args(argv)

    def log(text):
        print(f"tcurlora site: {text}", file=sys.stderr, flush=True)

    log(f"running only the federation's app {args.app_hash[:12]}")
    serve(args.runtime_api_address, args.app_hash, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
