"""A persistent library of training cases on disk: the corrected segmentations a clinician collects.

One folder per project (a site, a task)::

    <root>/<project>/index.json                    {"format": 1, "project", "cases": [...]}
    <root>/<project>/cases/<id>/image.nrrd         the volume (LPS NRRD, as Slicer writes it)
    <root>/<project>/cases/<id>/label.seg.nrrd     every segment of the correction, on the volume's grid

A case entry: ``{"id", "name", "added" (ISO date), "segments" [names], "colors" {name: RGB}, "validation" (bool), "dice"
({label name: Dice} of the last validation, or null), "adapter" (the adapter that Dice was measured with)}``.
The index is rewritten through a temporary file and a rename, so a crash never leaves it half-written; a
case folder is written completely before it enters the index. It survives restarting Slicer: everything is
in the files.

Needs MRML only to take a case from the scene (:meth:`CaseLibrary.addCase`) and to load one back
(:meth:`CaseLibrary.loadCase`); the rest is plain Python.
"""

import datetime
import json
import os
import re
import shutil
import uuid
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tcurlora.atomic import atomic_write_text

INDEX_NAME = "index.json"
FORMAT = 1


class CaseLibraryError(ValueError):
    """A library folder or index that cannot be used (the message names the file)."""


def safeProjectName(name: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._ -]+", "_", str(name or "").strip()).strip(" ._")
    if not text:
        raise CaseLibraryError("Give the project (site) a name.")
    return text


