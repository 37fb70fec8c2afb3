"""Moving images and labels between the input grid and the model's voxel space, and training patch sampling.

Model space is defined by a :class:`Preprocessing`:

* **Axis order.** A model-space tensor is ``[C, D, H, W]`` where axis ``D`` (then ``H``, ``W``) runs toward the
  first (second, third) letter of ``orientation``, the nibabel / MONAI ``Orientation(axcodes=...)`` convention
  (``"RAS"``: D goes to the patient's Right, H to Anterior, W to Superior). It is the array order MONAI's
  ``LoadImage`` + ``Orientation`` produce, so MONAI-trained models see what they were trained on.
* **Grid.** Reorientation only permutes/flips voxel axes (like MONAI, an oblique scan stays oblique: no
  rotation, no interpolation). With ``spacing`` set, the volume is then resampled (linear for images, nearest
  neighbour for labels) to that voxel size, keeping the field of view centred. ``spacing`` and
  ``patch_size`` are given in model axis order (D, H, W).
* **Intensity.** Normalised after resampling (``zscore``, ``percentile``, ``range`` or ``none``).

Going back (:func:`to_input_grid`, :func:`probabilities_to_input_grid`) builds the model-space volume as a
``SimpleITK`` image with its own physical geometry and resamples it onto the reference image, so results lie
exactly on the input grid whatever its direction matrix and spacing. When no resampling was involved the
way back is an exact axis permutation.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from .protocol import MAX_PATCH

# ----------------------------------------------------------------------------------------------------------
# configuration

_INTENSITY_DEFAULTS: dict[str, dict[str, Any]] = {
    # z-score over all voxels, or over non-zero voxels only (skull-stripped MRI: ignore the zero background).
    "zscore": {"nonzero": False},
    # Map the [lower, upper] percentiles to [b_min, b_max] (MRI without calibrated units).
    "percentile": {"lower": 0.5, "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True},
    # Map the fixed window [a_min, a_max] to [b_min, b_max] (CT in Hounsfield units). a_min/a_max required.
    "range": {"a_min": None, "a_max": None, "b_min": 0.0, "b_max": 1.0, "clip": True},
    "none": {},
}

_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})
#: What a voxel of the resampled image costs: the float32 resampled image, its tensor and the normalised copy,
#: and for a training case the int64 label.
RESAMPLED_BYTES_PER_VOXEL = 20


def _normalise_intensity(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"intensity must be a dict with a 'kind' ({', '.join(_INTENSITY_DEFAULTS)}), got {spec!r}")
    kind = spec["kind"]
    if kind not in _INTENSITY_DEFAULTS:
        raise ValueError(f"unknown intensity kind {kind!r}; use one of {', '.join(_INTENSITY_DEFAULTS)}")
    defaults = _INTENSITY_DEFAULTS[kind]
    unknown = set(spec) - {"kind"} - set(defaults)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} for intensity kind {kind!r} "
                         f"(allowed: {', '.join(defaults) or 'none'})")
    out: dict[str, Any] = {"kind": kind}
    for key, default in defaults.items():
        value = spec.get(key, default)
        if value is None:
            raise ValueError(f"intensity kind {kind!r} needs {key!r}")
        if isinstance(default, bool) or key in ("nonzero", "clip"):
            if not isinstance(value, bool):
                raise ValueError(f"intensity {key!r} must be true or false, got {value!r}")
        else:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"intensity {key!r} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"intensity {key!r} must be finite, got {value!r}")
        out[key] = value
    if kind == "percentile" and not 0.0 <= out["lower"] < out["upper"] <= 100.0:
        raise ValueError(f"percentile bounds need 0 <= lower < upper <= 100, got {out['lower']}, {out['upper']}")
    if kind == "range" and not out["a_min"] < out["a_max"]:
        raise ValueError(f"range needs a_min < a_max, got {out['a_min']}, {out['a_max']}")
    return out


@dataclass
class Preprocessing:
    """How volumes are brought into the model's voxel space (stored in adapter files).

    ``orientation``: three letters, one of each pair L/R, A/P, S/I (see the module docstring).
    ``spacing``: target voxel size in mm along (D, H, W), or None to keep the input's.
    ``intensity``: ``{"kind": "zscore", "nonzero": False}``, ``{"kind": "percentile", "lower", "upper",
    "b_min", "b_max", "clip"}``, ``{"kind": "range", "a_min", "a_max", "b_min", "b_max", "clip"}`` or
    ``{"kind": "none"}``; missing optional keys take their defaults.
    ``patch_size``: training / sliding-window patch (D, H, W), each a multiple of ``divisible_by``.
    ``divisible_by``: what the network's down-sampling needs the input size to be a multiple of.
    """

    orientation: str = "RAS"
    spacing: Optional[tuple[float, float, float]] = None
    intensity: dict = field(default_factory=lambda: {"kind": "zscore"})
    patch_size: tuple[int, int, int] = (96, 96, 96)
    divisible_by: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.orientation, str):
            raise ValueError(f"orientation must be a string like 'RAS', got {self.orientation!r}")
        code = self.orientation.upper()
        pairs_hit = sorted(i for c in code for i, pair in enumerate(_AXIS_PAIRS) if c in pair)
        if len(code) != 3 or pairs_hit != [0, 1, 2]:
            raise ValueError(f"orientation must take one letter from each of L/R, A/P, S/I (e.g. 'RAS'), "
                             f"got {self.orientation!r}")
        self.orientation = code
        if self.spacing is not None:
            try:
                spacing = tuple(float(s) for s in self.spacing)
            except (TypeError, ValueError):
                raise ValueError(f"spacing must be three numbers in mm or None, got {self.spacing!r}")
            if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
                raise ValueError(f"spacing must be three positive numbers in mm or None, got {self.spacing!r}")
            self.spacing = spacing  # type: ignore[assignment]
        self.intensity = _normalise_intensity(self.intensity)
        if isinstance(self.divisible_by, bool) or not isinstance(self.divisible_by, int) or self.divisible_by < 1:
            raise ValueError(f"divisible_by must be a positive integer, got {self.divisible_by!r}")
        try:
            patch = tuple(int(p) for p in self.patch_size)
        except (TypeError, ValueError):
            raise ValueError(f"patch_size must be three integers, got {self.patch_size!r}")
        if len(patch) != 3 or any(p != q for p, q in zip(patch, self.patch_size)) or min(patch) < 1 \
                or max(patch) > MAX_PATCH:
            raise ValueError(f"patch_size must be three integers from 1 to {MAX_PATCH}, got {self.patch_size!r}")
        if any(p % self.divisible_by for p in patch):
            raise ValueError(f"patch_size {patch} must be a multiple of divisible_by={self.divisible_by}")
        self.patch_size = patch  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, not tuples); :meth:`from_dict` restores it exactly."""
        return {
            "orientation": self.orientation,
            "spacing": None if self.spacing is None else [float(s) for s in self.spacing],
            "intensity": copy.deepcopy(self.intensity),
            "patch_size": [int(p) for p in self.patch_size],
            "divisible_by": int(self.divisible_by),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        """Build from :meth:`to_dict` output. Strict: unknown keys raise ``ValueError``; missing ones default."""
        if not isinstance(data, dict):
            raise ValueError(f"preprocessing must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)} (allowed: {', '.join(sorted(known))})")
        kwargs = dict(data)
        if kwargs.get("spacing") is not None:
            kwargs["spacing"] = tuple(kwargs["spacing"])
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        if "intensity" in kwargs:
            kwargs["intensity"] = copy.deepcopy(kwargs["intensity"])
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# geometry helpers


def _index_to_lps(size: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                  direction: Sequence[float]) -> np.ndarray:
    del size
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, dtype=float).reshape(3, 3) * np.asarray(spacing, dtype=float)
    m[:3, 3] = np.asarray(origin, dtype=float)
    return m


