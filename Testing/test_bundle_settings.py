"""MONAI bundles: preprocessing and sliding-window settings come from ``configs/inference.json`` (its
plain-value subset), not declared by hand; what tcurlora cannot reproduce is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import CT, UNET_ARGS


def write_bundle(folder, preprocessing, inferer=None, extra=None):
    from monai.networks.nets import UNet

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {
        "imports": ["$import torch"],
        "image_key": "image",
        "axcodes": "RAS",
        "network_def": {"_target_": "UNet", **UNET_ARGS},
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        **({"inferer": inferer} if inferer else {}),
        **(extra or {}),
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {"outputs": {"pred": {
        "channel_def": {"0": "background", "1": "L2", "2": "L3", "3": "L4"}}}}}), encoding="utf-8")
    torch.manual_seed(0)
    torch.save(UNet(**UNET_ARGS).state_dict(), str(folder / "models" / "model.pt"))
    return folder


# a typical bundle's preprocessing, with references as bundles write them
TRANSFORMS = [
    {"_target_": "LoadImaged", "keys": "@image_key"},
    {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
    {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "@axcodes"},
    {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [1.5, 1.5, 1.5], "mode": "bilinear"},
    {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -57, "a_max": 164, "b_min": 0.0,
     "b_max": 1.0, "clip": True},
    {"_target_": "EnsureTyped", "keys": "@image_key"},
]
INFERER = {"_target_": "SlidingWindowInferer", "roi_size": [48, 48, 32], "sw_batch_size": 4, "overlap": 0.5}


def test_settings_are_read_from_inference_json_and_match_monai(tmp_path):
    from monai.bundle import ConfigParser

    from tcurlora.io import read_image
    from tcurlora.models import load_base

    folder = write_bundle(tmp_path / "b", TRANSFORMS, INFERER)
    base = load_base(folder)
    prep = base.preprocessing
    assert prep.orientation == "RAS" and prep.spacing == (1.5, 1.5, 1.5)
    assert prep.intensity == {"kind": "range", "a_min": -57.0, "a_max": 164.0, "b_min": 0.0, "b_max": 1.0, "clip": True}
    assert tuple(base.inference_roi) == (48, 48, 32) and prep.patch_size == (48, 48, 32)
    assert base.inference_overlap == 0.5

    # the image the network sees is the one the bundle's own (MONAI-run) preprocessing makes
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    monai_x = parser.get_parsed_content("preprocessing")({"image": str(CT)})["image"]
    x, _, _ = base.prepare(read_image(CT))
    assert x.shape == monai_x.shape
    assert np.allclose(x.numpy(), np.asarray(monai_x), atol=1e-5)


def test_zscore_and_percentile_and_no_inferer(tmp_path):
    from tcurlora.models import load_base

    base = load_base(write_bundle(tmp_path / "z", [{"_target_": "NormalizeIntensityd", "keys": "image",
                                                    "nonzero": True}]))
    assert base.preprocessing.intensity == {"kind": "zscore", "nonzero": True}
    assert base.inference_overlap == 0.25 and base.preprocessing.spacing is None  # defaults: nothing declared
    base = load_base(write_bundle(tmp_path / "p", [{"_target_": "monai.transforms.ScaleIntensityRangePercentilesd",
                                                    "keys": "image", "lower": 1, "upper": 99, "b_min": -1,
                                                    "b_max": 1}]))
    assert base.preprocessing.intensity == {"kind": "percentile", "lower": 1.0, "upper": 99.0, "b_min": -1.0,
                                            "b_max": 1.0, "clip": False}


@pytest.mark.parametrize("transforms, inferer, message", [
    ([{"_target_": "Spacingd", "keys": "image", "pixdim": "$[1.0] * 3"}], None, "does not evaluate bundle expressions"),
    ([{"_target_": "CropForegroundd", "keys": "image", "source_key": "image"}], None,
     "CropForegroundd' is not one tcurlora reproduces"),
    ([], {"_target_": "SimpleInferer"}, "is not a sliding-window inferer"),
    ([{"_target_": "Orientationd", "keys": "image", "axcodes": "@nowhere"}], None, "which the config does not define"),
])
def test_what_tcurlora_cannot_reproduce_is_refused(tmp_path, transforms, inferer, message):
    from tcurlora.errors import InputError
    from tcurlora.models import load_base

    with pytest.raises(InputError, match=message) as err:
        load_base(write_bundle(tmp_path / "bad", transforms, inferer))
    assert "inference.json" in str(err.value) and "\n" not in str(err.value)


def test_tcurlora_json_preprocessing_wins(tmp_path):
    from tcurlora.models import load_base

    folder = write_bundle(tmp_path / "o", [{"_target_": "CropForegroundd", "keys": "image"}], INFERER)
    (folder / "configs" / "tcurlora.json").write_text(json.dumps({"preprocessing": {
        "orientation": "LPS", "intensity": {"kind": "zscore"}, "patch_size": [32, 32, 32]}, "inference_roi": [32, 32, 32],
        "inference_overlap": 0.3}), encoding="utf-8")
    base = load_base(folder)
    assert base.preprocessing.orientation == "LPS" and tuple(base.inference_roi) == (32, 32, 32)
    assert base.inference_overlap == 0.3
