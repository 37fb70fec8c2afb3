"""The catalog of base models shipped in ``Resources/Catalog`` (pure Python: Slicer lists it cheaply)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

from .errors import TCURLoRAError


def catalog_dirs() -> List[Path]:
    """Where catalog entries live: ``TCURLORA_CATALOG`` (extra folder), the installed package, the source tree."""
    here = Path(__file__).resolve().parent
    dirs = [Path(p) for p in os.environ.get("TCURLORA_CATALOG", "").split(os.pathsep) if p]
    dirs += [here / "_catalog", here.parent / "Resources" / "Catalog"]
    return [d for d in dirs if d.is_dir()]


def catalog() -> Dict[str, dict]:
    entries: Dict[str, dict] = {}
    for folder in catalog_dirs():
        for path in sorted(folder.glob("*.json")):
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise TCURLoRAError(f"{path.name}: invalid catalog entry ({exc})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
                raise TCURLoRAError(f"{path.name}: invalid catalog entry (needs a JSON object with a \"name\")")
            entries.setdefault(entry["name"], {**entry, "catalog_file": str(path)})
    return entries


def get_entry(name: str) -> dict:
    entries = catalog()
    if name not in entries:
        raise TCURLoRAError(f"unknown base model {name!r}; the catalog has: {', '.join(entries) or 'nothing'}"
                            " (or give a MONAI bundle folder or a network spec .json)")
    return entries[name]


def is_cached(entry: dict) -> bool:
    if entry.get("kind") == "deepbet":
        from .fetch import cache_dir

        return any((cache_dir() / "converted").glob("deepbet-1.0.2-model-*.safetensors"))
    return False


def list_models() -> List[dict]:
    """Catalog entries for display: name, title, labels, fingerprint, and whether the weights are cached."""
    return [{"name": e["name"], "title": e.get("title", e["name"]), "labels": e.get("labels", []),
             "fingerprint": e.get("fingerprint"), "licence": e.get("licence"), "source": e.get("source"),
             "cached": is_cached(e)} for e in catalog().values()]
