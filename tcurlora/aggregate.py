"""Exact weighted averaging of adapters trained at several sites (``tcurlora aggregate``, federated rounds).

Δ𝒲 = 𝒞 * Δ𝒰 * ℛ is linear in the core Δ𝒰, and 𝒞, ℛ are slices of the shared base: the case-weighted mean
of the sites' cores is therefore exactly the case-weighted mean of their weight updates.  Fully trained
modules (a decoder, a new head, every weight for ``full``) are weights themselves, so their mean is the mean
update too.  LoRA is refused: mean(B·A) is not mean(B)·mean(A), so averaging its factors is not averaging
its updates.

Files are read through the manifest and safetensors only (nothing is unpickled); the output is written
under a temporary name and renamed.
"""

from __future__ import annotations

import datetime
import json
from typing import Dict, Optional, Sequence, Tuple

import torch

from . import __version__
from .adapter import short_fingerprint
from .errors import TCURLoRAError, display_name
from .manifest import METADATA_KEY, check_tensors, parse_manifest, read_manifest
from .protocol import AVERAGEABLE_METHODS as AVERAGEABLE, check_adapter_path

LORA_REFUSAL = ("LoRA adapters cannot be averaged exactly: the mean of the sites' B·A is not (mean B)·(mean A), "
                "so averaging LoRA factors does not average the updates; train tCURLoRA adapters to aggregate")
# fields that may differ between sites without changing what a core means (the CUR indices, compared
# separately, pin the layout; the seed only drives patch sampling and head initialisation)
CONFIG_FREE = ("seed",)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}



def check_like(state: dict, reference: dict, where: str, against: str) -> None:
    """Each of ``reference``'s tensors is in ``state`` with the same shape and dtype; else one line naming it."""
    for key, ref in reference.items():
        value = state.get(key)
        if value is None:
            raise TCURLoRAError(f"{where}: tensor {key} is missing")
        if tuple(value.shape) != tuple(ref.shape) or value.dtype != ref.dtype:
            raise TCURLoRAError(f"{where}: tensor {key} is {value.dtype} {tuple(value.shape)}, "
                                f"{against} {ref.dtype} {tuple(ref.shape)}")

def layout(manifest: dict) -> dict:
    """What must be identical for two adapters' tensors to be averaged: base, method, config, stacks, labels."""
    method = manifest["method"]
    return {
        "method": method["name"],
        "base model": manifest["base"]["fingerprint"],
        "label table": [(int(l["value"]), str(l["name"]).lower()) for l in manifest["labels"]],
        "config": {k: v for k, v in method["config"].items() if k not in CONFIG_FREE},
        "stack names": [s["name"] for s in method["stacks"]],
        "stacks": [{"name": s["name"], "members": s["members"], "rank": s.get("rank"), "k": s.get("k"),
                    "indices I": s["I"], "indices J": s["J"]} for s in method["stacks"]],
        "fully trained modules": method.get("trained_modules", []),
        "norms with a scale and shift": method.get("norms", []),
    }


def first_difference(reference: dict, other: dict) -> Optional[str]:
    """The first layout difference between two manifests, in words (None when they fit)."""
    a, b = layout(reference), layout(other)
    for key in a:
        if key == "stacks":
            for sa, sb in zip(a[key], b[key]):
                for field in sa:
                    if sa[field] != sb[field]:
                        return f"stack {sa['name']!r}: {field} {_short(sb[field])} instead of {_short(sa[field])}"
        elif a[key] != b[key]:
            if key == "config":
                field = next(f for f in sorted(set(a[key]) | set(b[key])) if a[key].get(f) != b[key].get(f))
                return f"config {field} {_short(b[key].get(field))} instead of {_short(a[key].get(field))}"
            if key == "base model":
                return (f"base model '{other['base']['name']}' ({short_fingerprint(b[key])}) instead of "
                        f"'{reference['base']['name']}' ({short_fingerprint(a[key])})")
            return f"{key} {_short(b[key])} instead of {_short(a[key])}"
    return None


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def check_same_layout(manifests: Sequence[dict], names: Sequence[str]) -> None:
    """Refuse, with one line naming the file and the first difference, adapters that cannot be averaged."""
    for manifest, name in zip(manifests, names):
        if manifest["method"]["name"] == "lora":
            raise TCURLoRAError(f"{name}: {LORA_REFUSAL}")
        if manifest["method"]["name"] not in AVERAGEABLE:
            raise TCURLoRAError(f"{name}: method {manifest['method']['name']!r} cannot be averaged")
    for manifest, name in zip(manifests[1:], names[1:]):
        problem = first_difference(manifests[0], manifest)
        if problem:
            raise TCURLoRAError(f"{name}: does not fit {names[0]}: {problem}")


