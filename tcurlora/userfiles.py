"""Opening the files a user names: regular files only, and read within a size limit.

A named pipe (FIFO) given as an image, a label, an adapter, a job or a label table would block its reader for
ever, and a device file (``/dev/zero``) never ends; both are refused before they are read. Files we read
ourselves are opened without blocking and checked on the open descriptor (no window between the check and
the read); files a library opens by name (ITK, nibabel, torch) are checked just before.

Standard library only (the Slicer side reads job and label files with it too).
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO, Union

from .errors import InputError

PathLike = Union[str, "os.PathLike[str]"]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse_kind(path: PathLike, mode: int, what: str) -> InputError:
    return InputError(path, f"is {_kind(mode)}; the {what} must be a regular file")


def _stat_error(path: PathLike, exc: BaseException, what: str) -> InputError:
    if isinstance(exc, ValueError):  # os.stat("a\0b"): "embedded null byte"
        return InputError(path, "the file name holds a NUL character")
    if isinstance(exc, FileNotFoundError):
        return InputError(path, f"{what} not found" if what != "file" else "file not found")
    return InputError(path, f"cannot be read ({getattr(exc, 'strerror', None) or exc})")


def check_regular_file(path: PathLike, what: str = "file") -> int:
    """The size of ``path``, once it is known to be a regular file (symbolic links followed); otherwise an
    :class:`InputError` naming it: missing, a folder, a FIFO, a socket or a device."""
    try:
        info = os.stat(path)
    except (OSError, ValueError) as exc:
        raise _stat_error(path, exc, what) from None
    if not stat.S_ISREG(info.st_mode):
        raise _refuse_kind(path, info.st_mode, what)
    return info.st_size


def open_regular(path: PathLike, what: str = "file") -> BinaryIO:
    """``open(path, "rb")`` for a regular file only: the file is opened without blocking (a FIFO with no
    writer would block ``open`` itself), checked on its descriptor, then read as usual."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as exc:
        if isinstance(exc, IsADirectoryError):
            raise _refuse_kind(path, stat.S_IFDIR, what) from None
        raise _stat_error(path, exc, what) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse_kind(path, mode, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(path: PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The whole content of the regular file ``path``, refused (one line naming it) when it is larger than
    ``max_bytes``: a crafted file can not make the reader hold more."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise InputError(path, f"is {_megabytes(size)}; a {what} may be at most {_megabytes(max_bytes)}")
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise InputError(path, f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:  # it grew while it was read
        raise InputError(path, f"is larger than {_megabytes(max_bytes)}, the most a {what} may be")
    return data


def _megabytes(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MB" if n >= 2 ** 20 else f"{n} bytes"
