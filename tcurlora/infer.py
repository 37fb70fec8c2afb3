"""Segmentation: base model (+ adapter, merged first) -> label maps exactly on each input's grid."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .adapter import merge_adapter, set_active_adapter
from .adapter_file import load_adapter
from .errors import TCURLoRAError
from .events import Events
from .models import BaseModel
from .train import InferenceStopped, _StopWatch, pick_device, sliding_window_probabilities
from .tuners.strategies import PEFT_METHODS

SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


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
    from .io import _volume_files  # the same rule find_cases uses

    expanded: List[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and not any(f.suffix.lower() == ".dcm" or f.suffix == "" for f in p.iterdir() if f.is_file()):
            files = [str(f) for f in _volume_files(p) if not f.name.endswith(".seg.nrrd")]
            if not files:
                raise TCURLoRAError(f"{p.name}: no volumes in this folder")
            expanded += files
        else:
            expanded.append(str(item))
    return expanded


def segment(base: BaseModel, inputs: Sequence[str], output: str, *, adapter: Optional[str] = None,
            device: str = "auto", tta: bool = False, largest_component: Optional[bool] = None,
            probabilities: bool = False, sw_batch_size: int = 1, overlap: float = 0.25,
            events: Optional[Events] = None, stop_file: Optional[str] = None) -> dict:
    """Segment each input and write ``.seg.nrrd`` (names, colours) or a plain label map."""
    from .io import array_to_image, read_image, stem, write_image, write_segmentation

    events = events or Events()
    inputs = expand_inputs(inputs)
    outs = output_paths(inputs, output)
    dev = pick_device(device)
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
    values = [int(l["value"]) for l in labels]
    if largest_component is None:
        largest_component = base.largest_component
    written, seconds = [], []
    with _StopWatch(stop_file) as stop:
        for i, (src, dst) in enumerate(zip(inputs, outs), start=1):
            t0 = time.time()
            try:
                if stop.requested():
                    raise InferenceStopped()
                image = read_image(src)
                x, _, meta = base.prepare(image)
                probs = _predict(network, x, base, dev, tta, sw_batch_size, overlap, events, stop.requested)
            except InferenceStopped:  # asked before each volume and between sliding windows
                events.log(f"stopped: {len(written)} of {len(inputs)} inputs segmented")
                return {"outputs": {"segmentation": written[0] if written else None}, "cancelled": True,
                        "metrics": {"segmented": len(written)}, "files": written}
            label = base.restore(probs, meta, image, [0] + values)
            if largest_component:
                label = keep_largest_component(label, values)
            write_segmentation(dst, array_to_image(label.astype(np.uint16 if max(values, default=0) > 255 else np.uint8), image), labels)
            written.append(str(dst))
            if probabilities:
                p = base.restore_probabilities(probs, meta, image)
                pimg = sitk.GetImageFromArray(np.moveaxis(p[1:], 0, -1) if p.shape[0] > 2 else p[1], isVector=p.shape[0] > 2)
                _copy_geometry(pimg, image)  # CopyInformation refuses a vector image of a scalar one
                write_image(Path(dst).parent / f"{stem(dst)}_probabilities.nii.gz", pimg)
            seconds.append(time.time() - t0)
            events.progress("segment", i, len(inputs), eta_s=np.mean(seconds) * (len(inputs) - i))
            events.log(f"{Path(src).name} -> {dst} ({seconds[-1]:.1f} s)")
    return {"outputs": {"segmentation": written[0] if len(written) == 1 else Path(output)},
            "metrics": {"segmented": len(written), "seconds_per_volume": round(float(np.mean(seconds)), 2)},
            "cancelled": False, "files": written}


def _copy_geometry(dst: sitk.Image, ref: sitk.Image) -> None:
    dst.SetOrigin(ref.GetOrigin())
    dst.SetSpacing(ref.GetSpacing())
    dst.SetDirection(ref.GetDirection())


def _predict(network, x, base: BaseModel, dev: torch.device, tta: bool, sw_batch_size: int, overlap: float,
             events: Events, stop=None) -> torch.Tensor:
    """Sliding-window probabilities; on CUDA out-of-memory retry with a smaller window batch, then on the CPU."""
    amp = dev.type == "cuda"
    while True:
        try:
            return sliding_window_probabilities(network, x, base.inference_roi, dev, amp, sw_batch_size, overlap, tta,
                                                stop)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if sw_batch_size > 1:
                sw_batch_size //= 2
                events.warning(f"out of GPU memory: retrying with sliding-window batch {sw_batch_size}")
            else:
                events.warning("out of GPU memory: continuing on the CPU (slower)")
                network.to("cpu")
                dev, amp = torch.device("cpu"), False
