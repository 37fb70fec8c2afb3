"""Which layers go into which stack: module naming through wrappers and aliases, and the presets.

Names are always the base model's (wrappers are transparent), and a module the model reaches under several
names (nnU-Net's blocks hold each conv as ``.conv`` and ``.all_modules.0``; shared layers) is one member,
named by its first path, whose every path the tuner wraps.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ..config import TCURLoRAConfig
from .layers import (CORES, COPIES, NORM_TYPES, NORMS, WEIGHTED_TYPES, WRAPPERS, AdapterError, ModuleSwitch, TCURLayer,
                     unwrap, weight_to_matrix)

CONV_TYPES = (nn.Conv3d, nn.ConvTranspose3d)


@dataclass
class Member:
    module: str
    rows: Optional[Tuple[int, int]] = None  # a row block of the module's matrix (qkv split), else all

    def to_dict(self) -> dict:
        return {"module": self.module, "rows": list(self.rows) if self.rows else None}


@dataclass
class StackSpec:
    name: str
    members: List[Member]
    rank: Optional[int] = None  # the stack's own rank (a rank budget's); None: the config's

    @classmethod
    def from_manifest(cls, stack: dict) -> Tuple["StackSpec", Tuple[list, list]]:
        """A stored stack (name, members, indices I and J) as written by :meth:`TCURStack.describe`."""
        members = [Member(m["module"], tuple(m["rows"]) if m["rows"] else None) for m in stack["members"]]
        return cls(stack["name"], members), (stack["I"], stack["J"])


# ----------------------------------------------------------------------------------------------
# naming through wrappers


def walk(model: nn.Module, remove_duplicate: bool = True) -> Iterator[Tuple[str, nn.Module, nn.Module, str]]:
    """(base name, base module, the module holding it, its attribute there) for every module, wrappers hidden.

    With ``remove_duplicate`` each module appears once, under the first name that reaches it.
    """
    seen = set()

    def visit(module: nn.Module, prefix: str, parent: Optional[nn.Module], attr: str):
        base = unwrap(module)
        if remove_duplicate:
            if id(base) in seen:
                return
            seen.add(id(base))
        yield prefix, base, parent, attr
        for name, child in base._modules.items():
            if child is not None:
                yield from visit(child, f"{prefix}.{name}" if prefix else name, base, name)

    yield from visit(model, "", None, "")


def base_named_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """Named modules of the base model (each once), with wrapper levels and adapter copies hidden."""
    for name, module, _, _ in walk(model):
        yield name, module


def find(model: nn.Module, path: str) -> nn.Module:
    """The base module named ``path`` (a base-model name: wrappers are looked through)."""
    module = unwrap(model)
    for part in filter(None, path.split(".")):
        child = module._modules.get(part)
        if child is None:
            raise AdapterError(f"the model has no module {path!r}")
        module = unwrap(child)
    return module


def _slots(model: nn.Module, target: nn.Module) -> List[Tuple[nn.Module, str, nn.Module]]:
    """Every (holder, attribute, chain) where the model holds ``target``: ``chain`` is what the holder's slot
    holds (``target`` itself or wrappers around it), and an alias reached twice is listed once per path."""
    slots = []
    for _, _, parent, attr in walk(model, remove_duplicate=False):
        if parent is not None and unwrap(parent._modules[attr]) is target:
            slots.append((parent, attr, parent._modules[attr]))
    return slots


def wrap_layer(model: nn.Module, target: nn.Module, make, kind=TCURLayer) -> nn.Module:
    """The wrapper of type ``kind`` (a :class:`TCURLayer` or a norm's) around ``target`` (``make(target)`` if there
    is none yet), innermost: directly around the layer, inside any switch, at every path that reaches it."""
    for _, _, chain in _slots(model, target):
        module = chain
        while isinstance(module, WRAPPERS):
            if isinstance(module, kind):
                return module
            module = module.base_module if isinstance(module, ModuleSwitch) else module.base_layer
    layer = make(target)
    for holder, attr, chain in _slots(model, target):
        while isinstance(chain, ModuleSwitch):  # go inside the switches to the bare layer
            holder, attr, chain = chain, "base_module", chain.base_module
        holder._modules[attr] = layer
    return layer


def switch_module(model: nn.Module, target: nn.Module, make) -> ModuleSwitch:
    """The :class:`ModuleSwitch` around ``target`` (``make(chain)`` if there is none yet), outermost: around
    whatever the model holds there, at every path that reaches it."""
    slots = _slots(model, target)
    for _, _, chain in slots:
        if isinstance(chain, ModuleSwitch):
            return chain
    switches: Dict[int, ModuleSwitch] = {}
    for holder, attr, chain in slots:
        holder._modules[attr] = switches.setdefault(id(chain), make(chain))
    if len(switches) != 1:
        raise AdapterError("a module is wrapped differently under its aliases")
    return next(iter(switches.values()))


def adapter_key(key: str) -> bool:
    """Whether a ``state_dict`` key belongs to an adapter (a core or a trained copy), not to the base."""
    parts = key.split(".")
    return CORES in parts or COPIES in parts or NORMS in parts or any(p.startswith("lora_") for p in parts)


def base_key(key: str) -> str:
    """A ``state_dict`` key under the base model's name (wrapper levels dropped)."""
    return ".".join(p for p in key.split(".") if p not in ("base_layer", "base_module"))


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ----------------------------------------------------------------------------------------------
# presets


