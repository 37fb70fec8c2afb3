"""Run the tcurlora worker in a separate process and stream its JSON events.

This is the Slicer-facing half of the job protocol (keys, defaults and checks: :mod:`tcurlora.protocol`). It imports neither ``slicer`` nor ``qt`` and
needs only the standard library, so the Slicer modules, the CLI and the tests share it::

    job = WorkerJob(segment_job(base="deepbet", inputs=[...], output=..., stop_file=...), workdir=tmp)
    job.start()
    while not job.finished:            # a GUI calls poll_events() from a timer instead of looping
        for event in job.poll_events():
            ...
    job.cleanup()                       # removes the temporary folder

The worker (``python -m tcurlora.worker JOB.json``) prints one JSON object per line on stdout
(``log``, ``progress``, ``warning``, ``error``, ``result``); anything else it prints (library warnings, a
traceback on stderr) is delivered as a ``log`` event with ``"raw": true``. When the process has ended and
all its output has been read, :class:`WorkerJob` adds one last event of its own::

    {"event": "exit", "returncode": int, "cancelled": bool, "killed": bool}

Exit status 0 = done, 2 = error, 3 = cancelled (a cancelled training leaves a resumable checkpoint; resume by
running the same job with ``"resume": true``). Cancel = create the stop file the worker polls; after a grace
period the whole process tree is killed (a process group on POSIX, ``taskkill /T`` on Windows), because
``PythonSlicer`` is a launcher that runs the real interpreter as its child.

Python 3.9 compatible (Slicer 5.8).
"""

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from . import protocol
from .atomic import atomic_write_text
from .protocol import COMMANDS, DEVICES, EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, JOB_VERSION, METHODS  # noqa: F401

DEFAULT_GRACE_S = 1.0  # stop file, then SIGTERM, then SIGKILL after CANCEL_TERM_WAIT_S: gone within 2 s
CANCEL_TERM_WAIT_S = 0.5
JOB_FILE_NAME = "job.json"
STOP_FILE_NAME = "STOP"
WORKDIR_PREFIX = "tcurlora-"


def new_workdir(prefix: str = WORKDIR_PREFIX) -> str:
    """A fresh private temporary folder for one job."""
    return tempfile.mkdtemp(prefix=prefix)


# ----------------------------------------------------------------------------------------------------------
# job dictionaries


def _check_base(base: Any) -> Any:
    if isinstance(base, dict) and not (base.get("spec") and base.get("weights")):
        raise protocol.SettingError("base", "a network spec needs {'spec': FILE, 'weights': FILE}, got "
                                            f"{base!r}")
    return base


def segment_job(*, base: Any, inputs: Sequence[str], output: str, stop_file: str, adapter: Optional[str] = None,
                device: str = "auto", tta: Optional[bool] = None, largest_component: Optional[bool] = None,
                **settings: Any) -> Dict[str, Any]:
    """The job dictionary of a ``segment`` command, checked and completed by :func:`tcurlora.protocol.validate_job`
    (``settings``: any other segment key, e.g. ``sw_batch_size``; ``tta=None``: the base's own default). Raises
    ``ValueError`` naming the setting."""
    return protocol.validate_job({
        **settings, "version": JOB_VERSION, "command": "segment", "base": _check_base(base), "device": device,
        "stop_file": stop_file, "inputs": list(inputs), "output": output, "adapter": adapter, "tta": tta,
        "largest_component": largest_component})


def export_job(*, base: Any, adapter: str, output: str, format: Optional[str] = None, stop_file: Optional[str] = None,
               **settings: Any) -> Dict[str, Any]:
    """The job dictionary of an ``export`` command: ``adapter`` merged into ``base`` and written in the base's own
    format (``format``: default the base's) into the folder ``output``. Raises ``ValueError`` naming the setting."""
    if not adapter:
        raise protocol.SettingError("adapter", "is required (the adapter to merge into the base)")
    return protocol.validate_job({
        **settings, "version": JOB_VERSION, "command": "export", "base": _check_base(base), "adapter": adapter,
        "output": output, "format": format, "stop_file": stop_file})


def finetune_job(*, base: Any, cases: Sequence[Dict[str, str]], out: str, stop_file: str,
                 validation: Sequence[Dict[str, str]] = (), labels: Optional[Sequence[Dict[str, Any]]] = None,
                 method: str = protocol.default("method"), rank: int = protocol.default("rank"),
                 steps: int = protocol.default("steps"), lr: Optional[float] = None,
                 patch_size: Optional[Sequence[int]] = None, resume: bool = False, seed: int = protocol.default("seed"),
                 device: str = protocol.default("device"), **settings: Any) -> Dict[str, Any]:
    """The job dictionary of a ``finetune`` command (``labels=None``: the base model's labels), checked and
    completed by :func:`tcurlora.protocol.validate_job` (``settings``: any other finetune key, e.g.
    ``batch_size``). Raises ``ValueError`` naming the setting."""
    return protocol.validate_job({
        **settings, "version": JOB_VERSION, "command": "finetune", "base": _check_base(base), "device": device,
        "stop_file": stop_file, "cases": list(cases), "validation": list(validation),
        "labels": list(labels) if labels is not None else None, "method": method, "rank": rank, "steps": steps,
        "lr": lr, "patch_size": list(patch_size) if patch_size is not None else None, "out": out,
        "resume": resume, "seed": seed})


