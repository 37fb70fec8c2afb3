"""tcurlora.preprocess: model space <-> input grid, intensity normalisation, training patches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from tcurlora import io
from tcurlora.metrics import dice
from tcurlora.preprocess import (Preprocessing, default_flip_axes, probabilities_to_input_grid, to_input_grid,
                                 to_model_space, train_transforms)


def ellipsoid_case(shape_zyx=(30, 40, 50), spacing=(0.7, 1.3, 2.9), euler=(25, -35, 50), origin=(5.0, -7.0, 12.0),
                   seed=0):
    """Oblique, anisotropic image with two ellipsoid labels (1 large, 2 small)."""
    z, y, x = np.mgrid[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]
    c = np.array(shape_zyx) / 2
    big = ((z - c[0]) / (shape_zyx[0] / 3.2)) ** 2 + ((y - c[1]) / (shape_zyx[1] / 3.5)) ** 2 \
        + ((x - c[2]) / (shape_zyx[2] / 3.0)) ** 2 < 1
    small = ((z - c[0]) / 4) ** 2 + ((y - c[1] * 1.5) / 4) ** 2 + ((x - c[2] * 0.6) / 5) ** 2 < 1
    arr = np.zeros(shape_zyx, np.uint8)
    arr[big] = 1
    arr[small] = 2
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray((arr * 50.0 + rng.normal(100, 5, shape_zyx)).astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(Rotation.from_euler("xyz", euler, degrees=True).as_matrix().ravel().tolist())
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(img)
    return img, lab, arr


def one_hot(label: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(label[0], n).permute(3, 0, 1, 2).float()


# ------------------------------------------------------------------------------------------------ config


def test_preprocessing_dict_roundtrip():
    prep = Preprocessing(orientation="las", spacing=[1, 1.5, 2], intensity={"kind": "percentile", "upper": 99},
                         patch_size=[64, 64, 32], divisible_by=16)
    data = prep.to_dict()
    assert data == json.loads(json.dumps(data))
    assert data["intensity"] == {"kind": "percentile", "lower": 0.5, "upper": 99.0, "b_min": 0.0, "b_max": 1.0,
                                 "clip": True}
    back = Preprocessing.from_dict(json.loads(json.dumps(data)))
    assert back == prep and back.orientation == "LAS" and back.spacing == (1.0, 1.5, 2.0)
    assert Preprocessing.from_dict({}) == Preprocessing()
    assert Preprocessing().intensity == {"kind": "zscore", "nonzero": False}


@pytest.mark.parametrize("data", [
    {"orientation": "RAS", "bogus": 1},
    {"intensity": {"kind": "zscore", "lower": 1}},
    {"intensity": {"kind": "histogram"}},
    {"intensity": {"kind": "range", "a_min": 0}},
    {"intensity": {"kind": "range", "a_min": 10, "a_max": 0}},
    {"intensity": {"kind": "zscore", "nonzero": "yes"}},
    {"orientation": "RRS"},
    {"orientation": "RA"},
    {"spacing": [1, 0, 1]},
    {"patch_size": [96, 96, 90]},
    {"patch_size": [96, 96]},
    {"divisible_by": 0},
])
def test_preprocessing_rejects(data):
    with pytest.raises(ValueError):
        Preprocessing.from_dict(data)


# ------------------------------------------------------------------------------------------------ geometry


def test_axis_convention_matches_monai_orientation(tmp_path):
    """Our model-space array equals MONAI LoadImage + EnsureChannelFirst + Orientation(axcodes) on the file."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

    img, _, _ = ellipsoid_case(shape_zyx=(8, 10, 12), spacing=(1.0, 1.5, 2.0), euler=(8, -5, 12))
    path = str(tmp_path / "scan.nii.gz")
    sitk.WriteImage(img, path)
    for axcodes in ("RAS", "LPS", "PIR"):
        prep = Preprocessing(orientation=axcodes, intensity={"kind": "none"}, patch_size=(16, 16, 16))
        ours, _, meta = to_model_space(io.read_image(path), None, prep)
        monai = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")))])(path)
        assert tuple(ours.shape) == tuple(monai.shape)
        np.testing.assert_allclose(ours.numpy(), np.asarray(monai), rtol=1e-6)