def projects(root: str) -> List[str]:
    """Projects (sub-folders with an index) under ``root``."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, INDEX_NAME)))


def diceByName(reference: np.ndarray, referenceNames: Dict[int, str], prediction: np.ndarray,
               predictionNames: Dict[int, str]) -> Dict[str, Optional[float]]:
    """Dice per label *name* (the two label maps may number their labels differently); only names the
    reference has."""
    valueOf = {n.lower(): v for v, n in predictionNames.items()}
    out = {}
    for value, name in sorted(referenceNames.items()):
        predicted = valueOf.get(name.lower())
        if predicted is None:
            out[name] = 0.0 if (reference == value).any() else None
            continue
        a, b = reference == value, prediction == predicted
        total = int(a.sum()) + int(b.sum())
        out[name] = None if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
    return out


class CaseLibrary:
    """The cases of one project folder."""

    def __init__(self, root: str, project: str) -> None:
        self.project = safeProjectName(project)
        self.folder = os.path.join(os.path.abspath(root), self.project)
        self.indexPath = os.path.join(self.folder, INDEX_NAME)
        if os.path.exists(self.indexPath):
            self._read()
        else:
            os.makedirs(self.folder, exist_ok=True)
            self._index = {"format": FORMAT, "project": self.project, "cases": []}
            self._write()

    # -- index

    def _read(self) -> None:
        from tcurlora.errors import TCURLoRAError
        from tcurlora.safejson import read_json

        try:
            index = read_json(self.indexPath, "case index", strict=False)  # a shared project folder: size, depth limits
        except TCURLoRAError as exc:
            raise CaseLibraryError(f"{self.indexPath}: not a readable case index ({exc})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("cases"), list):
            raise CaseLibraryError(f"{self.indexPath}: not a case index of format {FORMAT}")
        self._index = index

    def _write(self) -> None:
        atomic_write_text(self.indexPath, json.dumps(self._index, indent=1))

    def reload(self) -> None:
        self._read()

    # -- listing

    def cases(self) -> List[Dict[str, Any]]:
        return [dict(c) for c in self._index["cases"]]

    def case(self, caseId: str) -> Dict[str, Any]:
        for entry in self._index["cases"]:
            if entry["id"] == caseId:
                return entry
        raise CaseLibraryError(f"{self.indexPath}: no case '{caseId}'")

    def files(self, caseId: str) -> Dict[str, str]:
        folder = os.path.join(self.folder, "cases", self.case(caseId)["id"])
        return {"image": os.path.join(folder, "image.nrrd"), "label": os.path.join(folder, "label.seg.nrrd")}

    def segmentInfo(self):
        """Every segment name of the library's cases in first-seen order, and a colour per name (for the
        label mapping, like the scene's cases)."""
        names: List[str] = []
        colors: Dict[str, List[float]] = {}
        for entry in self._index["cases"]:
            for name in entry.get("segments", []):
                if name not in names:
                    names.append(name)
                    if name in (entry.get("colors") or {}):
                        colors[name] = entry["colors"][name]
        return names, colors

    def split(self) -> Dict[str, List[str]]:
        """Case ids for training and validation."""
        cases = self._index["cases"]
        return {"training": [c["id"] for c in cases if not c.get("validation")],
                "validation": [c["id"] for c in cases if c.get("validation")]}

    # -- changes

    def addCase(self, volumeNode, segmentationNode, name: Optional[str] = None, validation: bool = False
                ) -> Dict[str, Any]:
        """Store the volume and every segment of the segmentation (on the volume's grid) as a new case:
        :meth:`takeCase` (main thread), :meth:`writeCase` (any thread), :meth:`commitCase` (main thread)."""
        return self.commitCase(self.writeCase(self.takeCase(volumeNode, segmentationNode, name, validation)))

    @staticmethod
    def takeCase(volumeNode, segmentationNode, name: Optional[str] = None, validation: bool = False
                 ) -> Dict[str, Any]:
        """The arrays and names of a case, taken from the scene (main thread)."""
        from . import nodeio

        if volumeNode is None or segmentationNode is None:
            raise CaseLibraryError("A training case needs a volume and its (corrected) segmentation.")
        segments = nodeio.segments(segmentationNode)
        if not segments:
            raise CaseLibraryError(f"'{segmentationNode.GetName()}' has no segment to learn from.")
        values = list(range(1, len(segments) + 1))
        label = nodeio.labelArrayFromSegmentation(segmentationNode, volumeNode, [s["id"] for s in segments], values)
        if not label.any():
            raise CaseLibraryError(f"'{segmentationNode.GetName()}' has no labelled voxel inside "
                                   f"'{volumeNode.GetName()}'.")
        return {"name": name or volumeNode.GetName(), "validation": bool(validation), "label": label,
                "image": nodeio.arrayFromVolume(volumeNode), "geometry": nodeio.ijkToRAS(volumeNode),
                "labels": [{"value": v, "name": s["name"], "color": s["color"]} for v, s in zip(values, segments)]}

    def writeCase(self, case: Dict[str, Any]) -> Dict[str, Any]:
        """Write a taken case's files into a new case folder (any thread: no MRML); returns its index entry."""
        from . import nodeio

        caseId = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        folder = os.path.join(self.folder, "cases", caseId)
        partial = folder + ".partial"
        os.makedirs(partial)
        try:
            nodeio.writeVolumeArray(os.path.join(partial, "image.nrrd"), case["image"], case["geometry"])
            nodeio.writeLabelArray(os.path.join(partial, "label.seg.nrrd"), case["label"], case["geometry"],
                                   case["labels"])
            os.replace(partial, folder)
        finally:
            if os.path.isdir(partial):
                shutil.rmtree(partial, ignore_errors=True)
        return {"id": caseId, "name": case["name"], "added": datetime.datetime.now().isoformat(timespec="seconds"),
                "segments": [e["name"] for e in case["labels"]],
                "colors": {e["name"]: e["color"] for e in case["labels"]},
                "validation": case["validation"], "dice": None, "adapter": None}

    def commitCase(self, entry: Dict[str, Any]) -> Dict[str, Any]:
        """Enter a written case into the index."""
        self._index["cases"].append(entry)
        self._write()
        return dict(entry)

    def removeCase(self, caseId: str) -> None:
        entry = self.case(caseId)
        self._index["cases"] = [c for c in self._index["cases"] if c["id"] != entry["id"]]
        self._write()  # out of the index first: a crash leaves an orphan folder, never a dangling entry
        shutil.rmtree(os.path.join(self.folder, "cases", entry["id"]), ignore_errors=True)

    def setValidation(self, caseId: str, validation: bool) -> None:
        self.case(caseId)["validation"] = bool(validation)
        self._write()

    def recordDice(self, caseId: str, scores: Dict[str, Optional[float]], adapter: Optional[str]) -> None:
        entry = self.case(caseId)
        entry["dice"] = {k: (None if v is None else round(float(v), 4)) for k, v in scores.items()}
        entry["adapter"] = adapter
        self._write()

    # -- back into a scene

    def loadCase(self, caseId: str, scene):
        """(volume node, segmentation node) of a case, added to ``scene`` (preview, training)."""
        from . import nodeio

        entry = self.case(caseId)
        files = self.files(caseId)
        for path in files.values():
            if not os.path.isfile(path):
                raise CaseLibraryError(f"{path}: the case file is missing")
        volume = nodeio.readVolume(scene, files["image"], name=entry["name"])
        segmentation = nodeio.readSegmentation(files["label"], scene=scene, name=f"{entry['name']} (case)",
                                               referenceVolumeNode=volume)
        return volume, segmentation

    def labelArray(self, caseId: str):
        """(label array K-J-I, {value: segment name}) of a stored case, read from its file."""
        from .nodeio import readLabelFile

        array, _, names = readLabelFile(self.files(caseId)["label"])
        return array, names


def caseTableRows(cases: Sequence[Dict[str, Any]]) -> List[List[str]]:
    """Rows for the GUI's case table: name, use, segments, last validation Dice."""
    rows = []
    for c in cases:
        scores = [v for v in (c.get("dice") or {}).values() if v is not None]
        diceText = f"{np.mean(scores):.3f}" if scores else "-"
        rows.append([c["name"], "validation" if c.get("validation") else "training",
                     ", ".join(c.get("segments", [])), diceText])
    return rows


def diceToolTip(case: Dict[str, Any]) -> str:
    """The Dice per label of a case's last validation, one per line ("" when it has none)."""
    return "\n".join(f"{k}: {'-' if v is None else f'{v:.3f}'}" for k, v in (case.get("dice") or {}).items())
