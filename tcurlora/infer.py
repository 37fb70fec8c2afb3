"""Segmentation: base model (+ adapter, merged first) -> label maps exactly on each input's grid."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .adapter import merge_adapter, set_active_adapter
from .adapter_file import load_adapter
from .atomic import check_writable
from .errors import InputError, TCURLoRAError
from .events import Events
from .labels import channel_values
from .limits import check_bytes, segmentation_bytes, size_text
from .models import BaseModel
from .protocol import PEFT_METHODS
from .runtime import InferenceStopped, StopWatch, pick_device, sliding_window_probabilities, with_oom_fallback
from .userfiles import open_regular

SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass
class SegmentResult:
    """What :func:`segment` wrote: ``files`` (one per segmented input, in input order)."""

    output: Path
    files: List[str] = field(default_factory=list)
    total: int = 0
    seconds_per_volume: Optional[float] = None
    cancelled: bool = False

    @property
    def outputs(self) -> Dict[str, Optional[str]]:
        if self.cancelled:
            return {"segmentation": self.files[0] if self.files else None}
        return {"segmentation": self.files[0] if len(self.files) == 1 else str(self.output)}

    def metrics_dict(self) -> dict:
        out = {"segmented": len(self.files)}
        if self.seconds_per_volume is not None:
            out["seconds_per_volume"] = self.seconds_per_volume
        return out


def keep_largest_component(label: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Per label value, keep only its largest 26-connected component."""
    from scipy import ndimage

    out = label.copy()
    for v in values:
        mask = label == v
        if not mask.any():
            continue
        comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        if n > 1:
            sizes = np.bincount(comps.ravel())
            sizes[0] = 0
            out[mask & (comps != sizes.argmax())] = 0
    return out


def post_processed_values(base: BaseModel, labels: Sequence[dict], largest_component: Optional[bool]) -> List[int]:
    """The label values that keep only their largest component: every label when asked (True), none when not
    (False); by default (None) the base's own rule (``base.largest_component``) for the labels the base itself
    has (matched by name, as a new head matches them), never for a label an adapter added: the base's rule
    describes its own structures (one brain), not a new one (the lateral ventricles are two)."""
    if largest_component is not None:
        return [int(l["value"]) for l in labels] if largest_component else []
    if not base.largest_component:
        return []
    own = {str(l["name"]).casefold() for l in base.labels}
    return [int(l["value"]) for l in labels if str(l["name"]).casefold() in own]


