"""Find the segmentation models already on this machine, ready to pass as ``--base``.

Where the tools keep them (each root can be replaced, see :func:`default_roots`):

* ``totalsegmentator``: TotalSegmentator's nnU-Net results, ``$TOTALSEG_HOME_DIR/nnunet/results``
  (default ``~/.totalsegmentator/nnunet/results``);
* ``nnunet``: ``$nnUNet_results`` and the model folder SlicerNNUnet was last pointed at (its
  ``SlicerNNUNet/Parameter`` setting in ``Slicer.ini``);
* ``auto3dseg``: SlicerMONAIAuto3DSeg's ``~/.MONAIAuto3DSeg/models``;
* ``bundle``: MONAI bundles downloaded with ``monai.bundle.download`` (``$TORCH_HOME/hub/bundle``, default
  ``~/.cache/torch/hub/bundle``).

Listing reads only small JSON/CSV files and file sizes: no checkpoint is opened.  A folder that cannot be
read becomes an entry with a ``problem``, never an exception.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from ..errors import InputError, TCURLoRAError, one_line
from ..safejson import JSONProblem, parse, read_json, read_json_object
from ..userfiles import read_limited

KINDS = ("totalsegmentator", "nnunet", "auto3dseg", "bundle")
MAX_SETTINGS_BYTES = 16 << 20
_TRAINER_FOLDER = re.compile(r"^[^_].*__.+__.+$")  # <trainer>__<plans>__<configuration>


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def slicer_settings_file() -> Path:
    """Slicer's user settings (``TCURLORA_SLICER_SETTINGS`` overrides where)."""
    if os.environ.get("TCURLORA_SLICER_SETTINGS"):
        return Path(os.environ["TCURLORA_SLICER_SETTINGS"])
    if os.name == "nt" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "slicer.org" / "Slicer.ini"
    return _home() / ".config" / "slicer.org" / "Slicer.ini"


def slicer_nnunet_model_path(settings: Optional[Path] = None) -> Optional[Path]:
    """The model folder saved by SlicerNNUnet (``[SlicerNNUNet] Parameter=`` JSON in Slicer.ini), if any."""
    settings = settings or slicer_settings_file()
    try:
        text = read_limited(settings, MAX_SETTINGS_BYTES, "Slicer settings file").decode("utf-8", errors="replace")
    except TCURLoRAError:  # missing, a FIFO, too large
        return None
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "SlicerNNUNet" and line.startswith("Parameter="):
            value = line[len("Parameter="):]
            if value.startswith('"') and value.endswith('"'):  # QSettings quotes and backslash-escapes strings
                value = re.sub(r'\\(.)', r"\1", value[1:-1])
            try:
                path = parse(value, strict=False).get("modelPath", {})
            except (JSONProblem, AttributeError):
                return None
            path = path.get("_path") if isinstance(path, dict) else path
            return Path(path) if isinstance(path, str) and path and "\0" not in path else None
    return None


def default_roots() -> Dict[str, List[Path]]:
    """Where each kind of model is looked for, from the environment (``HOME``, ``TOTALSEG_HOME_DIR``,
    ``nnUNet_results``, ``TORCH_HOME``, ``TCURLORA_SLICER_SETTINGS``)."""
    home = _home()
    ts_home = Path(os.environ["TOTALSEG_HOME_DIR"]) if os.environ.get("TOTALSEG_HOME_DIR") else home / ".totalsegmentator"
    nnunet = [Path(os.environ["nnUNet_results"])] if os.environ.get("nnUNet_results") else []
    slicer = slicer_nnunet_model_path()
    if slicer is not None:
        nnunet.append(slicer)
    torch_home = Path(os.environ["TORCH_HOME"]) if os.environ.get("TORCH_HOME") else home / ".cache" / "torch"
    return {"totalsegmentator": [ts_home / "nnunet" / "results"], "nnunet": nnunet,
            "auto3dseg": [home / ".MONAIAuto3DSeg" / "models"], "bundle": [torch_home / "hub" / "bundle"]}


def _size(files: Iterable[Path]) -> int:
    total = 0
    for f in files:
        try:
            total += f.stat().st_size
        except OSError:
            pass
    return total


def _walk_dirs(root: Path, depth: int) -> Iterator[Path]:
    """``root`` and its sub-folders down to ``depth`` levels, sorted, hidden ones skipped."""
    yield root
    if depth <= 0:
        return
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return
    for child in children:
        yield from _walk_dirs(child, depth - 1)


def _nnunet_entry(folder: Path, kind: str) -> dict:
    entry = {"kind": kind, "name": f"{folder.parent.name}/{folder.name}", "base": str(folder), "labels": [],
             "folds": sorted(int(p.name[5:]) for p in folder.glob("fold_*") if p.name[5:].isdigit()
                             and len(p.name) < 12),
             "size_bytes": _size(folder.glob("fold_*/checkpoint_*.pth"))}
    labels = read_json_object(folder / "dataset.json", "dataset.json", strict=False).get("labels", {})
    if not isinstance(labels, dict):
        raise InputError(folder / "dataset.json", "labels must map names to values")
    entry["labels"] = [k for k in labels if k.lower() != "background" and k != "ignore"]
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        entry["problem"] = "region-based labels"
    return entry


def _find_nnunet(root: Path, kind: str) -> List[dict]:
    found = []
    for folder in _walk_dirs(root, 3):
        if _TRAINER_FOLDER.match(folder.name) and (folder / "dataset.json").is_file() \
                and (folder / "plans.json").is_file() and any(folder.glob("fold_*/checkpoint_*.pth")):
            found.append(_entry(folder, kind, lambda: _nnunet_entry(folder, kind)))
    return found