# ----------------------------------------------------------------------------------------------------------
# events


def parse_event_line(line: str, stream: str = "stdout") -> Optional[Dict[str, Any]]:
    """One output line -> one event dict; None for a blank line.

    A line holding a JSON object with a string ``"event"`` key is that event; anything else becomes
    ``{"event": "log", "message": line, "raw": True, "stream": stream}``.
    """
    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    stripped = text.strip()
    if stream == "stdout" and stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("event"), str):
            return obj
    return {"event": "log", "message": text, "raw": True, "stream": stream}


def format_eta(seconds: Optional[float]) -> str:
    """``75.2`` -> ``"1 min 15 s"``; ``None`` or negative -> ``""``."""
    if seconds is None:
        return ""
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return ""
    if seconds != seconds or seconds < 0:  # NaN or negative
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_size(done_bytes: int, total_bytes: Optional[int] = None) -> str:
    """A download's progress: ``(4_100_000, 10_252_582)`` -> ``"4.1 of 10.3 MB"``; no total -> ``"4.1 MB"``."""
    return f"{done_bytes / 1e6:.1f} of {total_bytes / 1e6:.1f} MB" if total_bytes else f"{done_bytes / 1e6:.1f} MB"


# ----------------------------------------------------------------------------------------------------------
# the process


