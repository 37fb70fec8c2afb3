"""Images: reading (NIfTI, NRRD, MHA/MHD, DICOM series) with their checks, and writing.

Images are :class:`SimpleITK.Image` objects (physical space LPS, as ITK and DICOM use). ``read_image`` returns a
3D single-channel float32 image with finite voxels.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_write
from ..errors import InputError, display_name
from ..limits import available_memory, check_grid, size_text  # noqa: F401  (available_memory re-exported)
from ..userfiles import check_regular_file

PathLike = Union[str, "os.PathLike[str]"]

#: Metadata key under which read_image records the source path (used to name the image in messages).
PATH_KEY = "tcurlora:path"

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
LABEL_EXTENSIONS = (".seg.nrrd",) + IMAGE_EXTENSIONS[:-1]
#: Single-file formats we can write atomically (.mhd/.nhdr write two files, so they are not offered).
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


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
        raise InputError(path, f"{what} is 4D (size {size_text(size)}); a single 3D volume is needed")
    if dim == 2:
        raise InputError(path, f"{what} is 2D (size {size_text(size)}); a 3D volume is needed")
    if dim != 3:
        raise InputError(path, f"{what} has {dim} dimensions; a 3D volume is needed")
    if min(size) < 2:
        raise InputError(path, f"{what} is a single slice (size {size_text(size)}), i.e. 2D; a 3D volume is needed")
    if not all(math.isfinite(v) for v in image.GetSpacing() + image.GetOrigin() + image.GetDirection()) \
            or min(image.GetSpacing()) <= 0:  # resampling a NaN or zero spacing makes grids of any size
        raise InputError(path, f"{what} has an invalid geometry (spacing "
                               f"({', '.join(f'{v:.6g}' for v in image.GetSpacing())}) mm)")
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