def _grid(image: sitk.Image) -> dict[str, list]:
    return {"size": [int(s) for s in image.GetSize()], "spacing": [float(s) for s in image.GetSpacing()],
            "origin": [float(o) for o in image.GetOrigin()], "direction": [float(d) for d in image.GetDirection()]}


def _set_grid(image: sitk.Image, grid: dict[str, list]) -> sitk.Image:
    image.SetSpacing(grid["spacing"])
    image.SetOrigin(grid["origin"])
    image.SetDirection(grid["direction"])
    return image


def _resampled_grid(grid: dict[str, list], spacing: Sequence[float], where: Optional[str] = None) -> dict[str, list]:
    """Same axes, new voxel size, same field-of-view centre (the extent is kept to within half a voxel).
    With ``where`` (the image's file), a grid this machine cannot hold is refused before it is allocated."""
    size = np.asarray(grid["size"], dtype=float)
    old = np.asarray(grid["spacing"], dtype=float)
    new = np.asarray(spacing, dtype=float)
    extent = size * old / new
    if where is not None:  # from the float sizes: a huge input spacing would overflow the integer ones
        from .limits import check_grid

        sizes = np.minimum(np.nan_to_num(extent, nan=np.inf), 2.0 ** 62)
        check_grid(where, "the image at the model's spacing", [int(s) for s in sizes], RESAMPLED_BYTES_PER_VOXEL)
    new_size = np.maximum(1, np.round(extent)).astype(int)
    direction = np.asarray(grid["direction"], dtype=float).reshape(3, 3)
    centre = np.asarray(grid["origin"]) + direction @ (old * (size - 1) / 2)
    origin = centre - direction @ (new * (new_size - 1) / 2)
    return {"size": [int(s) for s in new_size], "spacing": [float(s) for s in new],
            "origin": [float(o) for o in origin], "direction": list(grid["direction"])}


