"""Reading and writing images, label maps and Slicer segmentations; finding (image, label) cases.

Conventions used throughout ``tcurlora``:

* Images are :class:`SimpleITK.Image` objects (physical space LPS, as ITK and DICOM use). ``read_image`` returns a
  3D single-channel float32 image with finite voxels.
* Label maps are integer ``SimpleITK.Image`` objects on the image grid; 0 is background.
* A *label table* is a list of dicts ``{"value": int, "name": str, "color": [r, g, b] (0..1),
  "terminology": optional str}`` (a Slicer ``TerminologyEntry`` string). Background (0) is never listed.
* Every user-facing problem with a file raises :class:`tcurlora.errors.InputError` naming the file.
* Every write is atomic: the file is written under a temporary name in the destination folder and renamed
  with :func:`os.replace`, so a failed or interrupted write never leaves a half-written output.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_write  # noqa: F401  (re-exported: the one atomic writer lives in atomic.py)
from .errors import InputError, TCURLoRAError, display_name, unsafe_character
from .userfiles import check_regular_file
from .limits import available_memory, check_grid, size_text as _size_text  # noqa: F401  (available_memory re-exported)
from .manifest import MAX_LABEL_VALUE, MAX_NAME
from .protocol import default_color  # noqa: F401  (re-exported: the one label palette)

PathLike = Union[str, "os.PathLike[str]"]
LabelTable = list[dict]

#: Metadata key under which read_image records the source path (used to name the image in messages).
PATH_KEY = "tcurlora:path"

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
LABEL_EXTENSIONS = (".seg.nrrd",) + IMAGE_EXTENSIONS[:-1]
#: Single-file formats we can write atomically (.mhd/.nhdr write two files, so they are not offered).
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")

# Geometry tolerance: NIfTI stores geometry in float32, and Slicer/ITK round-trips introduce ~1e-6 noise.
GEOMETRY_RTOL = 1e-4



# ----------------------------------------------------------------------------------------------------------
# small helpers


def extension(path: PathLike) -> str:
    """Lower-case file extension, keeping the compound ones we care about (``.seg.nrrd``, ``.nii.gz``)."""
    name = os.path.basename(os.fspath(path)).lower()
    for ext in (".seg.nrrd", ".nii.gz"):
        if name.endswith(ext):
            return ext
    return os.path.splitext(name)[1]


def stem(path: PathLike) -> str:
    """File name without its (compound) extension."""
    name = os.path.basename(os.fspath(path).rstrip("/\\"))
    ext = extension(name)
    return name[: len(name) - len(ext)] if ext else name


def _vec_text(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _sitk_reason(exc: Exception) -> str:
    # SimpleITK errors are multi-line with C++ source locations; keep the human part only.
    text = str(exc)
    if "ERROR:" in text:
        text = text.split("ERROR:", 1)[1]
    return " ".join(text.split())


def _image_name(image: sitk.Image, fallback: str = "the image") -> str:
    if image.HasMetaDataKey(PATH_KEY):
        return display_name(image.GetMetaData(PATH_KEY))
    return fallback


def array_to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap a NumPy array in SimpleITK (z, y, x) order as an image on ``reference``'s grid."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    if out.GetSize() != reference.GetSize():
        raise ValueError(f"array shape {array.shape} does not match the reference size {reference.GetSize()[::-1]}")
    out.CopyInformation(reference)
    return out


def _smallest_label_dtype(max_value: int) -> tuple[Any, int]:
    if max_value <= np.iinfo(np.uint8).max:
        return np.uint8, sitk.sitkUInt8
    if max_value <= np.iinfo(np.uint16).max:
        return np.uint16, sitk.sitkUInt16
    return np.int32, sitk.sitkInt32


# ----------------------------------------------------------------------------------------------------------
# label tables


def validate_label_table(label_table: Sequence[dict]) -> LabelTable:
    """Check and normalise a label table (see the module docstring); returns a new list sorted by value.

    Raises :class:`TCURLoRAError` on duplicate values or names, value 0 / negative, bad colours or a
    terminology string Slicer cannot parse. A missing colour gets a default one.
    """
    from slicerio.segmentation import terminology_entry_from_string

    out: LabelTable = []
    seen_values: set[int] = set()
    seen_names: set[str] = set()
    for entry in label_table:
        if not isinstance(entry, dict):
            raise TCURLoRAError(f"label table: entries must be objects, got {entry!r}")
        unknown = set(entry) - {"value", "name", "color", "terminology"}
        if unknown:
            raise TCURLoRAError(f"label table: unknown keys {sorted(unknown)} in entry {entry!r}")
        try:
            value = int(entry["value"])
            name = str(entry["name"]).strip()
        except (KeyError, TypeError, ValueError, OverflowError):
            raise TCURLoRAError(f"label table: each entry needs an integer 'value' and a 'name', got {entry!r}")
        if value != entry["value"] or value <= 0 or isinstance(entry["value"], bool):
            raise TCURLoRAError(f"label table: value {entry['value']!r} must be a positive integer (0 is background)")
        if value > MAX_LABEL_VALUE:
            raise TCURLoRAError(f"label table: value {value} is above {MAX_LABEL_VALUE} (label maps are written "
                                "with 8 or 16 bits)")
        if not name:
            raise TCURLoRAError(f"label table: label {value} has an empty name")
        # names and terminology go into .seg.nrrd header lines and onto terminals: no newline, ESC, etc.
        for what, text in (("name", name), ("terminology", str(entry.get("terminology") or ""))):
            bad = unsafe_character(text)
            if bad:
                raise TCURLoRAError(f"label table: the {what} of label {value} holds the control character {bad}")
            if what == "terminology" and "|" in text:  # '|' separates a .seg.nrrd segment's tags: it would forge one
                raise TCURLoRAError(f"label table: the terminology of label {value} holds '|'")
        if len(name) > MAX_NAME:
            raise TCURLoRAError(f"label table: the name of label {value} is longer than {MAX_NAME} characters")
        if not name.isascii():  # pynrrd writes .seg.nrrd headers as ASCII (and its reader drops other bytes)
            first = next(ch for ch in name if not ch.isascii())
            raise TCURLoRAError(f"label table: the name of label {value} holds {first!r}; .seg.nrrd segment names "
                                "must be ASCII")
        if value in seen_values:
            raise TCURLoRAError(f"label table: value {value} is listed twice")
        if name.lower() in seen_names:
            raise TCURLoRAError(f"label table: name '{name}' is listed twice (names are case-insensitive)")
        color = entry.get("color")
        if color is None:
            color = default_color(value)
        try:
            color = [float(c) for c in color]
        except (TypeError, ValueError):
            raise TCURLoRAError(f"label table: colour of '{name}' must be three numbers 0..1, got {color!r}")
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise TCURLoRAError(f"label table: colour of '{name}' must be three numbers 0..1, got {color!r}")
        item: dict = {"value": value, "name": name, "color": color}
        terminology = entry.get("terminology")
        if terminology:
            try:
                terminology_entry_from_string(str(terminology))
            except Exception:
                raise TCURLoRAError(
                    f"label table: terminology of '{name}' is not a Slicer TerminologyEntry string "
                    "(context~category~type~modifier~anatomic context~region~region modifier)")
            item["terminology"] = str(terminology)
        seen_values.add(value)
        seen_names.add(name.lower())
        out.append(item)
    return sorted(out, key=lambda e: e["value"])


def default_label_table(values: Sequence[int]) -> LabelTable:
    """Label table for bare label values: names ``Label <v>``, default colours."""
    return [{"value": int(v), "name": f"Label {int(v)}", "color": default_color(int(v))}
            for v in sorted(set(int(v) for v in values)) if int(v) != 0]


def _known_text(label_table: LabelTable) -> str:
    return ", ".join(f"{e['value']} {e['name']}" for e in label_table) or "none"


# ----------------------------------------------------------------------------------------------------------
# images


def _check_volume(image: sitk.Image, path: str, what: str) -> sitk.Image:
    """Accept only single-component 3D volumes (a trailing 4th axis of length 1 is dropped)."""
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        raise InputError(path, f"{what} has {ncomp} components per voxel (vector, RGB or multi-channel data); "
                               "a single-channel 3D volume is needed")
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(path, f"{what} has complex voxels; a real-valued 3D volume is needed")
    size = image.GetSize()
    dim = image.GetDimension()
    if dim == 4 and size[3] == 1:
        image = sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0])
        size, dim = image.GetSize(), 3
    if dim == 4:
        raise InputError(path, f"{what} is 4D (size {_size_text(size)}); a single 3D volume is needed")
    if dim == 2:
        raise InputError(path, f"{what} is 2D (size {_size_text(size)}); a 3D volume is needed")
    if dim != 3:
        raise InputError(path, f"{what} has {dim} dimensions; a 3D volume is needed")
    if min(size) < 2:
        raise InputError(path, f"{what} is a single slice (size {_size_text(size)}), i.e. 2D; a 3D volume is needed")
    if not all(math.isfinite(v) for v in image.GetSpacing() + image.GetOrigin() + image.GetDirection()) \
            or min(image.GetSpacing()) <= 0:  # resampling a NaN or zero spacing makes grids of any size
        raise InputError(path, f"{what} has an invalid geometry (spacing {_vec_text(image.GetSpacing())} mm)")
    return image


def _dicom_series(folder: str) -> list[tuple[str, list[str]]]:
    """All DICOM series below ``folder``: (series instance UID, slice files sorted by position by GDCM)."""
    series: list[tuple[str, list[str]]] = []
    for root, dirs, _files in os.walk(folder):
        dirs.sort()
        for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(root) or ():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(root, series_id)
            if files:
                series.append((series_id, list(files)))
    return series


def _series_description(files: Sequence[str]) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
        text = reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
    except RuntimeError:
        text = ""
    return f"{text[:40]}, {len(files)} files" if text else f"{len(files)} files"


def pick_dicom_series(path: PathLike, series_uid: str) -> str:
    """A file of DICOM series ``series_uid`` in the folder ``path`` (which :func:`read_image` then reads as that
    series); other inputs are returned unchanged.  An unknown UID is an :class:`InputError` listing the series."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    series = _dicom_series(path)
    for uid, files in series:
        if uid == series_uid:
            return files[0]
    raise InputError(path, f"has no DICOM series {series_uid} (it holds {_series_list(series)})")


