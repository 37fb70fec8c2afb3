"""SlicerMONAIAuto3DSeg models as base models.

The extension downloads each model as a zip and unpacks it to ``~/.MONAIAuto3DSeg/models/<id>/``: a
``model.pt`` checkpoint (``{"state_dict", "config", "epoch", "best_metric"}``) and a ``labels.csv`` next
to it (``LabelValue``, ``Name``, then DICOM code triples for category, type, type modifier, anatomic
region and region modifier).  ``--base`` takes that folder (or the zip itself).

The checkpoint is read with ``torch.load(weights_only=True)``: nothing in it runs.  The network is built
from ``config["network"]`` (plain values only; an allow-listed class, SegResNetDS).  Preprocessing and
the way back are the extension's own chain of MONAI transforms, in its order: normalise
(``normalize_mode``), Orientation to RAS (``orientation_ras``), crop to the foreground of the input
(``x > 0``, margin 10), Spacing to ``resample_resolution`` (an axis already within 0.75-1.25x of it is
left alone); sliding window over ``roi_size`` with overlap 0.625 and Gaussian weights; argmax; every
step inverted (``Invertd``, nearest neighbour) back onto the input grid.  Segments keep the label
table's terminology codes.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..limits import available_memory, check_grid
from ..preprocess import RESAMPLED_BYTES_PER_VOXEL, Preprocessing, image_source, label_on_image_grid
from ..protocol import MAX_PATCH
from ..safejson import JSONProblem, check_nesting
from ..safezip import SafeZip, is_zip, member_path
from ..userfiles import read_limited
from . import BaseModel, construct
from .construct import Built, check_plain_arguments, refuse_downloads

#: ``config["network"]["_target_"]`` values accepted (the class Auto3DSeg's SegResNet algorithm trains).
NETWORKS = {"SegResNetDS": "SegResNetDS", "monai.networks.nets.SegResNetDS": "SegResNetDS",
            "monai.networks.nets.segresnet_ds.SegResNetDS": "SegResNetDS"}
NORMALIZE_MODES = ("none", "range", "ct", "meanstd", "mri", "meanstdtanh", "pet")
#: The extension's sliding-window overlap.
OVERLAP = 0.625
#: Terminology context names used when the extension's own terminology files are not at hand (Slicer
#: falls back to the DICOM lists too, for codes those files do not hold).
TYPE_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
_CODE_FIELDS = ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence",
                "SegmentedPropertyTypeModifierCodeSequence", "AnatomicRegionSequence",
                "AnatomicRegionModifierSequence")


# ----------------------------------------------------------------------------------------------------------
# reading the model folder / zip


def find_model(path: Path) -> Optional[Tuple[Path, str]]:
    """``(container, prefix)`` when ``path`` is an Auto3DSeg model: a folder holding ``labels.csv`` and
    ``model.pt`` (in it or up to two sub-folders down: the extension unpacks release zips that keep them in
    a sub-folder) or a zip of one; else None."""
    path = Path(path)
    if path.is_dir():
        for pattern in ("labels.csv", "*/labels.csv", "*/*/labels.csv"):
            for labels in sorted(path.glob(pattern)):
                if (labels.parent / "model.pt").exists():
                    return labels.parent, ""
        return None
    if is_zip(path):
        with SafeZip(path) as archive:
            names = set(archive.names())
        for name in sorted(n for n in names if n == "labels.csv" or n.endswith("/labels.csv")):
            prefix = name[: -len("labels.csv")]
            if prefix + "model.pt" in names:
                return path, prefix
    return None


#: Largest labels.csv read (the extension's tables are a few kilobytes).
MAX_LABELS_BYTES = 1 << 20

def _read_member(container: Path, prefix: str, name: str, max_bytes: int) -> bytes:
    if container.is_dir():
        return read_limited(container / name, max_bytes, name)
    with SafeZip(container) as archive:
        return archive.read(prefix + name, max_bytes)


def read_checkpoint(container: Path, prefix: str = "") -> Dict[str, Any]:
    """``model.pt`` as a dict with a tensor ``state_dict`` and a ``config`` (``weights_only=True``)."""
    where = container / "model.pt" if container.is_dir() else Path(member_path(container, prefix + "model.pt"))
    data = _read_member(container, prefix, "model.pt", available_memory() // 2)  # then unpickled: twice its size
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything beyond tensors and plain containers
        raise InputError(where, f"refused or unreadable checkpoint (only plain weights load: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("config"), dict) \
            or not isinstance(checkpoint.get("state_dict"), dict):
        raise InputError(where, "not an Auto3DSeg checkpoint (needs 'state_dict' and 'config')")
    state = checkpoint["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(where, "state_dict does not hold only tensors")
    checkpoint["state_dict"] = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        check_nesting(checkpoint["config"])
    except JSONProblem as exc:
        raise InputError(where, f"config {exc}") from None
    return checkpoint


def read_labels(container: Path, prefix: str = "") -> List[dict]:
    """``labels.csv`` of a model folder or zip, read within limits and parsed (:func:`read_labels_csv`)."""
    where = container / "labels.csv" if container.is_dir() else Path(member_path(container, prefix + "labels.csv"))
    data = _read_member(container, prefix, "labels.csv", MAX_LABELS_BYTES)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(where, f"is not UTF-8 text (byte {exc.start})") from None
    return read_labels_csv(text, where)


#: Characters that structure a Slicer terminology string (``~`` between parts, ``^`` within a code) or a
#: ``.seg.nrrd`` segment's tags (``|``): in a code they would forge other fields.
_TERMINOLOGY_SEPARATORS = "~^|"


def read_labels_csv(text: str, where: Any) -> List[dict]:
    """``labels.csv`` -> label table entries with a Slicer terminology string where codes are given."""
    from ..io import default_color

    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:  # a NUL byte, a field over the csv module's 128 kB limit
        raise InputError(where, f"is not a readable CSV table ({exc})") from None
    if not rows or "LabelValue" not in rows[0] or "Name" not in rows[0]:
        raise InputError(where, "labels.csv needs 'LabelValue' and 'Name' columns")
    columns = rows[0]

    def cell(row: List[str], column: str) -> str:
        i = columns.index(column) if column in columns else None
        return row[i].strip() if i is not None and i < len(row) else ""  # short rows: trailing commas dropped

    labels = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        text_value = cell(row, "LabelValue")
        if not (text_value.isascii() and text_value.isdigit() and len(text_value) <= 5):
            raise InputError(where, f"line {n}: LabelValue {text_value[:20]!r} is not a label value 0..65535")
        value = int(text_value)
        if value == 0:
            continue  # background
        entry = {"value": value, "name": cell(row, "Name") or f"Label {value}", "color": default_color(value)}
        parts = [[cell(row, f"{f}.{part}") for part in ("CodingSchemeDesignator", "CodeValue", "CodeMeaning")]
                 for f in _CODE_FIELDS]
        bad = next((c for part in parts for c in part if any(ch in c for ch in _TERMINOLOGY_SEPARATORS)), None)
        if bad is not None:
            raise InputError(where, f"line {n}: the code {bad[:40]!r} holds one of {' '.join(_TERMINOLOGY_SEPARATORS)}, "
                                    "which separate terminology fields")
        codes = ["^".join(part) for part in parts]
        if codes[0].strip("^") and codes[1].strip("^"):  # category and type: what a Slicer entry needs
            entry["terminology"] = "~".join([TYPE_CONTEXT, codes[0], codes[1], codes[2], REGION_CONTEXT,
                                             codes[3], codes[4]])
        labels.append(entry)
    return labels


def build_network(spec: Any, where: Any, roi: Optional[Sequence[int]] = None) -> Built:
    """``config["network"]`` -> the network; plain values only, the class from :data:`NETWORKS`, measured with
    a window of ``roi`` before it is allocated (see :mod:`.construct`)."""
    import monai.networks.nets as nets

    target = spec.get("_target_") if isinstance(spec, dict) else spec
    if not isinstance(target, str) or target not in NETWORKS:
        raise InputError(where, f"config network {str(target)[:80]!r} is not one of "
                                f"{', '.join(sorted(set(NETWORKS.values())))}")
    args = {}
    for key, value in spec.items():
        if key == "_target_":
            continue
        if key.startswith("_") or key == "preprocess" or isinstance(value, dict) or (
                isinstance(value, str) and value[:1] in ("@", "$", "%")):
            raise InputError(where, f"config network argument {key}={str(value)[:60]!r} is not a plain value")
        args[key] = value
    check_plain_arguments(args, where, "config network arguments")
    norm = args.get("norm")
    # apex's fused instance norm: MONAI falls back to plain InstanceNorm3d without apex (same parameters)
    if isinstance(norm, str) and norm.upper() == "INSTANCE_NVFUSER":
        args["norm"] = "INSTANCE"
    elif isinstance(norm, (list, tuple)) and norm and str(norm[0]).upper() == "INSTANCE_NVFUSER":
        args["norm"] = ("INSTANCE", *norm[1:])
    if args.get("in_channels", 1) != 1:
        raise InputError(where, f"the network takes {str(args['in_channels'])[:20]} input channels; only "
                                "single-image models can be adapted")
    cls = getattr(nets, NETWORKS[target])
    refuse_downloads(cls, args, where)
    return construct.build_network(lambda: cls(**args), where, NETWORKS[target], [roi] if roi else [])


def check_config(config: dict, where: Any) -> dict:
    """The config keys the extension's inference reads, with their types and ranges (one line naming the
    checkpoint otherwise)."""
    def bad(key: str, need: str):
        return InputError(where, f"config {key} must be {need}, got {str(config.get(key))[:60]}")

    mode = config.get("normalize_mode", "meanstd")
    if not isinstance(mode, str) or mode not in NORMALIZE_MODES:
        raise InputError(where, f"unsupported normalize_mode {str(mode)[:40]!r} (known: {', '.join(NORMALIZE_MODES)})")
    bounds = config.get("intensity_bounds")
    if mode in ("range", "ct") and not (isinstance(bounds, (list, tuple)) and len(bounds) == 2
                                        and all(_is_number(b) for b in bounds) and bounds[0] < bounds[1]):
        raise InputError(where, f"normalize_mode {mode!r} needs intensity_bounds [low, high] (finite, low < high)")
    for key, default in (("orientation_ras", False), ("crop_foreground", True), ("sigmoid", False)):
        if not isinstance(config.get(key, default), bool):
            raise bad(key, "true or false")
    if config.get("sigmoid", False):
        raise InputError(where, "multi-label (sigmoid) Auto3DSeg models are not supported; only softmax label maps")
    if config.get("extra_modalities"):
        raise InputError(where, "models with extra input modalities are not supported; only single-image models")
    resolution = config.get("resample_resolution")
    if resolution is not None and not (isinstance(resolution, (list, tuple)) and len(resolution) == 3
                                       and all(_is_number(r) and r > 0 for r in resolution)):
        raise bad("resample_resolution", "three finite numbers > 0 (mm) or null")
    roi = config.get("roi_size")
    if not (isinstance(roi, (list, tuple)) and len(roi) == 3
            and all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_PATCH for r in roi)):
        raise InputError(where, f"config roi_size {str(roi)[:60]} is not three sizes from 1 to {MAX_PATCH}")
    network = config.get("network")
    blocks = network.get("blocks_down", (1, 2, 2, 4)) if isinstance(network, dict) else None
    if isinstance(blocks, (list, tuple)) and 0 < len(blocks) <= 12:  # SegResNetDS halves the size per level
        factor = 2 ** (len(blocks) - 1)
        if any(r % factor for r in roi):
            raise InputError(where, f"unusable config (roi_size {roi} must be a multiple of {factor}, the "
                                    "network's down-sampling)")
    return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------------------
# the extension's transform chain


def _sigmoid(x):
    return torch.sigmoid(x)


def _tanh3(x):
    return 3 * torch.tanh(x / 3)


def _pet(x):
    return torch.sigmoid((x - x.min()) / x.std())


def normalization(mode: str, bounds: Any, key: str = "image") -> list:
    """The extension's intensity transforms for ``normalize_mode``."""
    from monai.transforms import Lambdad, NormalizeIntensityd, ScaleIntensityRanged

    if mode == "none":
        return []
    if mode in ("range", "ct"):
        return [ScaleIntensityRanged(keys=key, a_min=bounds[0], a_max=bounds[1], b_min=-1, b_max=1, clip=False),
                Lambdad(keys=key, func=_sigmoid)]
    if mode in ("meanstd", "mri"):
        return [NormalizeIntensityd(keys=key, nonzero=True, channel_wise=True)]
    if mode == "meanstdtanh":
        return [NormalizeIntensityd(keys=key, nonzero=True, channel_wise=True), Lambdad(keys=key, func=_tanh3)]
    if mode == "pet":
        return [Lambdad(keys=key, func=_pet)]
    raise ValueError(f"unsupported normalize_mode {mode!r}")


