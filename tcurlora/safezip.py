"""Reading members of a ZIP archive someone else made (an Auto3DSeg model zip), within limits.

A crafted zip can claim one size and inflate to another, expand a few kilobytes into gigabytes (a
decompression bomb), hold millions of entries, use a compression Python cannot read, or be damaged. Here a
member is read only when the archive has at most :data:`MAX_ENTRIES` entries, the member is stored or
deflated, its declared size is within the caller's limit, its compression ratio is at most :data:`MAX_RATIO`,
and it inflates to exactly its declared size with the right CRC-32. Anything else is one
:class:`~tcurlora.errors.InputError` naming the archive (and member), never a ``BadZipFile`` or a traceback.

Standard library only.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import List, Union

from .errors import InputError, display_name
from .userfiles import open_regular

PathLike = Union[str, "os.PathLike[str]"]

MAX_ENTRIES = 10_000
#: Uncompressed size / compressed size above which a member is taken for a decompression bomb (model
#: weights compress about 1.1:1, text tables about 5:1, a bomb 1000:1).
MAX_RATIO = 100
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
_CHUNK = 1 << 20


class SafeZip:
    """An archive opened for reading its members one at a time (use as a context manager).

    Args:
        path: the ``.zip`` file (a regular file).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        self._file = open_regular(self.path, "zip archive")
        try:
            self._zip = zipfile.ZipFile(self._file)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            self._file.close()
            raise InputError(self.path, f"is not a readable zip archive ({_reason(exc)})") from None
        if len(infos) > MAX_ENTRIES:
            self.close()
            raise InputError(self.path, f"holds {len(infos):,} entries; a model zip may hold at most {MAX_ENTRIES:,}")
        self._infos = {info.filename: info for info in infos}

    def __enter__(self) -> "SafeZip":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def names(self) -> List[str]:
        """The member names, in archive order."""
        return list(self._infos)

    def read(self, name: str, max_bytes: int) -> bytes:
        """Member ``name`` inflated and checked (method, declared size, ratio, length, CRC-32)."""
        where = member_name(self.path, name)
        info = self._infos.get(name)
        if info is None:
            raise InputError(f"{where}: is not in the archive")
        if info.compress_type not in _METHODS:
            method = zipfile.compressor_names.get(info.compress_type, f"method {info.compress_type}")
            raise InputError(f"{where}: is compressed with {method}; model zips use {' or '.join(_METHODS.values())}")
        if info.flag_bits & 0x1:
            raise InputError(f"{where}: is encrypted")
        if info.file_size > max_bytes:
            raise InputError(f"{where}: is {info.file_size:,} bytes; it may be at most {max_bytes:,}")
        if info.file_size > MAX_RATIO * max(info.compress_size, 1) + 1024:
            raise InputError(f"{where}: inflates {info.compress_size:,} bytes to {info.file_size:,} (more than "
                                    f"{MAX_RATIO}:1): refused as a decompression bomb")
        chunks, total = [], 0
        try:
            with self._zip.open(info) as member:  # stops at the declared size, checks the CRC at its end
                while True:
                    chunk = member.read(_CHUNK)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > info.file_size:
                        raise InputError(f"{where}: inflates beyond its declared size")
                    chunks.append(chunk)
        except InputError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError,
                zlib.error) as exc:
            raise InputError(f"{where}: is damaged ({_reason(exc)})") from None
        if total != info.file_size:
            raise InputError(f"{where}: is damaged ({total:,} of {info.file_size:,} bytes)")
        return b"".join(chunks)


def member_name(path: PathLike, name: str) -> str:
    """How messages name member ``name`` of the archive ``path``: ``model.zip:labels.csv``."""
    return f"{display_name(path)}:{name.rsplit('/', 1)[-1]}"


def member_path(path: PathLike, name: str) -> str:
    """A path whose :func:`~tcurlora.errors.display_name` is :func:`member_name` (for ``InputError(path, ...)``)."""
    return os.path.join(os.path.dirname(os.fspath(path)), member_name(path, name))


def is_zip(path: PathLike) -> bool:
    """True for a regular file with a zip archive's end record (``zipfile.is_zipfile``; never opens a FIFO)."""
    try:
        with open_regular(path) as f:
            return zipfile.is_zipfile(f)
    except InputError:
        return False


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__
