"""The one reader for JSON (and a bundle's YAML) that comes from a user or a shared folder.

Job files, label tables, network specs, nnU-Net ``plans.json``/``dataset.json``, bundle configs and
metadata, ``configs/tcurlora.json``, and what ``models --discover`` lists are all read here, with limits:
the file is a regular file of at most :data:`MAX_JSON_BYTES`, its nesting is at most :data:`MAX_DEPTH`
levels and it holds at most :data:`MAX_NODES` values. Python's own parser fails on deep nesting with a
``RecursionError``, and every later recursive walk (ours, MONAI's) could too; a YAML alias can also make a
small file expand to billions of values. Each limit gives one line naming the file.

Standard library only (the Slicer side reads job files and bundle metadata with it too).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Union

from .errors import InputError
from .userfiles import read_limited

PathLike = Union[str, "os.PathLike[str]"]

#: Largest JSON or YAML file read (a job file listing 100,000 cases is about 15 MB).
MAX_JSON_BYTES = 32 * 2 ** 20
#: Deepest nesting of lists and objects (configs of the formats read here nest about 10 levels).
MAX_DEPTH = 64
#: Most values in one document (YAML aliases make a document larger than its file).
MAX_NODES = 4_000_000


class JSONProblem(ValueError):
    """What is wrong with a JSON text (the caller names the file)."""


class NonFiniteNumber(JSONProblem):
    """A strict text holds NaN, Infinity or a number that overflows to infinity."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise NonFiniteNumber(f"holds a non-finite number ({text})")
    return value


def _no_constant(text: str):
    raise NonFiniteNumber(f"holds a non-finite number ({text})")  # NaN, Infinity: Python reads them, JSON has none


def check_nesting(data: Any, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Any:
    """``data`` unchanged once its lists and dicts nest at most ``max_depth`` levels and it holds at most
    ``max_nodes`` values; :class:`JSONProblem` otherwise. Iterative, so it cannot overflow the stack, and
    shared or cyclic YAML aliases are counted each time they are reached."""
    todo = [(data, 0)]
    nodes = 0
    while todo:
        node, depth = todo.pop()
        nodes += 1
        if nodes > max_nodes:
            raise JSONProblem(f"holds more than {max_nodes:,} values")
        if isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, (list, tuple)):
            children = list(node)
        else:
            continue
        if depth + 1 > max_depth:
            raise JSONProblem(f"nests deeper than {max_depth} levels")
        todo.extend((child, depth + 1) for child in children)
    return data


def parse(text: Union[str, bytes], max_depth: int = MAX_DEPTH, strict: bool = True, what: str = "file") -> Any:
    """A JSON text as Python values, within the nesting limit. ``strict``: no NaN, Infinity or number that
    overflows to infinity (JSON has none; Python's ``json`` writes and reads them). :class:`JSONProblem`
    (one line, without the file name) for anything else."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise JSONProblem(f"is not UTF-8 text (byte {exc.start})") from None
    options = {"parse_float": _finite_float, "parse_constant": _no_constant} if strict else {}
    try:
        data = json.loads(text, **options)
    except RecursionError:
        raise JSONProblem(f"nests deeper than {max_depth} levels") from None
    except JSONProblem:
        raise
    except ValueError as exc:  # json.JSONDecodeError names the line and column
        raise JSONProblem(f"not a valid JSON {what} ({exc})") from None
    return check_nesting(data, max_depth)


def read_json(path: PathLike, what: str = "file", max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_DEPTH, strict: bool = True) -> Any:
    """The JSON document in the regular file ``path`` (see :func:`parse`); an :class:`InputError` naming the
    file for a missing, oversized, non-regular, malformed or too deeply nested one."""
    data = read_limited(path, max_bytes, what)
    try:
        return parse(data, max_depth, strict, what)
    except JSONProblem as exc:
        raise InputError(path, str(exc)) from None


def read_json_object(path: PathLike, what: str = "file", strict: bool = True) -> dict:
    """:func:`read_json` of a document that must be a JSON object."""
    data = read_json(path, what, strict=strict)
    if not isinstance(data, dict):
        raise InputError(path, "must be a JSON object")
    return data


def read_config(path: PathLike, what: str = "config") -> Any:
    """A ``.json``, ``.yaml`` or ``.yml`` config (a MONAI bundle's) with the limits of :func:`read_json`.
    YAML is read with ``yaml.safe_load`` (plain values only: no tags that build objects)."""
    if not os.fspath(path).lower().endswith((".yaml", ".yml")):
        return read_json(path, what, strict=False)
    import yaml

    data = read_limited(path, MAX_JSON_BYTES, what)
    try:
        loaded = yaml.safe_load(data.decode("utf-8-sig"))
    except RecursionError:
        raise InputError(path, f"nests deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(path, f"not a valid YAML {what} ({' '.join(str(exc).split())[:200]})") from None
    try:
        return check_nesting(loaded)
    except JSONProblem as exc:
        raise InputError(path, str(exc)) from None