def has_attention(model: nn.Module) -> bool:
    return any(isinstance(unwrap(m._modules.get("qkv") or nn.Identity()), nn.Linear)
               for _, m in base_named_modules(model))


def _child(module: nn.Module, *names: str) -> Tuple[Optional[str], Optional[nn.Module]]:
    for name in names:
        child = module._modules.get(name)
        if child is not None:
            return name, unwrap(child)
    return None, None


def _vit_stacks(model: nn.Module, excluded: List[str]) -> List[StackSpec]:
    """Per stage (shape): attention [out, q, k, v] of every block; MLP up; MLP down."""
    groups: "OrderedDict[Tuple[str, Tuple[int, int]], List[Member]]" = OrderedDict()

    def add(kind: str, shape, member: Member) -> None:
        groups.setdefault((kind, tuple(shape)), []).append(member)

    for name, module in base_named_modules(model):
        if under(name, excluded):
            continue
        prefix = f"{name}." if name else ""
        _, qkv = _child(module, "qkv")
        out_name, out = _child(module, "out_proj", "proj")
        if isinstance(qkv, nn.Linear) and isinstance(out, nn.Linear) and qkv.out_features % 3 == 0:
            d = qkv.out_features // 3
            if tuple(out.weight.shape) == (d, qkv.in_features):
                add("attn", (d, qkv.in_features), Member(prefix + out_name))
            for i in range(3):
                add("attn", (d, qkv.in_features), Member(prefix + "qkv", (i * d, (i + 1) * d)))
        up_name, up = _child(module, "linear1", "fc1")
        down_name, down = _child(module, "linear2", "fc2")
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear):
            add("mlp_up", up.weight.shape, Member(prefix + up_name))
            add("mlp_down", down.weight.shape, Member(prefix + down_name))
    order = {"attn": 0, "mlp_up": 1, "mlp_down": 2}  # the paper's order, stable across MONAI versions
    keys = sorted(groups, key=lambda key: order[key[0]])
    return [StackSpec(f"{kind}_{shape[0]}x{shape[1]}", groups[(kind, shape)]) for kind, shape in keys]


def _conv_stacks(model: nn.Module, excluded: List[str]) -> List[StackSpec]:
    """Same-shape Conv3d / ConvTranspose3d kernels grouped into stacks (as out × in·k³ matrices)."""
    groups: "OrderedDict[Tuple[str, Tuple[int, ...]], List[Member]]" = OrderedDict()
    for name, module in base_named_modules(model):
        if isinstance(module, CONV_TYPES) and not under(name, excluded):
            kind = "convT" if isinstance(module, nn.ConvTranspose3d) else "conv"
            groups.setdefault((kind, tuple(module.weight.shape)), []).append(Member(name))
    specs = []
    for (kind, shape), members in groups.items():
        n1, n2 = weight_to_matrix(find(model, members[0].module), torch.empty(shape, device="meta")).shape
        specs.append(StackSpec(f"{kind}_{n1}x{n2}", members))
    return specs


def _explicit_stacks(model: nn.Module, stacks: Dict[str, List[str]], excluded: List[str]) -> List[StackSpec]:
    specs = []
    for stack_name, patterns in stacks.items():
        members = [Member(n) for n, m in base_named_modules(model)
                   if isinstance(m, WEIGHTED_TYPES) and matches(n, patterns) and not under(n, excluded)]
        if not members:
            raise AdapterError(f"stack {stack_name!r}: no Linear/Conv module matches {patterns}")
        specs.append(StackSpec(stack_name, members))
    return specs


CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def trained_module_names(model: nn.Module, config: TCURLoRAConfig) -> List[str]:
    """The top-most modules that ``config.train_modules`` selects (each trained fully).

    A selected container (ModuleList, ModuleDict, Sequential) stands for its children: networks index, count
    and iterate their containers (nnU-Net's decoder runs ``len(self.stages)``), which a switch cannot offer.
    """
    modules = dict(base_named_modules(model))
    trained = [n for n in modules if n and matches(n, config.train_modules)]
    top = [n for n in trained if not under(n, [t for t in trained if t != n])]
    out: List[str] = []
    while top:
        name = top.pop(0)
        module = modules[name]
        if isinstance(module, CONTAINERS):
            top[:0] = [f"{name}.{child}" for child, m in module._modules.items() if m is not None
                       and f"{name}.{child}" in modules]
        else:
            out.append(name)
    return out


def decoder_names(model: nn.Module, patterns: List[str]) -> List[str]:
    """The modules a base declares as its decoder (``decoder_modules``: regular expressions of module names)."""
    return [n for n, _ in base_named_modules(model) if n and matches(n, patterns)]


def decoder_norm_names(model: nn.Module, patterns: List[str], excluded: List[str]) -> List[str]:
    """The normalisation layers inside the decoder modules ``patterns`` selects (outside ``excluded``), in order."""
    decoder = decoder_names(model, patterns)
    return [n for n, m in base_named_modules(model)
            if isinstance(m, NORM_TYPES) and under(n, decoder) and not under(n, excluded)]


def allocate_ranks(specs: List[StackSpec], shapes: List[Tuple[int, int, int]], rank: int, budget: int,
                   decoder: List[bool]) -> List[int]:
    """Each stack's rank under a budget of ``budget`` core values (Σ K·r²): every stack starts at ``rank`` (at most
    min(n1, n2)); then, a round at a time, each decoder stack whose next rank still fits gets one more, until none
    does; then the other stacks the same way with what is left.

    Args:
        specs: the stacks, in module order (their names appear in messages).
        shapes: (K, n1, n2) of each stack.
        rank: the starting rank.
        budget: the most core values in all.
        decoder: whether each stack lies in the base's decoder.
    """
    ranks = [min(rank, n1, n2) for _, n1, n2 in shapes]
    spent = sum(k * r * r for (k, _, _), r in zip(shapes, ranks))
    if spent > budget:
        raise AdapterError(f"rank_budget {budget} is below the {spent} core values of rank {rank}")
    for group in (True, False):
        grown = True
        while grown:
            grown = False
            for i, ((k, n1, n2), r) in enumerate(zip(shapes, ranks)):
                cost = k * (2 * r + 1)
                if decoder[i] == group and r < min(n1, n2) and spent + cost <= budget:
                    ranks[i], spent, grown = r + 1, spent + cost, True
    return ranks


def resolve_stacks(model: nn.Module, config: TCURLoRAConfig) -> List[StackSpec]:
    """The stacks a config asks for on ``model`` (names and members, not yet built)."""
    excluded = [n for n, _ in base_named_modules(model) if n and (matches(n, config.exclude_modules)
                                                                 or matches(n, config.train_modules))]
    if config.new_head:
        excluded.append(str(config.new_head["module"]))
    if config.target_modules:
        targets = [n for n, _ in base_named_modules(model) if n and matches(n, config.target_modules)]
        if not targets:
            raise AdapterError(f"target_modules {config.target_modules} match no module of the network")
        excluded += [n for n, m in base_named_modules(model) if isinstance(m, WEIGHTED_TYPES) and not under(n, targets)]
    preset = config.preset
    if preset == "auto":
        preset = "vit" if has_attention(model) else "conv"
    elif preset == "decoder":  # the conv stacks inside the decoder's modules (target_modules)
        if not config.target_modules:
            raise AdapterError("preset 'decoder' needs the decoder's modules: give target_modules, or adapt a base "
                               "model that declares its decoder (tcurlora.load_base)")
        preset = "conv"
    specs: List[StackSpec] = []
    if preset == "vit":
        specs += _vit_stacks(model, excluded)
    elif preset == "conv":
        specs += _conv_stacks(model, excluded)
    specs += _explicit_stacks(model, config.stacks, excluded)
    seen = set()
    for spec in specs:
        for m in spec.members:
            key = (m.module, m.rows)
            if key in seen:
                raise AdapterError(f"module {m.module} is in two stacks")
            seen.add(key)
    return specs


def member_matrix(model: nn.Module, member: Member) -> torch.Tensor:
    module = find(model, member.module)
    if not isinstance(module, WEIGHTED_TYPES):
        raise AdapterError(f"module {member.module} ({type(module).__name__}) has no weight that a stack can hold")
    matrix = weight_to_matrix(module, module.weight.detach())
    if member.rows:
        matrix = matrix[member.rows[0]:member.rows[1]]
    return matrix
