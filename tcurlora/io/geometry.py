"""Geometry: whether two images share a grid, and a label put exactly onto its image's grid."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..limits import size_text

# Geometry tolerance: NIfTI stores geometry in float32, and Slicer/ITK round-trips introduce ~1e-6 noise.
GEOMETRY_RTOL = 1e-4


def _vec_text(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def geometry_mismatch(a: sitk.Image, b: sitk.Image, rtol: float = GEOMETRY_RTOL) -> Optional[str]:
    """None when ``a`` and ``b`` share a grid (size exact; spacing, origin, direction within ``rtol``),
    otherwise a short description of the first difference, e.g. ``size 64x64x40 vs 64x64x41``."""
    if a.GetDimension() != b.GetDimension():
        return f"dimension {a.GetDimension()} vs {b.GetDimension()}"
    if a.GetSize() != b.GetSize():
        return f"size {size_text(a.GetSize())} vs {size_text(b.GetSize())}"
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