def transform_chain(config: dict, with_label: bool = False):
    """The extension's single-image chain on ``{"image1": input}`` (+ ``"label"`` for training cases).

    As the extension does it, the foreground box is taken from the loaded input ``image1`` (not reoriented).
    """
    from monai.transforms import Compose, ConcatItemsd, CropForegroundd, EnsureTyped, Orientationd, Spacingd

    keys = ["image", "label"] if with_label else ["image"]
    ts = [ConcatItemsd(keys=["image1"], name="image", dim=0),
          EnsureTyped(keys="image", data_type="tensor", dtype=torch.float, allow_missing_keys=True)]
    ts += normalization(config["normalize_mode"], config.get("intensity_bounds"))
    if config.get("orientation_ras", False):
        ts.append(Orientationd(keys=keys, axcodes="RAS"))
    if config.get("crop_foreground", True):
        ts.append(CropForegroundd(keys=keys, source_key="image1", margin=10, allow_smaller=True))
    if config.get("resample_resolution") is not None:
        pixdim = [float(p) for p in config["resample_resolution"]]
        ts.append(Spacingd(keys=keys, pixdim=pixdim, mode=["bilinear", "nearest"][: len(keys)], dtype=torch.float,
                           min_pixdim=np.array(pixdim) * 0.75, max_pixdim=np.array(pixdim) * 1.25,
                           allow_missing_keys=True))
    return Compose(ts)


