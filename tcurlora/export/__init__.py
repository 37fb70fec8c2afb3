"""``tcurlora export``: an adapter merged into its base and written back in the base's own format, so the base's
own tools run it (``nnUNetv2_predict`` and SlicerNNUnet, ``python -m monai.bundle run``, SlicerMONAIAuto3DSeg)::

    export_model("Dataset901_X/nnUNetTrainer__nnUNetPlans__3d_fullres", "site.safetensors", "exports", fold=0)

One module per format (:mod:`.nnunet`, :mod:`.bundle`, :mod:`.auto3dseg`) and :mod:`.common` for what they
share. The export goes into ``<output>/<base>_<adapter>`` (nnU-Net: ``Dataset…_<adapter>``, so ``<output>`` is
an ``nnUNet_results`` folder), which must not exist; it is built in a temporary folder and renamed, and carries
``tcurlora-export.json`` (base fingerprint, adapter sha256, label channels, how to run it). The adapter is
kilobytes; the export is as large as the base.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

from ..errors import InputError, TCURLoRAError, display_name
from ..events import Events
from ..protocol import EXPORT_FORMATS as FORMATS
from . import auto3dseg as auto3dseg_format, bundle as bundle_format, nnunet as nnunet_format
from .common import TRACE_FILE, Export, folder_name, merged, output_channels, trace, write_folder, write_json

NO_FORMAT = ("has no tool format to export to (export takes nnU-Net model folders, MONAI bundles and "
             "SlicerMONAIAuto3DSeg models); use it with tcurlora segment")
KINDS = {"nnunet": "an nnU-Net model", "bundle": "a MONAI bundle", "auto3dseg": "an Auto3DSeg model"}
TOOLS = {"nnunet": nnunet_format.TOOL, "bundle": bundle_format.TOOL, "auto3dseg": auto3dseg_format.TOOL}

__all__ = ["FORMATS", "TRACE_FILE", "ExportResult", "base_format", "export_model"]


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: ``folder`` (the export), its ``format`` and the ``tool`` that opens it,
    ``open_with`` (commands, one per line), ``warnings``, the label ``channels`` and the sizes in bytes."""

    folder: Path
    format: str
    tool: str
    open_with: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    channels: List[dict] = field(default_factory=list)
    size_bytes: int = 0
    adapter_bytes: int = 0
    cancelled = False  # an export is not cancelled halfway: it is there whole or not at all

    @property
    def outputs(self) -> dict:
        return {"export": str(self.folder)}

    def metrics_dict(self) -> dict:
        return {"format": self.format, "tool": self.tool, "open_with": self.open_with, "size_bytes": self.size_bytes,
                "adapter_bytes": self.adapter_bytes}


def base_format(kind: str, base_path: Path) -> Optional[str]:
    """The format a base of ``kind`` loaded from ``base_path`` exports as (None: a base with no tool format)."""
    if kind in ("nnunet", "auto3dseg"):
        return kind
    if kind == "monai" and base_path.is_dir():
        return "bundle"
    return None


def export_model(base: Union[str, os.PathLike], adapter: Union[str, os.PathLike], output: Union[str, os.PathLike],
                 fmt: Optional[str] = None, *, weights: Optional[str] = None, fold: Optional[int] = None,
                 events: Optional[Events] = None) -> ExportResult:
    """Merge ``adapter`` into ``base`` and write the base's own format into ``output`` (a folder).

    Args:
        base: an nnU-Net trained-model folder, a MONAI bundle folder or an Auto3DSeg model folder or zip.
        adapter: an adapter file trained on that base.
        output: the folder the export goes into (made if missing).
        fmt: ``nnunet``, ``bundle`` or ``auto3dseg``; default the base's own (the only one it can take).
        weights: a network spec's weights (a spec base has no tool format: refused).
        fold: the nnU-Net fold the adapter was trained on (needed when the folder has several).
        events: where progress and warnings go.
    """
    from ..manifest import read_manifest
    from ..models import load_base

    events = events or Events()
    adapter, output = Path(adapter), Path(output)
    if not adapter.is_file():
        raise InputError(adapter, "file not found")
    read_manifest(adapter)  # a bad file is refused before the base loads
    if fmt is not None and fmt not in FORMATS:
        raise TCURLoRAError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    base_path = Path(base["spec"] if isinstance(base, dict) else base)
    if not (base_path.is_dir() or base_path.suffix == ".zip"):  # a catalog name, a network spec: ours only
        raise TCURLoRAError(f"{display_name(base_path)}: {NO_FORMAT}")
    model = load_base(base, weights=weights, fold=fold)
    own = base_format(model.kind, base_path)
    if own is None:
        raise TCURLoRAError(f"{display_name(base_path)}: {NO_FORMAT}")
    fmt = fmt or own
    if fmt != own:
        raise InputError(base_path, f"is {KINDS[own]}: it exports as --format {own}, not {fmt}")
    name = nnunet_format.target_name(base_path, adapter) if fmt == "nnunet" else \
        folder_name(base_path.stem if base_path.is_file() else base_path.name, adapter)
    target = output / name
    if os.path.lexists(target):  # before the work; the rename checks again
        raise InputError(target, "already exists; choose another output folder or remove it")
    warnings: List[str] = []
    manifest = merged(model, adapter)
    events.log(f"{adapter.name} merged into {model.name}")
    export = Export(base=model, base_path=base_path, adapter=adapter, manifest=manifest,
                    labels=output_channels(manifest, warnings), base_labels=list(model.labels), warnings=warnings)

    result = ExportResult(folder=target, format=fmt, tool=TOOLS[fmt], warnings=warnings, channels=export.labels,
                          adapter_bytes=adapter.stat().st_size)

    def build(folder: Path) -> None:
        if fmt == "nnunet":
            result.open_with = nnunet_format.write(export, folder, target, fold)
        elif fmt == "bundle":
            result.open_with = bundle_format.write(export, folder, target)
        else:
            result.open_with = auto3dseg_format.write(export, folder, target)
        write_json(folder / TRACE_FILE, trace(export, fmt, result.open_with))

    try:
        write_folder(target, build)
    except OSError as exc:  # a full disk, a folder without write permission: nothing was left behind
        raise InputError(target, f"not written ({exc.strerror or exc})") from None
    if fmt == "nnunet":
        ambiguous = nnunet_format.same_id_warning(target)
        if ambiguous:
            warnings.append(ambiguous)
    result.size_bytes = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    for warning in warnings:
        events.warning(warning)
    events.log(f"{target}: {TOOLS[fmt]}, {result.size_bytes / 2 ** 20:.1f} MB (the adapter: "
               f"{result.adapter_bytes / 1024:.1f} KB)")
    for line in result.open_with:
        events.log(f"open with {line}")
    return result
