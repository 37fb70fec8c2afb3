"""The cases of a run: each (image, label) pair read, checked and brought into model space, its label values
as output channels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import InputError, TCURLoRAError
from ..events import Events
from ..labels import split_ignore, value_channels
from ..models import BaseModel
from .loss import IGNORE_INDEX


@dataclass
class Case:
    image_path: str
    label_path: str
    image: torch.Tensor  # [1, D, H, W] model space
    label: torch.Tensor

    def digest(self) -> str:
        """sha256 of what training sees (the prepared image and label), independent of file names."""
        h = hashlib.sha256()
        for t in (self.image, self.label):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


def load_cases(base: BaseModel, pairs: Sequence[Tuple[str, str]], labels: List[dict], what: str = "training") -> List[Case]:
    """Read and check every case before any training starts; errors name the file.  ``labels`` is the whole
    table (its ``ignore`` label too); the cases' labels come back as channel indices (:func:`_encode_labels`)."""
    from ..io import read_image, read_label

    if not pairs and what == "training":
        raise TCURLoRAError("no training cases given (use --image/--label, --cases FOLDER or a job file)")
    classes, ignore_value = split_ignore(labels)
    channels = value_channels(classes)
    cases = []
    for image_path, label_path in pairs:
        image = read_image(image_path)
        label = read_label(label_path, image, labels, image_path=image_path)
        x, y, _ = base.prepare(image, label)
        if not bool(((y > 0) & (y != ignore_value)).any()):
            raise InputError(label_path, "the label is empty after preprocessing (outside the model's field of view)")
        cases.append(Case(str(image_path), str(label_path), x.float(), _encode_labels(y.long(), channels, ignore_value)))
    return cases


def _encode_labels(y: torch.Tensor, channels: Dict[int, int], ignore_value: Optional[int] = None) -> torch.Tensor:
    """Label values -> their output channels (``channels``: 1..N in table order, values need not be contiguous);
    the ignore label's voxels -> :data:`IGNORE_INDEX`."""
    out = torch.zeros_like(y)
    for value, channel in channels.items():
        out[y == value] = channel
    if ignore_value is not None:
        out[y == ignore_value] = IGNORE_INDEX
    return out


def warn_absent_labels(cases: Sequence[Case], table: List[dict], events: Events) -> None:
    seen = set()
    for c in cases:
        seen |= set(int(v) for v in torch.unique(c.label).tolist())
    absent = [entry["name"] for i, entry in enumerate(table, start=1) if i not in seen]
    if absent:
        events.warning(f"label(s) {', '.join(absent)} occur in no training case: the adapter cannot learn them")
