"""Adapter files: one ``.safetensors`` holding the trained state and a JSON manifest in its header.

𝒞 and ℛ are not stored: they are slices of the base weights, so a file is only valid on the base
whose fingerprint it records.  Writing is atomic; reading never unpickles anything.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save_file

from . import __version__
from .config import TCURLoRAConfig
from .errors import TCURLoRAError, display_name
from .io import atomic_write, validate_label_table
from .manifest import (FORMAT_VERSION, LORA_KEY, METADATA_KEY, ManifestError, check_tensors,
                       parse_manifest, read_adapter_bytes, trained_prefix)
from .adapter import base_fingerprint, short_fingerprint
from .protocol import PEFT_METHODS
from .tuners import AdapterError, get_tuner
from .tuners.model import first_non_finite
from .tuners.stacks import find
from .tuners.registry import strategy_for


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
    bad = first_non_finite(tensors)
    if bad:  # a diverged training (NaN/inf) must not become a file that segments everything as background
        raise TCURLoRAError(f"{display_name(path)}: not written: tensor {bad} holds NaN or infinite values "
                            "(the training diverged; try a lower learning rate)")
    prov = {"software": f"tcurlora {__version__}", "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
            "cases": None, "steps": None, "validation_dice": None}
    prov.update(provenance or {})
    # JSON has no NaN/inf (and the reader refuses them): a metric that could not be computed is recorded as null
    prov = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in prov.items()}
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
    # One read of the whole file: header and tensors come from the same bytes (no memory map to fault on)
    data, metadata, index = read_adapter_bytes(path)
    if METADATA_KEY not in metadata:
        raise ManifestError(f"{name}: is a safetensors file but not a tcurlora adapter (no manifest)")
    manifest = parse_manifest(metadata[METADATA_KEY], name)
    check_tensors(manifest, index, name)
    try:
        validate_label_table(manifest["labels"])  # what segment will write: checked before any work
    except TCURLoRAError as exc:
        raise ManifestError(f"{name}: {exc}") from None
    fingerprint = base_fingerprint(model)
    if manifest["base"]["fingerprint"] != fingerprint:
        raise TCURLoRAError(
            f"{name}: trained on base model '{manifest['base']['name']}' ({short_fingerprint(manifest['base']['fingerprint'])}), "
            f"but the loaded base is '{_base_name(model)}' ({short_fingerprint(fingerprint)}); load the matching base model")
    tuner = get_tuner(model)
    adapter_name = adapter_name or _default_adapter_name(path)
    if adapter_name in tuner.adapters:
        raise TCURLoRAError(f"{name}: an adapter named {adapter_name!r} is already loaded")
    _check_layers_fit(model, manifest["method"], index, name)
    try:
        config = TCURLoRAConfig.from_dict(manifest["method"]["config"])
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{name}: invalid adapter config ({exc})") from None
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError) as exc:
        raise ManifestError(f"{name}: unreadable tensors ({exc})") from None
    del data
    bad = first_non_finite(tensors)
    if bad:
        raise ManifestError(f"{name}: tensor {bad} holds NaN or infinite values")
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


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _check_layers_fit(model: nn.Module, method: dict, index: dict, name: str) -> None:
    """Layers a load builds before its tensors arrive must match the file's tensors exactly, shape and dtype:
    a new output head (a crafted ``out_channels`` would allocate beyond the file) and PEFT's LoRA matrices
    (PEFT cannot take them out again once injected, so a misfit must be found before)."""
    def layer(path: str) -> nn.Module:
        try:
            module = find(model, path)  # the base's layer, through any earlier adapter's wrappers
        except AdapterError:
            raise ManifestError(f"{name}: does not fit this base model: no module {path}") from None
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() < 2:
            raise ManifestError(f"{name}: does not fit this base model: {path} is not a Linear/Conv layer")
        return module

    def expect(key: str, shape: list, dtype: torch.dtype) -> None:
        stored = index.get(key)
        wanted = _SAFETENSORS_DTYPES.get(dtype, str(dtype))
        if stored is None or stored["shape"] != shape or stored["dtype"] != wanted:
            got = "missing" if stored is None else f"{stored['dtype']} {stored['shape']}"
            raise ManifestError(f"{name}: does not fit this base model: tensor {key} is {got}, the layer needs "
                                f"{wanted} {shape}")

    head = method["config"].get("new_head")
    if head:
        module = layer(head["module"])
        shape = list(module.weight.shape)
        shape[1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0] = head["out_channels"]
        expect(trained_prefix(head["module"]) + "weight", shape, module.weight.dtype)
    if method["name"] in PEFT_METHODS:
        rank = method["config"].get("rank", TCURLoRAConfig.rank)
        for target in method["lora_targets"]:
            module = layer(target)
            if isinstance(module, nn.Linear):
                a, b = [rank, module.in_features], [module.out_features, rank]
            elif isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
                ones = [1] * len(module.kernel_size)  # PEFT: A = conv(in, r, kernel), B = conv(r, out, 1, groups)
                a = [rank, module.in_channels, *module.kernel_size]
                b = [module.out_channels, rank // module.groups, *ones]
            else:
                raise ManifestError(f"{name}: does not fit this base model: {target} is not a layer PEFT LoRA adapts")
            keys = {}
            for key in index:
                match = LORA_KEY.fullmatch(key)
                if match and match.group("target") == target:
                    keys[match.group("ab")] = key
            expect(keys.get("A", f"{target}.lora_A"), a, module.weight.dtype)
            expect(keys.get("B", f"{target}.lora_B"), b, module.weight.dtype)
        params = dict(model.named_parameters())
        for path in method.get("trained_modules") or []:
            own = {k for k in params if k.startswith(f"{path}.")}
            for key in sorted(own | {k for k in index if k.startswith(f"{path}.")}):
                if key not in params:
                    raise ManifestError(f"{name}: does not fit this base model: no parameter {key}")
                expect(key, list(params[key].shape), params[key].dtype)


def _default_adapter_name(path) -> str:
    """The adapter name taken from a file name (letters, digits, '_' and '-')."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", Path(path).name.split(".")[0]) or "adapter"
