"""The label table: a list of ``{"value": int, "name": str, "color": [r, g, b] (0..1), "terminology":
optional str}`` (a Slicer ``TerminologyEntry`` string). Background (0) is never listed."""

from __future__ import annotations

from typing import Sequence

from .errors import TCURLoRAError, unsafe_character
from .manifest import MAX_LABEL_VALUE, MAX_NAME
from .protocol import default_color

LabelTable = list[dict]


def validate_label_table(label_table: Sequence[dict]) -> LabelTable:
    """Check and normalise a label table (see the module docstring); returns a new list sorted by value.

    Raises :class:`TCURLoRAError` on duplicate values or names, value 0 / negative, bad colours or a
    terminology string Slicer cannot parse. A missing colour gets a default one.
    """
    from slicerio.segmentation import terminology_entry_from_string

    out: LabelTable = []
    seen_values: set[int] = set()
    seen_names: set[str] = set()
    for entry in label_table:
        if not isinstance(entry, dict):
            raise TCURLoRAError(f"label table: entries must be objects, got {entry!r}")
        unknown = set(entry) - {"value", "name", "color", "terminology"}
        if unknown:
            raise TCURLoRAError(f"label table: unknown keys {sorted(unknown)} in entry {entry!r}")
        try:
            value = int(entry["value"])
            name = str(entry["name"]).strip()
        except (KeyError, TypeError, ValueError, OverflowError):
            raise TCURLoRAError(f"label table: each entry needs an integer 'value' and a 'name', got {entry!r}")
        if value != entry["value"] or value <= 0 or isinstance(entry["value"], bool):
            raise TCURLoRAError(f"label table: value {entry['value']!r} must be a positive integer (0 is background)")
        if value > MAX_LABEL_VALUE:
            raise TCURLoRAError(f"label table: value {value} is above {MAX_LABEL_VALUE} (label maps are written "
                                "with 8 or 16 bits)")
        if not name:
            raise TCURLoRAError(f"label table: label {value} has an empty name")
        # names and terminology go into .seg.nrrd header lines and onto terminals: no newline, ESC, etc.
        for what, text in (("name", name), ("terminology", str(entry.get("terminology") or ""))):
            bad = unsafe_character(text)
            if bad:
                raise TCURLoRAError(f"label table: the {what} of label {value} holds the control character {bad}")
        if len(name) > MAX_NAME:
            raise TCURLoRAError(f"label table: the name of label {value} is longer than {MAX_NAME} characters")
        if not name.isascii():  # pynrrd writes .seg.nrrd headers as ASCII (and its reader drops other bytes)
            first = next(ch for ch in name if not ch.isascii())
            raise TCURLoRAError(f"label table: the name of label {value} holds {first!r}; .seg.nrrd segment names "
                                "must be ASCII")
        if value in seen_values:
            raise TCURLoRAError(f"label table: value {value} is listed twice")
        if name.lower() in seen_names:
            raise TCURLoRAError(f"label table: name '{name}' is listed twice (names are case-insensitive)")
        color = entry.get("color")
        if color is None:
            color = default_color(value)
        try:
            color = [float(c) for c in color]
        except (TypeError, ValueError):
            raise TCURLoRAError(f"label table: colour of '{name}' must be three numbers 0..1, got {color!r}")
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise TCURLoRAError(f"label table: colour of '{name}' must be three numbers 0..1, got {color!r}")
        item: dict = {"value": value, "name": name, "color": color}
        terminology = entry.get("terminology")
        if terminology:
            try:
                terminology_entry_from_string(str(terminology))
            except Exception:
                raise TCURLoRAError(
                    f"label table: terminology of '{name}' is not a Slicer TerminologyEntry string "
                    "(context~category~type~modifier~anatomic context~region~region modifier)")
            item["terminology"] = str(terminology)
        seen_values.add(value)
        seen_names.add(name.lower())
        out.append(item)
    return sorted(out, key=lambda e: e["value"])


def default_label_table(values: Sequence[int]) -> LabelTable:
    """Label table for bare label values: names ``Label <v>``, default colours."""
    return [{"value": int(v), "name": f"Label {int(v)}", "color": default_color(int(v))}
            for v in sorted(set(int(v) for v in values)) if int(v) != 0]


def _known_text(label_table: LabelTable) -> str:
    return ", ".join(f"{e['value']} {e['name']}" for e in label_table) or "none"
