"""An adapted SlicerMONAIAuto3DSeg model as that extension's model folder: ``model.pt`` and ``labels.csv``.

``model.pt`` keeps the base checkpoint's entries (``config``, ``epoch``, ``best_metric``) with the merged
``state_dict``; a new head sets ``config["network"]["out_channels"]`` and widens the deep-supervision heads the
extension's network also builds. ``labels.csv`` has the extension's columns: ``LabelValue`` (the channel),
``Name``, then the DICOM codes of each label's terminology (empty where a label has none: the extension then
names the segment and picks a colour itself).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import List

import torch

from ..models.auto3dseg import _CODE_FIELDS, build_network, find_model, read_checkpoint
from .common import Export, format_state

TOOL = "SlicerMONAIAuto3DSeg (its auto3dseg_segresnet_inference.py)"
CODE_PARTS = ("CodingSchemeDesignator", "CodeValue", "CodeMeaning")
# a Slicer terminology string: context~category~type~type modifier~region context~region~region modifier
TERMINOLOGY_CODES = (1, 2, 3, 5, 6)


def write(export: Export, folder: Path, final: Path) -> List[str]:
    """Fill ``folder`` (the exported model folder, renamed to ``final`` afterwards); returns how to run it."""
    container, prefix = find_model(export.base_path)
    checkpoint = read_checkpoint(container, prefix)
    where = container / "model.pt" if container.is_dir() else Path(export.base_path)
    config = dict(checkpoint["config"])
    config["network"] = {**config["network"], "out_channels": len(export.labels) + 1}
    network = build_network(config["network"], where).network  # what the extension builds from the config
    checkpoint["state_dict"] = format_state(network, export.network.state_dict(), checkpoint["state_dict"],
                                            export.channel_sources(), where)
    checkpoint["config"] = config
    torch.save(checkpoint, str(folder / "model.pt"))
    (folder / "labels.csv").write_text(labels_csv(export.labels), encoding="utf-8")
    return [f"SlicerMONAIAuto3DSeg: copy model.pt and labels.csv over the model's folder in ~/.MONAIAuto3DSeg/models/ "
            f"(keep a copy of the base), or run its script: python auto3dseg_segresnet_inference.py --model-file "
            f"{final / 'model.pt'} --image-file IMAGE --result-file SEG.nrrd"]


def labels_csv(labels: List[dict]) -> str:
    """The extension's ``labels.csv`` for the export's channels (what :func:`read_labels_csv` reads)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["LabelValue", "Name"] + [f"{f}.{p}" for f in _CODE_FIELDS for p in CODE_PARTS])
    for label in labels:
        parts = str(label.get("terminology") or "").split("~")
        codes = []
        for index in TERMINOLOGY_CODES:
            code = parts[index].split("^") if index < len(parts) else []
            codes += [(code[i] if i < len(code) else "") for i in range(3)]
        writer.writerow([label["channel"], label["name"]] + codes)
    return out.getvalue()