def _series_list(series: Sequence[tuple[str, list[str]]]) -> str:
    listed = "; ".join(f"{uid} ({_series_description(files)})" for uid, files in series[:10])
    return (listed + ("; ..." if len(series) > 10 else "")) or "no DICOM series"


def _read_dicom(path: str, member: Optional[str] = None) -> sitk.Image:
    if member is None:
        series = _dicom_series(path)
    else:
        folder = os.path.dirname(path) or "."
        member_abs = os.path.abspath(member)
        series = [(uid, files) for uid, files in ((sid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid)))
                                                  for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ())
                  if member_abs in {os.path.abspath(f) for f in files}]
    if not series:
        raise InputError(path, "no DICOM series found" if member is None else "is not part of a readable DICOM series")
    if len(series) > 1:
        # a localizer, another reconstruction, another patient: never guess which one was meant
        raise InputError(path, f"holds {len(series)} DICOM series: {_series_list(series)}; choose one with "
                               "--series UID, or give one of its files")
    files = series[0][1]
    check_regular_file(files[0], "DICOM file")
    first = _read_information(files[0], "DICOM file")
    _check_memory(path, (*first.GetSize()[:2], len(files)), _stored_bytes(first), "DICOM series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(path, f"DICOM series cannot be read ({_sitk_reason(exc)})")


# Working memory a volume costs per voxel beyond its stored voxels: the float32 copy, the finite check,
# the preprocessing copies (orientation, resampling, the network input) and the class probabilities.
WORKING_BYTES_PER_VOXEL = 24
_COMPONENT_BYTES = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
                    sitk.sitkInt32: 4, sitk.sitkFloat32: 4}


