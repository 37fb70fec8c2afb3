"""What every export format shares: the adapter merged into the base, the label table as output channels, the
folder's name, its trace file and its atomic writing."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .. import __version__
from ..adapter import merge_and_unload
from ..adapter_file import load_adapter
from ..atomic import atomic_folder
from ..errors import InputError, TCURLoRAError
from ..models import BaseModel
from ..safejson import read_json_object  # a JSON object file (size and depth limits), or one line naming it
from ..protocol import EXPORT_TRACE_FILE
from ..tuners.heads import start_new_head

TRACE_FILE = EXPORT_TRACE_FILE


@dataclass
class Export:
    """One export being written: the merged network and what the format writers need to know.

    Args:
        base: the base model (its network is the merged one after :func:`merged`).
        base_path: the base as the user gave it (an nnU-Net, bundle or Auto3DSeg folder).
        adapter: the adapter file.
        manifest: the adapter's manifest.
        labels: the output channels 1..N in order: ``{"channel", "value", "name", "color"[, "terminology"]}``,
            ``value`` the adapter's label value (what ``tcurlora segment`` writes), ``channel`` what the
            format's tool writes for it.
        base_labels: the base's own label table (channels 1..M), before the adapter.
        warnings: what the user should know about the result (one line each).
    """

    base: BaseModel
    base_path: Path
    adapter: Path
    manifest: dict
    labels: List[dict]
    base_labels: List[dict]
    warnings: List[str] = field(default_factory=list)

    @property
    def network(self) -> nn.Module:
        return self.base.network

    @property
    def new_head(self) -> bool:
        return bool(self.manifest["method"]["config"].get("new_head"))

    def channel_sources(self) -> List[Optional[int]]:
        """For each output channel (background first), the base's channel of the same label name (case-insensitive),
        None for a label new to the base: how a new head's channels start (:func:`start_new_head`)."""
        known = {str(l["name"]).casefold(): i for i, l in enumerate(self.base_labels, start=1)}
        return [0] + [known.get(l["name"].casefold()) for l in self.labels]


def merged(base: BaseModel, adapter: Path) -> dict:
    """Load ``adapter`` onto ``base`` (refused, in one line, when it belongs to another base) and merge it into
    the network for good (:func:`tcurlora.adapter.merge_and_unload`); returns the adapter's manifest."""
    manifest = load_adapter(base.network, adapter, adapter_name="export")  # and made active
    try:
        merge_and_unload(base.network)
    except (TCURLoRAError, RuntimeError, ValueError) as exc:  # PEFT cannot merge every layer (grouped convs)
        raise InputError(adapter, f"cannot be merged into the base's weights ({exc})") from None
    return manifest


def format_state(target: nn.Module, merged_state: Dict[str, torch.Tensor], original: Dict[str, torch.Tensor],
                 sources: Sequence[Optional[int]], where: Path) -> "OrderedDict[str, torch.Tensor]":
    """The state dict the format's own network ``target`` (built for the export's channels) loads.

    Each tensor is the merged one; where the merged network has none (an output layer only deep-supervision
    training runs, which tcurlora left out) it is the base's own, and when a new head changed the number of
    channels such a layer gets them as the new head started (:func:`start_new_head` with ``sources``).
    """
    out = OrderedDict()
    copies: dict = {}  # one copy per stored tensor: aliases (nnU-Net's .all_modules.0, decoder.encoder) stay shared
    wanted = target.state_dict()
    for key, like in wanted.items():
        value = merged_state.get(key)
        if value is None or value.shape != like.shape:
            value = original.get(key)
        if value is not None and value.shape != like.shape and value.shape[1:] == like.shape[1:] \
                and like.shape[0] == len(sources) and key.endswith((".weight", ".bias")):
            layer = key.rsplit(".", 1)[0]
            weight, bias = _widened(original[f"{layer}.weight"], original.get(f"{layer}.bias"), sources)
            value = weight if key.endswith(".weight") else bias
        if value is None or value.shape != like.shape:
            got = "missing" if value is None else tuple(value.shape)
            raise InputError(where, f"the merged weights do not fit the format's network: {key} is {got}, "
                                    f"the network needs {tuple(like.shape)}")
        shared = (value.data_ptr(), tuple(value.shape), value.stride(), value.dtype)
        if shared not in copies:  # the source is kept too: its memory cannot be reused by a later tensor
            copies[shared] = (value, value.detach().to("cpu", like.dtype).clone())
        out[key] = copies[shared][1]
    return out


def _widened(weight: torch.Tensor, bias: Optional[torch.Tensor], sources: Sequence[Optional[int]]):
    """(weight, bias) of an output convolution with ``len(sources)`` channels, started from ``weight``'s."""
    def conv(channels: int) -> nn.Module:
        return nn.Conv3d(weight.shape[1], channels, tuple(weight.shape[2:]), bias=bias is not None)

    old, new = conv(weight.shape[0]), conv(len(sources))
    with torch.no_grad():
        old.weight.copy_(weight)
        if bias is not None:
            old.bias.copy_(bias)
    start_new_head(new, old, sources)
    return new.weight.detach(), (new.bias.detach() if bias is not None else None)


def output_channels(manifest: dict, warnings: List[str]) -> List[dict]:
    """The adapter's labels as output channels 1..N (its table's order is the network's channel order).

    nnU-Net, bundles and Auto3DSeg write the channel number as the label value, so a table whose values are
    not 1..N in order is renumbered (names, colours and terminology kept) and a warning says how.
    """
    channels = []
    for channel, label in enumerate(manifest["labels"], start=1):
        entry = {"channel": channel, "value": int(label["value"]), "name": str(label["name"]),
                 "color": list(label.get("color") or [])}
        if label.get("terminology"):
            entry["terminology"] = label["terminology"]
        channels.append(entry)
    moved = [f"{c['name']} {c['value']}->{c['channel']}" for c in channels if c["value"] != c["channel"]]
    if moved:
        warnings.append("the format numbers labels by output channel: " + ", ".join(moved)
                        + f" (names kept; {TRACE_FILE} lists both)")
    return channels


def folder_name(base_tag: str, adapter: Path) -> str:
    """``<base>_<adapter>``: what the export is, in a name every tool and file system takes."""
    stem = Path(adapter).name.split(".")[0]
    clean = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_\-]", "_", stem)).strip("_") or "adapter"
    return f"{base_tag}_{clean}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def trace(export: Export, fmt: str, open_with: List[str]) -> dict:
    """What :data:`TRACE_FILE` holds: where the weights came from, and how to run them."""
    base = export.manifest["base"]
    return {
        "format": fmt,
        "base": {"name": export.base.name, "kind": export.base.kind, "path": str(export.base_path),
                 "fingerprint": base["fingerprint"]},
        "adapter": {"file": export.adapter.name, "sha256": sha256_of(export.adapter),
                    "method": export.manifest["method"]["name"], "new_head": export.new_head},
        "labels": export.labels,
        "open_with": open_with,
        "software": f"tcurlora {__version__}",
        "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    }


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """``build(tmp)`` fills a temporary folder next to ``target``, which is then renamed to ``target``."""
    return Path(atomic_folder(target, lambda tmp: build(Path(tmp))))


def check_label_names(labels: List[dict], where: Optional[Path], rule: str) -> None:
    """Names the format keys labels by must be unique (case-sensitive) and not "background"."""
    seen = set()
    for label in labels:
        name = label["name"]
        if name in seen or name.casefold() == "background":
            raise InputError(where or "adapter", f"label name {name!r} {rule}")
        seen.add(name)