def weighted_mean(states: Sequence[Dict[str, torch.Tensor]], weights: Sequence[float],
                  names: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """Σ w_i·state_i / Σ w_i per tensor (accumulated in float64; integer counters rounded).

    Every state must hold the same keys with the same shapes and dtypes (else one line naming the state).
    """
    names = list(names) or [f"update {i + 1}" for i in range(len(states))]
    if not states:
        raise TCURLoRAError("nothing to average")
    w = [float(x) for x in weights]
    if len(w) != len(states) or any(not (x > 0) or x != x or x == float("inf") for x in w):
        raise TCURLoRAError(f"need one positive weight per adapter ({len(states)}), got {list(weights)}")
    # relative to the largest weight first: the sum of huge weights (1e308 + 1e308) would overflow to inf
    # and every share to 0
    largest = max(w)
    w = [x / largest for x in w]
    total = sum(w)
    reference = states[0]
    for state, name in zip(states[1:], names[1:]):
        if set(state) != set(reference):
            extra = sorted(set(state) ^ set(reference))
            raise TCURLoRAError(f"{name}: tensors differ from {names[0]}'s (e.g. {extra[0]})")
        check_like(state, reference, name, f"{names[0]} has")
    out = {}
    for key, ref in reference.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for state, wi in zip(states, w):
            acc += state[key].to(torch.float64) * (wi / total)
        out[key] = (acc.round() if not ref.dtype.is_floating_point else acc).to(ref.dtype).contiguous()
    return out


def merged_manifest(manifests: Sequence[dict], weights: Sequence[float], names: Sequence[str],
                    tensors: Dict[str, torch.Tensor], rounds: Optional[int] = None) -> dict:
    """The first manifest with a provenance that says what was averaged and with which weights."""
    manifest = json.loads(json.dumps(manifests[0]))
    cases = [m["provenance"].get("cases") for m in manifests]
    manifest["provenance"] = {
        "software": f"tcurlora {__version__}", "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "cases": sum(cases) if all(isinstance(c, int) for c in cases) else None,
        "steps": None, "validation_dice": None,
        "aggregated_from": [{"adapter": n, "weight": w, "cases": c} for n, w, c in zip(names, weights, cases)],
    }
    if rounds is not None:
        manifest["provenance"]["federated_rounds"] = rounds
    manifest["method"]["trainable_values"] = int(sum(t.numel() for t in tensors.values()))
    return manifest


def write_adapter_tensors(path, manifest: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """Write an adapter file from a manifest and its tensors (checked as a reader would, then atomically)."""
    from safetensors.torch import save_file

    from .io import atomic_write

    text = json.dumps(manifest, separators=(",", ":"))
    where = display_name(path)
    parse_manifest(text, where)
    index = {k: {"dtype": SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype)), "shape": list(v.shape)}
             for k, v in tensors.items()}
    check_tensors(manifest, index, where)
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                             metadata={METADATA_KEY: text}))


def read_adapter(path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Manifest and tensors of an adapter file (safetensors only; refused with one line when invalid)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest = read_manifest(path)
    try:
        return manifest, load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TCURLoRAError(f"{display_name(path)}: unreadable tensors ({exc})") from None


def aggregate(paths: Sequence, out, weights: Optional[Sequence[float]] = None) -> dict:
    """Average the adapters at ``paths`` (weights: given, or each file's provenance case count) into ``out``.

    Returns a summary: the weights used and the output manifest.
    """
    if len(paths) < 2:
        raise TCURLoRAError("aggregate needs at least two adapter files")
    check_adapter_path(out, "merged adapter")
    names = [display_name(p) for p in paths]
    read = [read_adapter(p) for p in paths]
    manifests = [m for m, _ in read]
    check_same_layout(manifests, names)
    if weights is None:
        weights = []
        for manifest, name in zip(manifests, names):
            cases = manifest["provenance"].get("cases")
            if not (isinstance(cases, int) and not isinstance(cases, bool) and cases > 0):
                raise TCURLoRAError(f"{name}: its provenance records no case count; give --weights")
            weights.append(cases)
    elif len(weights) != len(paths):
        raise TCURLoRAError(f"{len(weights)} weight(s) for {len(paths)} adapter(s): give one per adapter")
    tensors = weighted_mean([t for _, t in read], weights, names)
    manifest = merged_manifest(manifests, list(weights), names, tensors)
    write_adapter_tensors(out, manifest, tensors)
    return {"weights": list(weights), "manifest": manifest}
