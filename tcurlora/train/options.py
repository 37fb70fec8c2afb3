"""What a run takes and gives: the training options, the files of a run, its metrics and its result."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .. import protocol
from ..protocol import FINETUNE_OPTION_KEYS, METHOD_TRAITS


@dataclass
class FinetuneOptions:
    """Training settings; defaults, ranges and messages come from :mod:`tcurlora.protocol` (the same the
    CLI flags and job files use). Invalid values raise :class:`tcurlora.protocol.SettingError`; the options of a
    job come from :meth:`from_job`, which its one check in the protocol has passed."""

    method: str = protocol.default("method")
    rank: int = protocol.default("rank")
    preset: str = protocol.default("preset")
    steps: int = protocol.default("steps")
    lr: Optional[float] = protocol.default("lr")
    weight_decay: float = protocol.default("weight_decay")
    batch_size: int = protocol.default("batch_size")
    patch_size: Optional[Tuple[int, int, int]] = protocol.default("patch_size")
    val_every: int = protocol.default("val_every")
    patience: int = protocol.default("patience")
    seed: int = protocol.default("seed")
    device: str = protocol.default("device")
    bf16: bool = protocol.default("bf16")
    checkpointing: bool = protocol.default("checkpointing")
    grad_accum: int = protocol.default("grad_accum")
    train_modules: List[str] = field(default_factory=lambda: protocol.default("train_modules"))
    checkpoint_every: Optional[int] = protocol.default("checkpoint_every")
    basis: str = protocol.default("basis")
    rank_stable: bool = protocol.default("rank_stable")
    selection: str = protocol.default("selection")
    norm_scale_shift: bool = protocol.default("norm_scale_shift")
    rank_budget: Optional[int] = protocol.default("rank_budget")
    new_label_recipe: bool = protocol.default("new_label_recipe")
    head_start: str = protocol.default("head_start")

    def __post_init__(self) -> None:
        self._set(protocol.validate_settings(dataclasses.asdict(self), FINETUNE_OPTION_KEYS))

    def _set(self, values: dict) -> None:
        for key, value in values.items():
            setattr(self, key, tuple(value) if key == "patch_size" and value is not None else value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_job(cls, job: dict) -> "FinetuneOptions":
        """The options of a job that :func:`tcurlora.protocol.validate_job` checked (and completed with the
        defaults): taken as they are, not checked a second time."""
        options = cls.__new__(cls)  # not __init__: its check is the one the job has passed
        options._set({key: job[key] for key in FINETUNE_OPTION_KEYS})
        return options

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else METHOD_TRAITS[self.method].default_lr

    def new_head_start(self) -> str:
        """Where a label the base lacks starts: ``prototype`` or ``low-prior`` (``auto``: the method's own)."""
        return METHOD_TRAITS[self.method].head_start if self.head_start == "auto" else self.head_start


@dataclass
class RunFiles:
    """The files of one training run, all named from the adapter's full file name."""

    adapter: Path
    checkpoint: Path
    curve: Path

    @classmethod
    def for_adapter(cls, out) -> "RunFiles":
        out = Path(out)
        stem = protocol.check_adapter_path(out)  # site.v2.safetensors -> site.v2 (not site)
        return cls(out, out.with_name(stem + ".checkpoint.pt"), out.with_name(stem + ".curve.png"))


def checkpoint_path(out) -> Path:
    return RunFiles.for_adapter(out).checkpoint


def curve_path(out) -> Path:
    return RunFiles.for_adapter(out).curve


@dataclass
class TrainingMetrics:
    steps: int
    total_steps: int
    seconds: float
    trainable_values: int
    final_loss: Optional[float]
    best_validation_dice: Optional[float]
    best_step: Optional[int]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["validation_dice"] = self.best_validation_dice  # the Dice of the saved adapter (what Slicer shows)
        return out


@dataclass
class FinetuneResult:
    files: RunFiles
    metrics: TrainingMetrics
    cancelled: bool

    @property
    def outputs(self) -> Dict[str, Path]:
        """What the run wrote: the checkpoint always; adapter and curve when it finished."""
        out = {"checkpoint": self.files.checkpoint}
        if not self.cancelled:
            out.update(adapter=self.files.adapter, curve=self.files.curve)
        return out

    def metrics_dict(self) -> dict:
        return self.metrics.to_dict()