def _kill_tree(proc: "subprocess.Popen", term_wait_s: float = 2.0) -> None:
    """Kill ``proc`` and everything it started."""
    if os.name == "nt":
        if proc.poll() is None:
            flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, creationflags=flags, check=False)
        try:
            proc.wait(timeout=term_wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
        return
    # POSIX: the worker leads its own session/process group (start_new_session=True), so its children
    # (the real interpreter behind the PythonSlicer launcher, data-loader workers) share the group id.
    pgid = proc.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        if sig == signal.SIGTERM:
            deadline = time.monotonic() + term_wait_s
            while time.monotonic() < deadline:
                if proc.poll() is not None and not _group_alive(pgid):
                    return
                time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class WorkerJob:
    """One run of the worker process on one job file.

    :param job: the job dictionary (see :func:`segment_job`, :func:`finetune_job`); ``version`` and
        ``stop_file`` (``<workdir>/STOP``) are filled in when missing.
    :param workdir: the job's temporary folder (created with :func:`new_workdir` when None). The job file is
        written there; :meth:`cleanup` removes the whole folder unless ``keep_workdir`` is set.
    :param python_executable: interpreter that runs the worker (``PythonSlicer`` inside Slicer;
        ``sys.executable`` by default).
    :param module: module run with ``-m`` (``tcurlora.worker``).
    :param script: run this script file instead of ``-m module`` (stand-in workers in tests).
    :param pythonpath: folders prepended to ``PYTHONPATH`` of the worker (where ``tcurlora`` lives).
    :param env: base environment (``os.environ`` by default); ``extra_env`` is applied on top of it.
    """

    def __init__(self, job: Dict[str, Any], workdir: Optional[str] = None, python_executable: Optional[str] = None,
                 module: str = "tcurlora.worker", script: Optional[str] = None,
                 pythonpath: Sequence[str] = (), env: Optional[Dict[str, str]] = None,
                 extra_env: Optional[Dict[str, str]] = None, keep_workdir: bool = False) -> None:
        self.workdir = os.fspath(workdir) if workdir else new_workdir()
        os.makedirs(self.workdir, exist_ok=True)
        self.job = dict(job)
        self.job.setdefault("version", JOB_VERSION)
        if not self.job.get("stop_file"):
            self.job["stop_file"] = os.path.join(self.workdir, STOP_FILE_NAME)
        self.job_path = os.path.join(self.workdir, JOB_FILE_NAME)
        self.python_executable = python_executable or sys.executable
        self.module = module
        self.script = script
        self.pythonpath = [os.fspath(p) for p in pythonpath if p]
        self.base_env = env
        self.extra_env = dict(extra_env or {})
        self.keep_workdir = keep_workdir

        self.proc: Optional[subprocess.Popen] = None
        self._events: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()
        self._cancel_requested = False
        self._killed = False
        self._finished = threading.Event()
        self._exit_emitted = False
        self._cleaned = False
        self.returncode: Optional[int] = None
        self.started_at: Optional[float] = None

    # -- properties

    @property
    def stop_file(self) -> str:
        return self.job["stop_file"]

    @property
    def command_line(self) -> List[str]:
        head = [self.python_executable]
        if self.script:
            return head + [self.script, self.job_path]
        return head + ["-m", self.module, self.job_path]

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def finished(self) -> bool:
        """True once the process has ended and all its output has been queued (the ``exit`` event included).
        Call :meth:`poll_events` until it returns nothing more to get every event."""
        return self._finished.is_set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    # -- life cycle

    def environment(self) -> Dict[str, str]:
        env = dict(os.environ if self.base_env is None else self.base_env)
        env.update(self.extra_env)
        paths = list(self.pythonpath)
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        return env

    def write_job(self) -> str:
        """Write the job file (atomically) and return its path."""
        return atomic_write_text(self.job_path, json.dumps(self.job, indent=2) + "\n")

    def start(self) -> "WorkerJob":
        if self.proc is not None:
            raise RuntimeError("this job was already started; create a new WorkerJob to run it again")
        if self._cleaned:
            raise RuntimeError("this job was cleaned up")
        self.write_job()
        if os.path.exists(self.stop_file):
            os.remove(self.stop_file)  # a stale stop file from a cancelled run must not stop a resumed one
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                                       | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        else:
            kwargs["start_new_session"] = True
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command_line, cwd=self.workdir, env=self.environment(),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        readers = [threading.Thread(target=self._read, args=(self.proc.stdout, "stdout"), daemon=True),
                   threading.Thread(target=self._read, args=(self.proc.stderr, "stderr"), daemon=True)]
        for t in readers:
            t.start()
        waiter = threading.Thread(target=self._wait, args=(readers,), daemon=True)
        waiter.start()
        self._threads = readers + [waiter]
        return self

    def _read(self, stream, name: str) -> None:
        try:
            for line in iter(stream.readline, ""):
                event = parse_event_line(line, name)
                if event is not None:
                    self._events.put(event)
        except (ValueError, OSError):  # stream closed under us (cleanup during a read)
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    def _wait(self, readers: List[threading.Thread]) -> None:
        assert self.proc is not None
        rc = self.proc.wait()
        for t in readers:
            t.join()
        self.returncode = rc
        self._events.put({"event": "exit", "returncode": rc,
                          "cancelled": rc == EXIT_CANCELLED or self._cancel_requested,
                          "killed": self._killed})
        self._finished.set()

    def poll_events(self, max_events: Optional[int] = None) -> List[Dict[str, Any]]:
        """Every event queued so far (non-blocking; safe to call from a GUI timer)."""
        events: List[Dict[str, Any]] = []
        while max_events is None or len(events) < max_events:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        return events

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until the process ended and its output was read; the return code (None on timeout)."""
        if self.proc is None:
            return None
        if not self._finished.wait(timeout):
            return None
        return self.returncode

    def cancel(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Ask the worker to stop (stop file); kill the process tree if it is still running after ``grace_s``.
        Returns at once."""
        self._cancel_requested = True
        try:
            with open(self.stop_file, "w", encoding="utf-8") as f:
                f.write("cancel\n")
        except OSError:
            pass  # the folder may be gone already; the kill below still applies
        if not self.running:
            return
        if grace_s <= 0:
            self.kill()
            return

        def kill_later() -> None:
            if not self._finished.wait(grace_s):
                self.kill(CANCEL_TERM_WAIT_S)

        threading.Thread(target=kill_later, daemon=True).start()

    def kill(self, term_wait_s: float = 2.0) -> None:
        """Kill the worker and its children now (SIGTERM, then SIGKILL after ``term_wait_s``)."""
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                return
            self._killed = True
            _kill_tree(self.proc, term_wait_s)

    def cleanup(self, timeout_s: float = 10.0) -> None:
        """Stop the process if it is still running and remove the temporary folder (unless ``keep_workdir``).
        Safe to call more than once."""
        if self.proc is not None and self.running:
            self._cancel_requested = True
            self.kill()
        if self.proc is not None:
            self._finished.wait(timeout_s)
            if os.name != "nt" and (self._cancel_requested or self._killed) and _group_alive(self.proc.pid):
                try:  # children that outlived a cancelled worker (the group still exists only because of them)
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if not self.keep_workdir and os.path.isdir(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._cleaned = True

    def __enter__(self) -> "WorkerJob":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "not started" if self.proc is None else ("running" if self.running else f"exit {self.returncode}")
        return f"WorkerJob({self.job.get('command')!r}, {self.workdir!r}, {state})"