def test_ras_axis_zero_runs_to_the_right():
    arr = np.zeros((4, 5, 6), np.float32)
    arr[:, :, 0] = 1.0  # x index 0; identity LPS direction: index 0 is the rightmost column
    img = sitk.GetImageFromArray(arr)
    t, _, meta = to_model_space(img, None, Preprocessing(intensity={"kind": "none"}, patch_size=(16, 16, 16)))
    assert t.shape == (1, 6, 5, 4)
    assert torch.all(t[0, -1] == 1) and torch.all(t[0, :-1] == 0)  # D runs toward R: x=0 ends up last


@pytest.mark.parametrize("spacing", [None, (1.5, 1.5, 1.5), (0.9, 2.2, 1.1)])
def test_roundtrip_oblique_anisotropic(spacing):
    img, lab, arr = ellipsoid_case()
    prep = Preprocessing(spacing=spacing, patch_size=(32, 32, 32))
    image_t, label_t, meta = to_model_space(img, lab, prep)
    assert image_t.dtype == torch.float32 and label_t.dtype == torch.int64
    assert image_t.shape == label_t.shape and image_t.shape[0] == 1
    assert list(image_t.shape[1:]) == meta["model"]["size"]
    if spacing is not None:
        assert meta["model"]["spacing"] == list(spacing)
    json.dumps(meta)
    probs = one_hot(label_t, 3)
    out = to_input_grid(probs, meta, img)
    assert out.shape == arr.shape
    result = io.array_to_image(out, img)  # exactly on the input grid
    assert result.GetSize() == img.GetSize() and result.GetSpacing() == img.GetSpacing()
    assert result.GetOrigin() == img.GetOrigin() and result.GetDirection() == img.GetDirection()
    for value in (1, 2):
        d = dice(out, arr, value)
        assert d >= (0.999 if spacing is None else 0.95 if value == 1 else 0.8), (value, d)
    if spacing is None:
        np.testing.assert_array_equal(out, arr)  # a pure axis permutation comes back exactly
    p = probabilities_to_input_grid(probs, meta, img)
    assert p.shape == (3,) + arr.shape and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(p, 0), out)


def test_to_input_grid_channel_values_and_single_channel():
    img, lab, arr = ellipsoid_case(shape_zyx=(16, 18, 20))
    prep = Preprocessing(spacing=(2.0, 2.0, 2.0), patch_size=(16, 16, 16))
    _, label_t, meta = to_model_space(img, lab, prep)
    out = to_input_grid(one_hot(label_t, 3), meta, img, channel_values=[0, 4, 300])
    assert set(np.unique(out)) <= {0, 4, 300} and out.dtype == np.uint16
    fg = (label_t > 0).float()
    single = to_input_grid(fg, meta, img)
    assert set(np.unique(single)) == {0, 1}
    assert dice(single, (arr > 0).astype(np.uint8), 1) > 0.85  # coarse 2 mm grid, tiny volume
    with pytest.raises(ValueError):
        to_input_grid(torch.zeros(2, 3, 4, 5), meta, img)


def test_label_must_be_on_image_grid():
    img, lab, _ = ellipsoid_case(shape_zyx=(8, 9, 10))
    lab.SetSpacing((1, 1, 1))
    with pytest.raises(ValueError):
        to_model_space(img, lab, Preprocessing(patch_size=(16, 16, 16)))


def test_intensity_kinds():
    img, _, arr = ellipsoid_case(shape_zyx=(10, 12, 14))
    raw = sitk.GetArrayFromImage(img)
    small = (16, 16, 16)
    z, _, _ = to_model_space(img, None, Preprocessing(patch_size=small))
    assert abs(z.mean().item()) < 1e-4 and abs(z.std(unbiased=False).item() - 1) < 1e-3
    p, _, _ = to_model_space(img, None, Preprocessing(patch_size=small,
                                                      intensity={"kind": "percentile", "lower": 1, "upper": 99}))
    assert p.min().item() == 0.0 and p.max().item() == 1.0
    r, _, _ = to_model_space(img, None, Preprocessing(
        patch_size=small, intensity={"kind": "range", "a_min": 100, "a_max": 150, "b_min": -1, "b_max": 1}))
    assert r.min().item() == -1.0 and r.max().item() == 1.0
    n, _, _ = to_model_space(img, None, Preprocessing(patch_size=small, intensity={"kind": "none"}))
    assert np.isclose(n.sum().item(), raw.sum(dtype=np.float64), rtol=1e-5)
    # z-score over non-zero voxels leaves zeros at zero.
    masked = sitk.GetImageFromArray(np.where(arr > 0, raw, 0).astype(np.float32))
    nz, _, _ = to_model_space(masked, None, Preprocessing(patch_size=small, intensity={"kind": "zscore",
                                                                                      "nonzero": True}))
    assert (nz == 0).sum().item() == int((arr == 0).sum())
    assert abs(nz[nz != 0].mean().item()) < 1e-3


