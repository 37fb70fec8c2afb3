"""An adapted nnU-Net v2 model as nnU-Net's own trained-model folder.

Written as nnU-Net's results layout, ``<export>/Dataset…_<adapter>/{Trainer}__{Plans}__{configuration}/`` with
``dataset.json`` (the labels), ``plans.json``, ``dataset_fingerprint.json`` and ``fold_N/checkpoint_final.pth``
holding the keys nnU-Net's trainer writes: the merged ``network_weights`` (every segmentation layer, the
deep-supervision ones included), the base's trainer name, mirroring axes and training log, ``init_args`` with
the new dataset.json, and an optimizer state without momentum (the base's momentum belongs to other weights).
``nnUNetv2_predict``, SlicerNNUnet (model path: the export folder) and TotalSegmentator read it as they read
the base.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import List, Optional

import torch

from ..errors import InputError
from ..models.nnunet import build_network, find_checkpoint, find_model_folder, read_checkpoint
from .common import Export, check_label_names, folder_name, format_state, read_json_object, write_json

TOOL = "nnU-Net (nnUNetv2_predict, SlicerNNUnet)"
DATASET_FOLDER = re.compile(r"Dataset(?P<id>\d{3})_.+")


def target_name(base_path: Path, adapter: Path) -> str:
    """``Dataset<ID>_<name>_<adapter>``: the base's dataset folder name with the adapter's."""
    model_folder = find_model_folder(base_path)
    if len(model_folder.name.split("__")) != 3:
        raise InputError(model_folder, "is not named Trainer__Plans__configuration: nnU-Net finds models by that name")
    dataset = model_folder.parent
    if not DATASET_FOLDER.fullmatch(dataset.name):
        raise InputError(dataset, "is not an nnU-Net dataset folder (DatasetNNN_Name): nnU-Net finds models by "
                                  "that name")
    return folder_name(dataset.name, adapter)


def write(export: Export, folder: Path, final: Path, fold: Optional[int]) -> List[str]:
    """Fill ``folder`` (the export's dataset folder, renamed to ``final`` afterwards); returns how to run it."""
    model_folder = find_model_folder(export.base_path)
    checkpoint_path = find_checkpoint(model_folder, fold)
    checkpoint = read_checkpoint(checkpoint_path)
    check_label_names(export.labels, export.adapter, "cannot be an nnU-Net label (dataset.json keys labels by "
                                                     "name; 'background' is channel 0)")
    dataset_json = read_json_object(model_folder / "dataset.json")
    dataset_json["labels"] = {"background": 0, **{l["name"]: l["channel"] for l in export.labels}}
    plans = read_json_object(model_folder / "plans.json")
    plans["dataset_name"] = final.name
    trainer_folder = folder / model_folder.name
    write_json(trainer_folder / "dataset.json", dataset_json)
    write_json(trainer_folder / "plans.json", plans)
    if (model_folder / "dataset_fingerprint.json").is_file():
        shutil.copyfile(model_folder / "dataset_fingerprint.json", trainer_folder / "dataset_fingerprint.json")

    cm = export.base.configuration_manager
    network = build_network(cm, 1, len(export.labels) + 1, model_folder / "plans.json").network  # what the predictor builds
    original = {k[len("module."):] if k.startswith("module.") else k: v
                for k, v in checkpoint["network_weights"].items()}
    checkpoint["network_weights"] = format_state(network, export.network.state_dict(), original,
                                                 export.channel_sources(), checkpoint_path)
    optimizer = checkpoint.get("optimizer_state")
    if isinstance(optimizer, dict) and "param_groups" in optimizer:
        checkpoint["optimizer_state"] = {"state": {}, "param_groups": optimizer["param_groups"]}
    init_args = checkpoint.get("init_args")
    if isinstance(init_args, dict):
        checkpoint["init_args"] = {**init_args, "dataset_json": dataset_json, "plans": plans}
    fold_folder = trainer_folder / checkpoint_path.parent.name
    fold_folder.mkdir(parents=True)
    torch.save(checkpoint, str(fold_folder / "checkpoint_final.pth"))

    trainer, plans_name, configuration = model_folder.name.split("__")
    fold_number = checkpoint_path.parent.name[len("fold_"):]
    mirroring = "it mirrors over the trainer's axes; --disable_tta turns that off" \
        if checkpoint.get("inference_allowed_mirroring_axes") is not None else "no mirroring: the trainer's choice"
    return [f"nnUNetv2_predict -i IMAGES -o OUT -d {final.name} -tr {trainer} -p {plans_name} -c {configuration} "
            f"-f {fold_number}, with nnUNet_results={final.parent} ({mirroring})",
            f"SlicerNNUnet: model path {final}, folds {fold_number}"]


def same_id_warning(folder: Path) -> Optional[str]:
    """nnU-Net's ``-d <ID>`` is ambiguous where another dataset folder has the export's ID."""
    match = DATASET_FOLDER.fullmatch(folder.name)
    others = sorted(p.name for p in folder.parent.glob(f"Dataset{match.group('id')}_*") if p != folder) \
        if match and folder.parent.is_dir() else []
    if others:
        return (f"{folder.parent} also holds {', '.join(others)}: give nnU-Net the full name -d {folder.name} "
                f"(-d {match.group('id')} is ambiguous there)")
    return None