def image_source(image: sitk.Image) -> str:
    """The file ``image`` was read from (as :func:`tcurlora.io.read_image` records it), for messages."""
    from .io import PATH_KEY

    return image.GetMetaData(PATH_KEY) if image.HasMetaDataKey(PATH_KEY) else "the image"


def _sitk_to_tensor(image: sitk.Image, dtype: torch.dtype) -> torch.Tensor:
    # SimpleITK arrays are (k, j, i); model tensors are (i, j, k) = (D, H, W) after orientation.
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype).unsqueeze(0)


def _normalise(tensor: torch.Tensor, intensity: dict[str, Any]) -> torch.Tensor:
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange, ScaleIntensityRangePercentiles

    kind = intensity["kind"]
    if kind == "zscore":
        out = NormalizeIntensity(nonzero=intensity["nonzero"], channel_wise=True)(tensor)
    elif kind == "percentile":
        out = ScaleIntensityRangePercentiles(lower=intensity["lower"], upper=intensity["upper"],
                                             b_min=intensity["b_min"], b_max=intensity["b_max"],
                                             clip=intensity["clip"], channel_wise=True)(tensor)
    elif kind == "range":
        out = ScaleIntensityRange(a_min=intensity["a_min"], a_max=intensity["a_max"], b_min=intensity["b_min"],
                                  b_max=intensity["b_max"], clip=intensity["clip"])(tensor)
    else:
        out = tensor
    return _as_plain_tensor(out).to(torch.float32).contiguous()


def _as_plain_tensor(x: Any) -> torch.Tensor:
    # MONAI may return MetaTensor; callers get plain tensors (no hidden metadata, cheap to move around).
    t = torch.as_tensor(x)
    return t.as_tensor() if hasattr(t, "as_tensor") else t


# ----------------------------------------------------------------------------------------------------------
# forward / backward


def label_on_image_grid(label: sitk.Image, image: sitk.Image) -> sitk.Image:
    """``label`` with exactly ``image``'s geometry; refused unless it already lies on the image's grid (within
    the reading tolerance)."""
    from .io import geometry_mismatch

    problem = geometry_mismatch(label, image)
    if problem is not None:
        raise ValueError(f"label is not on the image grid ({problem})")
    label = sitk.Image(label)
    label.CopyInformation(image)
    return label


