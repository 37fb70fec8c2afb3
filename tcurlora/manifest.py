"""The adapter manifest: the JSON that a ``.safetensors`` adapter file carries in its header.

Pure Python (no torch): Slicer reads it to show an adapter's summary before anything heavy loads.
The safetensors header is parsed by hand, strictly, so that a truncated file, a corrupt header or
a pickle renamed to ``.safetensors`` is refused with one line and nothing is ever unpickled.
"""

from __future__ import annotations

import math
import os
import re
import struct
from typing import Dict, Optional, Tuple

from . import safejson
from .config import PRESETS, SELECTIONS, TCURLoRAConfig
from .errors import TCURLoRAError, display_name, unsafe_character
from .labels import MAX_NAME, LabelError, check_label_table
from .protocol import METHODS, PEFT_METHODS
from .userfiles import open_regular

try:  # the parser behind re.compile: to check a pattern's shape without running it
    from re import _parser as _sre_parser
except ImportError:  # Python < 3.11
    import sre_parse as _sre_parser

FORMAT_VERSION = "1.0"
METADATA_KEY = "tcurlora"
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_TENSOR_DIMS = 8
MAX_RANK = 4096
MAX_CHANNELS = 4096  # outputs of a new head
MAX_STACK_MEMBERS = 4096
MAX_PATTERNS = 256
MAX_PATTERN_CHARS = 512
MAX_REPEATS = 3
CONFIG_FIELDS = set(TCURLoRAConfig.__dataclass_fields__)
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
# PEFT's LoRA keys: <target>.lora_A.<adapter name>.weight
LORA_KEY = re.compile(r"(?P<target>.+)\.lora_(?P<ab>[AB])\.[^.]+\.weight")
# DoRA's magnitude per output: <target>.lora_magnitude_vector.<adapter name>.weight
DORA_KEY = re.compile(r"(?P<target>.+)\.lora_magnitude_vector\.[^.]+\.weight")
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
PICKLE_PROBLEM = "is a PyTorch pickle/zip checkpoint, not a safetensors adapter; it was not opened"


class ManifestError(TCURLoRAError):
    """An adapter file or its manifest is unreadable or invalid."""


def _fail(where: str, problem: str) -> ManifestError:
    return ManifestError(f"{where}: {problem}")


def read_header(path) -> Tuple[Dict[str, str], Dict[str, dict]]:
    """The safetensors header of ``path``: (metadata, tensor index), validated against the file size.

    Reads only the header (``tcurlora inspect``); :func:`read_adapter_bytes` reads the whole file.
    """
    name = display_name(path)
    try:
        with open_regular(path, "adapter file") as f:  # a FIFO would block the reader: refused unopened
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = _header_length(head, size, name)
            raw = f.read(n)
    except OSError as exc:
        raise _fail(name, f"cannot read ({exc.strerror or exc})") from None
    return _parse_header(head, raw, size - 8 - n, name)


def read_adapter_bytes(path) -> Tuple[bytes, Dict[str, str], Dict[str, dict]]:
    """The whole file in memory, with its validated header: (data, metadata, tensor index).

    The tensors are then parsed from these bytes (never from a memory map of the file), so a file replaced or
    truncated while it is read cannot crash the reader: it sees the old file whole, or a short one it refuses.
    """
    name = display_name(path)
    try:
        with open_regular(path, "adapter file") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            n = _header_length(head, size, name)
            raw = f.read(n)
            metadata, index = _parse_header(head, raw, size - 8 - n, name)
            # then the header again and exactly the tensors' bytes (not trailing junk), in one buffer
            end = 8 + n + max((info["data_offsets"][1] for info in index.values()), default=0)
            f.seek(0)
            data = f.read(end)
    except OSError as exc:
        raise _fail(name, f"cannot read ({exc.strerror or exc})") from None
    if len(data) < end or data[:8 + n] != head + raw:
        raise _fail(name, "truncated or changed while it was being read")
    return data, metadata, index


