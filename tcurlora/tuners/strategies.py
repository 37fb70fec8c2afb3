"""One strategy per method: what an adapter of that method puts into the model, trains, saves and merges.

``tcurlora``  stacks of cores (plus modules trained fully, ``train_modules``);
``decoder``   only modules trained fully (each adapter keeps its own copy);
``full``      every base weight, in place (the model can hold no other adapter);
``lora``      HF PEFT's LoRA on the layers tCURLoRA would stack (the comparison baseline; alone too).

The paper's other baselines (``pissa``, ``dora``, ``curlora``, ``lorapt``) live in :mod:`.baselines`. Each
strategy registers itself (:mod:`.registry`).
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..config import TCURLoRAConfig
from ..manifest import norm_prefix, trained_prefix
from .heads import _new_head
from .layers import (COPIES, NORM_TYPES, AdapterError, ModuleSwitch, NormScaleShift, ScaleShift, TCURLayer, TCURStack,
                     projectable_kind, unwrap)
from .registry import register_strategy
from .stacks import (StackSpec, allocate_ranks, decoder_names, decoder_norm_names, find, member_matrix,
                     resolve_stacks, switch_module, trained_module_names, under, wrap_layer)

@dataclass
class AdapterRecord:
    """Everything one named adapter owns."""

    name: str
    config: TCURLoRAConfig
    stacks: "OrderedDict[str, TCURStack]" = field(default_factory=OrderedDict)
    trained: "OrderedDict[str, nn.Module]" = field(default_factory=OrderedDict)  # base path -> own copy
    norms: "OrderedDict[str, ScaleShift]" = field(default_factory=OrderedDict)  # norm path -> its scale and shift
    lora_targets: List[str] = field(default_factory=list)
    labels: Optional[list] = None  # the label table of an adapter loaded from a file
    merge_backup: list = field(default_factory=list)  # (parameter, its value before a PEFT merge)
    base_backup: list = field(default_factory=list)  # (parameter, its value before injection changed it: PiSSA)
    head: Optional[nn.Module] = None  # the new output layer of a PEFT adapter (new labels), behind a ModuleSwitch

    def new_head(self) -> Optional[nn.Module]:
        """The adapter's own output layer when it has new labels (``config.new_head``), else None."""
        if not self.config.new_head:
            return None
        return self.head if self.head is not None else self.trained.get(str(self.config.new_head["module"]))

    def parameters(self):
        for stack in self.stacks.values():
            yield from stack.parameters()
        for module in self.trained.values():
            yield from module.parameters()
        for pair in self.norms.values():
            yield from pair.parameters()


