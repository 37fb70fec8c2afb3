"""Adapter configuration (the PEFT-style config dataclass)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .protocol import CORE_BASES as BASES, CORE_SELECTIONS as SELECTIONS, METHODS, PRESETS


MAX_HEAD_CHANNELS = 1024  # labels of one segmentation; far beyond any real label table


def _check_patterns(name: str, patterns) -> None:
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{name} must be a list of regular expressions (strings)")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"{name}: invalid regular expression {p!r} ({exc})") from None


@dataclass
class TCURLoRAConfig:
    """How to adapt a network.

    method:          ``tcurlora`` (train only the stack cores Δ𝒰, plus ``train_modules``), or the
                     baselines ``lora``, ``pissa``, ``dora`` (HF PEFT on the same target layers),
                     ``curlora`` (matrix CUR per layer, inverted-probability indices), ``lorapt``
                     (t-SVD of the same stacks), ``decoder`` (train ``train_modules`` only) and
                     ``full`` (train every weight).
    preset:          which stacks to build: ``vit`` (per ViT/Swin stage: attention [out, q, k, v] of
                     every block, MLP up, MLP down), ``conv`` (same-shape Conv3d/ConvTranspose3d
                     kernels, each as out × in·k³), ``decoder`` (``conv`` inside the base's decoder only:
                     ``target_modules``, by default the decoder modules its base model declares),
                     ``auto`` (``vit`` if the model has attention blocks, else ``conv``) or ``none``
                     (only ``stacks``).
    stacks:          explicit stacks: name -> regular expressions matched (fullmatch) against module
                     names; every matched module's whole weight is a member, in module order.
    rank:            r, the number of CUR columns/rows (clamped to min(n1, n2) per stack).
    selection:       ``deterministic`` (the paper's top-r rule), ``sampled`` (inverted probabilities, seeded;
                     ``seed`` also seeds the ``curlora`` draw) or ``gradient`` (columns and rows by their alignment
                     with the task's first gradient: ``finetune`` picks them from its training patches and the file
                     keeps them; injecting such a config needs the stored stacks).
    scale:           optional multiplier of Δ𝒲 (the paper has none: 1.0).
    basis:           ``cur`` (the core sits between 𝒞 and ℛ themselves, as in the paper) or ``orthonormal`` (between
                     orthonormal bases of the same spans, a QR per Fourier slice: Δ𝒲 = 𝒬 * Δ𝒱 * 𝒫ᵀ, so that
                     ‖Δ𝒲‖ = ‖Δ𝒱‖ whatever the norms and conditioning of 𝒞 and ℛ; same span, same values).
    rank_stable:     scale each stack's Δ𝒲 by sqrt(8 / r) (r: the stack's own rank), so that an Adam step of the
                     core moves the layer as far at any rank as at the rank-8 default the rates were chosen at
                     (rsLoRA's 1/sqrt(r) rule, normalised to r = 8; meant for the orthonormal basis).
    norm_scale_shift: also train a per-channel scale and shift after every normalisation layer of the base's
                     decoder (SSF; ``decoder_modules`` of the base), merged into the norm's affine parameters.
    rank_budget:     the most values the cores may hold: stacks start at ``rank`` and the decoder's stacks are
                     raised first, one rank at a time each, then the others, until no raise fits (None: every
                     stack at ``rank``).
    train_modules:   regular expressions of modules trained fully (decoder, output head); opt-in.
    exclude_modules: regular expressions of modules never put in a stack.
    target_modules:  when not empty, stacks (and the LoRA family's targets) take only layers inside modules matching these
                     regular expressions (e.g. a base's decoder: then backward never enters the encoder).
    new_head:        ``{"module": name, "out_channels": n}`` to give the adapter its own output layer
                     (a new label set); that layer is trained fully.
    lora_alpha:      LoRA scaling numerator of the PEFT baselines (PEFT's α; default = rank).
    """

    method: str = "tcurlora"
    preset: str = "auto"
    stacks: Dict[str, List[str]] = field(default_factory=dict)
    rank: int = 8
    selection: str = "deterministic"
    seed: int = 0
    scale: float = 1.0
    basis: str = "cur"
    rank_stable: bool = False
    norm_scale_shift: bool = False
    rank_budget: Optional[int] = None
    train_modules: List[str] = field(default_factory=list)
    exclude_modules: List[str] = field(default_factory=list)
    target_modules: List[str] = field(default_factory=list)
    new_head: Optional[Dict[str, object]] = None
    lora_alpha: Optional[float] = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTIONS)}")
        if self.basis not in BASES:
            raise ValueError(f"unknown basis {self.basis!r}; choose one of {', '.join(BASES)}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a whole number ≥ 1, got {self.rank!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be a whole number, got {self.seed!r}")
        for name in ("rank_stable", "norm_scale_shift"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.rank_budget is not None and (isinstance(self.rank_budget, bool) or not isinstance(self.rank_budget, int)
                                             or self.rank_budget < 1):
            raise ValueError(f"rank_budget must be a whole number ≥ 1 or None, got {self.rank_budget!r}")
        tcurlora_only = [name for name, on in (("rank_stable", self.rank_stable), ("norm_scale_shift", self.norm_scale_shift),
                                               ("rank_budget", self.rank_budget is not None),
                                               ("selection 'gradient'", self.selection == "gradient")) if on]
        if tcurlora_only and self.method != "tcurlora":
            raise ValueError(f"{', '.join(tcurlora_only)}: options of method 'tcurlora', not {self.method!r}")
        for name in ("scale", "lora_alpha"):
            value = getattr(self, name)
            if value is None and name == "lora_alpha":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        _check_patterns("train_modules", self.train_modules)
        _check_patterns("exclude_modules", self.exclude_modules)
        _check_patterns("target_modules", self.target_modules)
        if not isinstance(self.stacks, dict) or not all(isinstance(k, str) for k in self.stacks):
            raise ValueError("stacks must map stack names to lists of regular expressions")
        for stack_name, patterns in self.stacks.items():
            _check_patterns(f"stacks[{stack_name!r}]", patterns)
        if self.new_head is not None:
            if not isinstance(self.new_head, dict) or set(self.new_head) != {"module", "out_channels"}:
                raise ValueError("new_head must be {'module': name, 'out_channels': n}")
            channels = self.new_head["out_channels"]
            if not isinstance(self.new_head["module"], str) or isinstance(channels, bool) or not isinstance(channels, int) \
                    or not 1 <= channels <= MAX_HEAD_CHANNELS:
                raise ValueError(f"new_head needs a module name and 1..{MAX_HEAD_CHANNELS} out_channels")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TCURLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown adapter config keys: {', '.join(sorted(unknown))}")
        return cls(**data)