def output_paths(inputs: Sequence[str], output: str) -> List[Path]:
    """One output per input: ``output`` itself for one input file, else files in the ``output`` folder."""
    out = Path(output)
    if len(inputs) == 1 and out.name.endswith(SEGMENTATION_SUFFIXES):
        return [out]
    if out.name.endswith(SEGMENTATION_SUFFIXES):
        raise TCURLoRAError(f"{out.name}: several inputs need an output folder, not a file")
    from .io import stem

    return [out / f"{stem(p)}.seg.nrrd" for p in inputs]


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Files as given; a folder of volumes expands to its volumes (a DICOM series folder stays one input)."""
    from .io import volume_files  # the same rule find_cases uses

    expanded: List[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and not any(f.suffix.lower() == ".dcm" or f.suffix == "" for f in p.iterdir() if f.is_file()):
            files = [str(f) for f in volume_files(p) if not f.name.endswith(".seg.nrrd")]
            if not files:
                raise TCURLoRAError(f"{p.name}: no volumes in this folder")
            expanded += files
        else:
            expanded.append(str(item))
    return expanded


def segment(base: BaseModel, inputs: Sequence[str], output: str, *, adapter: Optional[str] = None,
            device: str = "auto", tta: Optional[bool] = None, largest_component: Optional[bool] = None,
            probabilities: bool = False, sw_batch_size: int = 1, overlap: Optional[float] = None,
            events: Optional[Events] = None, stop_file: Optional[str] = None) -> SegmentResult:
    """Segment each input and write ``.seg.nrrd`` (names, colours) or a plain label map.

    ``overlap``: sliding-window overlap; default the base's own (``base.inference_overlap``). ``tta``: average over
    mirrored inputs; None follows the base's own tool (nnU-Net mirrors when its trainer allows, as
    ``nnUNetv2_predict`` does; bundles, Auto3DSeg and deepbet do not)."""
    from .io import array_to_image, read_image, stem, write_image, write_segmentation

    events = events or Events()
    inputs = expand_inputs(inputs)
    outs = output_paths(inputs, output)
    check_inputs_and_outputs(inputs, outs, adapter)
    dev = pick_device(device)
    overlap = base.inference_overlap if overlap is None else overlap
    network = base.network
    labels = base.labels
    if adapter:
        manifest = load_adapter(network, adapter, adapter_name="segment")
        labels = manifest["labels"]
        if manifest["method"]["name"] not in PEFT_METHODS:
            set_active_adapter(network, "segment")
            merge_adapter(network)  # zero-overhead inference
        # else: the PEFT baselines run unmerged: their layers are live once injected, and PEFT's merge
        # does not cover every conv layer (grouped ones)
        events.log(f"adapter {Path(adapter).name}: {manifest['method']['name']}, labels "
                   + ", ".join(l["name"] for l in labels))
    network.eval().to(dev)
    channel_to_value = channel_values(labels)
    values = channel_to_value[1:]
    one_component = post_processed_values(base, labels, largest_component)
    own_pipeline = hasattr(base, "segment_image")
    result = SegmentResult(output=Path(output), total=len(inputs))
    seconds = []
    with StopWatch(stop_file) as stop:
        for i, (src, dst) in enumerate(zip(inputs, outs), start=1):
            t0 = time.time()
            try:
                if stop.requested():
                    raise InferenceStopped()
                image = read_image(src)
                if own_pipeline:  # the base's own tool segments (nnU-Net's predictor), with our network
                    label, p = base.segment_image(image, labels, dev, tta, stop.requested, probabilities, events)
                else:
                    x, _, meta = base.prepare(image)
                    check_bytes(src, f"segmenting {size_text(x.shape[1:])} voxels in {len(values) + 1} classes",
                                segmentation_bytes(x.shape[1:], len(values) + 1, base.window_bytes, sw_batch_size),
                                "crop or downsample it, lower --sw-batch-size, or free memory")
                    probs = _predict(network, x, base, dev, bool(tta), sw_batch_size, overlap, events, stop.requested)
            except InferenceStopped:  # asked before each volume and between sliding windows
                events.log(f"stopped: {len(result.files)} of {len(inputs)} inputs segmented")
                result.cancelled = True
                return result
            if not own_pipeline:
                label = base.restore(probs, meta, image, channel_to_value)
            if one_component:
                label = keep_largest_component(label, one_component)
            write_segmentation(dst, array_to_image(label.astype(np.uint16 if max(values, default=0) > 255 else np.uint8), image), labels)
            result.files.append(str(dst))
            if probabilities:
                p = p if own_pipeline else base.restore_probabilities(probs, meta, image)
                pimg = sitk.GetImageFromArray(np.moveaxis(p[1:], 0, -1) if p.shape[0] > 2 else p[1], isVector=p.shape[0] > 2)
                _copy_geometry(pimg, image)  # CopyInformation refuses a vector image of a scalar one
                write_image(Path(dst).parent / f"{stem(dst)}_probabilities.nii.gz", pimg)
            seconds.append(time.time() - t0)
            events.progress("segment", i, len(inputs), eta_s=np.mean(seconds) * (len(inputs) - i))
            events.log(f"{Path(src).name} -> {dst} ({seconds[-1]:.1f} s)")
    result.seconds_per_volume = round(float(np.mean(seconds)), 2) if seconds else None
    return result


def check_inputs_and_outputs(inputs: Sequence[str], outs: Sequence[Path], adapter: Optional[str]) -> None:
    """Before any work: every input and the adapter exist and can be opened, every output folder takes a file."""
    for path in list(inputs) + ([adapter] if adapter else []):
        if os.path.isdir(path):  # a DICOM series folder
            continue
        try:
            with open_regular(path) as f:  # missing, unreadable, a FIFO or a device: refused before any work
                f.read(1)
        except OSError as exc:
            raise InputError(path, f"cannot be read ({exc.strerror or exc})") from None
    for one_per_folder in {Path(o).parent: o for o in outs}.values():
        check_writable(one_per_folder, what="segmentation")


def _copy_geometry(dst: sitk.Image, ref: sitk.Image) -> None:
    dst.SetOrigin(ref.GetOrigin())
    dst.SetSpacing(ref.GetSpacing())
    dst.SetDirection(ref.GetDirection())


def _predict(network, x, base: BaseModel, dev: torch.device, tta: bool, sw_batch_size: int, overlap: float,
             events: Events, stop=None) -> torch.Tensor:
    """Sliding-window probabilities; on CUDA out-of-memory retry with a smaller window batch, then on the CPU."""
    state = {"dev": dev, "batch": sw_batch_size}

    def attempt() -> torch.Tensor:
        return sliding_window_probabilities(network, x, base.inference_roi, state["dev"], state["dev"].type == "cuda",
                                            state["batch"], overlap, tta, stop, base.inference_mode)

    def shrink() -> Optional[str]:
        if state["batch"] <= 1:
            return None
        state["batch"] //= 2
        return f"out of GPU memory: retrying with sliding-window batch {state['batch']}"

    def to_cpu() -> None:
        network.to("cpu")
        state["dev"] = torch.device("cpu")

    return with_oom_fallback(attempt, shrink, to_cpu, events, "sliding-window batch 1")
