"""Writing outputs safely: every file is written under a temporary name and renamed, and a destination is
probed before long work so that a run never fails at its end for want of a writable folder.

Standard library only (the Slicer side writes job files with it too).
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Callable, Optional, Union

from .errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

_COMPOUND = (".seg.nrrd", ".nii.gz", ".tar.gz")


def _split_name(name: str):
    lower = name.lower()
    for ext in _COMPOUND:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    stem, ext = os.path.splitext(name)
    return stem, ext


def atomic_write(path: PathLike, write: Callable[[str], None]) -> str:
    """Run ``write(tmp)`` for a temporary name next to ``path`` (same extension, so writers pick the format),
    flush it to disk, then rename it onto ``path``: readers (and a restart after a crash or power loss) see
    the old file or the whole new one, never half of it. On any error (or interrupt) the temporary file is
    removed and ``path`` is left as it was."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = _split_name(os.path.basename(path))
    # Same folder: os.replace is atomic only within one file system.
    tmp = os.path.join(folder, f".{stem}.{uuid.uuid4().hex[:12]}.tmp{ext}")
    try:
        write(tmp)
        _sync(tmp)  # the data is on disk before the name points at it (power loss, not only a kill)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _sync(folder)  # and the rename itself
    return path


def atomic_folder(path: PathLike, write: Callable[[str], None]) -> str:
    """Run ``write(tmp)`` for a temporary folder next to ``path``, then rename it onto ``path``: a reader sees
    no folder or the whole one, never half of it. ``path`` must not exist (:class:`InputError` naming it);
    on any error the temporary folder is removed."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        raise InputError(path, "already exists; choose another output folder or remove it")
    parent = os.path.dirname(path)
    _make_folder(parent, path, "output")
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        os.mkdir(tmp)
        write(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                _sync(os.path.join(root, name))
        os.rename(tmp, path)  # refused, not merged, if a folder of that name with files appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync(parent)
    return path


def _sync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. a folder on Windows, or a file system without fsync
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: PathLike, content: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)

    return atomic_write(path, write)


def atomic_copy(src: PathLike, dest: PathLike) -> str:
    return atomic_write(dest, lambda tmp: shutil.copyfile(os.fspath(src), tmp))


PROBE_BYTES = 64 * 1024


def check_writable(path: PathLike, need_bytes: int = 0, what: str = "output") -> None:
    """Refuse (:class:`InputError` naming ``path``) unless a file can be created in ``path``'s folder (made if
    missing): a probe file is written, flushed to disk and removed. ``need_bytes``: free space the outputs
    will take; refused when the file system reports less."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(path, f"is a folder; the {what} must be a file path")
    _make_folder(folder, path, what)
    probe = os.path.join(folder, f".tcurlora-probe-{uuid.uuid4().hex[:12]}")
    try:
        with open(probe, "xb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise InputError(path, f"cannot write the {what} here ({exc.strerror or exc})") from None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    free = free_bytes(folder)
    if need_bytes and free is not None and free < need_bytes:
        raise InputError(path, f"not enough free space for the {what}: {free / 2 ** 20:.1f} MB free, "
                               f"about {need_bytes / 2 ** 20:.1f} MB needed")


def _make_folder(folder: str, path: str, what: str) -> None:
    """Make ``folder`` (and its parents); :class:`InputError` naming ``path`` when that fails."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise InputError(path, f"cannot create the {what} folder ({exc.strerror or exc})") from None


def free_bytes(folder: PathLike) -> Optional[int]:
    try:
        return shutil.disk_usage(os.fspath(folder)).free
    except OSError:
        return None
