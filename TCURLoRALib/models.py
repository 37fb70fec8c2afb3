"""Base-model choices, adapter summaries and segment-to-label mappings (pure Python, no Slicer needed).

A *model entry* is a dict: ``{"name", "title", "labels", "fingerprint", "kind", ...}`` where ``kind`` is
``"catalog"`` (from ``tcurlora.catalog.list_models()``), ``"bundle"`` (a MONAI bundle folder, ``"path"``) or
``"spec"`` (a network spec JSON + weights, ``"spec"`` and ``"weights"``). :meth:`ModelRegistry.jobBase` turns
an entry into the job file's ``"base"`` value.
"""

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tcurlora import labels as labeltables

CUSTOM_KINDS = ("bundle", "spec")
FOUND_KIND = "found"  # a base model found on this computer (its folder is the job's base)


def defaultColor(value: int) -> List[float]:
    """The engine's colour for a label value (one palette for the GUI, the worker and the files)."""
    return labeltables.default_color(value)


def catalogModels() -> List[Dict[str, Any]]:
    """The engine's catalog entries (all fields: the model card needs task, modality, intended use, licence)
    with ``kind="catalog"`` and ``cached``; [] (and a logged error) if unavailable."""
    try:
        from tcurlora.catalog import catalog, is_cached

        models = [dict(e, base_kind=e.get("kind"), cached=is_cached(e)) for e in catalog().values()]
    except Exception as exc:  # the engine package is missing or broken: the GUI must still open
        logging.error(f"TCURLoRA: cannot read the model catalog: {exc}")
        return []
    out = []
    for model in models:
        entry = dict(model)
        entry.setdefault("title", entry.get("name", "?"))
        entry.setdefault("labels", [])
        entry.setdefault("fingerprint", None)
        entry["kind"] = "catalog"
        out.append(entry)
    return out


def _bundleLabels(folder: str) -> List[Dict[str, Any]]:
    """Labels from a MONAI bundle's ``configs/metadata.json`` (``channel_def`` of the prediction), if any."""
    from tcurlora.errors import TCURLoRAError
    from tcurlora.safejson import read_json

    path = os.path.join(folder, "configs", "metadata.json")
    try:
        meta = read_json(path, "bundle metadata", strict=False)  # a shared folder: size and depth limits
        outputs = meta.get("network_data_format", {}).get("outputs", {})
        pred = outputs.get("pred") or next(iter(outputs.values()), {})
        channels = pred.get("channel_def", {})
    except (TCURLoRAError, AttributeError, StopIteration):
        return []
    labels = []
    for key, name in sorted(channels.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        if str(key).isdigit() and int(key) > 0:
            labels.append({"value": int(key), "name": str(name), "color": defaultColor(int(key))})
    return labels


def _specLabels(spec: str) -> List[Dict[str, Any]]:
    from tcurlora.errors import TCURLoRAError
    from tcurlora.safejson import read_json

    try:
        data = read_json(spec, "network spec")
    except TCURLoRAError:
        return []
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, list):
        return []
    return [dict(e) for e in labels if isinstance(e, dict) and "value" in e and "name" in e]