def _clean_copy(tuner, module: nn.Module) -> nn.Module:
    """A deep copy of a base module without any adapter in it (another adapter's wrappers stay behind)."""
    memo = {id(tuner): tuner}
    for record in tuner.adapters.values():
        for part in (*record.stacks.values(), *record.trained.values(), *record.norms.values()):
            memo[id(part)] = part  # shared, and dropped with the wrappers below: never copied
    clone = copy.deepcopy(unwrap(module), memo)

    def strip(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is not None:
                parent._modules[name] = bare = unwrap(child)
                strip(bare)

    strip(clone)
    return clone


def _decoder_patterns(tuner, option: str) -> List[str]:
    """The decoder modules the base declared (``decoder_modules``), which ``option`` needs."""
    patterns = list(tuner.base_info.get("decoder_modules") or [])
    if not patterns:
        raise AdapterError(f"{option} needs the base's decoder modules: adapt a base model that declares them "
                           "(tcurlora.load_base)")
    return patterns


def _switch_in(tuner, record: AdapterRecord, target: nn.Module, own: nn.Module) -> nn.Module:
    """Run ``own`` in place of ``target`` while the adapter is active (behind a ModuleSwitch); returns ``own``."""
    switch_module(tuner.model, target, lambda chain: ModuleSwitch(chain, tuner)).set_copy(record.name, own)
    return own


@register_strategy
class Strategy:
    """The default behaviour (used by ``tcurlora``); the other methods override what differs.

    Each method takes ``tuner``, the model's :class:`~tcurlora.tuners.model.TCURTuner` (which calls it), and the
    ``record`` of the adapter it acts on.
    """

    method = "tcurlora"
    exclusive = False  # the model can hold no other adapter beside one of this method
    trains_base = False  # base weights change in place: the tuner records the base fingerprint first
    layout_key = "stacks"  # where :meth:`describe` (and so an adapter file) lists the stacks

    def inject(self, tuner, record: AdapterRecord, layout: Optional[dict]) -> None:
        """Put the adapter into the model: resolved from its config, or (``layout``: what :meth:`describe`
        returned, as an adapter file stores it) exactly as saved, with no pattern of the config evaluated."""
        stored = None if layout is None else layout.get(self.layout_key, [])
        if stored is None and record.config.selection == "gradient":
            raise AdapterError("selection 'gradient' picks columns and rows from training patches: finetune does, "
                               "and an adapter file keeps them (inject with the stored stacks)")
        self._build_stacks(tuner, record, self.stack_specs(tuner, record) if stored is None
                           else [self.stored_spec(s) for s in stored])
        self._add_trained(tuner, record, layout)
        self._add_norms(tuner, record, layout)

    def stack_specs(self, tuner, record: AdapterRecord) -> list:
        """(spec, indices or None) of every stack the config asks for (each at its rank under a ``rank_budget``)."""
        model, config = tuner.model, record.config
        specs = resolve_stacks(model, config)
        if config.rank_budget is not None and specs:
            decoder = decoder_names(model, _decoder_patterns(tuner, "rank_budget"))
            shapes = [(len(s.members), *member_matrix(model, s.members[0]).shape) for s in specs]
            in_decoder = [all(under(m.module, decoder) for m in s.members) for s in specs]
            for spec, rank in zip(specs, allocate_ranks(specs, shapes, config.rank, config.rank_budget, in_decoder)):
                spec.rank = rank
        return [(spec, None) for spec in specs]

    def stored_spec(self, stack: dict):
        """(spec, indices) of one stack as :meth:`describe` listed it."""
        return StackSpec.from_manifest(stack)

    def make_stack(self, spec: StackSpec, matrices: torch.Tensor, config: TCURLoRAConfig, indices,
                   projectable: Optional[str]):
        return TCURStack(spec.name, spec.members, matrices, spec.rank or config.rank, config.selection, config.seed,
                         config.scale, indices, projectable=projectable, basis=config.basis,
                         rank_stable=config.rank_stable)

    def _build_stacks(self, tuner, record: AdapterRecord, built: list) -> None:
        model = tuner.model
        device = next(model.parameters()).device
        for spec, indices in built:
            try:
                matrices = torch.stack([member_matrix(model, m) for m in spec.members])
            except RuntimeError as exc:  # members of different shapes
                raise AdapterError(f"stack {spec.name}: members do not fit this model ({exc})") from None
            kinds = {projectable_kind(find(model, m.module)) for m in spec.members}
            projectable = kinds.pop() if len(kinds) == 1 else None
            stack = self.make_stack(spec, matrices, record.config, indices, projectable).to(device)
            stack._tuner = tuner
            record.stacks[spec.name] = stack
            for index, member in enumerate(spec.members):
                layer = wrap_layer(model, find(model, member.module), lambda m: TCURLayer(m, tuner))
                layer.add_entry(record.name, stack, index, member.rows)

    def _add_trained(self, tuner, record: AdapterRecord, layout: Optional[dict]) -> None:
        model, config = tuner.model, record.config
        stored = None if layout is None else layout.get("trained_modules")
        paths = trained_module_names(model, config) if stored is None else [str(p) for p in stored]
        head = str(config.new_head["module"]) if config.new_head else None
        if head is not None and head not in paths:
            paths.append(head)
        for path in paths:
            target = find(model, path)
            own = _new_head(target, int(config.new_head["out_channels"])) if path == head else _clean_copy(tuner, target)
            record.trained[path] = _switch_in(tuner, record, target, own)

    def _add_norms(self, tuner, record: AdapterRecord, layout: Optional[dict]) -> None:
        """A scale and shift per channel after each normalisation layer of the decoder (``norm_scale_shift``)."""
        if not record.config.norm_scale_shift:
            return
        model = tuner.model
        stored = None if layout is None else layout.get("norms")
        if stored is None:
            paths = decoder_norm_names(model, _decoder_patterns(tuner, "norm_scale_shift"), list(record.trained))
        else:
            paths = [str(p) for p in stored]
        for path in paths:
            target = find(model, path)
            if not isinstance(target, NORM_TYPES):
                raise AdapterError(f"module {path} ({type(target).__name__}) is not a normalisation layer")
            wrapper = wrap_layer(model, target, lambda m: NormScaleShift(m, tuner), kind=NormScaleShift)
            record.norms[path] = wrapper.add(record.name)

    def remove(self, tuner, record: AdapterRecord) -> None:
        for module in tuner.model.modules():
            if isinstance(module, (TCURLayer, NormScaleShift)):
                module.remove_adapter(record.name)
            elif isinstance(module, ModuleSwitch):
                module.set_copy(record.name, None)

    def trainable(self, tuner, record: AdapterRecord):
        return list(record.parameters())

    def state_dict(self, tuner, record: AdapterRecord, keep_vars: bool = False) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict()
        for name, stack in record.stacks.items():
            for key, value in stack.named_parameters():  # delta_u of a tCURLoRA stack
                out[f"stacks.{name}.{key}"] = value
        for path, module in record.trained.items():
            for key, value in module.state_dict(keep_vars=True).items():
                out[trained_prefix(path) + key] = value
        for path, pair in record.norms.items():
            for key, value in pair.named_parameters():
                out[norm_prefix(path) + key] = value
        return out if keep_vars else OrderedDict((k, v.detach()) for k, v in out.items())

    def after_load(self, tuner, record: AdapterRecord) -> None:
        for stack in record.stacks.values():
            stack.clear_cache()

    def merge(self, tuner, record: AdapterRecord) -> None:
        with torch.no_grad():
            for module in tuner.model.modules():
                if isinstance(module, (TCURLayer, NormScaleShift)):
                    module.merge(record.name)

    def unmerge(self, tuner, record: AdapterRecord) -> None:
        with torch.no_grad():
            for module in tuner.model.modules():
                if isinstance(module, (TCURLayer, NormScaleShift)):
                    module.unmerge()

    def describe(self, tuner, record: AdapterRecord) -> dict:
        described = {"config": record.config.to_dict(), "stacks": [], "trained_modules": list(record.trained)}
        described[self.layout_key] = [s.describe() for s in record.stacks.values()]
        if record.config.norm_scale_shift:
            described["norms"] = list(record.norms)
        return described

    def tensors_from_file(self, tensors: Dict[str, torch.Tensor], adapter_name: str) -> Dict[str, torch.Tensor]:
        return tensors


@register_strategy
class DecoderStrategy(Strategy):
    method = "decoder"

    def inject(self, tuner, record, layout) -> None:
        config = record.config
        if layout is None and not trained_module_names(tuner.model, config) and not config.new_head:
            raise AdapterError("method 'decoder' needs train_modules (regular expressions of the decoder/head modules)")
        self._add_trained(tuner, record, layout)


@register_strategy
class FullStrategy(Strategy):
    method = "full"
    exclusive = True
    trains_base = True

    def inject(self, tuner, record, layout) -> None:
        if record.config.new_head:  # new labels: a new output layer of its own, as every method has
            self._add_trained(tuner, record, layout)

    def trainable(self, tuner, record):
        replaced = {id(p) for path in record.trained for p in unwrap(find(tuner.model, path)).parameters()}
        return [p for p in tuner.model.parameters() if id(p) not in replaced]  # the old head gets no gradient

    def state_dict(self, tuner, record, keep_vars: bool = False):
        out = tuner.base_state_dict(keep_vars=keep_vars)
        out.update(super().state_dict(tuner, record, keep_vars=keep_vars))  # the new head, if any
        return out

    def merge(self, tuner, record) -> None:  # the weights are the adapter
        pass

    unmerge = merge

    def describe(self, tuner, record) -> dict:
        return {"config": record.config.to_dict(), "stacks": [], "trained_modules": list(record.trained)}


@register_strategy
class LoraStrategy(Strategy):
    method = "lora"
    exclusive = True
    trains_base = True  # train_modules train in place
    peft_options: dict = {}  # LoraConfig settings of a PEFT variant (DoRA: use_dora)

    def inject(self, tuner, record, layout) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise AdapterError("method 'lora' needs HF PEFT: pip install peft") from None
        model, config = tuner.model, record.config
        if layout is None:  # the layers tCURLoRA would stack; PEFT has no ConvTranspose LoRA
            specs = resolve_stacks(model, TCURLoRAConfig(**{**config.to_dict(), "method": "tcurlora"}))
            targets = sorted({m.module for s in specs for m in s.members
                              if not isinstance(find(model, m.module), nn.modules.conv._ConvTransposeNd)})
            trained_paths = trained_module_names(model, config)
        else:
            targets = [str(t) for t in layout.get("lora_targets") or []]
            trained_paths = [str(t) for t in layout.get("trained_modules") or []]
        if not targets:
            raise AdapterError("LoRA: no target layer that PEFT supports (PEFT has no ConvTranspose LoRA)")
        for t in targets:
            find(model, t)  # a stored name this model lacks: one clear error, not PEFT's
        record.lora_targets = targets
        lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha or config.rank, target_modules=targets,
                          lora_dropout=0.0, bias="none", **self.peft_options)
        inject_adapter_in_model(lora, model, adapter_name=record.name)
        _wrap_aliases(model)
        if config.new_head:  # new labels: a new output layer of the adapter's own, trained fully (as every method)
            target = find(model, str(config.new_head["module"]))
            record.head = _switch_in(tuner, record, target, _new_head(target, int(config.new_head["out_channels"])))
        self.initialise(tuner, record)
        record.trained = OrderedDict((p, find(model, p)) for p in trained_paths)

    def initialise(self, tuner, record) -> None:
        """After PEFT's injection: what a variant initialises itself (PiSSA's principal factors)."""

    def _lora_layers(self, tuner):
        from peft.tuners.lora import LoraLayer

        return [m for m in tuner.model.modules() if isinstance(m, LoraLayer)]

    def remove(self, tuner, record) -> None:
        """Put every layer PEFT wrapped back as it was (a failed load leaves the model untouched)."""
        from peft.tuners.lora import LoraLayer

        model = tuner.model
        for parent in list(model.modules()):
            for attr, child in list(parent._modules.items()):
                if isinstance(child, LoraLayer):
                    parent._modules[attr] = child.get_base_layer()
                elif isinstance(child, ModuleSwitch):
                    child.set_copy(record.name, None)

    def trainable(self, tuner, record):
        params = [p for n, p in tuner.model.named_parameters() if "lora_" in n and COPIES not in n.split(".")]
        head = list(record.head.parameters()) if record.head is not None else []
        return params + [p for m in record.trained.values() for p in m.parameters()] + head

    def state_dict(self, tuner, record, keep_vars: bool = False):
        trained = list(record.trained)
        out = OrderedDict((k, v) for k, v in tuner.model.state_dict(keep_vars=True).items()
                          if ("lora_" in k or under(k.rsplit(".", 1)[0], trained)) and COPIES not in k.split("."))
        if record.head is not None:  # under the key every method gives a new head
            prefix = trained_prefix(str(record.config.new_head["module"]))
            out.update((prefix + k, v) for k, v in record.head.state_dict(keep_vars=True).items())
        return out if keep_vars else OrderedDict((k, v.detach()) for k, v in out.items())

    def after_load(self, tuner, record) -> None:
        pass

    def merge(self, tuner, record) -> None:
        # PEFT unmerges by subtraction (DoRA by division): keep the exact base weights aside instead
        layers = self._lora_layers(tuner)
        record.merge_backup = [(w, w.detach().clone()) for w in (layer.get_base_layer().weight for layer in layers)]
        try:
            with torch.no_grad():
                for layer in layers:
                    _merge_peft_layer(layer, record.name)
        except Exception:
            self.unmerge(tuner, record)
            raise

    def unmerge(self, tuner, record) -> None:
        with torch.no_grad():
            for weight, value in record.merge_backup:
                weight.data.copy_(value)
        record.merge_backup = []
        for layer in self._lora_layers(tuner):
            layer.merged_adapters = []

    def describe(self, tuner, record) -> dict:
        return {"config": record.config.to_dict(), "stacks": [], "trained_modules": list(record.trained),
                "lora_targets": record.lora_targets}

    def tensors_from_file(self, tensors, adapter_name):
        # PEFT puts the adapter's name in its keys: lora_A.<name>.weight, lora_magnitude_vector.<name>.weight
        return {re.sub(r"\.(lora_(?:A|B|magnitude_vector))\.[^.]+\.", rf".\1.{adapter_name}.", k): v
                for k, v in tensors.items()}