def _read_information(path: str, what: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()  # the header only: sizes are checked before any voxel is allocated
    except RuntimeError as exc:
        raise InputError(path, f"cannot be read as {what} ({_sitk_reason(exc)})")
    return reader


def _stored_bytes(reader: sitk.ImageFileReader) -> int:
    return _COMPONENT_BYTES.get(reader.GetPixelID(), 8) * max(1, reader.GetNumberOfComponents())


def _check_memory(path: str, size: Sequence[int], stored_bytes: int, what: str) -> None:
    """Refuse, from the header, a volume this machine cannot hold (or a header that claims absurd sizes)."""
    check_grid(path, what, size, stored_bytes + WORKING_BYTES_PER_VOXEL)


def _check_nifti_complete(path: str) -> None:
    """ITK reads a NIfTI file shorter than its header says with the missing voxels as zeros: refuse it."""
    import gzip
    import zlib

    import nibabel as nib

    try:
        header = nib.load(path).header
        need = max(int(header.get_data_offset()), int(getattr(header, "single_vox_offset", 0))) + \
            int(np.prod(header.get_data_shape(), dtype=np.float64)) * header.get_data_dtype().itemsize
    except Exception:  # nibabel cannot parse it: ITK's reader says what is wrong
        return
    if extension(path) == ".nii":
        have = os.path.getsize(path)
    else:
        have = 0
        try:
            with gzip.open(path, "rb") as f:  # count the decompressed bytes, 1 MB at a time
                while have < need:
                    chunk = f.read(min(1 << 20, need - have))
                    if not chunk:
                        break
                    have += len(chunk)
        except (EOFError, OSError, zlib.error):
            raise InputError(path, "compressed data is truncated or corrupt (the file was cut short?)") from None
    if have < need:
        raise InputError(path, f"truncated: the header describes {need} bytes, the file holds {have}")


def _read_volume(path: str, what: str) -> sitk.Image:
    """Read an image file with ITK after checking, from its header, its size against memory and (NIfTI) its length."""
    check_regular_file(path)  # a FIFO would block ITK
    reader = _read_information(path, what)
    _check_memory(path, reader.GetSize(), _stored_bytes(reader), what)
    if extension(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(path, f"cannot be read as {what} ({_sitk_reason(exc)})")


def _nifti_nonfinite(path: str) -> int:
    """NaN/inf voxels of a float NIfTI file: ITK's NIfTI reader turns them into 0, so ask nibabel."""
    import nibabel as nib

    img = nib.load(path)
    if not np.issubdtype(img.get_data_dtype(), np.floating):
        return 0  # integer voxels cannot be NaN
    data = np.asanyarray(img.dataobj)
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def read_image(path: PathLike) -> sitk.Image:
    """Read a 3D image (NIfTI, NRRD, MHA/MHD, or a DICOM series folder / one of its files) as float32.

    DICOM: the folder is searched (recursively) and must hold one series (see :func:`pick_dicom_series`), or
    ``path`` is one file of the series to read.
    Raises :class:`InputError` for a missing/unreadable file, 2D, 4D or multi-component data, NaN/inf voxels,
    a NIfTI file shorter than its header says, a folder with several DICOM series, and a volume larger than
    the available memory allows (checked from the header, before reading the voxels).
    The source path is recorded in the image metadata (:data:`PATH_KEY`) so later messages can name it.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    if os.path.isdir(path):
        image = _read_dicom(path)
    elif extension(path) == ".dcm":
        image = _read_dicom(path, member=path)
    else:
        image = _read_volume(path, "an image")
    image = _check_volume(image, path, "image")
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if not bad and extension(path) in (".nii", ".nii.gz"):
        bad = _nifti_nonfinite(path)
    if bad:
        raise InputError(path, f"image contains {bad} NaN or infinite voxel(s)")
    image.SetMetaData(PATH_KEY, os.path.abspath(path))
    return image


# ----------------------------------------------------------------------------------------------------------
# geometry


def geometry_mismatch(a: sitk.Image, b: sitk.Image, rtol: float = GEOMETRY_RTOL) -> Optional[str]:
    """None when ``a`` and ``b`` share a grid (size exact; spacing, origin, direction within ``rtol``),
    otherwise a short description of the first difference, e.g. ``size 64x64x40 vs 64x64x41``."""
    if a.GetDimension() != b.GetDimension():
        return f"dimension {a.GetDimension()} vs {b.GetDimension()}"
    if a.GetSize() != b.GetSize():
        return f"size {_size_text(a.GetSize())} vs {_size_text(b.GetSize())}"
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if not np.all(np.abs(sa - sb) <= rtol * np.maximum(np.abs(sa), np.abs(sb))):
        return f"spacing {_vec_text(sa)} vs {_vec_text(sb)} mm"
    oa, ob = np.array(a.GetOrigin()), np.array(b.GetOrigin())
    # Relative to the coordinate magnitude, but never tighter than rtol of a voxel.
    scale = np.maximum(np.maximum(np.abs(oa), np.abs(ob)), max(sa.max(), 1.0))
    if not np.all(np.abs(oa - ob) <= rtol * scale):
        return f"origin {_vec_text(oa)} vs {_vec_text(ob)} mm"
    da, db = np.array(a.GetDirection()), np.array(b.GetDirection())
    if not np.all(np.abs(da - db) <= rtol):
        return f"direction {_vec_text(da)} vs {_vec_text(db)}"
    return None


def _same_lattice_resample(label: sitk.Image, image: sitk.Image) -> Optional[sitk.Image]:
    """If every voxel of ``label`` sits exactly on a voxel of ``image`` (same spacing, axes possibly permuted or
    flipped, integer offset: e.g. Slicer's "crop to minimum extent"), return it on the image grid (0 outside);
    None if the lattices differ or foreground would fall outside the image."""
    def index_to_lps(img: sitk.Image) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
        m[:3, 3] = img.GetOrigin()
        return m

    if label.GetDimension() != 3:
        return None
    lab_to_img = np.linalg.inv(index_to_lps(image)) @ index_to_lps(label)
    rot, offset = lab_to_img[:3, :3], lab_to_img[:3, 3]
    if not (np.allclose(rot, np.round(rot), atol=1e-3) and np.allclose(np.abs(np.round(rot)).sum(0), 1)
            and np.allclose(np.abs(np.round(rot)).sum(1), 1) and np.allclose(offset, np.round(offset), atol=1e-3)):
        return None
    # Nearest neighbour is exact here: every target voxel centre is a source voxel centre (or outside).
    out = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    if np.count_nonzero(sitk.GetArrayViewFromImage(out)) != np.count_nonzero(sitk.GetArrayViewFromImage(label)):
        return None
    return out


def _align_to_image(label: sitk.Image, image: sitk.Image, label_path: str, image_name: str,
                    allow_subgrid: bool) -> sitk.Image:
    problem = geometry_mismatch(label, image)
    if problem is None:
        label = sitk.Image(label)
        label.CopyInformation(image)  # snap tolerated float noise to the image's exact grid
        return label
    if allow_subgrid:
        moved = _same_lattice_resample(label, image)
        if moved is not None:
            return moved
    raise InputError(label_path, f"geometry does not match {image_name} ({problem})")


# ----------------------------------------------------------------------------------------------------------
# labels


def is_segmentation_file(path: PathLike) -> bool:
    """True for a Slicer segmentation: ``.seg.nrrd``, or any ``.nrrd`` whose header has ``Segment0_*`` keys."""
    path = os.fspath(path)
    ext = extension(path)
    if ext == ".seg.nrrd":
        return True
    if ext in (".nrrd", ".nhdr") and os.path.isfile(path):
        try:
            import nrrd
            header = nrrd.read_header(path)
        except Exception:
            return False
        return any(k.startswith("Segment0_") for k in header)
    return False


def _segment_value_map(segments: list[dict], label_table: Optional[LabelTable], path: str) -> list[int]:
    """Output label value of each segment (same order as ``segments``)."""
    if label_table is not None:
        by_name = {e["name"].lower(): e["value"] for e in label_table}
        values = []
        for seg in segments:
            name = str(seg.get("name", seg.get("id", ""))).strip()
            if name.lower() not in by_name:
                known = ", ".join(e["name"] for e in label_table) or "none"
                raise InputError(path, f"segment '{name}' is not in the label table (known names: {known})")
            values.append(by_name[name.lower()])
        return values
    # No table: keep the stored label values when they already form one plain label map (what we write and
    # what Slicer writes without overlaps); otherwise number segments 1..N in the file's segment order.
    stored = [seg.get("labelValue", 1) for seg in segments]
    one_layer = all(seg.get("layer", 0) == 0 for seg in segments)
    if one_layer and len(set(stored)) == len(stored) and all(v > 0 for v in stored):
        return [int(v) for v in stored]
    return list(range(1, len(segments) + 1))


def _read_slicer_segmentation(path: str) -> dict:
    import nrrd
    import slicerio

    check_regular_file(path, "segmentation")
    try:
        sizes = [int(s) for s in nrrd.read_header(path).get("sizes", [])]
    except Exception:  # slicerio below names the problem
        sizes = []
    if sizes:  # the voxels are decompressed whole: check the size the header claims first (8-bit voxels)
        _check_memory(path, sizes, 1, "a segmentation")
    try:
        seg = slicerio.read_segmentation(path)
    except Exception as exc:  # slicerio raises IOError/ValueError/KeyError on malformed headers
        raise InputError(path, f"cannot be read as a Slicer segmentation ({' '.join(str(exc).split())})")
    voxels = seg.get("voxels")
    if voxels is None or voxels.ndim not in (3, 4):
        shape = "none" if voxels is None else _size_text(voxels.shape)
        raise InputError(path, f"segmentation voxels must be 3D (or 3D layers), got shape {shape}")
    if voxels.ndim == 3 and min(voxels.shape) < 2:
        raise InputError(path, f"segmentation is 2D (size {_size_text(voxels.shape)}); a 3D volume is needed")
    if not seg.get("segments"):
        raise InputError(path, "segmentation contains no segments")
    return seg


def _segmentation_to_image(seg: dict, values: list[int]) -> sitk.Image:
    """Collapse (possibly layered/overlapping) segments into one label map on the segmentation's own grid.
    Overlaps are resolved as Slicer exports them: a later segment in the file's list wins."""
    import slicerio

    shape = seg["voxels"].shape[-3:]  # (i, j, k)
    out = np.zeros(shape, dtype=_smallest_label_dtype(max(values))[0])
    for segment, value in zip(seg["segments"], values):
        out[slicerio.segment_mask(seg, segment)] = value
    image = sitk.GetImageFromArray(np.ascontiguousarray(out.transpose(2, 1, 0)))
    ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (axes / spacing).ravel()])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    return image


def _read_plain_label(path: str) -> sitk.Image:
    label = _read_volume(path, "a label map")
    label = _check_volume(label, path, "label map")
    array = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            raise InputError(path, "label map contains NaN or infinite values")
        frac = array != np.round(array)
        if frac.any():
            raise InputError(path, f"label map has non-integer values (e.g. {float(array[frac][0]):g}); "
                                   "is it an image rather than a label map?")
    if array.size and array.min() < 0:
        raise InputError(path, f"label map has negative values (min {array.min():g})")
    max_value = int(array.max()) if array.size else 0
    dtype, pixel_id = _smallest_label_dtype(max_value)
    if label.GetPixelID() != pixel_id:
        label = sitk.Cast(label, pixel_id)
    return label


def read_label_unchecked(path: PathLike, label_table: Optional[Sequence[dict]] = None) -> sitk.Image:
    """Read a label map or Slicer segmentation on its own grid (no geometry or emptiness check).

    Used where there is no image to compare with (e.g. evaluation of a prediction against a reference).
    Value rules are those of :func:`read_label`.
    """
    path = os.fspath(path)
    table = validate_label_table(label_table) if label_table is not None else None
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    if os.path.isdir(path):
        raise InputError(path, "is a folder; a label map or .seg.nrrd file is needed")
    if is_segmentation_file(path):
        seg = _read_slicer_segmentation(path)
        values = _segment_value_map(seg["segments"], table, path)
        return _segmentation_to_image(seg, values)
    label = _read_plain_label(path)
    if table is not None:
        present = np.unique(sitk.GetArrayViewFromImage(label))
        unknown = sorted(set(int(v) for v in present) - {0} - {e["value"] for e in table})
        if unknown:
            shown = ", ".join(str(v) for v in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
            raise InputError(path, f"label values {shown} are not in the label table "
                                   f"(known: {_known_text(table)})")
    return label


def read_label(path: PathLike, image: sitk.Image, label_table: Optional[Sequence[dict]] = None, *,
               image_path: Optional[PathLike] = None, allow_empty: bool = False) -> sitk.Image:
    """Read the label of ``image`` and return it as an integer ``sitk.Image`` on the image's exact grid.

    * Plain label maps (NIfTI, NRRD, MHA...): values are kept; with a ``label_table``, any non-zero value
      not listed is an error. Float files are accepted when all values are whole numbers.
    * Slicer segmentations (``.seg.nrrd``, read with slicerio; layered/overlapping segments supported):
      with a ``label_table``, segments are mapped to values BY NAME (case-insensitive; several segments with
      one name are merged); an unknown name is an error listing the known names. Without a table the stored
      label values are kept when they form a plain label map, otherwise segments are numbered 1..N in file
      order. Where segments overlap, the later one in the file wins (as Slicer's labelmap export does).
      A segmentation stored on the image's voxel lattice but with another extent or axis order (Slicer's
      "crop to minimum extent") is put back onto the image grid exactly; any other difference is an error.
    * Geometry (size exact; spacing, origin, direction within 1e-4 relative) must equal the image's,
      an all-background label is an error unless ``allow_empty``, and 2D/4D/vector labels are errors.

    ``image_path`` names the image in messages (defaults to the path recorded by :func:`read_image`).
    """
    path = os.fspath(path)
    table = validate_label_table(label_table) if label_table is not None else None
    label = read_label_unchecked(path, table)
    source = os.fspath(image_path) if image_path is not None else (
        image.GetMetaData(PATH_KEY) if image.HasMetaDataKey(PATH_KEY) else None)
    image_name = display_name(source) if source else "the image"
    if source and image_name == display_name(path):
        # Same base name in two folders (imagesTr/x.nii.gz vs labelsTr/x.nii.gz): show the parent folder too.
        image_name = os.path.basename(os.path.dirname(os.path.abspath(source))) + "/" + image_name
    label = _align_to_image(label, image, path, image_name, allow_subgrid=is_segmentation_file(path))
    if not allow_empty and not np.any(sitk.GetArrayViewFromImage(label)):
        raise InputError(path, "label contains no foreground (all voxels are background 0)")
    return label


def label_table_from_segmentation(path: PathLike) -> LabelTable:
    """Label table of a Slicer segmentation: segment names, colours, terminology, and the values
    :func:`read_label` assigns without a table. Useful to start a training from a Slicer annotation."""
    from slicerio.segmentation import terminology_entry_to_string

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    seg = _read_slicer_segmentation(path)
    values = _segment_value_map(seg["segments"], None, path)
    table: LabelTable = []
    seen: dict[str, int] = {}
    for segment, value in zip(seg["segments"], values):
        name = str(segment.get("name", segment.get("id", f"Segment {value}"))).strip() or f"Segment {value}"
        if name.lower() in seen:
            raise InputError(path, f"two segments are named '{name}'; rename one so labels are unambiguous")
        seen[name.lower()] = value
        entry: dict = {"value": value, "name": name,
                       "color": [min(1.0, max(0.0, float(c))) for c in segment.get("color", default_color(value))]}
        if segment.get("terminology"):
            entry["terminology"] = terminology_entry_to_string(segment["terminology"])
        table.append(entry)
    return validate_label_table(table)


# ----------------------------------------------------------------------------------------------------------
# writing


def _check_write_extension(path: str, allowed: Sequence[str]) -> str:
    ext = extension(path)
    if ext not in allowed:
        raise InputError(path, f"unsupported output format '{ext or 'no extension'}'; use one of {', '.join(allowed)}")
    return ext


def write_image(path: PathLike, image: sitk.Image) -> str:
    """Write an image atomically (.nii.gz, .nii, .nrrd or .mha, compressed where the format allows)."""
    path = os.fspath(path)
    _check_write_extension(path, WRITE_EXTENSIONS)
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True))