def to_meta_tensor(image: sitk.Image, dtype=torch.float32):
    """A SimpleITK volume as MONAI's readers load it: ``[1, i, j, k]`` with its RAS affine."""
    from monai.data import MetaTensor

    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)[None]
    return MetaTensor(tensor, affine=torch.from_numpy(ras), meta={"original_affine": ras, "space": "RAS"})


class Auto3DSegBase(BaseModel):
    """An Auto3DSeg SegResNet with the extension's pre- and post-processing.

    ``preprocessing`` describes the model for adapter manifests and training patches (patch = ``roi_size``);
    :meth:`prepare` and :meth:`restore` apply the extension's own transform chain.
    """

    def __init__(self, *args, config: dict, **kwargs) -> None:
        self.config = config
        self._chain = transform_chain(config)
        self._chain_with_label = transform_chain(config, with_label=True)
        super().__init__(*args, **kwargs)

    def _check_grid(self, image: sitk.Image) -> None:
        """Refuse an image whose grid at ``resample_resolution`` this machine cannot hold (before Spacingd)."""
        pixdim = self.config.get("resample_resolution")
        if pixdim is None:
            return
        # after Orientationd(RAS) array axis a runs along physical axis a: image axis i lands on its dominant one
        direction = np.abs(np.asarray(image.GetDirection(), dtype=float).reshape(3, 3))
        axes = direction.argmax(axis=0) if self.config.get("orientation_ras", False) else range(3)
        sizes = [min(n * s / float(pixdim[a]), 2.0 ** 62) for n, s, a in zip(image.GetSize(), image.GetSpacing(), axes)]
        check_grid(image_source(image), "the image at the model's spacing", [int(s) for s in sizes],
                   RESAMPLED_BYTES_PER_VOXEL)

    def prepare(self, image: sitk.Image, label: Optional[sitk.Image] = None):
        self._check_grid(image)
        data = {"image1": to_meta_tensor(image)}
        if label is not None:
            label = label_on_image_grid(label, image)
            data["label"] = to_meta_tensor(label)
        out = (self._chain_with_label if label is not None else self._chain)(data)
        x = out["image"]
        y = out["label"].as_tensor().round().long() if label is not None else None
        return x.as_tensor().float().contiguous(), y, {"image": x}

    def _invert(self, values: torch.Tensor, meta: dict, nearest: bool) -> np.ndarray:
        from monai.transforms import Invertd
        from monai.utils import convert_to_dst_type

        image = meta["image"]
        pred = convert_to_dst_type(values, image, dtype=values.dtype, device=values.device)[0]
        inverted = Invertd(keys="pred", orig_keys="image", transform=self._chain,
                           nearest_interp=nearest)({"image": image, "pred": pred})["pred"]
        return np.asarray(torch.as_tensor(inverted).cpu().numpy())

    def restore(self, probabilities, meta, reference, channel_values=None):
        probabilities = torch.as_tensor(probabilities)
        index = torch.argmax(probabilities, dim=0, keepdim=True).to(torch.uint8)
        index = self._invert(index, meta, nearest=True)[0].transpose(2, 1, 0).astype(np.int64)
        if tuple(index.shape) != tuple(reference.GetSize()[::-1]):
            raise ValueError(f"inverted prediction {index.shape} does not match the input {reference.GetSize()[::-1]}")
        values = list(range(probabilities.shape[0])) if channel_values is None else [int(v) for v in channel_values]
        lut = np.asarray(values, dtype=np.int64)
        max_value = int(lut.max(initial=0))
        dtype = np.uint8 if max_value <= 255 else np.uint16 if max_value <= 65535 else np.int32
        return lut[index].astype(dtype)

    def restore_probabilities(self, probabilities, meta, reference):
        p = self._invert(torch.as_tensor(probabilities).float(), meta, nearest=False)
        p[0][p.sum(0) == 0] = 1.0  # outside the foreground crop: background
        return np.ascontiguousarray(p.transpose(0, 3, 2, 1))


