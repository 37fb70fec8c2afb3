"""The adapter manifest: the JSON that a ``.safetensors`` adapter file carries in its header.

Pure Python (no torch): Slicer reads it to show an adapter's summary before anything heavy loads.
The safetensors header is parsed by hand, strictly, so that a truncated file, a corrupt header or
a pickle renamed to ``.safetensors`` is refused with one line and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Dict, Tuple

from .errors import TCURLoRAError, display_name
from .protocol import METHODS

FORMAT_VERSION = "1.0"
METADATA_KEY = "tcurlora"
MAX_HEADER_BYTES = 64 * 1024 * 1024
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
METHOD_NAMES = METHODS
PICKLE_PROBLEM = "is a PyTorch pickle/zip checkpoint, not a safetensors adapter; it was not opened"


class ManifestError(TCURLoRAError):
    """An adapter file or its manifest is unreadable or invalid."""


def _fail(where: str, problem: str) -> ManifestError:
    return ManifestError(f"{where}: {problem}")


def read_header(path) -> Tuple[Dict[str, str], Dict[str, dict]]:
    """The safetensors header of ``path``: (metadata, tensor index), validated against the file size."""
    name = display_name(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(name, "not an adapter file (too short for a safetensors header)")
            (n,) = struct.unpack("<Q", head)
            # Zip local-file signature, or a pickle PROTO opcode (protocol 2-5).  These 8 bytes are also a valid
            # header length now and then (any length = 128 mod 256 starts with 0x80), so a file is called a
            # pickle only if it is not a plausible safetensors file: length out of range or no '{' after it.
            pickled = head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
            if n > MAX_HEADER_BYTES or n > size - 8:
                if pickled:
                    raise _fail(name, PICKLE_PROBLEM)
                raise _fail(name, "not a safetensors adapter file, or truncated (header length out of range)")
            raw = f.read(n)
            if pickled and not raw.startswith(b"{"):
                raise _fail(name, PICKLE_PROBLEM)
    except OSError as exc:
        raise _fail(name, f"cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # '[[[[…' nests past the recursion limit
        raise _fail(name, "corrupted header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise _fail(name, "corrupted header (not a JSON object)")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(name, "corrupted header (metadata must map strings to strings)")
    data_size = size - 8 - n
    end_max = 0
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(name, f"corrupted header entry for tensor {key!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise _fail(name, f"tensor {key!r} has unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise _fail(name, f"tensor {key!r} has an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _fail(name, f"tensor {key!r} has invalid data offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise _fail(name, f"tensor {key!r}: size does not match its dtype and shape")
        end_max = max(end_max, offsets[1])
    if end_max > data_size:
        raise _fail(name, f"truncated: tensors need {end_max} bytes of data, the file has {data_size}")
    return metadata, header


def parse_manifest(text: str, where: str = "adapter") -> dict:
    """Validate the manifest JSON; raise :class:`ManifestError` (never anything else) when invalid."""
    try:
        data = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        raise _fail(where, "manifest is not valid JSON") from None
    if not isinstance(data, dict):
        raise _fail(where, "manifest is not a JSON object")
    version = data.get("format_version")
    if not isinstance(version, str) or not _is_version(version):
        raise _fail(where, "manifest has no valid format_version")
    major = int(version.split(".")[0])
    ours = int(FORMAT_VERSION.split(".")[0])
    if major > ours:
        raise _fail(where, f"adapter format {version} is newer than this tcurlora reads ({FORMAT_VERSION}); "
                           "upgrade tcurlora (pip install -U tcurlora, or update the Slicer extension)")
    if major < 1:
        raise _fail(where, f"unknown adapter format version {version}")
    for key, kind in (("method", dict), ("base", dict), ("labels", list), ("preprocessing", dict), ("provenance", dict)):
        if not isinstance(data.get(key), kind):
            raise _fail(where, f"manifest field {key!r} is missing or not a {kind.__name__}")
    method = data["method"]
    if method.get("name") not in METHOD_NAMES:
        raise _fail(where, f"unknown method {method.get('name')!r}")
    if not isinstance(method.get("config"), dict) or not isinstance(method.get("stacks"), list):
        raise _fail(where, "manifest method lacks its config or stacks")
    for stack in method["stacks"]:
        _check_stack(stack, where)
    base = data["base"]
    if not isinstance(base.get("name"), str) or not isinstance(base.get("fingerprint"), str) \
            or not base["fingerprint"].startswith("sha256:"):
        raise _fail(where, "manifest base needs a name and a sha256 fingerprint")
    values = set()
    for label in data["labels"]:
        if not (isinstance(label, dict) and isinstance(label.get("value"), int) and not isinstance(label["value"], bool)
                and label["value"] > 0 and isinstance(label.get("name"), str) and label["name"]):
            raise _fail(where, "every label needs a positive integer value and a name")
        color = label.get("color")
        if not (isinstance(color, list) and len(color) == 3
                and all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1 for c in color)):
            raise _fail(where, f"label {label['name']!r} needs an RGB colour of three numbers in 0..1")
        if label["value"] in values:
            raise _fail(where, f"label value {label['value']} appears twice")
        values.add(label["value"])
    return data


def _check_stack(stack, where: str) -> None:
    ok = (isinstance(stack, dict) and isinstance(stack.get("name"), str) and isinstance(stack.get("members"), list)
          and stack["members"] and isinstance(stack.get("I"), list) and isinstance(stack.get("J"), list)
          and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stack["I"] + stack["J"])
          and len(stack["I"]) == len(stack["J"]) > 0)
    if ok:
        for member in stack["members"]:
            rows = member.get("rows") if isinstance(member, dict) else 0
            ok = ok and isinstance(member, dict) and isinstance(member.get("module"), str) and (
                rows is None or (isinstance(rows, list) and len(rows) == 2
                                 and all(isinstance(r, int) and not isinstance(r, bool) for r in rows)
                                 and 0 <= rows[0] < rows[1]))
    if not ok:
        raise _fail(where, "manifest has a malformed stack description")


def _is_version(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 2 and all(p.isdigit() and p.isascii() and len(p) < 6 for p in parts)


def check_tensors(manifest: dict, index: Dict[str, dict], where: str = "adapter") -> None:
    """The file's tensors (its header index) must be those its manifest describes.

    Checked for ``tcurlora``/``decoder``/``curlora`` adapters, whose keys are ``stacks.<stack>.delta_u`` (F32, K×r×r)
    and ``trained.<module path with __>.<param>``: so ``tcurlora inspect`` already refuses a file with
    missing, extra or misshapen cores, before any base model is loaded.
    """
    method = manifest["method"]
    if method["name"] not in ("tcurlora", "decoder", "curlora"):
        return
    stacks = {f"stacks.{s['name']}.delta_u": s for s in method["stacks"]}
    for key, stack in stacks.items():
        info = index.get(key)
        if info is None:
            raise _fail(where, f"tensor {key!r} is missing")
        k, rank = stack.get("k"), stack.get("rank")
        if _is_count(k) and _is_count(rank) and (info["dtype"] != "F32" or info["shape"] != [k, rank, rank]):
            raise _fail(where, f"tensor {key!r} is {info['dtype']} {info['shape']}, the manifest says F32 {[k, rank, rank]}")
    trained = method.get("trained_modules")
    prefixes = (tuple(f"trained.{m.replace('.', '__')}." for m in trained)
                if isinstance(trained, list) and all(isinstance(m, str) for m in trained) else ("trained.",))
    for key in index:
        if key not in stacks and not (prefixes and key.startswith(prefixes)):
            raise _fail(where, f"unexpected tensor {key!r} (not described by the manifest)")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_manifest(path) -> dict:
    """The validated manifest of an adapter file (reads only the header; checks it against the tensor index)."""
    metadata, index = read_header(path)
    if METADATA_KEY not in metadata:
        raise _fail(display_name(path), "is a safetensors file but not a tcurlora adapter (no manifest)")
    manifest = parse_manifest(metadata[METADATA_KEY], display_name(path))
    check_tensors(manifest, index, display_name(path))
    return manifest


def summary(manifest: dict) -> str:
    """A few readable lines about an adapter (``tcurlora inspect`` and the Slicer module)."""
    method, base, prov = manifest["method"], manifest["base"], manifest["provenance"]
    labels = ", ".join(f"{l['value']}={l['name']}" for l in manifest["labels"]) or "(none)"
    tsvd = method.get("tsvd_stacks")  # lorapt lists its t-SVD stacks apart (they have no CUR indices)
    stacks = method["stacks"] or (tsvd if isinstance(tsvd, list) else [])
    dice = prov.get("validation_dice")  # provenance is free-form: format only a number
    dice = format(dice, ".3f") if isinstance(dice, (int, float)) and not isinstance(dice, bool) else \
        "n/a" if dice is None else str(dice)
    lines = [
        f"method:      {method['name']} (rank {method.get('config', {}).get('rank', '?')}, "
        f"{len(stacks)} stacks, {method.get('trainable_values', '?')} trained values)",
        f"base model:  {base['name']} ({base['fingerprint'][:19]}...)",
        f"labels:      {labels}",
        f"trained on:  {prov.get('cases', '?')} case(s), {prov.get('steps', '?')} steps, "
        f"validation Dice {dice}",
        f"created:     {prov.get('date', '?')} with {prov.get('software', '?')}",
        f"format:      {manifest['format_version']}",
    ]
    return "\n".join(lines)
