"""What a network spec ``.json`` or a bundle's ``configs/tcurlora.json`` may declare about a base, checked.

Each field gets its type, range and consistency checked here, once, with one line naming the file:
``name`` (text), ``labels`` (a label table), ``preprocessing`` (:class:`~tcurlora.preprocess.Preprocessing`),
``head`` (a module name), ``decoder_modules`` (module-name patterns of a safe shape), ``inference_roi``
(three sizes), ``inference_overlap`` (0 to below 1); a spec also ``network`` and ``weights``. ``provenance``
and ``description`` are kept as information. Unknown keys are refused: a typo must not silently fall back to
a default.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Tuple, Union

from ..errors import InputError, TCURLoRAError, unsafe_character
from ..manifest import MAX_NAME, MAX_PATTERNS, _is_module_path, check_pattern
from ..preprocess import Preprocessing
from ..protocol import MAX_PATCH

PathLike = Union[str, "os.PathLike[str]"]

BASE_FIELDS = ("name", "labels", "preprocessing", "head", "decoder_modules", "inference_roi", "inference_overlap",
               "provenance", "description")
SPEC_FIELDS = BASE_FIELDS + ("network", "weights")


def check_fields(data: Any, where: PathLike, allowed: Tuple[str, ...], what: str) -> Dict[str, Any]:
    """``data`` (a JSON object, a ``what``) with its declared fields checked and normalised: ``labels``
    validated, ``preprocessing`` as a :class:`Preprocessing`, ``inference_roi`` a tuple; absent fields stay
    absent."""
    if not isinstance(data, dict):
        raise InputError(where, f"a {what} must be a JSON object")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InputError(where, f"unknown keys {', '.join(map(repr, unknown))} (known: {', '.join(allowed)})")
    out = dict(data)
    if "name" in data:
        out["name"] = text(data["name"], where, "name")
    if data.get("labels") is not None:
        out["labels"] = label_table(data["labels"], where)
    if "preprocessing" in data:
        out["preprocessing"] = preprocessing(data["preprocessing"], where)
    if data.get("head") is not None and not _is_module_path(data["head"]):
        raise InputError(where, f"head {str(data['head'])[:80]!r} is not a module name (like decoder.seg_layers.4)")
    if "decoder_modules" in data:
        out["decoder_modules"] = module_patterns(data["decoder_modules"], where, "decoder_modules")
    if data.get("inference_roi") is not None:
        out["inference_roi"] = window(data["inference_roi"], where, "inference_roi")
    if data.get("inference_overlap") is not None:
        out["inference_overlap"] = overlap(data["inference_overlap"], where, "inference_overlap")
    return out


def text(value: Any, where: PathLike, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME or unsafe_character(value):
        raise InputError(where, f"{what} must be a text of 1 to {MAX_NAME} printable characters")
    return value


def label_table(value: Any, where: PathLike) -> List[dict]:
    from ..io import validate_label_table

    if not isinstance(value, list) or not value:
        raise InputError(where, "labels must be a non-empty list of {\"value\", \"name\", \"color\"}")
    try:
        return validate_label_table(value)
    except TCURLoRAError as exc:
        raise InputError(where, str(exc)) from None


def preprocessing(value: Any, where: PathLike) -> Preprocessing:
    try:
        return Preprocessing.from_dict(value)
    except (TypeError, ValueError) as exc:
        raise InputError(where, f"invalid preprocessing ({exc})") from None


def module_patterns(value: Any, where: PathLike, what: str) -> List[str]:
    """Module-name regular expressions of a shape that matches in polynomial time (the adapter-file rule)."""
    if not isinstance(value, list) or len(value) > MAX_PATTERNS:
        raise InputError(where, f"{what} must be a list of at most {MAX_PATTERNS} regular expressions")
    for pattern in value:
        problem = check_pattern(pattern)
        if problem:
            raise InputError(where, f"{what}: {problem}")
    return list(value)


def window(value: Any, where: PathLike, what: str) -> Tuple[int, int, int]:
    """Three sizes 1..MAX_PATCH (a single size stands for a cube, as MONAI's inferers take it)."""
    sizes = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(sizes, (list, tuple)) and len(sizes) == 3
            and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_PATCH for s in sizes)):
        raise InputError(where, f"{what} must be three sizes from 1 to {MAX_PATCH}, got {str(value)[:60]}")
    return tuple(sizes)


def overlap(value: Any, where: PathLike, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 <= value < 1):
        raise InputError(where, f"{what} must be a number from 0 to below 1, got {str(value)[:60]}")
    return float(value)
