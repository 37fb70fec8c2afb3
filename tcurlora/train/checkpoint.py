"""The resumable checkpoint: the run record it is bound to, reading and writing it, and when to save."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .. import protocol
from ..atomic import atomic_write
from ..config import TCURLoRAConfig
from ..errors import TCURLoRAError
from .cases import Case
from .options import FinetuneOptions, RunFiles

CHECKPOINT_FORMAT = 2


#: Options that may change between a stopped run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ("device", "checkpoint_every")


def run_record(files: RunFiles, train_cases: Sequence[Case], val_cases: Sequence[Case], options: FinetuneOptions,
               config: TCURLoRAConfig, table: List[dict], base_id: str) -> dict:
    """What makes a run this run: its adapter path, its data (content hashes), settings, labels and base."""
    def cases(cs):
        return [{"image": Path(c.image_path).name, "label": Path(c.label_path).name, "sha256": c.digest()} for c in cs]

    settings = {k: v for k, v in options.to_dict().items() if k not in RESUMABLE_CHANGES}
    return {"adapter": str(files.adapter.resolve()), "cases": cases(train_cases), "validation": cases(val_cases),
            "settings": _plain(settings), "config": _plain(config.to_dict()), "labels": _plain(table),
            "base": base_id}


def _plain(value):
    """JSON-like plain values (tuples -> lists), as a checkpoint stores and loads them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_differences(saved: dict, current: dict) -> List[str]:
    """Human-readable differences between two run records (empty: the same run)."""
    diffs = []
    if saved.get("adapter") != current["adapter"]:
        diffs.append(f"it was written for {saved.get('adapter')}")
    for key, what in (("cases", "training cases"), ("validation", "validation cases")):
        old, new = saved.get(key) or [], current[key]
        if [c["sha256"] for c in old] != [c["sha256"] for c in new]:
            diffs.append(f"its {what} differ ({', '.join(c['image'] for c in old) or 'none'} then, "
                         f"{', '.join(c['image'] for c in new) or 'none'} now)")
    old_settings, new_settings = saved.get("settings") or {}, current["settings"]
    changed = [f"{k} {old_settings.get(k)!r} -> {new_settings.get(k)!r}"
               for k in sorted(set(old_settings) | set(new_settings)) if old_settings.get(k) != new_settings.get(k)]
    if changed:
        diffs.append("settings differ: " + ", ".join(changed))
    if saved.get("config") != current["config"] and not changed:
        diffs.append("the adapter configuration differs")
    if saved.get("labels") != current["labels"]:
        diffs.append("the label table differs")
    if saved.get("base") != current["base"]:
        diffs.append("the base model differs")
    return diffs


def load_checkpoint(path: Path, record: dict) -> dict:
    """The checkpoint at ``path`` if it belongs to the run ``record`` describes; one clear line otherwise."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise TCURLoRAError(f"{path.name}: cannot read this checkpoint ({type(exc).__name__}); train without "
                            "--resume") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "run" not in state:
        raise TCURLoRAError(f"{path.name}: not a checkpoint of this tcurlora version; train without --resume")
    diffs = run_differences(state["run"], record)
    if diffs:
        raise TCURLoRAError(f"{path.name}: belongs to another run, not resumed: {'; '.join(diffs)}. Resume with the "
                            "same files and settings, or train without --resume")
    return state


def checkpoint_bytes(network: torch.nn.Module) -> int:
    """An upper estimate of the run's outputs on disk: checkpoint (state, two AdamW moments, best copy),
    adapter file and curve."""
    trained = sum(p.numel() * p.element_size() for p in network.parameters() if p.requires_grad)
    return 6 * trained + 4 * 2 ** 20


class CheckpointSchedule:
    """Every ``every`` steps, or (None) whenever ``interval_s`` seconds have passed since the last save."""

    def __init__(self, every: Optional[int], interval_s: Optional[float] = None) -> None:
        self.every = every
        self.interval_s = protocol.CHECKPOINT_INTERVAL_S if interval_s is None else interval_s
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every:
            return step % self.every == 0
        return time.monotonic() - self.last >= self.interval_s

    def saved(self) -> None:
        self.last = time.monotonic()


def save_checkpoint(path: Path, state: dict, record: dict) -> None:
    """Write a run's resumable state (``Training.state_dict()``) bound to its record, atomically (a kill during
    the write leaves the previous checkpoint)."""
    payload = {"format": CHECKPOINT_FORMAT, "run": record, **state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
