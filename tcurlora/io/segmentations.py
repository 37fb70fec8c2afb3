"""Label maps and Slicer segmentations (``.seg.nrrd``): reading them onto an image's grid, and writing them.

Label maps are integer ``SimpleITK.Image`` objects on the image grid; 0 is background.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_write
from ..errors import InputError, display_name
from ..labels import (MAX_LABEL_VALUE, LabelError, LabelTable, check_label_table, default_color, default_label_table,
                      names_text)
from ..limits import size_text
from ..userfiles import check_regular_file
from .geometry import _align_to_image
from .images import (PATH_KEY, WRITE_EXTENSIONS, PathLike, _check_memory, _check_volume, _check_write_extension,
                     _read_volume, _smallest_label_dtype, extension)


def validate_label_table(label_table: Sequence[dict]) -> LabelTable:
    """A label table checked and normalised (:func:`tcurlora.labels.check_label_table`) that a Slicer segmentation
    can also hold: ASCII names (pynrrd writes ``.seg.nrrd`` headers as ASCII, and its reader drops other bytes)
    and terminology strings Slicer parses. Raises :class:`~tcurlora.labels.LabelError` ``label table: ...``.
    """
    from slicerio.segmentation import terminology_entry_from_string

    try:
        table = check_label_table(label_table)
    except LabelError as exc:
        raise LabelError(f"label table: {exc}") from None
    for entry in table:
        if not entry["name"].isascii():
            first = next(ch for ch in entry["name"] if not ch.isascii())
            raise LabelError(f"label table: the name of label {entry['value']} holds {first!r}; .seg.nrrd segment "
                             "names must be ASCII")
        if entry.get("terminology"):
            try:
                terminology_entry_from_string(entry["terminology"])
            except Exception:
                raise LabelError(f"label table: terminology of '{entry['name']}' is not a Slicer TerminologyEntry "
                                 "string (context~category~type~modifier~anatomic context~region~region modifier)")
    return table


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
        shape = "none" if voxels is None else size_text(voxels.shape)
        raise InputError(path, f"segmentation voxels must be 3D (or 3D layers), got shape {shape}")
    if voxels.ndim == 3 and min(voxels.shape) < 2:
        raise InputError(path, f"segmentation is 2D (size {size_text(voxels.shape)}); a 3D volume is needed")
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
                                   f"(known: {names_text(table)})")
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
