"""The label table: its check, defaults, the ``ignore`` label, label value <-> output channel, and the limits.

A *label table* is a list of ``{"value": int, "name": str, "color": [r, g, b] (0..1), "terminology": optional
str}`` (a Slicer ``TerminologyEntry`` string); background (0) is never listed. Names are case-insensitive.
A network's output channel ``c`` (1..N) is the ``c``-th label of the table in value order; channel 0 is
background.

Every reader of a label table checks it here: the job protocol, adapter manifests, the engine's image I/O
(which adds the ``.seg.nrrd`` format's own rules) and the Slicer side. Standard library only and Python 3.9
compatible: the Slicer side imports it before torch is installed.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import TCURLoRAError, shown, unsafe_character

LabelTable = List[dict]

#: Label maps are written with 8 or 16 bits (``tcurlora.io.write_segmentation``).
MAX_LABEL_VALUE = 65535
#: Characters in a label's name (an adapter manifest holds base and stack names to the same limit).
MAX_NAME = 256
KEYS = ("value", "name", "color", "terminology")
#: A label of this name (any value, case-insensitive) marks voxels nobody annotated (a partly corrected case):
#: training leaves them out of the loss and of validation; it is not an output class (nnU-Net's convention).
IGNORE_LABEL = "ignore"
#: The job's ``labels`` value that takes the table from the first Slicer segmentation.
LABELS_FROM_SEGMENTATION = "from-segmentation"

# Distinct default colours for labels without a colour (Slicer-like soft tones), as RGB in 0..1.
LABEL_PALETTE = (
    (0.502, 0.682, 0.502), (0.945, 0.839, 0.569), (0.694, 0.478, 0.396), (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310), (0.867, 0.510, 0.396), (0.565, 0.933, 0.565), (0.753, 0.408, 0.690),
    (0.863, 0.961, 0.078), (0.306, 0.247, 0.000), (1.000, 0.980, 0.863), (0.902, 0.863, 0.275),
    (0.784, 0.784, 0.922), (0.980, 0.980, 0.824), (0.957, 0.839, 0.584), (0.000, 0.592, 0.808),
)


class LabelError(TCURLoRAError, ValueError):
    """A label table that cannot be used; the message says which label and why."""


def default_color(value: int) -> List[float]:
    """The default colour of a label value (the same on every path: engine, CLI and Slicer)."""
    return [float(c) for c in LABEL_PALETTE[(int(value) - 1) % len(LABEL_PALETTE)]]


def default_label_table(values: Sequence[int]) -> LabelTable:
    """Label table for bare label values: names ``Label <v>``, default colours."""
    return [{"value": int(v), "name": f"Label {int(v)}", "color": default_color(int(v))}
            for v in sorted(set(int(v) for v in values)) if int(v) != 0]


def check_label_table(table, require_color: bool = False) -> LabelTable:
    """A label table checked and normalised: a new list sorted by value, names stripped, every label with a
    colour (a missing one gets :func:`default_color` unless ``require_color``).

    Raises :class:`LabelError` for a table that is not a list of label objects, unknown keys, a value outside
    1..:data:`MAX_LABEL_VALUE`, an empty, over-long or control-character name (names go into ``.seg.nrrd``
    header lines and onto terminals), a colour that is not three numbers in 0..1, a terminology that is not
    text, and a value or name (case-insensitive) listed twice.
    """
    if not isinstance(table, (list, tuple)):
        raise LabelError(f"must be a list of {{\"value\", \"name\", \"color\"}}, got {shown(table)}")
    out: LabelTable = []
    values: set = set()
    names: set = set()
    for entry in table:
        if not isinstance(entry, dict):
            raise LabelError(f"entries must be objects, got {shown(entry)}")
        unknown = set(entry) - set(KEYS)
        if unknown:
            raise LabelError(f"unknown keys {sorted(map(str, unknown))} in entry {shown(entry)}")
        value = entry.get("value")
        if not (_is_number(value) and isinstance(entry.get("name"), str)):
            raise LabelError(f"each entry needs an integer 'value' and a 'name', got {shown(entry)}")
        if value <= 0 or value != int(value):
            raise LabelError(f"value {value!r} must be a positive integer (0 is background)")
        if value > MAX_LABEL_VALUE:
            raise LabelError(f"value {value} is above {MAX_LABEL_VALUE} (label maps are written with 8 or 16 bits)")
        value = int(value)
        name = entry["name"].strip()
        if not name:
            raise LabelError(f"label {value} has an empty name")
        for what, text in (("name", name), ("terminology", entry.get("terminology"))):
            bad = unsafe_character(text) if isinstance(text, str) else None
            if bad:
                raise LabelError(f"the {what} of label {value} holds the control character {bad}")
            if what == "terminology" and isinstance(text, str) and "|" in text:  # '|' separates a .seg.nrrd segment's tags: it would forge one
                raise LabelError(f"the terminology of label {value} holds '|'")
        if len(name) > MAX_NAME:
            raise LabelError(f"the name of label {value} is longer than {MAX_NAME} characters")
        if value in values:
            raise LabelError(f"label value {value} appears twice")
        if name.lower() in names:
            raise LabelError(f"label name '{name}' appears twice (names are case-insensitive)")
        item: dict = {"value": value, "name": name, "color": _color(entry.get("color"), name, value, require_color)}
        terminology = entry.get("terminology")
        if terminology is not None and not isinstance(terminology, str):
            raise LabelError(f"the terminology of '{name}' must be text, got {shown(terminology)}")
        if terminology:
            item["terminology"] = terminology
        values.add(value)
        names.add(name.lower())
        out.append(item)
    return sorted(out, key=lambda e: e["value"])


def _color(color, name: str, value: int, required: bool) -> List[float]:
    if color is None and not required:
        return default_color(value)
    if not (isinstance(color, (list, tuple)) and len(color) == 3 and all(_is_number(c) and 0 <= c <= 1 for c in color)):
        raise LabelError(f"colour of '{name}' must be three numbers 0..1, got {shown(color)}")
    return [float(c) for c in color]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_ignore(entry: dict) -> bool:
    """Whether a label marks voxels nobody annotated (:data:`IGNORE_LABEL`)."""
    return str(entry["name"]).lower() == IGNORE_LABEL


def split_ignore(table: Sequence[dict]) -> Tuple[List[dict], Optional[int]]:
    """A label table -> (its classes, the value of its ``ignore`` label or None)."""
    ignore = [l for l in table if is_ignore(l)]
    return [dict(l) for l in table if l not in ignore], (int(ignore[0]["value"]) if ignore else None)


def same_labels(a: Sequence[dict], b: Sequence[dict]) -> bool:
    """Whether two tables have the same values with the same names (case-insensitive), in the same order."""
    return [(l["value"], l["name"].lower()) for l in a] == [(l["value"], l["name"].lower()) for l in b]


def channel_values(classes: Sequence[dict]) -> List[int]:
    """The label value of each output channel: background (0), then the classes in table order."""
    return [0] + [int(entry["value"]) for entry in classes]


def value_channels(classes: Sequence[dict]) -> Dict[int, int]:
    """The output channel (1..N, in table order) of each class's label value."""
    return {int(entry["value"]): channel for channel, entry in enumerate(classes, start=1)}


def names_text(table: Sequence[dict]) -> str:
    """``"1 Brain, 2 Lesion"`` (``"none"`` for an empty table), for messages."""
    return ", ".join(f"{e['value']} {e['name']}" for e in table) or "none"