def _find_auto3dseg(root: Path) -> List[dict]:
    from .auto3dseg import find_model, read_labels

    def entry_of(folder: Path) -> Optional[dict]:
        model = find_model(folder)
        if model is None:
            return None
        return {"kind": "auto3dseg", "name": folder.name, "base": str(folder),
                "labels": [label["name"] for label in read_labels(model[0])],
                "size_bytes": _size([model[0] / "model.pt"])}

    found = []
    for folder in list(_walk_dirs(root, 1))[1:]:
        entry = _entry(folder, "auto3dseg", lambda: entry_of(folder))
        if entry is not None:
            found.append(entry)
    return found


def _bundle_entry(folder: Path) -> dict:
    weights = [p for p in (folder / "models").glob("*") if p.suffix in (".pt", ".ts", ".safetensors")] \
        if (folder / "models").is_dir() else []
    entry = {"kind": "bundle", "name": folder.name, "base": str(folder), "labels": [], "size_bytes": _size(weights)}
    if not weights:
        entry["problem"] = "no weights in models/"
    if (folder / "configs" / "metadata.json").exists():  # labels are optional in a bundle's metadata
        meta = read_json(folder / "configs" / "metadata.json", "bundle metadata", strict=False)
        try:
            channels = meta["network_data_format"]["outputs"]["pred"].get("channel_def", {})
            entry["labels"] = [str(v) for k, v in sorted(channels.items(), key=lambda kv: int(kv[0])) if int(k) > 0]
        except (KeyError, TypeError, ValueError, AttributeError):
            pass
    return entry


def _find_bundles(root: Path) -> List[dict]:
    found = []
    for folder in list(_walk_dirs(root, 2))[1:]:
        if any((folder / "configs" / n).is_file() for n in ("inference.json", "inference.yaml")):
            found.append(_entry(folder, "bundle", lambda: _bundle_entry(folder)))
    return found


def _entry(folder: Path, kind: str, read: Callable[[], Any]) -> Any:
    """``read()``, or for a folder that cannot be read an entry that names its problem: one bad folder never
    hides the others."""
    try:
        return read()
    except (TCURLoRAError, OSError) as exc:
        return {"kind": kind, "name": folder.name, "base": str(folder), "labels": [], "size_bytes": 0,
                "problem": str(exc)}


def discover_models(roots: Optional[Dict[str, Iterable[os.PathLike]]] = None) -> List[dict]:
    """Models found under ``roots`` (``{kind: [folder, ...]}``, default :func:`default_roots`).

    Each entry: ``kind``, ``name``, ``base`` (the path to pass as ``--base``), ``labels`` (names),
    ``size_bytes``, ``root``; nnU-Net ones also ``folds``; ``problem`` when it cannot be used as is.
    """
    roots = default_roots() if roots is None else roots
    unknown = set(roots) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown model kind(s) {sorted(unknown)}; use {', '.join(KINDS)}")
    entries: List[dict] = []
    seen = set()
    for kind in KINDS:
        for root in roots.get(kind, []):
            root = Path(root)
            if not root.is_dir():
                continue
            if kind in ("totalsegmentator", "nnunet"):
                found = _find_nnunet(root, kind)
            elif kind == "auto3dseg":
                found = _find_auto3dseg(root)
            else:
                found = _find_bundles(root)
            for entry in found:
                if entry["base"] not in seen:  # e.g. $nnUNet_results also picked in Slicer
                    seen.add(entry["base"])
                    entries.append({**entry, "root": str(root)})
    return entries


def describe(entry: dict) -> str:
    """One line: kind, name, labels, size, and the ``--base`` path; names from the folders shown with any
    character that could drive a terminal (an escape sequence in a label or folder name) as ``?``."""
    labels = [one_line(label) for label in entry["labels"]]
    shown = ", ".join(labels[:4]) + (f", ... ({len(labels)} labels)" if len(labels) > 4 else "")
    folds = f" folds {','.join(map(str, entry['folds']))};" if entry.get("folds") else ""
    problem = f"  [cannot be used: {one_line(entry['problem'])}]" if entry.get("problem") else ""
    return (f"{entry['kind']:16s} {one_line(entry['name'])}: {shown or 'no labels listed'};{folds} "
            f"{entry['size_bytes'] / 2 ** 20:.1f} MB  --base {one_line(entry['base'])}{problem}")


def discover_main(root_args: List[str], as_json: bool = False) -> int:
    """``tcurlora models --discover [--root KIND=FOLDER ...] [--json]``."""
    roots: Optional[Dict[str, List[Path]]] = None
    if root_args:
        roots = {}
        for item in root_args:
            kind, sep, folder = item.partition("=")
            if not sep or kind not in KINDS or not folder:
                raise TCURLoRAError(f"--root {item!r}: use KIND=FOLDER with KIND one of {', '.join(KINDS)}")
            roots.setdefault(kind, []).append(Path(folder))
    entries = discover_models(roots)
    if as_json:
        print(json.dumps(entries, indent=2))
    elif not entries:
        print(one_line("no models found (looked in: " + "; ".join(
            f"{k}: {', '.join(map(str, v)) or '-'}" for k, v in (roots or default_roots()).items()) + ")"))
    for entry in entries if not as_json else []:
        print(describe(entry))
    return 0


__all__ = ["discover_main", "KINDS", "default_roots", "discover_models", "describe", "slicer_nnunet_model_path"]