def _as_label_image(label: Union[sitk.Image, np.ndarray]) -> tuple[sitk.Image, np.ndarray]:
    if not isinstance(label, sitk.Image):
        raise TypeError("label must be a SimpleITK image (use array_to_image(array, reference) for arrays)")
    if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("label must be a 3D single-component image")
    array = sitk.GetArrayFromImage(label)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(array == np.round(array)):
            raise ValueError("label has non-integer values")
    if array.size and array.min() < 0:
        raise ValueError("label has negative values")
    return label, array.astype(np.int64, copy=False)


def write_segmentation(path: PathLike, label: sitk.Image, label_table: Optional[Sequence[dict]] = None) -> str:
    """Write a label map atomically.

    ``.seg.nrrd``: a Slicer segmentation (written with slicerio) with one segment per label-table entry
    (name, colour, label value, terminology; entries absent from this label map become empty segments), on
    the label's grid in LPS, readable by slicerio and 3D Slicer. Other extensions (.nii.gz, .nii, .nrrd,
    .mha): a plain label map. Without a ``label_table``, segments are named ``Label <v>``.
    Values present in the label but missing from the table raise ``ValueError``.
    """
    import slicerio

    path = os.fspath(path)
    ext = _check_write_extension(path, (".seg.nrrd",) + WRITE_EXTENSIONS)
    label, array = _as_label_image(label)
    present = set(int(v) for v in np.unique(array)) - {0}
    table = validate_label_table(label_table) if label_table is not None else default_label_table(sorted(present))
    missing = present - {e["value"] for e in table}
    if missing:
        raise ValueError(f"label values {sorted(missing)} are not in the label table")
    max_value = max([e["value"] for e in table] + [0])
    if max_value > MAX_LABEL_VALUE:  # never wrap a value silently (2**40 would be written as 0)
        raise ValueError(f"label value {max_value} is above {MAX_LABEL_VALUE}; label maps are written with 8 or 16 bits")
    dtype, pixel_id = _smallest_label_dtype(max_value)

    if ext != ".seg.nrrd":
        out = sitk.Cast(label, pixel_id) if label.GetPixelID() != pixel_id else label
        return atomic_write(path, lambda tmp: sitk.WriteImage(out, tmp, True))

    voxels = np.ascontiguousarray(array.astype(dtype).transpose(2, 1, 0))  # (k,j,i) -> (i,j,k) for NRRD 'F' order
    direction = np.array(label.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(label.GetSpacing(), dtype=float)
    ijk_to_lps[:3, 3] = label.GetOrigin()
    segments = []
    for entry in table:
        mask = voxels == entry["value"]
        if mask.any():
            idx = np.nonzero(mask)
            extent = [int(v) for axis in idx for v in (axis.min(), axis.max())]
        else:
            extent = [0, -1, 0, -1, 0, -1]  # how Slicer stores an empty segment
        segment: dict = {
            "id": f"Segment_{entry['value']}",
            "name": entry["name"],
            "nameAutoGenerated": False,
            "color": [round(float(c), 6) for c in entry["color"]],
            "colorAutoGenerated": False,
            "labelValue": int(entry["value"]),
            "layer": 0,
            "extent": extent,
            "status": "completed",
        }
        if entry.get("terminology"):
            from slicerio.segmentation import terminology_entry_from_string
            segment["terminology"] = terminology_entry_from_string(entry["terminology"])
        segments.append(segment)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps,
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segments,
    }
    return atomic_write(path, lambda tmp: slicerio.write_segmentation(tmp, segmentation))