def _header_length(head: bytes, size: int, name: str) -> int:
    if len(head) < 8:
        raise _fail(name, "not an adapter file (too short for a safetensors header)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or n > size - 8:
        if _looks_pickled(head):
            raise _fail(name, PICKLE_PROBLEM)
        raise _fail(name, "not a safetensors adapter file, or truncated (header length out of range)")
    return n


def _looks_pickled(head: bytes) -> bool:
    # Zip local-file signature, or a pickle PROTO opcode (protocol 2-5).  These 8 bytes are also a valid
    # header length now and then (any length = 128 mod 256 starts with 0x80), so a file is called a
    # pickle only if it is not a plausible safetensors file: length out of range or no '{' after it.
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _parse_header(head: bytes, raw: bytes, data_size: int, name: str) -> Tuple[Dict[str, str], Dict[str, dict]]:
    if _looks_pickled(head) and not raw.startswith(b"{"):
        raise _fail(name, PICKLE_PROBLEM)
    try:
        header = safejson.parse(raw)
    except safejson.NonFiniteNumber:
        raise _fail(name, "corrupted header (a non-finite number)") from None
    except safejson.JSONProblem:  # not UTF-8, not JSON, or '[[[[…' nested past the limit
        raise _fail(name, "corrupted header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise _fail(name, "corrupted header (not a JSON object)")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(name, "corrupted header (metadata must map strings to strings)")
    end_max = 0
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(name, f"corrupted header entry for tensor {key!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _fail(name, f"tensor {key!r} has unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise _fail(name, f"tensor {key!r} has an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _fail(name, f"tensor {key!r} has invalid data offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise _fail(name, f"tensor {key!r}: size does not match its dtype and shape")
        end_max = max(end_max, offsets[1])
    if end_max > data_size:
        raise _fail(name, f"truncated: tensors need {end_max} bytes of data, the file has {data_size}")
    return metadata, header


def parse_manifest(text: str, where: str = "adapter") -> dict:
    """Validate the manifest JSON; raise :class:`ManifestError` (never anything else) when invalid.

    Everything a loader later acts on is checked here, cheaply and before any allocation: types, ranges and
    finiteness of the config, the stacks' structure, label values and names, and every string (no control or
    bidirectional characters, which could forge ``.seg.nrrd`` header lines or drive a terminal).  Regular
    expressions must be of a shape that matches in polynomial time (see :func:`check_pattern`).
    """
    if not isinstance(text, (str, bytes, bytearray)):
        raise _fail(where, "manifest is not valid JSON")
    try:
        data = safejson.parse(text)
    except safejson.NonFiniteNumber as exc:
        raise _fail(where, f"manifest {exc}") from None
    except safejson.JSONProblem:
        raise _fail(where, "manifest is not valid JSON") from None
    if not isinstance(data, dict):
        raise _fail(where, "manifest is not a JSON object")
    _check_strings(data, where)
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
    if method.get("name") not in METHODS:
        raise _fail(where, f"unknown method {method.get('name')!r}")
    if not isinstance(method.get("config"), dict) or not isinstance(method.get("stacks"), list):
        raise _fail(where, "manifest method lacks its config or stacks")
    _check_config(method["config"], method["name"], where)
    seen_members: set = set()
    for stack in method["stacks"]:
        _check_stack(stack, where, seen_members)
    if "tsvd_stacks" in method:  # lorapt: t-SVD stacks have a rank but no CUR indices
        if method["name"] != "lorapt" or not isinstance(method["tsvd_stacks"], list):
            raise _fail(where, "manifest has a malformed stack description")
        for stack in method["tsvd_stacks"]:
            _check_stack(stack, where, seen_members, indices=False)
    for key in ("trained_modules", "lora_targets", "norms"):
        if key in method and not (isinstance(method[key], list) and all(_is_module_path(m) for m in method[key])):
            raise _fail(where, f"manifest method field {key!r} must be a list of module names")
    if method["name"] in PEFT_METHODS and not method.get("lora_targets"):
        raise _fail(where, "a LoRA adapter must list its lora_targets")
    base = data["base"]
    if not (isinstance(base.get("name"), str) and 0 < len(base["name"]) <= MAX_NAME
            and isinstance(base.get("fingerprint"), str) and re.fullmatch(r"sha256:[0-9a-f]{64}", base["fingerprint"])):
        raise _fail(where, "manifest base needs a name and a sha256 fingerprint")
    try:
        check_label_table(data["labels"], require_color=True)
    except LabelError as exc:
        raise _fail(where, f"label table: {exc}") from None
    return data


def _check_strings(data, where: str) -> None:
    """Every string (keys too) free of characters that would forge header lines or drive a terminal."""
    todo = [(data, "manifest")]
    while todo:  # iterative: a deeply nested manifest must not overflow Python's stack here
        node, at = todo.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            for text in (key, value):
                if isinstance(text, str):
                    bad = unsafe_character(text)
                    if bad:
                        raise _fail(where, f"manifest text in {at} holds the control character {bad}")
            if isinstance(value, (dict, list)):
                todo.append((value, f"{at}.{key}" if isinstance(key, str) and len(key) < 40 else at))


def _check_config(config: dict, method: str, where: str) -> None:
    """The adapter config, field by field (what :class:`tcurlora.config.TCURLoRAConfig` would accept, bounded)."""
    def bad(field: str, problem: str) -> ManifestError:
        return _fail(where, f"adapter config {field!r} {problem}")

    unknown = set(config) - CONFIG_FIELDS
    if unknown:
        raise _fail(where, f"invalid adapter config (unknown adapter config keys: {', '.join(sorted(map(str, unknown)))})")
    if config.get("method", method) != method:
        raise bad("method", f"is {config.get('method')!r}, the manifest says {method!r}")
    for field, choices in (("preset", PRESETS), ("selection", SELECTIONS)):
        if field in config and config[field] not in choices:
            raise bad(field, f"must be one of {', '.join(choices)}")
    if "rank" in config and not (_is_int(config["rank"]) and 1 <= config["rank"] <= MAX_RANK):
        raise bad("rank", f"must be an integer in 1..{MAX_RANK}")
    if "seed" in config and not (_is_int(config["seed"]) and 0 <= config["seed"] < 2 ** 63):
        raise bad("seed", "must be a non-negative 64-bit integer")
    for field in ("rank_stable", "norm_scale_shift"):
        if field in config and not isinstance(config[field], bool):
            raise bad(field, "must be true or false")
    if config.get("rank_budget") is not None and not (_is_int(config["rank_budget"]) and config["rank_budget"] > 0):
        raise bad("rank_budget", "must be a positive integer or null")
    if "scale" in config and not _is_number(config["scale"]):
        raise bad("scale", "must be a finite number")
    if config.get("lora_alpha") is not None and not _is_number(config["lora_alpha"]):
        raise bad("lora_alpha", "must be a finite number or null")
    for field in ("train_modules", "exclude_modules", "target_modules"):
        patterns = config.get(field, [])
        if not isinstance(patterns, list) or len(patterns) > MAX_PATTERNS:
            raise bad(field, f"must be a list of at most {MAX_PATTERNS} regular expressions")
        for pattern in patterns:
            _check_pattern_field(pattern, field, where)
    stacks = config.get("stacks", {})
    if not isinstance(stacks, dict) or len(stacks) > MAX_PATTERNS:
        raise bad("stacks", "must map stack names to lists of regular expressions")
    for stack_name, patterns in stacks.items():
        if not (isinstance(patterns, list) and 0 < len(patterns) <= MAX_PATTERNS and _is_stack_name(stack_name)):
            raise bad("stacks", "must map stack names to lists of regular expressions")
        for pattern in patterns:
            _check_pattern_field(pattern, "stacks", where)
    head = config.get("new_head")
    if head is not None and not (isinstance(head, dict) and set(head) == {"module", "out_channels"}
                                 and _is_module_path(head["module"]) and _is_int(head["out_channels"])
                                 and 1 <= head["out_channels"] <= MAX_CHANNELS):
        raise bad("new_head", f"must be {{'module': name, 'out_channels': 1..{MAX_CHANNELS}}}")


def _check_pattern_field(pattern, field: str, where: str) -> None:
    problem = check_pattern(pattern)
    if problem:
        raise _fail(where, f"adapter config {field!r}: {problem}")


def check_pattern(pattern) -> Optional[str]:
    """Why a module-name regular expression from a file is refused, or None.

    Python's ``re`` backtracks, and an expression like ``(.*.*)*X`` takes exponential time: a shared file must
    not be able to hang a reader.  Accepted: at most :data:`MAX_PATTERN_CHARS` characters, no back-references,
    no repetition (``*``, ``+``, ``{m,n}`` with n > 1) inside another repetition or around an alternation, and at
    most :data:`MAX_REPEATS` repetitions in all, so a match costs at most about n^3 steps for a module name of
    n characters.  Module-name patterns (``model\\.2(\\..*)?``, ``.*blocks\\.\\d+\\.attn\\..*``) fit easily.
    """
    if not isinstance(pattern, str) or not pattern:
        return "regular expressions must be non-empty strings"
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"regular expression longer than {MAX_PATTERN_CHARS} characters"
    try:
        tree = _sre_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return f"invalid regular expression {pattern!r}"
    repeats = 0
    todo = [(tree, False)]  # (sub-pattern, inside a repetition)
    while todo:
        sub, repeated = todo.pop()
        for op, av in sub:
            name = str(op)
            if name.startswith("GROUPREF"):
                return f"regular expression {pattern!r} uses a back-reference"
            multi = name.endswith("REPEAT") and av[1] > 1
            if multi:
                repeats += 1
                if repeated:
                    return f"regular expression {pattern!r} nests repetitions (it could take exponential time)"
            if name == "BRANCH" and repeated:
                return f"regular expression {pattern!r} repeats an alternation (it could take exponential time)"
            todo += [(child, repeated or multi) for child in _sub_patterns(av)]
    if repeats > MAX_REPEATS:
        return f"regular expression {pattern!r} has more than {MAX_REPEATS} repetitions"
    return None


def _sub_patterns(av) -> list:
    if isinstance(av, _sre_parser.SubPattern):
        return [av]
    if isinstance(av, (tuple, list)):
        return [child for item in av for child in _sub_patterns(item)]
    return []


def _check_stack(stack, where: str, seen: set, indices: bool = True) -> None:
    ok = (isinstance(stack, dict) and _is_stack_name(stack.get("name")) and isinstance(stack.get("members"), list)
          and 0 < len(stack["members"]) <= MAX_STACK_MEMBERS)
    if ok and indices:
        ok = (isinstance(stack.get("I"), list) and isinstance(stack.get("J"), list)
              and all(_is_int(i) and 0 <= i < 2 ** 31 for i in stack["I"] + stack["J"])
              and 0 < len(stack["I"]) == len(stack["J"]) <= MAX_RANK)
    elif ok:
        ok = _is_int(stack.get("rank")) and 0 < stack["rank"] <= MAX_RANK
    if ok:
        for field, expected in (("k", len(stack["members"])), ("rank", len(stack["I"]) if indices else stack["rank"])):
            ok = ok and (field not in stack or stack[field] == expected)
        for member in stack["members"]:
            rows = member.get("rows") if isinstance(member, dict) else 0
            ok = ok and isinstance(member, dict) and _is_module_path(member.get("module")) and (
                rows is None or (isinstance(rows, list) and len(rows) == 2 and all(_is_int(r) for r in rows)
                                 and 0 <= rows[0] < rows[1] < 2 ** 31))
            if ok:
                key = (member["module"], tuple(rows) if rows else None)
                if key in seen:  # each member builds a copy of its weight: repeats would multiply memory
                    raise _fail(where, f"module {member['module']} is listed twice in the stacks")
                seen.add(key)
    if not ok:
        raise _fail(where, "manifest has a malformed stack description")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_module_path(value) -> bool:
    return isinstance(value, str) and len(value) <= MAX_PATTERN_CHARS and _MODULE_PATH.fullmatch(value) is not None


def _is_stack_name(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME and "." not in value


def _is_version(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 2 and all(p.isdigit() and p.isascii() and len(p) < 6 for p in parts)


def trained_prefix(module_path: str) -> str:
    """Where a fully trained module's tensors sit in an adapter file: ``trained.<module path, dots as __>.``"""
    return f"trained.{module_path.replace('.', '__')}."


def norm_prefix(module_path: str) -> str:
    """Where the scale and shift after a norm layer sit in an adapter file: ``norms.<module path, dots as __>.``"""
    return f"norms.{module_path.replace('.', '__')}."


def check_tensors(manifest: dict, index: Dict[str, dict], where: str = "adapter") -> None:
    """The file's tensors (its header index) must be those its manifest describes.

    ``tcurlora``/``decoder``/``curlora`` adapters (``lorapt``: 𝒜, ℬ per t-SVD stack): keys ``stacks.<stack>.delta_u`` (F32, K×r×r) and
    ``trained.<module path with __>.<param>``, and a ``new_head`` has its weight in the file with
    ``out_channels`` outputs.  ``lora``/``pissa``/``dora``: one ``lora_A`` (r rows) and ``lora_B`` (r columns) per target, r the
    config's rank.  So ``tcurlora inspect`` already refuses a file with missing, extra or misshapen tensors, and
    a loader never builds more than the file's own tensors describe.
    """
    method = manifest["method"]
    if method["name"] in PEFT_METHODS:
        _check_lora_tensors(method, index, where)
        return
    if method["name"] not in ("tcurlora", "decoder", "curlora", "lorapt"):
        return
    stacks = {f"stacks.{s['name']}.delta_u": s for s in method["stacks"]}
    for key, stack in stacks.items():
        info = index.get(key)
        if info is None:
            raise _fail(where, f"tensor {key!r} is missing")
        k, rank = len(stack["members"]), len(stack["I"])
        if info["dtype"] != "F32" or info["shape"] != [k, rank, rank]:
            raise _fail(where, f"tensor {key!r} is {info['dtype']} {info['shape']}, the manifest says F32 {[k, rank, rank]}")
    for stack in method.get("tsvd_stacks") or []:  # lorapt: 𝒜 (K, n1, r) and ℬ (K, r, n2) per stack
        k, rank = len(stack["members"]), stack["rank"]
        for part, rank_dim in (("principal_left", 2), ("principal_right", 1)):
            key = f"stacks.{stack['name']}.{part}"
            info = index.get(key)
            if info is None:
                raise _fail(where, f"tensor {key!r} is missing")
            shape = info["shape"]
            if info["dtype"] != "F32" or len(shape) != 3 or shape[0] != k or shape[rank_dim] != rank:
                raise _fail(where, f"tensor {key!r} is {info['dtype']} {info['shape']}, the manifest says F32 with "
                                   f"K = {k} and rank {rank}")
            stacks[key] = stack
    trained = method.get("trained_modules")
    prefixes = (tuple(trained_prefix(m) for m in trained)
                if isinstance(trained, list) else ("trained.",))
    norms = {norm_prefix(m) + part for m in method.get("norms") or [] for part in ("norm_scale", "norm_shift")}
    for key in norms:
        info = index.get(key)
        if info is None:
            raise _fail(where, f"tensor {key!r} is missing")
        if info["dtype"] != "F32" or len(info["shape"]) != 1:
            raise _fail(where, f"tensor {key!r} is {info['dtype']} {info['shape']}, the manifest says one F32 per channel")
    for key in index:
        if key not in stacks and key not in norms and not (prefixes and key.startswith(prefixes)):
            raise _fail(where, f"unexpected tensor {key!r} (not described by the manifest)")
    head = method["config"].get("new_head")
    if head:
        key = trained_prefix(head["module"]) + "weight"
        info = index.get(key)
        if info is None or len(info["shape"]) < 2 or head["out_channels"] not in info["shape"][:2]:
            raise _fail(where, f"new_head {head['module']} with {head['out_channels']} outputs has no matching "
                               f"tensor {key!r} in the file")


def _check_lora_tensors(method: dict, index: Dict[str, dict], where: str) -> None:
    rank = method["config"].get("rank", 8)
    targets = set(method["lora_targets"])
    trained = tuple(f"{m}." for m in method.get("trained_modules") or [])
    head = method["config"].get("new_head")
    if head:  # a new output layer: its own tensors, under the key every method gives it
        trained += (trained_prefix(head["module"]),)
    found = set()
    for key, info in index.items():
        match = LORA_KEY.fullmatch(key)
        if match and match.group("target") in targets:
            dim = 0 if match.group("ab") == "A" else 1
            if len(info["shape"]) < 2 or info["shape"][dim] != rank:
                raise _fail(where, f"tensor {key!r} has shape {info['shape']}, not rank {rank}")
            found.add((match.group("target"), match.group("ab")))
        elif method["name"] == "dora" and DORA_KEY.fullmatch(key) and DORA_KEY.fullmatch(key).group("target") in targets:
            found.add((DORA_KEY.fullmatch(key).group("target"), "magnitude"))
        elif not (trained and key.startswith(trained)):
            raise _fail(where, f"unexpected tensor {key!r} (not described by the manifest)")
    parts = ("A", "B", "magnitude") if method["name"] == "dora" else ("A", "B")
    missing = sorted(f"{t}.lora_{ab}" for t in targets for ab in parts if (t, ab) not in found)
    if missing:
        raise _fail(where, f"tensor {missing[0]}... is missing")


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
    """A few readable lines about an adapter (``tcurlora inspect`` and the Slicer module).

    The manifest's strings are free of control characters (:func:`parse_manifest`); long ones are shortened."""
    method, base, prov = manifest["method"], manifest["base"], manifest["provenance"]
    labels = ", ".join(f"{l['value']}={l['name']}" for l in manifest["labels"]) or "(none)"
    dice = prov.get("validation_dice")  # provenance is free-form: format only a number
    dice = format(dice, ".3f") if isinstance(dice, (int, float)) and not isinstance(dice, bool) else \
        "n/a" if dice is None else dice
    lines = [
        f"method:      {method['name']} (rank {_clip(method.get('config', {}).get('rank', '?'))}, "
        f"{len(method['stacks'] or method.get('tsvd_stacks') or [])} stacks, "
        f"{_clip(method.get('trainable_values', '?'))} trained values)",
        f"base model:  {_clip(base['name'])} ({base['fingerprint'][:19]}...)",
        f"labels:      {_clip(labels, 400)}",
        f"trained on:  {_clip(prov.get('cases', '?'))} case(s), {_clip(prov.get('steps', '?'))} steps, "
        f"validation Dice {_clip(dice)}",
        f"created:     {_clip(prov.get('date', '?'))} with {_clip(prov.get('software', '?'))}",
        f"format:      {manifest['format_version']}",
    ]
    return "\n".join(lines)


def _clip(value, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
