"""Case discovery: the (image, label) pairs of a folder (nnU-Net's imagesTr/labelsTr, or side by side)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InputError
from .images import LABEL_EXTENSIONS, PathLike, extension, stem


# Suffixes that mark a label file next to its image: X_label.nii.gz, X-label.nrrd (Slicer's labelmap default
# name), X_seg.nii.gz, X-seg..., and X.seg.nrrd (Slicer segmentation).
_LABEL_SUFFIX = re.compile(r"(?:[_-](?:label|labels|seg|segmentation)|\.seg)$", re.IGNORECASE)
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def volume_files(folder: Path) -> list[Path]:
    """The image, label-map and segmentation files of a folder (not its sub-folders), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and extension(p) in LABEL_EXTENSIONS)


def _find_nnunet_cases(folder: Path) -> list[tuple[str, str]]:
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    labels: dict[str, Path] = {}
    for p in volume_files(labels_dir):
        labels.setdefault(stem(p), p)
    cases: list[tuple[str, str]] = []
    missing: list[str] = []
    for p in volume_files(images_dir):
        case = stem(p)
        match = _CHANNEL_SUFFIX.match(case)
        if match:
            if match.group("channel") != "0000":
                raise InputError(p, "is a second input channel; only single-channel cases (_0000) are supported")
            case = match.group("case")
        label = labels.get(case) or labels.get(stem(p))
        if label is None:
            missing.append(p.name)
        else:
            cases.append((str(p), str(label)))
    if missing:
        raise InputError(labels_dir, f"no label for image(s) {', '.join(missing[:5])}"
                                     f"{', ...' if len(missing) > 5 else ''} (expected labelsTr/<case>.<ext>)")
    return cases


def find_cases(folder: PathLike) -> list[tuple[str, str]]:
    """Find (image_path, label_path) training cases in ``folder``, sorted by image name.

    Rule 1, nnU-Net layout: if ``folder`` has ``imagesTr/`` and ``labelsTr/``, each image
    ``imagesTr/<case>_0000.<ext>`` (or ``imagesTr/<case>.<ext>``) pairs with ``labelsTr/<case>.<ext>``
    (any supported extension, including ``.seg.nrrd``). Every image must have a label; other channels
    (``_0001``...) are rejected, since the models take one channel.

    Rule 2, side by side (otherwise): in ``folder`` itself (not recursive), an image ``X.<ext>`` - or a
    DICOM series sub-folder ``X/`` - pairs with exactly one of ``X_label``, ``X-label``, ``X_labels``,
    ``X_seg``, ``X-seg``, ``X_segmentation`` (any supported extension) or ``X.seg.nrrd``. Files without a
    partner are ignored; two label candidates for one image is an error.

    Supported extensions: .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd (labels also .seg.nrrd).
    Raises :class:`InputError` when the folder is missing or holds no case.
    """
    root = Path(os.fspath(folder))
    if not root.is_dir():
        raise InputError(root, "case folder not found" if not root.exists() else "is not a folder")
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        cases = _find_nnunet_cases(root)
    else:
        files = volume_files(root)
        labels: dict[str, list[Path]] = {}
        images: dict[str, Path] = {}
        for p in files:
            s = stem(p)
            m = _LABEL_SUFFIX.search(s) if extension(p) != ".seg.nrrd" else None
            if extension(p) == ".seg.nrrd":
                labels.setdefault(s, []).append(p)
            elif m:
                labels.setdefault(s[: m.start()], []).append(p)
            else:
                images.setdefault(s, p)
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            images.setdefault(d.name, d)  # a DICOM series folder named like its label
        cases = []
        for case in sorted(images):
            found = labels.get(case, [])
            if len(found) > 1:
                raise InputError(images[case], "has several label files: " + ", ".join(p.name for p in found))
            if found:
                cases.append((str(images[case]), str(found[0])))
    if not cases:
        raise InputError(root, "no (image, label) cases found; use imagesTr/ + labelsTr/, or X.nii.gz next to "
                               "X_label.nii.gz / X.seg.nrrd")
    return sorted(cases)