class ModelRegistry:
    """Catalog models plus the user's own ("Add model...") entries."""

    def __init__(self, catalog: Optional[Sequence[Dict[str, Any]]] = None,
                 custom: Sequence[Dict[str, Any]] = ()) -> None:
        self.catalog = [dict(e, kind="catalog") for e in (catalog if catalog is not None else catalogModels())]
        self.custom: List[Dict[str, Any]] = []
        for entry in custom:
            try:
                self._addCustom(dict(entry))
            except (ValueError, KeyError):
                continue

    def entries(self) -> List[Dict[str, Any]]:
        return self.catalog + self.custom

    def names(self) -> List[str]:
        return [e["name"] for e in self.entries()]

    def entry(self, name: str) -> Optional[Dict[str, Any]]:
        for e in self.entries():
            if e["name"] == name:
                return e
        return None

    def _addCustom(self, entry: Dict[str, Any]) -> Dict[str, Any]:
        if entry.get("kind") not in CUSTOM_KINDS:
            raise ValueError(f"unknown model kind {entry.get('kind')!r}")
        entry.setdefault("labels", [])
        entry.setdefault("fingerprint", None)
        self.custom = [e for e in self.custom if e["name"] != entry["name"]] + [entry]
        return entry

    def addBundle(self, folder: str) -> Dict[str, Any]:
        folder = os.path.abspath(os.fspath(folder))
        if not os.path.isdir(folder):
            raise ValueError(f"'{folder}' is not a folder (a MONAI bundle folder is needed)")
        if not os.path.isdir(os.path.join(folder, "configs")):
            raise ValueError(f"'{os.path.basename(folder)}' has no configs/ folder: it is not a MONAI bundle")
        return self._addCustom({"name": "bundle:" + folder, "title": os.path.basename(folder) + " (MONAI bundle)",
                                "kind": "bundle", "path": folder, "labels": _bundleLabels(folder)})

    def addSpec(self, spec: str, weights: str) -> Dict[str, Any]:
        spec, weights = os.path.abspath(os.fspath(spec)), os.path.abspath(os.fspath(weights))
        for path, what in ((spec, "network spec JSON"), (weights, "weights file")):
            if not os.path.isfile(path):
                raise ValueError(f"the {what} '{path}' does not exist")
        return self._addCustom({"name": "spec:" + spec + "|" + weights,
                                "title": f"{os.path.basename(spec)} + {os.path.basename(weights)}",
                                "kind": "spec", "spec": spec, "weights": weights, "labels": _specLabels(spec)})

    def ensure(self, name: str) -> Optional[Dict[str, Any]]:
        """The entry called ``name``; a custom entry is rebuilt from its name (``bundle:<folder>`` or
        ``spec:<spec>|<weights>``, as stored in a saved scene) when its files still exist; else None."""
        entry = self.entry(name)
        if entry is not None or not name:
            return entry
        try:
            if name.startswith("bundle:"):
                return self.addBundle(name[len("bundle:"):])
            if name.startswith("spec:") and "|" in name:
                spec, weights = name[len("spec:"):].split("|", 1)
                return self.addSpec(spec, weights)
        except ValueError:
            return None
        return None

    def remove(self, name: str) -> None:
        self.custom = [e for e in self.custom if e["name"] != name]

    def customEntries(self) -> List[Dict[str, Any]]:
        """JSON-serialisable custom entries, for saving in settings or the parameter node."""
        return [dict(e) for e in self.custom]

    @staticmethod
    def jobBase(entry: Dict[str, Any]) -> Any:
        kind = entry.get("kind", "catalog")
        if kind in ("bundle", FOUND_KIND):
            return entry["path"]
        if kind == "spec":
            return {"spec": entry["spec"], "weights": entry["weights"]}
        return entry["name"]

    @staticmethod
    def jobSettings(entry: Dict[str, Any]) -> Dict[str, Any]:
        """Job keys that go with the base: the fold of an nnU-Net model folder that has several."""
        return {"fold": entry["fold"]} if entry.get("fold") is not None else {}


def discoveredEntries(found: Sequence[Any]) -> List[Dict[str, Any]]:
    """Model entries for bases found on this computer (``tcurlora.models.discover.discover_models()``: dicts
    with ``kind`` such as totalsegmentator / nnunet / auto3dseg / bundle, ``name``, ``base`` = the folder to
    pass as the job's base, ``labels`` = label names, ``problem`` when it cannot be used as is). A model with a
    problem is left out (and logged); label names are shown, their values come from the model at run time."""
    entries = []
    for item in found:
        item = {"base": item} if isinstance(item, (str, os.PathLike)) else dict(item)
        path = os.fspath(item.get("base") or item.get("path") or "")
        if not path:
            continue
        if item.get("problem"):
            logging.warning(f"TCURLoRA: the model in {path} is not offered: {item['problem']}")
            continue
        what = item.get("kind") or "model"
        title = item.get("title") or item.get("name") or os.path.basename(path.rstrip(os.sep))
        names = [str(n) for n in item.get("labels") or []]
        entry = {"name": "found:" + path, "title": f"{title} ({what}, on this computer)", "kind": FOUND_KIND,
                 "source": what, "path": path, "labels": [], "labelNames": names,
                 "fingerprint": item.get("fingerprint")}
        folds = item.get("folds") or []
        if len(folds) < 2:
            entries.append(entry)
            continue
        # an nnU-Net folder trained with cross-validation: each fold is its own base (an adapter fits one)
        for fold in folds:
            entries.append(dict(entry, name=f"found:{path}#fold_{fold}", fold=int(fold),
                                title=f"{title} fold {fold} ({what}, on this computer)"))
    return entries


