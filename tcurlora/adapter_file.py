"""Adapter files: one ``.safetensors`` holding the trained state and a JSON manifest in its header.

𝒞 and ℛ are not stored: they are slices of the base weights, so a file is only valid on the base
whose fingerprint it records.  Writing is atomic; reading never unpickles anything.
"""

from __future__ import annotations

import datetime
import hashlib
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
from .adapter import (AdapterError, ModuleSwitch, TCURLayer, adapter_state_dict, base_state_dict, delete_adapter,
                      describe_adapter, inject_adapter, list_adapters, load_adapter_state_dict, set_active_adapter)
from .config import TCURLoRAConfig
from .errors import TCURLoRAError, display_name
from .io import atomic_write, validate_label_table
from .manifest import (FORMAT_VERSION, METADATA_KEY, ManifestError, check_tensors, parse_manifest,
                       read_adapter_bytes)


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the frozen base weights in canonical order: sorted names, dtype, shape, bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(base_state_dict(model).items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{str(t.dtype).replace('torch.', '')}\0{tuple(t.shape)}\0".encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


def base_name(model: nn.Module) -> str:
    return getattr(model, "tcurlora_base_name", type(model).__name__)


def save_adapter(model: nn.Module, path, *, labels: Optional[List[dict]] = None,
                 preprocessing: Optional[dict] = None, provenance: Optional[dict] = None,
                 adapter_name: Optional[str] = None) -> dict:
    """Write the adapter (the active one by default) to ``path``; returns the manifest written."""
    described = describe_adapter(model, adapter_name)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model, adapter_name).items()}
    bad = _non_finite(tensors)
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
        "base": {"name": base_name(model), "fingerprint": _trained_on_fingerprint(model, described)},
        "labels": labels if labels is not None else list(getattr(model, "tcurlora_labels", [])),
        "preprocessing": preprocessing if preprocessing is not None else dict(getattr(model, "tcurlora_preprocessing", {})),
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
            f"{name}: trained on base model '{manifest['base']['name']}' ({manifest['base']['fingerprint'][7:19]}), "
            f"but the loaded base is '{base_name(model)}' ({fingerprint[7:19]}); load the matching base model")
    adapter_name = adapter_name or _default_adapter_name(path)
    if adapter_name in list_adapters(model):
        raise TCURLoRAError(f"{name}: an adapter named {adapter_name!r} is already loaded")
    _check_new_head(model, manifest["method"]["config"].get("new_head"), index, name)
    try:
        config = TCURLoRAConfig.from_dict(manifest["method"]["config"])
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{name}: invalid adapter config ({exc})") from None
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError) as exc:
        raise ManifestError(f"{name}: unreadable tensors ({exc})") from None
    del data
    bad = _non_finite(tensors)
    if bad:
        raise ManifestError(f"{name}: tensor {bad} holds NaN or infinite values")
    if manifest["method"]["name"] == "lora":  # PEFT puts the adapter's name in its keys: lora_A.<name>.weight
        tensors = {re.sub(r"\.(lora_[AB])\.[^.]+\.", rf".\1.{adapter_name}.", k): v for k, v in tensors.items()}
    previous = getattr(getattr(model, "_tcurlora_state", None), "active", None)
    had_lora = hasattr(model, "_tcurlora_lora")
    try:
        inject_adapter(model, config, adapter_name, stacks=manifest["method"]["stacks"])
        load_adapter_state_dict(model, tensors, adapter_name)
    except (AdapterError, TypeError, ValueError, IndexError, KeyError, AttributeError, RuntimeError, re.error) as exc:
        # a crafted config (train_modules: 5, a bad regex, scale: "x") fails outside AdapterError too
        _discard(model, adapter_name, previous, drop_lora=not had_lora)
        raise ManifestError(f"{name}: does not fit this base model: {exc}") from None
    if not activate:
        set_active_adapter(model, previous)
    for p in model.parameters():
        p.requires_grad_(False)
    model.tcurlora_adapter_labels = getattr(model, "tcurlora_adapter_labels", {})
    model.tcurlora_adapter_labels[adapter_name] = manifest["labels"]
    return manifest


def _non_finite(tensors: dict) -> Optional[str]:
    """The first floating-point tensor holding NaN or ±inf, by name; None if all are finite."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def _check_new_head(model: nn.Module, head: Optional[dict], index: dict, name: str) -> None:
    """A new output layer is built before its tensors load: its stored weight must have exactly the shape the
    layer will have, so a crafted ``out_channels`` cannot allocate more than the file holds."""
    if not head:
        return
    try:
        module = model.get_submodule(head["module"])
    except AttributeError:
        raise ManifestError(f"{name}: does not fit this base model: new_head module {head['module']} not found") from None
    module = getattr(module, "base_module", module)  # an earlier adapter's switch or stack wrapper
    module = getattr(module, "base_layer", module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ManifestError(f"{name}: does not fit this base model: new_head {head['module']} is not a Linear/Conv layer")
    shape = list(weight.shape)
    shape[1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0] = head["out_channels"]
    stored = index[f"trained.{head['module'].replace('.', '__')}.weight"]["shape"]
    if stored != shape:
        raise ManifestError(f"{name}: does not fit this base model: new_head weight is {stored} in the file, "
                            f"the layer needs {shape}")


def _trained_on_fingerprint(model: nn.Module, described: dict) -> str:
    """The fingerprint of the base the adapter was trained on.

    ``full`` (and LoRA's ``train_modules``) train base weights in place, so after training the live weights
    are no longer the base's: use the fingerprint :func:`tcurlora.adapter.inject_adapter` recorded before training.
    """
    recorded = getattr(model, "tcurlora_base_fingerprint", None)
    if recorded and described["config"]["method"] in ("full", "lora"):
        return recorded
    return base_fingerprint(model)


def _default_adapter_name(path) -> str:
    """The adapter name taken from a file name; 'train', 'eval', 'to'... are ModuleDict attributes, so prefixed."""
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(path).name.split(".")[0]) or "adapter"
    return f"adapter_{name}" if hasattr(nn.ModuleDict(), name) else name


def _discard(model: nn.Module, adapter_name: str, previous: Optional[str], drop_lora: bool = False) -> None:
    """Undo a failed load, including a partly built adapter (inject_adapter registers it only at the end) and
    PEFT LoRA layers this load injected (``drop_lora``)."""
    if drop_lora and hasattr(model, "_tcurlora_lora"):
        from peft.tuners.lora import LoraLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
        del model._tcurlora_lora
    if adapter_name in list_adapters(model):
        delete_adapter(model, adapter_name)
    for module in model.modules():
        if isinstance(module, TCURLayer):
            module._entries.pop(adapter_name, None)
        elif isinstance(module, ModuleSwitch):
            module._copies.pop(adapter_name, None)
    state = getattr(model, "_tcurlora_state", None)
    if state is not None:
        state.active = previous