# ----------------------------------------------------------------------------------------------------------
# case discovery

# Suffixes that mark a label file next to its image: X_label.nii.gz, X-label.nrrd (Slicer's labelmap default
# name), X_seg.nii.gz, X-seg..., and X.seg.nrrd (Slicer segmentation).
_LABEL_SUFFIX = re.compile(r"(?:[_-](?:label|labels|seg|segmentation)|\.seg)$", re.IGNORECASE)
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and extension(p) in LABEL_EXTENSIONS)


def _find_nnunet_cases(folder: Path) -> list[tuple[str, str]]:
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    labels: dict[str, Path] = {}
    for p in _volume_files(labels_dir):
        labels.setdefault(stem(p), p)
    cases: list[tuple[str, str]] = []
    missing: list[str] = []
    for p in _volume_files(images_dir):
        case = stem(p)
        match = _CHANNEL_SUFFIX.match(case)
        if match:
            if match.group("channel") != "0000":
                raise InputError(p, "is a second input channel; only single-channel cases (_0000) are supported")
            case = match.group("case")
        label = labels.get(case) or labels.get(stem(p))
        if label is None:
            missing.append(p.name)
        else:
            cases.append((str(p), str(label)))
    if missing:
        raise InputError(labels_dir, f"no label for image(s) {', '.join(missing[:5])}"
                                     f"{', ...' if len(missing) > 5 else ''} (expected labelsTr/<case>.<ext>)")
    return cases


