"""Segmentation metrics: Dice and the 95th-percentile Hausdorff distance (HD95), per label.

Arrays are label maps of equal shape (any integer values, 0 = background). ``spacing`` is the voxel size
in mm **in the array's axis order** (for a SimpleITK array that is ``image.GetSpacing()[::-1]``).

These are measured on a handful of cases (templates, a few annotated scans), not on a cohort: report them as
such.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
from scipy import ndimage

PathLike = Union[str, "os.PathLike[str]"]


def _masks(pred: np.ndarray, ref: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference shapes differ: {pred.shape} vs {ref.shape}")
    return pred == label, ref == label


def dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    """Dice overlap of ``label`` in ``pred`` and ``ref``: 2|P∩R| / (|P|+|R|).

    Both empty (the label is absent and correctly not predicted) counts as perfect agreement: 1.0.
    """
    p, r = _masks(pred, ref, label)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & r)) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    # Surface = voxels of the mask with a 6-neighbour outside it (array border counts as outside), the same
    # edge definition as MONAI's get_mask_edges (scipy binary_erosion XOR mask).
    return mask & ~ndimage.binary_erosion(mask)


def _directed_distances(from_surface: np.ndarray, to_surface: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    # Distance (mm) from each surface voxel of one mask to the nearest surface voxel of the other.
    dist = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return dist[from_surface]


def hd95(pred: np.ndarray, ref: np.ndarray, label: int, spacing: Optional[Sequence[float]] = None) -> float:
    """95th-percentile Hausdorff distance of ``label`` in mm.

    Surface voxels of each mask are found by erosion; the distances from every surface voxel of the
    prediction to the reference surface, and from the reference surface to the prediction's, are computed
    with a Euclidean distance transform using ``sampling=spacing`` (array axis order; default 1 mm).
    The result is ``max(P95(pred -> ref), P95(ref -> pred))``, the robust Hausdorff distance, exactly as
    ``monai.metrics.compute_hausdorff_distance(..., percentile=95)`` computes it (linear-interpolated
    percentiles). It is not the maximum (the plain Hausdorff distance), so a few outlier voxels do not dominate.

    Empty masks: exactly one of the two empty -> ``inf`` (no surface to measure to); both empty -> ``nan``
    (undefined; :func:`dice` gives 1.0 in that case).
    """
    p, r = _masks(pred, ref, label)
    has_p, has_r = bool(p.any()), bool(r.any())
    if not has_p and not has_r:
        return float("nan")
    if not has_p or not has_r:
        return float("inf")
    spacing_arr = np.ones(p.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    if spacing_arr.shape != (p.ndim,):
        raise ValueError(f"spacing needs {p.ndim} values (array axis order), got {spacing!r}")
    # Crop to the union's bounding box plus a one-voxel zero margin: the same surfaces (an object touching
    # the array border keeps its border surface) and the same nearest-surface distances, far less work.
    box = ndimage.find_objects((p | r).astype(np.uint8))[0]
    p = np.pad(p[box], 1)
    r = np.pad(r[box], 1)
    sp, sr = _surface(p), _surface(r)
    d_pr = _directed_distances(sp, sr, spacing_arr)
    d_rp = _directed_distances(sr, sp, spacing_arr)
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


def evaluate(pred_paths: Sequence[PathLike], ref_paths: Sequence[PathLike],
             label_table: Optional[Sequence[dict]] = None) -> list[dict]:
    """Dice and HD95 of each predicted file against its reference, per label.

    Files may be label maps or ``.seg.nrrd`` (read like :func:`tcurlora.io.read_label`, segments mapped by
    name when a ``label_table`` is given). Prediction and reference must share a grid (else ``InputError``).
    Labels: those of ``label_table``, or else every non-zero value found in either file.
    Returns rows ``{"case", "label", "name", "dice", "hd95_mm"}``; ``case`` is the reference file's stem.
    """
    import SimpleITK as sitk

    from .errors import InputError, display_name
    from .io import geometry_mismatch, read_label_unchecked, stem, validate_label_table

    if len(pred_paths) != len(ref_paths):
        raise ValueError(f"{len(pred_paths)} predictions for {len(ref_paths)} references")
    table = validate_label_table(label_table) if label_table is not None else None
    rows: list[dict] = []
    for pred_path, ref_path in zip(pred_paths, ref_paths):
        ref_img = read_label_unchecked(ref_path, table)
        pred_img = read_label_unchecked(pred_path, table)
        problem = geometry_mismatch(pred_img, ref_img)
        if problem is not None:
            raise InputError(pred_path, f"geometry does not match {display_name(ref_path)} ({problem})")
        pred = sitk.GetArrayViewFromImage(pred_img)
        ref = sitk.GetArrayViewFromImage(ref_img)
        spacing = ref_img.GetSpacing()[::-1]  # array axis order
        if table is not None:
            labels = [(e["value"], e["name"]) for e in table]
        else:
            values = sorted((set(np.unique(pred).tolist()) | set(np.unique(ref).tolist())) - {0})
            labels = [(int(v), f"Label {int(v)}") for v in values]
        case = stem(ref_path)
        for value, name in labels:
            rows.append({"case": case, "label": int(value), "name": name,
                         "dice": dice(pred, ref, value), "hd95_mm": hd95(pred, ref, value, spacing)})
    return rows


def summary_line(rows: Sequence[dict]) -> str:
    """One line: mean Dice (and min), median HD95 over finite values, per label when there are several.

    Example: ``3 cases: Dice 0.912 (min 0.850), HD95 median 3.2 mm | Liver: Dice 0.930, HD95 2.1 mm | ...``.
    Infinite HD95 (one mask empty) is counted, not averaged; NaN (both empty) is left out.
    """
    if not rows:
        return "no cases evaluated"

    def part(sub: Sequence[dict]) -> str:
        d = np.array([r["dice"] for r in sub], dtype=float)
        h = np.array([r["hd95_mm"] for r in sub], dtype=float)
        finite = h[np.isfinite(h)]
        text = f"Dice {np.mean(d):.3f}"
        if len(d) > 1:
            text += f" (min {np.min(d):.3f})"
        text += f", HD95 median {np.median(finite):.2f} mm" if finite.size else ", HD95 n/a"
        n_inf = int(np.count_nonzero(np.isinf(h)))
        if n_inf:
            text += f" ({n_inf} with an empty mask)"
        return text

    cases = len({r["case"] for r in rows})
    line = f"{cases} case{'s' if cases != 1 else ''}: {part(rows)}"
    labels = sorted({(r["label"], r["name"]) for r in rows})
    if len(labels) > 1:
        for value, name in labels:
            line += f" | {name}: {part([r for r in rows if r['label'] == value])}"
    return line


__all__ = ["dice", "hd95", "evaluate", "summary_line"]
