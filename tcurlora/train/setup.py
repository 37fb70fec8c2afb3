"""Before training: the label table, the cases, the adapter configuration and the new head's start."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import protocol
from ..adapter_file import base_fingerprint
from ..config import TCURLoRAConfig
from ..errors import InputError, TCURLoRAError
from ..events import Events
from ..labels import LABELS_FROM_SEGMENTATION, same_labels, split_ignore, value_channels
from ..models import BaseModel
from ..tuners import get_tuner
from ..tuners.heads import output_dim, start_new_head
from ..tuners.layers import unwrap
from ..tuners.stacks import find
from .loss import IGNORE_INDEX
from .options import FinetuneOptions


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


def resolve_labels(base: BaseModel, labels: Optional[Sequence[dict]], first_label: Optional[str]) -> List[dict]:
    """The adapter's label table: given, or from the first Slicer segmentation ("from-segmentation"), or the base's."""
    from ..io import label_table_from_segmentation, validate_label_table

    if labels == LABELS_FROM_SEGMENTATION:
        if not first_label or not str(first_label).endswith(".seg.nrrd"):
            raise TCURLoRAError("labels 'from-segmentation' needs .seg.nrrd label files")
        return label_table_from_segmentation(first_label)
    if labels:
        return validate_label_table(labels)
    return [dict(l) for l in base.labels]


def load_cases(base: BaseModel, pairs: Sequence[Tuple[str, str]], labels: List[dict], what: str = "training") -> List[Case]:
    """Read and check every case before any training starts; errors name the file.  ``labels`` is the whole
    table (its ``ignore`` label too); the cases' labels come back as channel indices (:func:`_encode_labels`)."""
    from ..io import read_image, read_label

    if not pairs and what == "training":
        raise TCURLoRAError("no training cases given (use --image/--label, --cases FOLDER or a job file)")
    classes, ignore_value = split_ignore(labels)
    cases = []
    for image_path, label_path in pairs:
        image = read_image(image_path)
        label = read_label(label_path, image, labels, image_path=image_path)
        x, y, _ = base.prepare(image, label)
        if not bool(((y > 0) & (y != ignore_value)).any()):
            raise InputError(label_path, "the label is empty after preprocessing (outside the model's field of view)")
        cases.append(Case(str(image_path), str(label_path), x.float(), _encode_labels(y.long(), classes, ignore_value)))
    return cases


def _encode_labels(y: torch.Tensor, classes: List[dict], ignore_value: Optional[int] = None) -> torch.Tensor:
    """Label values -> channel indices 1..N in table order (values need not be contiguous); the ignore
    label's voxels -> :data:`IGNORE_INDEX`."""
    out = torch.zeros_like(y)
    for value, channel in value_channels(classes).items():
        out[y == value] = channel
    if ignore_value is not None:
        out[y == ignore_value] = IGNORE_INDEX
    return out


def _warn_absent_labels(cases: Sequence[Case], table: List[dict], events: Events) -> None:
    seen = set()
    for c in cases:
        seen |= set(int(v) for v in torch.unique(c.label).tolist())
    absent = [entry["name"] for i, entry in enumerate(table, start=1) if i not in seen]
    if absent:
        events.warning(f"label(s) {', '.join(absent)} occur in no training case: the adapter cannot learn them")


def _start_new_head(network: torch.nn.Module, base: BaseModel, table: List[dict]) -> None:
    """A fresh adapter's new head (labels that differ from the base's): each label starts from the base's
    channel of the same name, a label new to the base from its background at a low prior
    (:func:`~tcurlora.tuners.heads.start_new_head`)."""
    head = get_tuner(network).record("finetune").new_head()
    if head is None:
        return
    base_head = unwrap(find(network, str(base.head)))
    channels = base_head.weight.shape[output_dim(base_head)]
    known = {str(entry["name"]).casefold(): i for i, entry in enumerate(base.labels, start=1) if i < channels}
    start_new_head(head, base_head, [0] + [known.get(str(entry["name"]).casefold()) for entry in table])


def build_adapter_config(base: BaseModel, options: FinetuneOptions, labels: List[dict]) -> TCURLoRAConfig:
    train_modules = list(options.train_modules)
    if options.method == "decoder" and not train_modules:
        if not base.decoder_modules:
            raise TCURLoRAError(f"base {base.name} declares no decoder modules; pass --train-modules")
        train_modules = list(base.decoder_modules)
    new_head = None
    if not same_labels(labels, base.labels):
        if not base.head:
            raise TCURLoRAError(f"these labels differ from base {base.name}'s, and the base declares no output head to replace")
        new_head = {"module": base.head, "out_channels": len(labels) + 1}
    # preset "decoder": only the conv stacks of the base's decoder modules, so backward stops at the decoder (on
    # deepbet at 128³ a CPU step then costs half of full fine-tuning, against about as much for every conv stack;
    # but on the demo's task it levelled off at Dice 0.954 where every stack reached 0.965, so "auto" keeps every
    # stack and the decoder is the user's choice for speed); the tuner takes the modules the base declared
    if options.preset == "decoder" and not base.decoder_modules:
        raise TCURLoRAError(f"base {base.name} declares no decoder modules: use --preset conv (or auto)")
    return TCURLoRAConfig(method=options.method, preset=options.preset, rank=options.rank, seed=options.seed,
                          train_modules=train_modules if options.method != "full" else [], new_head=new_head)


def training_preprocessing(base: BaseModel, options: FinetuneOptions):
    """The base's preprocessing with the run's patch size (checked against what the base can take)."""
    prep = dataclasses.replace(base.preprocessing)
    if options.patch_size:
        patch = protocol.check_patch_size(options.patch_size, int(prep.divisible_by))
        prep = type(prep).from_dict({**prep.to_dict(), "patch_size": list(patch)})
    return prep


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _read_start(path: str, base: BaseModel, table: List[dict]):
    """The config of the adapter a run continues; refused in one line unless it was trained on this base with
    these labels (its tensors are loaded, with every check of ``load_adapter``, when training starts)."""
    from ..manifest import read_manifest

    manifest = read_manifest(path)
    name = Path(path).name
    fingerprint = base_fingerprint(base.network)
    if manifest["base"]["fingerprint"] != fingerprint:
        raise TCURLoRAError(f"{name}: trained on another base model ({manifest['base']['name']}); "
                            f"it cannot be continued on {base.name}")
    if not same_labels(manifest["labels"], table):
        raise TCURLoRAError(f"{name}: its labels ({', '.join(l['name'] for l in manifest['labels'])}) differ from "
                            f"this run's ({', '.join(l['name'] for l in table)})")
    return TCURLoRAConfig.from_dict(manifest["method"]["config"])
