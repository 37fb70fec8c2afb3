"""SlicerMONAIAuto3DSeg models as base models: parity with the extension's inference, adapters, training with
deep supervision, terminology in the output, and refusals.

The model is made in a session fixture with MONAI alone (``auto3dseg_model.make_model``: a small SegResNetDS
with deep supervision trained a few AdamW steps on the vendored TPTBox CT crop), in the extension's folder
format; the reference is that extension's inference script rebuilt from the same MONAI transforms
(``auto3dseg_model.extension_inference``).  The CT is PIR-oriented at 1.5 mm, so reorientation, the
foreground crop, the resampling tolerance (two axes left alone, one resampled) and every inversion are used.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CT, CT_VERT, SUBPROCESS_ENV, Evil, assert_one_line_error, cli_subprocess

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auto3dseg_model import CONFIG, LABELS, extension_inference, make_model, write_labels_csv  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="session")
def a3d(tmp_path_factory):
    """``model`` folder, ``zip`` of it, ``ct`` (.nrrd, as Slicer hands volumes to the extension), ``label``
    (vertebrae as the model's values 1..3), ``reference``: the extension's label map in (i, j, k) order."""
    root = tmp_path_factory.mktemp("auto3dseg")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model(root / "models" / "vertebrae-test" / "segresnet", CT, CT_VERT)
    finally:
        torch.set_num_threads(before)
    ct = root / "ct.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(CT)), str(ct))
    vert = sitk.ReadImage(str(CT_VERT))
    label = sitk.GetImageFromArray(np.select([sitk.GetArrayFromImage(vert) == v for v in (21, 22, 23)], [1, 2, 3], 0)
                                   .astype(np.uint8))
    label.CopyInformation(vert)
    label_file = root / "ct_label.nrrd"
    sitk.WriteImage(label, str(label_file))
    archive = root / "vertebrae-test-v1.0.0.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # the release zips hold the files in a sub-folder
        for f in ("model.pt", "labels.csv"):
            zf.write(model / f, f"segresnet/{f}")
    reference = extension_inference(model / "model.pt", ct)
    return SimpleNamespace(model=model, folder=root / "models" / "vertebrae-test", zip=archive, ct=ct,
                           label=label_file, reference=reference, root=root)


def run(*args):
    return subprocess.run(cli_subprocess(*args), capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)


def label_array(path, reference_image) -> np.ndarray:
    """A written segmentation as an (i, j, k) array on the input grid."""
    from tcurlora.io import read_image, read_label

    return sitk.GetArrayFromImage(read_label(path, read_image(reference_image))).transpose(2, 1, 0)


def test_reference_segments_something(a3d):
    """The fixture model is trained enough that parity is not a comparison of empty maps."""
    assert set(np.unique(a3d.reference)) - {0}, "the test model predicts only background"


def test_segment_matches_the_extension_with_no_adapter_and_a_zero_adapter(a3d, tmp_path):
    from tcurlora.adapter import inject_adapter
    from tcurlora.adapter_file import save_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.models import load_base

    out = tmp_path / "base.seg.nrrd"
    proc = run("segment", "--base", a3d.folder, "--device", "cpu", a3d.ct, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(label_array(out, a3d.ct), a3d.reference)

    base = load_base(a3d.folder)
    inject_adapter(base.network, TCURLoRAConfig(rank=2), "zero")  # cores start at zero: the base function
    zero = tmp_path / "zero.safetensors"
    manifest = save_adapter(base.network, zero)
    assert manifest["base"]["kind"] == "auto3dseg"
    out_zero = tmp_path / "zero.seg.nrrd"
    proc = run("segment", "--base", a3d.zip, "--device", "cpu", "--adapter", zero, a3d.ct, "-o", out_zero)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(label_array(out_zero, a3d.ct), a3d.reference)


@pytest.mark.parametrize("change", [
    {"normalize_mode": "meanstd"},
    {"normalize_mode": "meanstdtanh"},
    {"normalize_mode": "pet"},
    {"orientation_ras": False, "crop_foreground": False, "resample_resolution": None},
])
def test_other_settings_match_the_extension(a3d, tmp_path, change):
    """Each normalisation mode, and no reorientation/crop/resampling, as the extension applies them (the same
    in-process path ``segment`` takes)."""
    from tcurlora.io import read_image
    from tcurlora.models import load_base
    from tcurlora.runtime import sliding_window_probabilities

    folder = bad_model(a3d, tmp_path, change)
    base = load_base(folder)
    image = read_image(a3d.ct)
    x, _, meta = base.prepare(image)
    probs = sliding_window_probabilities(base.network, x, base.inference_roi, torch.device("cpu"), False,
                                         overlap=base.inference_overlap)
    ours = base.restore(probs, meta, image, [0, 1, 2, 3]).transpose(2, 1, 0)
    assert np.array_equal(ours, extension_inference(folder / "model.pt", a3d.ct))


def test_labels_keep_their_terminology_codes(a3d, tmp_path):
    import slicerio

    out = tmp_path / "seg.seg.nrrd"
    assert run("segment", "--base", a3d.folder, "--device", "cpu", a3d.ct, "-o", out).returncode == 0
    segments = {s["labelValue"]: s for s in slicerio.read_segmentation(str(out), skip_voxels=True)["segments"]}
    for value, name, code, meaning in LABELS:
        assert segments[value]["name"] == name
        assert segments[value]["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
        assert segments[value]["terminology"]["type"] == ["SCT", code, meaning]


def test_trained_adapter_changes_the_output_and_round_trips(a3d, tmp_path):
    """finetune through the CLI on the base's own labels; the adapter reaches the output, and the file
    reloaded onto a fresh base gives what the CLI wrote."""
    from tcurlora.adapter import merge_adapter
    from tcurlora.adapter_file import load_adapter
    from tcurlora.io import read_image
    from tcurlora.models import load_base
    from tcurlora.runtime import sliding_window_probabilities

    adapter = tmp_path / "site.safetensors"
    proc = run("finetune", "--base", a3d.folder, "--device", "cpu", "--image", a3d.ct, "--label", a3d.label,
               "--out", adapter, "--steps", "3", "--lr", "0.2", "--rank", "4", "--batch-size", "1")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "adapted.seg.nrrd"
    assert run("segment", "--base", a3d.folder, "--device", "cpu", "--adapter", adapter, a3d.ct, "-o", out).returncode == 0
    adapted = label_array(out, a3d.ct)
    assert (adapted != a3d.reference).sum() > 100

    base = load_base(a3d.zip)
    manifest = load_adapter(base.network, adapter)
    assert manifest["base"]["kind"] == "auto3dseg" and manifest["labels"] == base.labels
    assert manifest["base"]["name"] == "vertebrae-test" and base.name == "vertebrae-test-v1.0.0"
    merge_adapter(base.network)
    image = read_image(a3d.ct)
    x, _, meta = base.prepare(image)
    probs = sliding_window_probabilities(base.network.eval(), x, base.inference_roi, torch.device("cpu"), False,
                                         overlap=base.inference_overlap)
    again = base.restore(probs, meta, image, [0] + [l["value"] for l in base.labels]).transpose(2, 1, 0)
    assert np.array_equal(again, adapted)


def test_deep_supervision_levels_are_trained_and_a_new_head_trains_without_them(a3d, tmp_path):
    """Every deep-supervision head gets a gradient (the coarse head only feeds the loss); with new labels the
    new full-resolution head is trained and the coarse heads (base labels) are left out."""
    from tcurlora.adapter import adapter_state_dict
    from tcurlora.models import load_base
    from tcurlora.train import FinetuneOptions, finetune

    base = load_base(a3d.folder)
    coarse = base.network.up_layers[0].head.weight.detach().clone()
    options = FinetuneOptions(method="decoder", steps=1, device="cpu", batch_size=1, lr=1e-2)
    finetune(base, [(str(a3d.ct), str(a3d.label))], tmp_path / "dec.safetensors", options=options)
    state = adapter_state_dict(base.network)
    key = next(k for k in state if "up_layers__0__head" in k and k.endswith("weight"))
    assert not torch.equal(state[key], coarse)

    base = load_base(a3d.folder)
    spine = [{"value": 1, "name": "lumbar spine", "color": [1.0, 0.5, 0.0]}]
    label = sitk.ReadImage(str(a3d.label)) > 0
    (tmp_path / "spine").mkdir()
    sitk.WriteImage(sitk.Cast(label, sitk.sitkUInt8), str(tmp_path / "spine" / "ct_label.nrrd"))
    result = finetune(base, [(str(a3d.ct), str(tmp_path / "spine" / "ct_label.nrrd"))], tmp_path / "spine.safetensors",
                      labels=spine, options=FinetuneOptions(steps=1, device="cpu", batch_size=1))
    assert not result.cancelled
    state = adapter_state_dict(base.network)
    head = [v for k, v in state.items() if "up_layers__1__head" in k and k.endswith("weight")]
    assert head and head[0].shape[0] == 2


def test_adapter_for_another_auto3dseg_model_is_refused(a3d, tmp_path):
    from tcurlora.adapter import inject_adapter
    from tcurlora.adapter_file import load_adapter, save_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.errors import TCURLoRAError
    from tcurlora.models import load_base

    other = tmp_path / "other"
    other.mkdir()
    checkpoint = torch.load(a3d.model / "model.pt", weights_only=True)
    checkpoint["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, other / "model.pt")
    write_labels_csv(other / "labels.csv")
    base = load_base(other)
    inject_adapter(base.network, TCURLoRAConfig(rank=2))
    save_adapter(base.network, tmp_path / "other.safetensors")
    with pytest.raises(TCURLoRAError, match="trained on base model 'other'"):
        load_adapter(load_base(a3d.folder).network, tmp_path / "other.safetensors")


@pytest.mark.parametrize("change, message", [
    ({"network": {**CONFIG["network"], "_target_": "UNet"}}, "is not one of SegResNetDS"),
    ({"network": {**CONFIG["network"], "_target_": "$__import__('os').system('true')"}}, "is not one of"),
    ({"network": {**CONFIG["network"], "out_channels": "@output_classes"}}, "is not a plain value"),
    ({"network": {**CONFIG["network"], "in_channels": 2}}, "only single-image models"),
    ({"sigmoid": True}, "sigmoid"),
    ({"normalize_mode": "fancy"}, "unsupported normalize_mode"),
    ({"roi_size": [30, 32, 32]}, "unusable config"),
])
def test_bad_configs_are_one_line_errors(a3d, tmp_path, change, message):
    from tcurlora.errors import InputError
    from tcurlora.models import load_base

    folder = bad_model(a3d, tmp_path, change)
    with pytest.raises(InputError) as err:
        load_base(folder)
    assert message in str(err.value) and "model.pt" in str(err.value) and "\n" not in str(err.value)


def bad_model(a3d, tmp_path, change):
    """The test model with ``change`` made to its config."""
    folder = tmp_path / "changed"
    folder.mkdir()
    checkpoint = torch.load(a3d.model / "model.pt", weights_only=True)
    checkpoint["config"] = {**checkpoint["config"], **change}
    torch.save(checkpoint, folder / "model.pt")
    write_labels_csv(folder / "labels.csv")
    return folder


def test_cli_refuses_a_bad_model_in_one_line_and_writes_nothing(a3d, tmp_path):
    folder = bad_model(a3d, tmp_path, {"sigmoid": True})
    proc = run("segment", "--base", folder, "--device", "cpu", a3d.ct, "-o", tmp_path / "x.seg.nrrd")
    line = assert_one_line_error(proc)
    assert "model.pt" in line and "sigmoid" in line
    assert not (tmp_path / "x.seg.nrrd").exists()
    proc = run("segment", "--base", tmp_path / "nothing.zip", "--device", "cpu", a3d.ct, "-o", tmp_path / "x.seg.nrrd")
    assert "no such base model" in assert_one_line_error(proc)


def test_pickled_object_in_model_pt_is_refused_without_running_it(a3d, tmp_path):
    from tcurlora.errors import InputError
    from tcurlora.models import load_base

    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "ran"
    checkpoint = torch.load(a3d.model / "model.pt", weights_only=True)
    checkpoint["config"]["hook"] = Evil(marker)
    torch.save(checkpoint, folder / "model.pt")
    write_labels_csv(folder / "labels.csv")
    with pytest.raises(InputError, match="refused or unreadable checkpoint"):
        load_base(folder)
    assert not marker.exists()


def test_labels_csv_beyond_the_output_channels_is_refused(a3d, tmp_path):
    from tcurlora.errors import InputError
    from tcurlora.models import load_base

    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "model.pt").write_bytes((a3d.model / "model.pt").read_bytes())
    (folder / "labels.csv").write_text("LabelValue,Name\n1,a\n7,b\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"label value\(s\) \[7\] but the network has only 4 output channels"):
        load_base(folder)
    (folder / "labels.csv").write_text("LabelValue,Name\n2,b\n", encoding="utf-8")  # missing ones: default names
    assert [(l["value"], l["name"]) for l in load_base(folder).labels] == [(1, "Label 1"), (2, "b"), (3, "Label 3")]