def load_auto3dseg(path: Path) -> Auto3DSegBase:
    """An Auto3DSeg model folder (or zip) as a base model; errors name the file."""
    path = Path(path)
    found = find_model(path)
    if found is None:
        raise InputError(path, "not an Auto3DSeg model (no labels.csv with a model.pt beside it)")
    container, prefix = found
    checkpoint = read_checkpoint(container, prefix)
    where = container / "model.pt" if container.is_dir() else Path(member_path(container, prefix + "model.pt"))
    config = check_config(checkpoint["config"], where)
    roi = [int(r) for r in config["roi_size"]]
    built = build_network(config.get("network"), where, roi)
    network = built.network
    from . import _load_state

    _load_state(network, checkpoint["state_dict"], where)
    mode = config.get("normalize_mode", "meanstd")
    out_channels = built.out_channels or int(getattr(network, "out_channels", 0) or 0)
    labels_where = container / "labels.csv" if container.is_dir() else Path(member_path(container, prefix + "labels.csv"))
    labels = _complete_labels(read_labels(container, prefix), out_channels, labels_where)
    divisible = int(max(network.shape_factor()))
    intensity: dict = {"kind": "none"}
    if mode in ("range", "ct"):  # then a sigmoid, which Preprocessing cannot describe: prepare() applies it
        intensity = {"kind": "range", "a_min": float(config["intensity_bounds"][0]),
                     "a_max": float(config["intensity_bounds"][1]), "b_min": -1.0, "b_max": 1.0, "clip": False}
    elif mode in ("meanstd", "mri", "meanstdtanh"):
        intensity = {"kind": "zscore", "nonzero": True}
    try:
        prep = Preprocessing(orientation="RAS", spacing=config.get("resample_resolution"), intensity=intensity,
                             patch_size=tuple(roi), divisible_by=divisible)
    except ValueError as exc:
        raise InputError(where, f"unusable config ({exc})") from None
    n_up = len(network.up_layers)
    name = path.name if path.is_dir() else path.stem  # the model's folder (or zip), not the sub-folder
    return Auto3DSegBase(
        name=name, network=network, labels=labels, preprocessing=prep, head=f"up_layers.{n_up - 1}.head",
        # the levels are ModuleDicts (not callable): their callable parts
        decoder_modules=[r"up_layers\.\d+\.(upsample|blocks|head)"], inference_roi=tuple(roi), inference_overlap=OVERLAP,
        window_bytes=built.window_bytes, source=f"Auto3DSeg model {name} (epoch {str(checkpoint.get('epoch', '?'))[:12]})",
        kind="auto3dseg", config=config)


def _complete_labels(labels: List[dict], out_channels: int, where: Any) -> List[dict]:
    """Channel c is label value c (the extension saves the argmax as is): one entry per channel 1..C-1."""
    from ..io import default_label_table, validate_label_table

    by_value = {e["value"]: e for e in labels}
    extra = sorted(v for v in by_value if v >= out_channels)
    if extra:
        raise InputError(where, f"label value(s) {extra} but the network has only {out_channels} output channels")
    table = [by_value.get(v) or default_label_table([v])[0] for v in range(1, out_channels)]
    try:
        return validate_label_table(table)
    except Exception as exc:
        raise InputError(where, str(exc)) from None