def find_cases(folder: PathLike) -> list[tuple[str, str]]:
    """Find (image_path, label_path) training cases in ``folder``, sorted by image name.

    Rule 1, nnU-Net layout: if ``folder`` has ``imagesTr/`` and ``labelsTr/``, each image
    ``imagesTr/<case>_0000.<ext>`` (or ``imagesTr/<case>.<ext>``) pairs with ``labelsTr/<case>.<ext>``
    (any supported extension, including ``.seg.nrrd``). Every image must have a label; other channels
    (``_0001``...) are rejected, since the models take one channel.

    Rule 2, side by side (otherwise): in ``folder`` itself (not recursive), an image ``X.<ext>`` - or a
    DICOM series sub-folder ``X/`` - pairs with exactly one of ``X_label``, ``X-label``, ``X_labels``,
    ``X_seg``, ``X-seg``, ``X_segmentation`` (any supported extension) or ``X.seg.nrrd``. Files without a
    partner are ignored; two label candidates for one image is an error.

    Supported extensions: .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd (labels also .seg.nrrd).
    Raises :class:`InputError` when the folder is missing or holds no case.
    """
    root = Path(os.fspath(folder))
    if not root.is_dir():
        raise InputError(root, "case folder not found" if not root.exists() else "is not a folder")
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        cases = _find_nnunet_cases(root)
    else:
        files = _volume_files(root)
        labels: dict[str, list[Path]] = {}
        images: dict[str, Path] = {}
        for p in files:
            s = stem(p)
            m = _LABEL_SUFFIX.search(s) if extension(p) != ".seg.nrrd" else None
            if extension(p) == ".seg.nrrd":
                labels.setdefault(s, []).append(p)
            elif m:
                labels.setdefault(s[: m.start()], []).append(p)
            else:
                images.setdefault(s, p)
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            images.setdefault(d.name, d)  # a DICOM series folder named like its label
        cases = []
        for case in sorted(images):
            found = labels.get(case, [])
            if len(found) > 1:
                raise InputError(images[case], "has several label files: " + ", ".join(p.name for p in found))
            if found:
                cases.append((str(images[case]), str(found[0])))
    if not cases:
        raise InputError(root, "no (image, label) cases found; use imagesTr/ + labelsTr/, or X.nii.gz next to "
                               "X_label.nii.gz / X.seg.nrrd")
    return sorted(cases)


__all__ = [
    "PATH_KEY", "IMAGE_EXTENSIONS", "LABEL_EXTENSIONS", "WRITE_EXTENSIONS", "extension", "stem",
    "array_to_image", "default_color", "validate_label_table", "default_label_table", "read_image",
    "geometry_mismatch", "is_segmentation_file", "read_label", "read_label_unchecked",
    "label_table_from_segmentation", "write_image", "write_segmentation", "find_cases", "pick_dicom_series",
    "available_memory",
]