def _merge_peft_layer(layer, adapter: str) -> None:
    base = layer.get_base_layer()
    if not (isinstance(base, nn.Conv3d) and tuple(base.kernel_size) == (1, 1, 1) and base.groups == 1):
        layer.merge()
        return
    # PEFT 0.21 squeezes a 1×1×1 kernel as a 2-D one and fails: read the adapted layer's linear map off an
    # identity input instead (one voxel per input channel; the same maths for LoRA, PiSSA and DoRA)
    weight = base.weight
    eye = torch.eye(base.in_channels, device=weight.device, dtype=weight.dtype).reshape(base.in_channels, -1, 1, 1, 1)
    out = layer(eye)[(...,) + tuple(base.padding)]  # the voxel itself, not the zero padding around it
    if base.bias is not None:
        out = out - base.bias
    weight.data.copy_(out.t().reshape(weight.shape))
    layer.merged_adapters.append(adapter)


def _wrap_aliases(model: nn.Module) -> None:
    """PEFT wraps a layer under the first name it finds; a layer the model also holds under another name (nnU-Net's
    ``.all_modules.0``, which its forward runs) gets the same LoRA layer there, or LoRA would be inert on it."""
    from peft.tuners.lora import LoraLayer

    wrapped = {id(m.get_base_layer()): m for m in model.modules() if isinstance(m, LoraLayer)}
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if child is not None and id(child) in wrapped and wrapped[id(child)] is not parent:
                parent._modules[attr] = wrapped[id(child)]
