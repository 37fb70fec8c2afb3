"""The model-level API: add, switch, merge, save and load adapters of a model in place.

Each function is a thin call on the model's :class:`~tcurlora.tuners.TCURTuner`, which owns the adapter
state (see :mod:`tcurlora.tuners` for the layers, stack discovery and the Fourier kernels)::

    model = inject_adapter(network, TCURLoRAConfig(rank=8))   # only the cores train
    ...train...
    merge_adapter(model)                                      # inference at the base model's cost
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .config import TCURLoRAConfig
from .tuners import AdapterError, AdapterRecord, get_tuner, resolve_stacks

__all__ = ["AdapterError", "active_adapter", "adapter_state_dict", "base_fingerprint", "base_state_dict",
           "delete_adapter", "describe_adapter", "get_adapter", "inject_adapter", "list_adapters",
           "load_adapter_state_dict", "merge_adapter", "merge_and_unload", "resolve_stacks",
           "set_active_adapter", "short_fingerprint", "trainable_parameter_count", "unmerge_adapter"]


def inject_adapter(model: nn.Module, config: TCURLoRAConfig, adapter_name: str = "default",
                   stacks: Optional[List[dict]] = None) -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place, make it active, and return ``model``.

    Only the adapter's parameters are left trainable.  ``stacks`` (from a saved manifest) rebuilds the exact
    stacks and CUR indices of a saved adapter instead of resolving them from ``config``.
    """
    get_tuner(model).add_adapter(config, adapter_name, layout=None if stacks is None else {
        "stacks": stacks, "trained_modules": None})
    return model


def set_active_adapter(model: nn.Module, adapter_name: Optional[str]) -> None:
    """Switch the adapter in use without reloading the base (None = the plain base model)."""
    get_tuner(model).set_active(adapter_name)


def list_adapters(model: nn.Module) -> List[str]:
    tuner = get_tuner(model, create=False)
    return list(tuner.adapters) if tuner else []


def active_adapter(model: nn.Module) -> Optional[str]:
    tuner = get_tuner(model, create=False)
    return tuner.active if tuner else None


def get_adapter(model: nn.Module, adapter_name: Optional[str] = None) -> AdapterRecord:
    """The record of one adapter (its config, stacks and trained module copies)."""
    return get_tuner(model).record(adapter_name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    get_tuner(model).delete_adapter(adapter_name)


def merge_adapter(model: nn.Module) -> nn.Module:
    """Write the active adapter's update into the base weights: inference then costs what the base does."""
    get_tuner(model).merge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """The base network with the active adapter merged into its weights and every wrapper removed (HF PEFT's
    name): a plain module whose ``state_dict()`` has the base's own keys (a new head's with its new number of
    outputs), ready for the base's own tools. In place; the adapters are gone afterwards (PEFT's semantics)."""
    tuner = get_tuner(model, create=False)
    return tuner.merge_and_unload() if tuner is not None else model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Restore the exact base weights (kept aside at merge, not recomputed by subtraction)."""
    get_tuner(model).unmerge()
    return model


def adapter_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> "OrderedDict[str, torch.Tensor]":
    """The trainable state of one adapter: what an adapter file stores (never the frozen base)."""
    return get_tuner(model).adapter_state_dict(adapter_name)


def load_adapter_state_dict(model: nn.Module, tensors: Dict[str, torch.Tensor], adapter_name: Optional[str] = None) -> None:
    """Load tensors saved by :func:`adapter_state_dict`; every key, shape and dtype must match."""
    get_tuner(model).load_adapter_state_dict(tensors, adapter_name)


def base_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The frozen base weights under their original names (merged deltas excluded)."""
    return get_tuner(model).base_state_dict()


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the base weights in canonical order (sorted names, dtype, shape, bytes)."""
    return get_tuner(model).base_fingerprint()


def short_fingerprint(fingerprint: str) -> str:
    """The 12 hex digits of a base fingerprint (``sha256:…``) that messages and folder names show."""
    return fingerprint.split(":", 1)[-1][:12]


def describe_adapter(model: nn.Module, adapter_name: Optional[str] = None) -> dict:
    """What a manifest stores about the adapter's structure: config, stacks, indices, trained modules."""
    return get_tuner(model).describe(adapter_name)


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of trainable values (what the optimiser updates)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
