"""The tuner: the object that owns a model's adapters (HF PEFT's ``BaseTuner`` role).

``get_tuner(model)`` returns the model's tuner (making one on first use).  Nothing is stamped on the user's
module: the tuner is found through a weak registry, or, for a deep copy of an adapted model, through the
wrappers it put into the model (their copy carries a copy of the tuner).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import re
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..config import TCURLoRAConfig
from .layers import WRAPPERS, AdapterError, ModuleSwitch, NormScaleShift, TCURLayer
from .stacks import adapter_key, base_key
from .registry import strategy_for
from .strategies import AdapterRecord, Strategy

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")

_TUNERS: "weakref.WeakKeyDictionary[nn.Module, TCURTuner]" = weakref.WeakKeyDictionary()


class TCURTuner:
    """All adapters of one model: adding, switching, merging, saving and loading their state.

    Args:
        model: the base network; its layers are wrapped in place as adapters are added.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self.adapters: "OrderedDict[str, AdapterRecord]" = OrderedDict()
        self.active: Optional[str] = None
        self.merged: Optional[str] = None
        self.base_info: dict = {}  # name, labels, preprocessing, decoder modules of the base (tcurlora.models)
        self.trained_from: Optional[str] = None  # base fingerprint before a method that trains base weights
        self._work: Optional[torch.Tensor] = None

    def __deepcopy__(self, memo):
        # reached through the wrappers of a deep-copied model: the copy belongs to the copied model
        new = copy.copy(self)
        memo[id(self)] = new
        model = self._model()
        copied_model = memo.get(id(model)) if model is not None else None
        new._model = weakref.ref(copied_model) if copied_model is not None else (lambda: None)
        new.adapters = copy.deepcopy(self.adapters, memo)
        new.base_info = copy.deepcopy(self.base_info, memo)
        new._work = None
        if copied_model is not None:
            _TUNERS[copied_model] = new
        return new

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise AdapterError("the tuner's model no longer exists")
        return model

    # -- adapters --------------------------------------------------------------------------------

    def strategy(self, adapter_name: Optional[str] = None) -> Strategy:
        return strategy_for(self.record(adapter_name).config.method)

    def record(self, adapter_name: Optional[str] = None) -> AdapterRecord:
        name = adapter_name or self.active
        if name is None or name not in self.adapters:
            raise AdapterError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
        return self.adapters[name]

    def add_adapter(self, config: TCURLoRAConfig, adapter_name: str = "default", layout: Optional[dict] = None,
                    labels: Optional[list] = None) -> AdapterRecord:
        """Add adapter ``adapter_name``, make it active and leave only its parameters trainable.

        Args:
            config: how to adapt.
            adapter_name: letters, digits, ``_`` and ``-``.
            layout: the structure a saved adapter recorded (stacks with their indices, trained modules, LoRA
                targets): rebuilt exactly, without evaluating the config's patterns.
            labels: the label table an adapter file carried.
        """
        if not isinstance(adapter_name, str) or not ADAPTER_NAME.fullmatch(adapter_name):
            raise AdapterError(f"invalid adapter name {adapter_name!r} (letters, digits, '_' and '-')")
        if adapter_name in self.adapters:
            raise AdapterError(f"the model already has an adapter named {adapter_name!r}")
        if self.merged is not None:
            raise AdapterError("unmerge the merged adapter before adding another")
        strategy = strategy_for(config.method)
        sharing = [r.name for r in self.adapters.values() if strategy_for(r.config.method).exclusive]
        if self.adapters and (strategy.exclusive or sharing):
            method = config.method if strategy.exclusive else self.adapters[sharing[0]].config.method
            raise AdapterError(f"method {method!r} changes the base model itself; its adapter cannot share a model "
                               "with another adapter (load a fresh base)")
        if config.preset == "decoder" and not config.target_modules:  # the decoder its base model declared
            config = dataclasses.replace(config, target_modules=list(self.base_info.get("decoder_modules", [])))
        if strategy.trains_base and self.trained_from is None:
            self.trained_from = self.base_fingerprint()
        record = AdapterRecord(adapter_name, config, labels=labels)
        try:
            strategy.inject(self, record, layout)
        except Exception:
            strategy.remove(self, record)  # undo what was wrapped so far
            raise
        self.adapters[adapter_name] = record
        self.active = adapter_name
        self._release_buffers()
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in strategy.trainable(self, record):
            p.requires_grad_(True)
        return record

    def delete_adapter(self, adapter_name: str) -> None:
        record = self.record(adapter_name)
        if self.merged == adapter_name:
            self.unmerge()
        strategy_for(record.config.method).remove(self, record)
        del self.adapters[adapter_name]
        if self.active == adapter_name:
            self.active = None
        self._release_buffers()

    def set_active(self, adapter_name: Optional[str]) -> None:
        """Switch the adapter in use without reloading the base (None = the plain base model)."""
        if adapter_name is not None:
            self.record(adapter_name)
        if self.merged is not None and self.merged != adapter_name:
            self.unmerge()
        if self.active != adapter_name:
            self._release_buffers()  # only the active adapter's Δ𝒲 is kept
        self.active = adapter_name

    def trainable_parameters(self, adapter_name: Optional[str] = None) -> List[nn.Parameter]:
        record = self.record(adapter_name)
        return strategy_for(record.config.method).trainable(self, record)

    # -- merging ---------------------------------------------------------------------------------

    def merge(self) -> None:
        """Write the active adapter's update into the base weights: inference then costs what the base does."""
        if self.active is None:
            raise AdapterError("no active adapter to merge")
        if self.merged == self.active:
            return
        if self.merged is not None:
            self.unmerge()
        record = self.record()
        strategy_for(record.config.method).merge(self, record)
        self.merged = self.active
        self._release_buffers()  # a merged model reads no Δ𝒲: give its memory back

    def unmerge(self) -> None:
        """Restore the exact base weights (kept aside at merge, not recomputed by subtraction)."""
        if self.merged is None:
            return
        record = self.adapters[self.merged]
        strategy_for(record.config.method).unmerge(self, record)
        self.merged = None

    def merge_and_unload(self) -> nn.Module:
        """The model with the active adapter merged and every wrapper gone (HF PEFT's ``merge_and_unload``).

        In place: each wrapped layer is put back as the base's own layer holding the merged weight, each
        switch as the active adapter's own copy (trained decoder, new head) or the base's module, PEFT's LoRA
        layers as their merged base layers; a module the model holds under several names (nnU-Net's aliases)
        stays one module. The model then has no adapter and ``state_dict()`` has the base's own keys.
        """
        model = self.model
        if self.active is not None:
            self.merge()
        plain = self._plain_module
        done = set()

        def unwrap_children(module: nn.Module) -> None:
            if id(module) in done:
                return
            done.add(id(module))
            for name, child in list(module._modules.items()):
                if child is not None:
                    module._modules[name] = bare = plain(child)
                    unwrap_children(bare)

        unwrap_children(model)
        self.adapters.clear()
        self.active = self.merged = None
        self._work = None
        _TUNERS.pop(model, None)
        return model

    def _plain_module(self, module: nn.Module) -> nn.Module:
        """What a (possibly wrapped) child runs once merged: the module itself without any wrapper."""
        from ..protocol import PEFT_METHODS

        peft_layer = None
        if any(r.config.method in PEFT_METHODS for r in self.adapters.values()):
            from peft.tuners.tuners_utils import BaseTunerLayer as peft_layer
        while True:
            if isinstance(module, TCURLayer):
                module._merge_backup = None
                module = module.base_layer
            elif isinstance(module, NormScaleShift):
                module = module.plain(self.active)
            elif isinstance(module, ModuleSwitch):
                module = module.copy_of(self.active) or module.base_module
            elif peft_layer is not None and isinstance(module, peft_layer):
                module = module.get_base_layer()
            else:
                return module

    # -- state -----------------------------------------------------------------------------------

    def adapter_state_dict(self, adapter_name: Optional[str] = None, keep_vars: bool = False) -> "OrderedDict[str, torch.Tensor]":
        """The trainable state of one adapter: what an adapter file stores (never the frozen base)."""
        record = self.record(adapter_name)
        state = _first_names(strategy_for(record.config.method).state_dict(self, record, keep_vars=True))
        return state if keep_vars else OrderedDict((k, v.detach()) for k, v in state.items())

    def load_adapter_state_dict(self, tensors: Dict[str, torch.Tensor], adapter_name: Optional[str] = None) -> None:
        """Load tensors saved by :meth:`adapter_state_dict`; every key, shape and dtype must match and every
        value be finite."""
        record = self.record(adapter_name)
        strategy = strategy_for(record.config.method)
        target = self.adapter_state_dict(adapter_name, keep_vars=True)
        missing = sorted(set(target) - set(tensors))
        unexpected = sorted(set(tensors) - set(target))
        if missing or unexpected:
            raise AdapterError("tensors do not match the adapter: "
                               + "; ".join(filter(None, [missing and f"missing {', '.join(missing[:5])}",
                                                         unexpected and f"unexpected {', '.join(unexpected[:5])}"])))
        for key, value in tensors.items():
            ref = target[key]
            if tuple(value.shape) != tuple(ref.shape) or value.dtype != ref.dtype:
                raise AdapterError(f"tensor {key}: expected {ref.dtype} {tuple(ref.shape)}, got {value.dtype} {tuple(value.shape)}")
        bad = first_non_finite(tensors)
        if bad is not None:
            raise AdapterError(f"tensor {bad} holds NaN or infinite values")
        with torch.no_grad():
            for key, value in tensors.items():
                target[key].copy_(value)
        strategy.after_load(self, record)

    def base_state_dict(self, keep_vars: bool = False) -> "OrderedDict[str, torch.Tensor]":
        """The base weights under their original names, as before any merge (adapter tensors excluded)."""
        model = self.model
        backups = {}
        for name, module in model.named_modules(remove_duplicate=False):
            clean = base_key(name)
            if isinstance(module, TCURLayer) and module._merge_backup is not None:
                backups[f"{clean}.weight" if clean else "weight"] = module._merge_backup
            elif isinstance(module, NormScaleShift) and module._merge_backup is not None:
                backups[f"{clean}.weight"], backups[f"{clean}.bias"] = module._merge_backup
        out = OrderedDict()
        for key, value in model.state_dict(keep_vars=True).items():
            if adapter_key(key):
                continue
            key = base_key(key)
            value = backups.get(key, value)
            out[key] = value if keep_vars else value.detach()
        return out

    def base_fingerprint(self) -> str:
        """sha256 over the base weights in canonical order: sorted names, dtype, shape, bytes."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.base_state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}\0{str(t.dtype).replace('torch.', '')}\0{tuple(t.shape)}\0".encode())
            # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return "sha256:" + digest.hexdigest()

    def trained_on_fingerprint(self) -> str:
        """The fingerprint of the base the adapters were trained on (before methods that change it)."""
        return self.trained_from or self.base_fingerprint()

    def describe(self, adapter_name: Optional[str] = None) -> dict:
        """What a manifest stores about the adapter's structure: config, stacks, indices, trained modules."""
        record = self.record(adapter_name)
        return strategy_for(record.config.method).describe(self, record)

    # -- buffers ---------------------------------------------------------------------------------

    def work_buffer(self, shape: Tuple[int, ...], device: torch.device) -> torch.Tensor:
        """A Fourier-domain work buffer shared by the stacks of this model, grown as needed."""
        numel = math.prod(shape)
        buf = self._work
        if buf is None or buf.device != device or buf.numel() < numel:
            buf = self._work = torch.empty(numel, device=device)
        return buf[:numel].view(shape)

    def _release_buffers(self) -> None:
        for record in self.adapters.values():
            for stack in record.stacks.values():
                stack.clear_cache()
        self._work = None


def first_non_finite(tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or ±inf; None if all are finite."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def _first_names(state: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
    """Each tensor once, under the first name it has: a module held under two names (nnU-Net's ``.conv`` and
    ``.all_modules.0``, its ``decoder.encoder``) lists its tensors twice, and loading one name fills both."""
    seen, out = set(), OrderedDict()
    for key, value in state.items():
        if id(value) not in seen:
            seen.add(id(value))
            out[key] = value
    return out


def get_tuner(model: nn.Module, create: bool = True) -> Optional[TCURTuner]:
    """The tuner of ``model`` (made on first use unless ``create`` is False)."""
    tuner = _TUNERS.get(model)
    if tuner is not None:
        return tuner
    for module in model.modules():  # a deep copy: its wrappers carry the copied tuner
        if isinstance(module, WRAPPERS) and module._tuner._model() is model:
            _TUNERS[model] = module._tuner
            return module._tuner
    if not create:
        return None
    tuner = _TUNERS[model] = TCURTuner(model)
    return tuner