# ----------------------------------------------------------------------------------------------------------
# adapters


def _shortFingerprint(fingerprint: Optional[str]) -> str:
    if not fingerprint:
        return "unknown"
    text = str(fingerprint)
    if ":" in text:
        text = text.split(":", 1)[1]
    return text[:12]


def _sameFingerprint(a: str, b: str) -> bool:
    def norm(x: str) -> str:
        x = str(x).strip().lower()
        return x.split(":", 1)[1] if x.startswith("sha256:") else x

    return norm(a) == norm(b)


def labelsText(labels: Sequence[Dict[str, Any]]) -> str:
    if not labels:
        return "none"
    return ", ".join(f"{e.get('value')} {e.get('name')}" for e in labels)


def adapterSummary(manifest: Dict[str, Any]) -> str:
    """A few lines describing an adapter manifest (shown before applying it)."""
    method = manifest.get("method", {}) or {}
    base = manifest.get("base", {}) or {}
    prov = manifest.get("provenance", {}) or {}
    methodText = str(method.get("name", "?"))
    rank = method.get("rank", (method.get("config") or {}).get("rank"))
    if rank is not None:
        methodText += f" (rank {rank})"
    lines = [
        f"Labels: {labelsText(manifest.get('labels', []))}",
        f"Base model: {base.get('name', '?')} (fingerprint {_shortFingerprint(base.get('fingerprint'))})",
        f"Method: {methodText}",
    ]
    training = []
    if prov.get("cases") is not None:
        training.append(f"{prov['cases']} training case{'s' if prov['cases'] != 1 else ''}")
    if prov.get("steps") is not None:
        training.append(f"{prov['steps']} steps")
    dice = prov.get("validation_dice")
    training.append(f"validation Dice {dice:.3f}" if isinstance(dice, (int, float)) else "no validation Dice")
    lines.append("Trained on: " + ", ".join(training))
    made = [str(prov[k]) for k in ("software", "date") if prov.get(k)]
    if made:
        lines.append("Created: " + ", ".join(made))
    return "\n".join(lines)


def checkAdapterCompatibility(manifest: Dict[str, Any], entry: Optional[Dict[str, Any]]) -> Tuple[bool, str]:
    """Whether an adapter fits the selected base model: (ok, message).

    The base-weight fingerprints decide when both are known; otherwise a catalog model must at least have the
    adapter's base name. Unknown fingerprints are accepted (the worker compares them before applying).
    """
    if entry is None:
        return False, "Select a base model first."
    base = manifest.get("base", {}) or {}
    adapterBase = str(base.get("name") or "?")
    adapterFp = base.get("fingerprint")
    entryFp = entry.get("fingerprint")
    title = entry.get("title", entry.get("name"))
    if adapterFp and entryFp:
        if _sameFingerprint(adapterFp, entryFp):
            return True, f"Adapter matches the base model '{title}'."
        return False, (f"This adapter was trained on base model '{adapterBase}' (fingerprint "
                       f"{_shortFingerprint(adapterFp)}), not on the selected '{title}' (fingerprint "
                       f"{_shortFingerprint(entryFp)}). Select the base model it was trained on.")
    if entry.get("kind", "catalog") == "catalog" and adapterBase != "?" and adapterBase != entry.get("name"):
        return False, (f"This adapter was trained on base model '{adapterBase}', not on the selected "
                       f"'{title}'. Select the base model it was trained on.")
    return True, "Base-model fingerprint not known yet: the worker checks it before applying the adapter."


# ----------------------------------------------------------------------------------------------------------
# segment -> label mapping


def defaultLabelMapping(segmentNames: Sequence[str], baseLabels: Sequence[Dict[str, Any]],
                        segmentColors: Optional[Dict[str, Sequence[float]]] = None) -> List[Dict[str, Any]]:
    """One row per segment name: a segment named like a base label (case-insensitive) maps to that label;
    any other segment becomes a new label with its own name and the next free value."""
    byName = {str(e["name"]).lower(): e for e in baseLabels}
    used = {int(e["value"]) for e in baseLabels}
    rows = []
    newByName: Dict[str, int] = {}
    for name in segmentNames:
        base = byName.get(name.lower())
        if base is not None:
            rows.append({"segment": name, "include": True, "label": str(base["name"]), "value": int(base["value"]),
                         "color": list(base.get("color") or defaultColor(int(base["value"])))})
            continue
        key = name.lower()
        if key not in newByName:
            value = 1
            while value in used:
                value += 1
            used.add(value)
            newByName[key] = value
        value = newByName[key]
        color = (segmentColors or {}).get(name) or defaultColor(value)
        rows.append({"segment": name, "include": True, "label": name, "value": value, "color": list(color)})
    return rows


