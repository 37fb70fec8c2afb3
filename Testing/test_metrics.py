"""tcurlora.metrics: Dice, HD95 (cross-checked with MONAI), file evaluation and the summary line."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from tcurlora import io
from tcurlora.errors import InputError
from tcurlora.metrics import dice, evaluate, hd95, summary_line


def monai_hd(pred: np.ndarray, ref: np.ndarray, label: int, spacing, percentile=95) -> float:
    from monai.metrics import compute_hausdorff_distance

    p = torch.from_numpy((pred == label)[None, None].astype(np.float32))
    r = torch.from_numpy((ref == label)[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compute_hausdorff_distance(p, r, include_background=True, percentile=percentile,
                                         spacing=list(spacing))
    return float(out[0, 0])


def blob(shape, seed, n=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    arr = np.zeros(shape, np.uint8)
    arr[noise > np.percentile(noise, 80)] = 1
    arr[noise > np.percentile(noise, 95)] = n
    return arr


def test_dice_values():
    a = np.zeros((4, 5, 6), np.uint8)
    b = np.zeros_like(a)
    assert dice(a, b, 1) == 1.0  # both empty: perfect agreement (documented)
    a[0, 0, :4] = 1
    assert dice(a, b, 1) == 0.0
    b[0, 0, 2:6] = 1
    assert dice(a, b, 1) == pytest.approx(2 * 2 / 8)
    assert dice(a, a, 1) == 1.0
    with pytest.raises(ValueError):
        dice(a, b[:2], 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 1.3)])
def test_hd95_matches_monai(seed, spacing):
    shape = (24, 28, 32)
    ref = blob(shape, seed)
    pred = blob(shape, seed + 100)
    for label in (1, 3):
        ours = hd95(pred, ref, label, spacing)
        assert ours == pytest.approx(monai_hd(pred, ref, label, spacing), rel=1e-5, abs=1e-5)


def test_hd95_object_touching_border_matches_monai():
    ref = np.zeros((10, 12, 14), np.uint8)
    ref[0:5, 0:6, 3:9] = 1  # touches the array border: border faces are surface too
    pred = np.zeros_like(ref)
    pred[1:6, 0:7, 4:12] = 1
    spacing = (3.0, 1.0, 0.5)
    assert hd95(pred, ref, 1, spacing) == pytest.approx(monai_hd(pred, ref, 1, spacing), rel=1e-5)


def test_hd95_is_not_the_maximum():
    ref = np.zeros((40, 40, 40), np.uint8)
    ref[10:30, 10:30, 10:30] = 1
    pred = ref.copy()
    pred[2, 2, 38] = 1  # one stray voxel far away: dominates the max, not the 95th percentile
    spacing = (1.0, 1.0, 1.0)
    h95 = hd95(pred, ref, 1, spacing)
    hmax = monai_hd(pred, ref, 1, spacing, percentile=None)
    assert h95 == pytest.approx(monai_hd(pred, ref, 1, spacing), rel=1e-5)
    assert hmax == pytest.approx(math.sqrt(8**2 + 8**2 + 9**2), rel=1e-5)  # to the corner (10, 10, 29)
    assert h95 < 1.0 and h95 < hmax


def test_hd95_known_value_and_spacing():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:15, 5:15, 5:15] = 1
    pred = np.roll(ref, 2, axis=0)  # shifted 2 voxels along axis 0
    assert hd95(pred, ref, 1, (1, 1, 1)) == pytest.approx(2.0)
    assert hd95(pred, ref, 1, (3.0, 1, 1)) == pytest.approx(6.0)  # spacing is in array axis order
    assert hd95(ref, ref, 1, (1, 1, 1)) == 0.0


def test_hd95_empty_masks():
    a = np.zeros((5, 5, 5), np.uint8)
    b = a.copy()
    b[2, 2, 2] = 1
    assert math.isnan(hd95(a, a, 1))
    assert math.isinf(hd95(a, b, 1)) and math.isinf(hd95(b, a, 1))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.tuples(*[st.floats(0.3, 3.0)] * 3))
def test_metric_properties(seed, spacing):
    a = blob((12, 13, 14), seed)
    b = blob((12, 13, 14), seed + 1)
    assert 0.0 <= dice(a, b, 1) <= 1.0
    assert dice(a, b, 1) == pytest.approx(dice(b, a, 1))
    assert hd95(a, b, 1, spacing) == pytest.approx(hd95(b, a, 1, spacing))


def _write_case(tmp_path, name, arr, spacing=(0.9, 1.2, 2.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((1.0, 2.0, 3.0))
    path = str(tmp_path / name)
    sitk.WriteImage(img, path)
    return path, img


def test_evaluate_and_summary(tmp_path):
    table = [{"value": 1, "name": "Organ", "color": [1, 0, 0]}, {"value": 3, "name": "Lesion", "color": [0, 1, 0]}]
    ref1 = blob((16, 18, 20), 5)
    pred1 = blob((16, 18, 20), 6)
    ref2 = blob((16, 18, 20), 7)
    p1, _ = _write_case(tmp_path, "pred1.nii.gz", pred1)
    r1, _ = _write_case(tmp_path, "case1.nii.gz", ref1)
    p2, _ = _write_case(tmp_path, "pred2.nrrd", ref2)
    _, ref2_img = _write_case(tmp_path, "tmp.nii.gz", ref2)
    r2 = io.write_segmentation(tmp_path / "case2.seg.nrrd", ref2_img, table)  # reference as a Slicer file
    rows = evaluate([p1, p2], [r1, r2], table)
    assert len(rows) == 4
    assert {r["case"] for r in rows} == {"case1", "case2"}
    row = next(r for r in rows if r["case"] == "case1" and r["label"] == 3)
    assert row["name"] == "Lesion"
    assert row["dice"] == pytest.approx(dice(pred1, ref1, 3))
    assert row["hd95_mm"] == pytest.approx(hd95(pred1, ref1, 3, (2.0, 1.2, 0.9)))
    assert all(r["dice"] == 1.0 and r["hd95_mm"] == 0.0 for r in rows if r["case"] == "case2")
    line = summary_line(rows)
    assert line.startswith("2 cases: Dice") and "Organ:" in line and "Lesion:" in line and "\n" not in line
    # Without a table: labels found in either file.
    assert {r["label"] for r in evaluate([p1], [r1])} == {1, 3}
    assert summary_line([]) == "no cases evaluated"


def test_summary_counts_empty_masks():
    rows = [{"case": "a", "label": 1, "name": "x", "dice": 0.0, "hd95_mm": float("inf")},
            {"case": "b", "label": 1, "name": "x", "dice": 0.8, "hd95_mm": 4.0}]
    line = summary_line(rows)
    assert "1 with an empty mask" in line and "4.00 mm" in line


def test_evaluate_geometry_mismatch(tmp_path):
    arr = blob((8, 9, 10), 1)
    p, _ = _write_case(tmp_path, "pred.nii.gz", arr, spacing=(1, 1, 1))
    r, _ = _write_case(tmp_path, "ref.nii.gz", arr)
    with pytest.raises(InputError) as e:
        evaluate([p], [r])
    assert "pred.nii.gz" in str(e.value) and "ref.nii.gz" in str(e.value)
