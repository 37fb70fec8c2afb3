"""Job events: one JSON object per line (names in :mod:`tcurlora.protocol`), plus a terminal progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import IO, Optional

from .jobs import format_size
from .protocol import EVENT_ERROR, EVENT_LOG, EVENT_PROGRESS, EVENT_RESULT, EVENT_WARNING


class Events:
    """Writes ``log``/``progress``/``warning``/``error``/``result`` events.

    ``stream``: where JSON lines go (a file, stdout for the worker, or None).  ``console``: a
    human-readable echo (stderr) with a one-line progress bar when it is a terminal.
    """

    def __init__(self, stream: Optional[IO[str]] = None, console: Optional[IO[str]] = None) -> None:
        self.stream = stream
        self.console = console
        self._bar_open = False
        self._tty = bool(console is not None and hasattr(console, "isatty") and console.isatty())

    @classmethod
    def for_cli(cls, target: Optional[str]) -> "Events":
        """``--events FILE`` (or ``-`` for stdout) plus the console on stderr."""
        if target is None:
            return cls(None, sys.stderr)
        if target == "-":
            return cls(sys.stdout, sys.stderr)
        return cls(open(target, "a", encoding="utf-8", buffering=1), sys.stderr)

    def emit(self, event: str, **fields) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if self.stream is not None:
            self.stream.write(json.dumps(record, default=_jsonable) + "\n")
            self.stream.flush()
        if self.console is not None and self.console is not self.stream:
            self._echo(record)

    def log(self, message: str) -> None:
        self.emit(EVENT_LOG, message=message)

    def warning(self, message: str) -> None:
        self.emit(EVENT_WARNING, message=message)

    def error(self, message: str) -> None:
        self.emit(EVENT_ERROR, message=message)

    def progress(self, phase: str, step: int, total: int, loss=None, dice=None, eta_s=None, **extra) -> None:
        self.emit(EVENT_PROGRESS, phase=phase, step=step, total=total, loss=_num(loss), dice=_num(dice),
                  eta_s=_num(eta_s), **extra)

    def download(self, file_name: str, done_bytes: int, total_bytes=None) -> None:
        """A download's progress in bytes (the callback of :func:`tcurlora.fetch.download_progress`)."""
        self.progress("download", done_bytes, total_bytes or 0, file=file_name, unit="bytes")

    def result(self, outputs: dict, metrics: Optional[dict] = None, cancelled: bool = False) -> None:
        self.emit(EVENT_RESULT, outputs={k: str(v) for k, v in outputs.items() if v is not None},
                  metrics=metrics or {}, cancelled=cancelled)

    def close(self) -> None:
        self._end_bar()
        if self.stream not in (None, sys.stdout, sys.stderr):
            self.stream.close()

    # console rendering ------------------------------------------------------------------------
    def _end_bar(self) -> None:
        if self._bar_open:
            self.console.write("\n")
            self._bar_open = False

    def _echo(self, r: dict) -> None:
        out = self.console
        kind = r["event"]
        if kind == EVENT_PROGRESS:
            frac = r["step"] / max(1, r["total"])
            in_bytes = r.get("unit") == "bytes"
            if in_bytes:
                parts = [f"{r['phase']} {r.get('file', '')} {format_size(r['step'], r['total'])}"]
            else:
                parts = [f"{r['phase']} {r['step']}/{r['total']}"]
            if r.get("loss") is not None:
                parts.append(f"loss {r['loss']:.4f}")
            if r.get("dice") is not None:
                parts.append(f"val Dice {r['dice']:.3f}")
            if r.get("eta_s") is not None:
                parts.append(f"ETA {_fmt_time(r['eta_s'])}")
            if self._tty:
                bar = "#" * int(30 * frac)
                out.write(f"\r[{bar:<30s}] " + "  ".join(parts) + "   ")
                self._bar_open = True
                if r["step"] >= r["total"]:
                    self._end_bar()
            elif r["step"] == r["total"] or r.get("dice") is not None or (r["step"] % 10 == 0 and not in_bytes):
                out.write("  ".join(parts) + "\n")
        elif kind == EVENT_RESULT:
            self._end_bar()
            for k, v in r["outputs"].items():
                out.write(f"{k}: {v}\n")
        else:
            self._end_bar()
            prefix = {EVENT_WARNING: "warning: ", EVENT_ERROR: "error: "}.get(kind, "")
            out.write(prefix + str(r.get("message", "")) + "\n")
        out.flush()


def _num(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, 6)


def _fmt_time(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _jsonable(obj):
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


class StopRequested(Exception):
    """A stop file appeared or SIGINT/SIGTERM arrived: save a resumable checkpoint and end."""