def mergeLabelMapping(previous: Sequence[Dict[str, Any]], segmentNames: Sequence[str],
                      baseLabels: Sequence[Dict[str, Any]],
                      segmentColors: Optional[Dict[str, Sequence[float]]] = None) -> List[Dict[str, Any]]:
    """Rows for ``segmentNames``, keeping the user's earlier choices for segments already in ``previous``."""
    old = {str(r["segment"]): r for r in previous}
    fresh = defaultLabelMapping([n for n in segmentNames if n not in old],
                                list(baseLabels) + [{"value": r["value"], "name": r["label"]}
                                                    for r in previous if r.get("include", True)],
                                segmentColors)
    freshByName = {r["segment"]: r for r in fresh}
    return [dict(old[n]) if n in old else freshByName[n] for n in segmentNames]


def labelsFromMapping(mapping: Sequence[Dict[str, Any]], baseLabels: Sequence[Dict[str, Any]]
                      ) -> Tuple[Optional[List[Dict[str, Any]]], List[Dict[str, Any]], Dict[str, int]]:
    """Check a mapping table and derive what the job needs.

    Returns ``(jobLabels, labelTable, segmentToValue)``: ``jobLabels`` is None when every used label is a base
    label (same name and value: the base's output head is fine-tuned), else the full label table (the engine
    then trains a new head); ``labelTable`` names/colours every used value; ``segmentToValue`` maps each
    included segment name to its label value. Raises ValueError with a readable message on a bad table.
    """
    rows = [r for r in mapping if r.get("include", True)]
    if not rows:
        raise ValueError("No segment is mapped to a label: tick at least one segment in the label table.")
    nameOfValue: Dict[int, str] = {}
    valueOfName: Dict[str, int] = {}
    colorOfValue: Dict[int, List[float]] = {}
    segmentToValue: Dict[str, int] = {}
    for row in rows:
        segment = str(row.get("segment", "")).strip()
        label = str(row.get("label", "")).strip()
        try:
            value = int(row.get("value"))
        except (TypeError, ValueError):
            raise ValueError(f"Segment '{segment}': label value '{row.get('value')}' is not a whole number.")
        if not label:
            raise ValueError(f"Segment '{segment}': the label name is empty.")
        if not 1 <= value <= labeltables.MAX_LABEL_VALUE:
            raise ValueError(f"Segment '{segment}': label value {value} must be between 1 and "
                             f"{labeltables.MAX_LABEL_VALUE} (0 is background).")
        if value in nameOfValue and nameOfValue[value].lower() != label.lower():
            raise ValueError(f"Label value {value} is used for both '{nameOfValue[value]}' and '{label}'.")
        if label.lower() in valueOfName and valueOfName[label.lower()] != value:
            raise ValueError(f"Label '{label}' has two values: {valueOfName[label.lower()]} and {value}.")
        nameOfValue.setdefault(value, label)
        valueOfName[label.lower()] = value
        if row.get("color") is not None:
            colorOfValue.setdefault(value, [float(c) for c in row["color"]][:3])
        segmentToValue[segment] = value
    baseByValue = {int(e["value"]): e for e in baseLabels}
    table = []
    allBase = True
    for value in sorted(nameOfValue):
        base = baseByValue.get(value)
        if base is not None and str(base["name"]).lower() == nameOfValue[value].lower():
            table.append({"value": value, "name": str(base["name"]),
                          "color": list(base.get("color") or colorOfValue.get(value) or defaultColor(value))})
        else:
            allBase = False
            table.append({"value": value, "name": nameOfValue[value],
                          "color": colorOfValue.get(value) or defaultColor(value)})
    table = labeltables.check_label_table(table)  # the rules every label table meets (names, colours, limits)
    return (None if allBase else table), table, segmentToValue