# ------------------------------------------------------------------------------------------------ training


def _model_case(shape=(20, 24, 28)):
    image = torch.randn(1, *shape)
    label = torch.zeros(1, *shape, dtype=torch.long)
    label[0, 8:12, 10:14, 12:16] = 1
    label[0, 2:4, 3:5, 20:24] = 2
    return {"image": image, "label": label}


def test_train_transforms_shapes_and_padding():
    from monai.utils import set_determinism

    set_determinism(seed=0)
    prep = Preprocessing(patch_size=(16, 32, 32), divisible_by=16)
    out = train_transforms(prep, num_samples=3)(_model_case())  # 24x28 < 32: padded
    assert isinstance(out, list) and len(out) == 3
    for sample in out:
        assert tuple(sample["image"].shape) == (1, 16, 32, 32) and sample["image"].dtype == torch.float32
        assert tuple(sample["label"].shape) == (1, 16, 32, 32) and sample["label"].dtype == torch.int64
        assert set(torch.unique(sample["label"]).tolist()) <= {0, 1, 2}
    set_determinism(seed=None)


def test_a_training_patch_beyond_the_image_is_padded_as_the_sliding_window_pads_it():
    """An image smaller than the patch (nnU-Net's 3 mm brains): the training patch must show the network what the
    inferer's window shows it beyond the edge (zeros), not the image's border carried outwards."""
    from monai.inferers import sliding_window_inference

    prep = Preprocessing(patch_size=(16, 16, 16), divisible_by=16)
    image = torch.full((1, 10, 12, 14), -0.9)  # a z-scored background
    image[0, 3:7, 4:8, 5:9] = 1.5
    label = torch.zeros(1, 10, 12, 14, dtype=torch.long)
    label[0, 3:7, 4:8, 5:9] = 1
    patch = train_transforms(prep, num_samples=1, augment=False)({"image": image, "label": label})[0]
    windows = []
    sliding_window_inference(image[None], (16, 16, 16), 1, lambda x: windows.append(x.clone()) or x)
    assert len(windows) == 1
    assert torch.equal(torch.as_tensor(patch["image"]), torch.as_tensor(windows[0][0]))
    assert (patch["image"] == 0).sum() == 16 ** 3 - image.numel()
    assert int(patch["label"].sum()) == int(label.sum())


def test_train_transforms_positive_sampling():
    from monai.utils import set_determinism

    set_determinism(seed=1)
    prep = Preprocessing(patch_size=(8, 8, 8), divisible_by=8)
    case = _model_case((40, 40, 40))
    out = train_transforms(prep, num_samples=8, pos=1.0, neg=0.0, augment=False)(case)
    assert all(s["label"].sum() > 0 for s in out)  # every patch centred on foreground
    set_determinism(seed=None)


def test_train_transforms_deterministic():
    from monai.utils import set_determinism

    prep = Preprocessing(patch_size=(16, 16, 16))
    case = _model_case()
    original = {k: v.clone() for k, v in case.items()}

    def run():
        return train_transforms(prep, num_samples=2, flip_axes=(0, 1, 2))(dict(case))

    set_determinism(seed=123)
    a = run()
    set_determinism(seed=123)
    b = run()
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    t = train_transforms(prep, num_samples=2)
    t.set_random_state(seed=7)
    c = t(dict(case))
    t.set_random_state(seed=7)
    d = t(dict(case))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(c, d))
    # The cached case is never modified by drawing patches.
    assert torch.equal(case["image"], original["image"]) and torch.equal(case["label"], original["label"])
    assert type(c[0]["image"]) is torch.Tensor  # plain tensors, not MetaTensor
    set_determinism(seed=None)


def test_default_flip_axes_keeps_left_right():
    prep = Preprocessing(orientation="RAS", patch_size=(16, 16, 16))
    assert default_flip_axes(prep, [{"value": 1, "name": "liver"}]) == (0, 1, 2)
    assert default_flip_axes(prep, [{"value": 1, "name": "kidney_left"}]) == (1, 2)
    assert default_flip_axes(prep, None) == (1, 2)
    assert default_flip_axes(Preprocessing(orientation="PIL", patch_size=(16, 16, 16)), None) == (0, 1)