def to_model_space(image: sitk.Image, label: Optional[sitk.Image], prep: Preprocessing
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor], dict[str, Any]]:
    """Reorient, resample and normalise ``image`` (and its ``label``, with nearest neighbour).

    Returns ``(image [1, D, H, W] float32, label [1, D, H, W] int64 or None, meta)``. ``meta`` is a
    JSON-serialisable dict with the model-space grid (``"model"``) and the input grid (``"input"``), each
    ``{"size", "spacing", "origin", "direction"}`` in SimpleITK (LPS, i-j-k) terms, plus ``"orientation"``.
    The label must lie on the image's grid (as :func:`tcurlora.io.read_label` returns it).
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("to_model_space needs a 3D single-channel image")
    if label is not None:
        label = label_on_image_grid(label, image)
    input_grid = _grid(image)
    # DICOMOrient uses the same "axis runs toward the letter" convention as nibabel/MONAI axcodes.
    oriented = sitk.DICOMOrient(image, prep.orientation)
    oriented_label = sitk.DICOMOrient(label, prep.orientation) if label is not None else None
    grid = _grid(oriented)
    if prep.spacing is not None:
        target = _resampled_grid(grid, prep.spacing, image_source(image))
        ref = _set_grid(sitk.Image(target["size"], sitk.sitkUInt8), target)
        # Points just outside the old voxel centres (< half a voxel) are still inside ITK's buffer: no zero rim.
        oriented = sitk.Resample(oriented, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        if oriented_label is not None:
            oriented_label = sitk.Resample(oriented_label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                           oriented_label.GetPixelID())
        grid = target
    image_t = _normalise(_sitk_to_tensor(oriented, torch.float32), prep.intensity)
    label_t = _sitk_to_tensor(oriented_label, torch.int64) if oriented_label is not None else None
    meta = {"orientation": prep.orientation, "model": grid, "input": input_grid}
    return image_t, label_t, meta


def _lattice_permutation(model: dict[str, list], reference: sitk.Image
                         ) -> Optional[tuple[list[int], list[bool]]]:
    """If the model grid is the reference grid with axes permuted/flipped (no resampling happened), return,
    per reference axis, the model axis it comes from and whether it is reversed; else None."""
    ref = _grid(reference)
    a_model = _index_to_lps(**model)
    a_ref = _index_to_lps(**ref)
    t = np.linalg.inv(a_ref) @ a_model  # model index -> reference index
    rot, off = t[:3, :3], t[:3, 3]
    perm = np.round(rot)
    if not np.allclose(rot, perm, atol=1e-4) or not np.allclose(off, np.round(off), atol=1e-3):
        return None
    if not (np.abs(perm).sum(0) == 1).all() or not (np.abs(perm).sum(1) == 1).all():
        return None
    axes, flips = [], []
    for r in range(3):
        a = int(np.argmax(np.abs(perm[r])))
        sign = perm[r, a]
        n = model["size"][a]
        if n != ref["size"][r] or round(off[r]) != (0 if sign > 0 else n - 1):
            return None
        axes.append(a)
        flips.append(bool(sign < 0))
    return axes, flips


def _probabilities_numpy(probabilities: Union[torch.Tensor, np.ndarray], meta: dict[str, Any]) -> np.ndarray:
    probs = probabilities.detach().float().cpu().numpy() if isinstance(probabilities, torch.Tensor) \
        else np.asarray(probabilities, dtype=np.float32)
    if probs.ndim == 3:
        probs = probs[None]
    if probs.ndim != 4 or list(probs.shape[1:]) != list(meta["model"]["size"]):
        raise ValueError(f"probabilities must be [C, {', '.join(str(s) for s in meta['model']['size'])}] "
                         f"in model space, got {list(probs.shape)}")
    return probs


def _channels_on_reference(probs: np.ndarray, meta: dict[str, Any], reference: sitk.Image):
    """Yield each channel resampled onto ``reference`` as a float32 (z, y, x) array."""
    model = meta["model"]
    perm = _lattice_permutation(model, reference)
    n = probs.shape[0]
    for c in range(n):
        channel = probs[c]  # (i, j, k) model axes
        if perm is not None:
            axes, flips = perm
            out = np.transpose(channel, axes)
            out = np.flip(out, axis=[r for r in range(3) if flips[r]]) if any(flips) else out
            yield np.ascontiguousarray(out.transpose(2, 1, 0), dtype=np.float32)
            continue
        img = _set_grid(sitk.GetImageFromArray(np.ascontiguousarray(channel.transpose(2, 1, 0))), model)
        # Outside the model field of view: background for channel 0 of a multi-class output, 0 otherwise.
        default = 1.0 if (c == 0 and n > 1) else 0.0
        res = sitk.Resample(img, reference, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
        yield sitk.GetArrayFromImage(res)


def probabilities_to_input_grid(probabilities: Union[torch.Tensor, np.ndarray], meta: dict[str, Any],
                                reference: sitk.Image) -> np.ndarray:
    """Resample model-space probabilities ``[C, D, H, W]`` linearly onto ``reference``'s grid.

    Returns float32 ``[C, z, y, x]`` (SimpleITK array order of ``reference``, so channel ``c`` wraps with
    ``tcurlora.io.array_to_image(out[c], reference)``).
    """
    probs = _probabilities_numpy(probabilities, meta)
    size = reference.GetSize()[::-1]
    out = np.empty((probs.shape[0],) + tuple(size), dtype=np.float32)
    for c, channel in enumerate(_channels_on_reference(probs, meta, reference)):
        out[c] = channel
    return out


def to_input_grid(probabilities: Union[torch.Tensor, np.ndarray], meta: dict[str, Any], reference: sitk.Image,
                  channel_values: Optional[Sequence[int]] = None) -> np.ndarray:
    """Label map on ``reference``'s grid from model-space probabilities ``[C, D, H, W]``.

    The probabilities are resampled linearly first and the argmax is taken on the input grid (smoother
    boundaries than resampling a label map). ``channel_values[c]`` is the label value of channel ``c``
    (default: ``c``). A single channel is a foreground probability, thresholded at 0.5 (value 1 or
    ``channel_values[0]``). Returns an integer array in SimpleITK (z, y, x) order.
    """
    probs = _probabilities_numpy(probabilities, meta)
    n = probs.shape[0]
    values = list(range(n)) if channel_values is None else [int(v) for v in channel_values]
    if n == 1 and channel_values is None:
        values = [1]
    if len(values) != n:
        raise ValueError(f"channel_values has {len(values)} entries for {n} channels")
    size = tuple(reference.GetSize()[::-1])
    best_index = np.zeros(size, dtype=np.int32)
    best = None
    # Running argmax: one resampled channel in memory at a time (many-label models on large CTs).
    for c, channel in enumerate(_channels_on_reference(probs, meta, reference)):
        if n == 1:
            best_index = (channel > 0.5).astype(np.int32)
            break
        if best is None:
            best = channel
            continue
        better = channel > best
        best_index[better] = c
        best = np.where(better, channel, best)
    lut = np.asarray(values if n > 1 else [0, values[0]], dtype=np.int64)
    labels = lut[best_index]
    max_value = int(lut.max(initial=0))
    dtype = np.uint8 if max_value <= 255 else np.uint16 if max_value <= 65535 else np.int32
    return labels.astype(dtype)


# ----------------------------------------------------------------------------------------------------------
# training patches

# "left"/"right" anywhere (left_kidney, KidneyRight) or a short token (kidney_l, "Kidney R", lt/rt).
_LATERAL = re.compile(r"left|right|links|rechts|gauche|droite|(?:^|[\W_])(?:l|r|lt|rt)(?:$|[\W_])", re.IGNORECASE)


def _clone(x: torch.Tensor) -> torch.Tensor:
    # Module-level (picklable for DataLoader workers). Patches are crop *views* of the cached case, and
    # RandStdShiftIntensity (MONAI 1.6) shifts in place: without a copy, every draw would corrupt the case.
    return x.clone()


def _lateral_axis(orientation: str) -> int:
    return next(i for i, c in enumerate(orientation) if c in "LR")


def default_flip_axes(prep: Preprocessing, label_table: Optional[Sequence[dict]] = None) -> tuple[int, ...]:
    """Axes to mirror during training. Mirroring left-right swaps the meaning of left/right structures, so
    the L-R axis is only flipped when a label table is given and no label name looks lateral."""
    lateral = label_table is None or any(_LATERAL.search(str(e.get("name", ""))) for e in label_table)
    lr = _lateral_axis(prep.orientation)
    return tuple(a for a in range(3) if not (lateral and a == lr))


def train_transforms(prep: Preprocessing, num_samples: int = 2, *, pos: float = 2.0, neg: float = 1.0,
                     flip_axes: Optional[Sequence[int]] = None, label_table: Optional[Sequence[dict]] = None,
                     augment: bool = True):
    """MONAI dictionary transforms turning one model-space case ``{"image": [1,D,H,W], "label": [1,D,H,W]}``
    into a list of ``num_samples`` patches of ``prep.patch_size`` (image float32, label int64).

    Built for a handful of cases: volumes smaller than the patch are padded; patch centres are drawn on
    foreground with probability ``pos / (pos + neg)`` (labels are small relative to the volume); then light
    augmentation: mirroring (``flip_axes``, default :func:`default_flip_axes`), small rotations (<= 15 deg) and
    scaling (+-10 %), intensity scale/shift relative to the patch's spread, and mild Gaussian noise.

    Reproducible: call ``monai.utils.set_determinism(seed)`` before building, or call
    ``.set_random_state(seed)`` on the returned ``Compose``.
    """
    from monai.transforms import (CastToTyped, Compose, EnsureTyped, Lambdad, RandAffined,
                                  RandCropByPosNegLabeld, RandFlipd, RandGaussianNoised, RandScaleIntensityd, RandStdShiftIntensityd,
                                  SpatialPadd)

    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    keys = ["image", "label"]
    patch = list(prep.patch_size)
    steps: list = [
        EnsureTyped(keys=keys, track_meta=False),
        # Pad with zeros, as inference pads a window (MONAI's sliding window, nnU-Net's predictor) and nnU-Net's
        # own trainer pads: a patch must look like what the network will see beyond the image's edge.
        SpatialPadd(keys=keys, spatial_size=patch, mode="constant", value=0),
        RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch, pos=pos, neg=neg,
                               num_samples=num_samples),
        Lambdad(keys=keys, func=_clone),
    ]
    if augment:
        axes = default_flip_axes(prep, label_table) if flip_axes is None else tuple(int(a) for a in flip_axes)
        steps += [RandFlipd(keys=keys, prob=0.2, spatial_axis=a) for a in axes]
        steps += [
            RandAffined(keys=keys, prob=0.2, rotate_range=(math.radians(15),) * 3, scale_range=(0.1,) * 3,
                        mode=("bilinear", "nearest"), padding_mode="border"),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
            RandStdShiftIntensityd(keys="image", factors=0.1, prob=0.3),
        ]
        if prep.intensity["kind"] != "none":  # noise level only means something on a normalised scale
            steps.append(RandGaussianNoised(keys="image", prob=0.15, std=0.05))
    steps += [EnsureTyped(keys=keys, track_meta=False),  # plain tensors out, no MetaTensor bookkeeping
              CastToTyped(keys=keys, dtype=(torch.float32, torch.int64))]
    return Compose(steps)


__all__ = ["Preprocessing", "to_model_space", "to_input_grid", "probabilities_to_input_grid",
           "train_transforms", "default_flip_axes"]
