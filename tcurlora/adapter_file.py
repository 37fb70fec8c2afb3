"""Adapter files: one ``.safetensors`` holding the trained state and a JSON manifest in its header.

𝒞 and ℛ are not stored: they are slices of the base weights, so a file is only valid on the base
whose fingerprint it records.  Writing is atomic; reading never unpickles anything.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import TCURLoRAConfig
from .errors import TCURLoRAError, display_name
from .io import atomic_write
from .manifest import FORMAT_VERSION, METADATA_KEY, ManifestError, check_tensors, read_header, parse_manifest
from .tuners import AdapterError, get_tuner
from .tuners.strategies import strategy_for


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the frozen base weights in canonical order: sorted names, dtype, shape, bytes."""
    return get_tuner(model).base_fingerprint()


def _base_name(model: nn.Module) -> str:
    return get_tuner(model).base_info.get("name") or type(model).__name__


def save_adapter(model: nn.Module, path, *, labels: Optional[List[dict]] = None,
                 preprocessing: Optional[dict] = None, provenance: Optional[dict] = None,
                 adapter_name: Optional[str] = None, base_name: Optional[str] = None) -> dict:
    """Write the adapter (the active one by default) to ``path``; returns the manifest written.

    ``labels``, ``preprocessing`` and ``base_name`` default to what the base model registered with the tuner.
    """
    tuner = get_tuner(model)
    described = tuner.describe(adapter_name)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tuner.adapter_state_dict(adapter_name).items()}
    prov = {"software": f"tcurlora {__version__}", "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
            "cases": None, "steps": None, "validation_dice": None}
    prov.update(provenance or {})
    manifest = {
        "format_version": FORMAT_VERSION,
        "method": {"name": described["config"]["method"], **described,
                   "trainable_values": int(sum(t.numel() for t in tensors.values()))},
        "base": {"name": base_name or _base_name(model), "fingerprint": tuner.trained_on_fingerprint(),
                 # what the base is (auto3dseg, nnunet, ...), when it was loaded as a base model
                 **({"kind": tuner.base_info["kind"]} if tuner.base_info.get("kind") else {})},
        "labels": labels if labels is not None else list(tuner.base_info.get("labels", [])),
        "preprocessing": preprocessing if preprocessing is not None else dict(tuner.base_info.get("preprocessing", {})),
        "provenance": prov,
    }
    text = json.dumps(manifest, separators=(",", ":"))
    parse_manifest(text, display_name(path))  # never write a file we would refuse to read
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: text}))
    return manifest


def load_adapter(model: nn.Module, path, adapter_name: Optional[str] = None, activate: bool = True) -> dict:
    """Add the adapter stored at ``path`` to ``model`` (the base it was trained on) and return its manifest.

    Refuses, with one line naming both, an adapter trained on another base.  On any error the model
    is left as it was.
    """
    name = display_name(path)
    metadata, index = read_header(path)
    if METADATA_KEY not in metadata:
        raise ManifestError(f"{name}: is a safetensors file but not a tcurlora adapter (no manifest)")
    manifest = parse_manifest(metadata[METADATA_KEY], name)
    check_tensors(manifest, index, name)
    fingerprint = base_fingerprint(model)
    if manifest["base"]["fingerprint"] != fingerprint:
        raise TCURLoRAError(
            f"{name}: trained on base model '{manifest['base']['name']}' ({manifest['base']['fingerprint'][7:19]}), "
            f"but the loaded base is '{_base_name(model)}' ({fingerprint[7:19]}); load the matching base model")
    tuner = get_tuner(model)
    adapter_name = adapter_name or _default_adapter_name(path)
    if adapter_name in tuner.adapters:
        raise TCURLoRAError(f"{name}: an adapter named {adapter_name!r} is already loaded")
    try:
        config = TCURLoRAConfig.from_dict(manifest["method"]["config"])
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{name}: invalid adapter config ({exc})") from None
    try:
        tensors = load_file(os.fspath(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ManifestError(f"{name}: unreadable tensors ({exc})") from None
    strategy = strategy_for(config.method)
    tensors = strategy.tensors_from_file(tensors, adapter_name)
    previous = tuner.active
    try:
        # the stored layout (resolved module names, CUR indices): no pattern from the file is evaluated
        tuner.add_adapter(config, adapter_name, layout=manifest["method"], labels=manifest["labels"])
        tuner.load_adapter_state_dict(tensors, adapter_name)
    except (AdapterError, TypeError, ValueError, IndexError, KeyError, AttributeError, RuntimeError) as exc:
        # a crafted layout (members: 5, scale: "x") fails outside AdapterError too
        if adapter_name in tuner.adapters:
            tuner.delete_adapter(adapter_name)
        tuner.active = previous
        raise ManifestError(f"{name}: does not fit this base model: {exc}") from None
    if not activate:
        tuner.set_active(previous)
    for p in model.parameters():
        p.requires_grad_(False)
    return manifest


def _default_adapter_name(path) -> str:
    """The adapter name taken from a file name (letters, digits, '_' and '-')."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", Path(path).name.split(".")[0]) or "adapter"
