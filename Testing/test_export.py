"""``tcurlora export`` against each base's own tool: the exported folder, run by that tool, gives what
``tcurlora segment --adapter`` gives on the base, voxel for voxel (a new head included).

* nnU-Net: the real ``nnUNetv2_predict`` command on the export (with and without mirroring), the model folder
  made by nnU-Net's own trainer (``nnunet_model`` in conftest);
* MONAI bundle: the bundle's own inference config run through ``monai.bundle.run`` (MONAI's ConfigWorkflow; the
  config loops over the dataset with MONAI transforms, because pytorch-ignite, which the model zoo's evaluators
  need, is not installed here);
* Auto3DSeg: SlicerMONAIAuto3DSeg's inference script as ``Testing/auto3dseg_model.py`` rebuilt it.

The adapters are real files: a tCURLoRA adapter whose cores are set to random values (so that it changes the
output), and one with a new head whose labels are not the base's (values 9 and 7, which the formats number 1
and 2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

os.environ.setdefault("nnUNet_def_n_proc", "1")  # nnU-Net's thread count for resampling/export (read at import)

from conftest import CT, CT_VERT, REPO, SUBPROCESS_ENV, UNET_ARGS, assert_one_line_error, cli_subprocess  # noqa: E402

sys.path.insert(0, str(REPO / "Testing"))
import nnunet_fixture  # noqa: E402
from auto3dseg_model import extension_inference, make_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

BUNDLE_UNET = {**UNET_ARGS, "num_res_units": 0}  # its last layer is the output layer: a new head can replace it
BUNDLE_HEAD = "model.2.conv"
NEW_LABELS = [{"value": 9, "name": "l3", "color": [0.2, 0.7, 0.3]},
              {"value": 7, "name": "lumbar spine", "color": [0.9, 0.6, 0.1]}]


def _cli(*args) -> int:
    from tcurlora.cli import main

    return main([str(a) for a in args])


def _adapter(base, path: Path, new_head: bool = False, head: str = None, scale: float = 0.3) -> Path:
    """An adapter of ``base`` (a freshly loaded base model) whose trained values are random: it changes the output.
    ``new_head``: on the labels :data:`NEW_LABELS`, with a new output layer ``head`` (default: the base's)."""
    from tcurlora.adapter import get_adapter, inject_adapter
    from tcurlora.adapter_file import save_adapter
    from tcurlora.config import TCURLoRAConfig

    torch.manual_seed(1)
    new = {"module": head or base.head, "out_channels": len(NEW_LABELS) + 1} if new_head else None
    inject_adapter(base.network, TCURLoRAConfig(rank=2, new_head=new), "site")
    with torch.no_grad():
        for stack in get_adapter(base.network).stacks.values():
            stack.delta_u.normal_(0.0, scale)
        for module in get_adapter(base.network).trained.values():  # the new head: away from its start
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.5)
    save_adapter(base.network, path, labels=NEW_LABELS if new_head else None)
    return path


def _values(channels: np.ndarray, trace: dict) -> np.ndarray:
    """A tool's label map (output channels) in the adapter's label values, through the export's trace file."""
    lut = np.zeros(max(l["channel"] for l in trace["labels"]) + 1, dtype=np.int64)
    for label in trace["labels"]:
        lut[label["channel"]] = label["value"]
    return lut[channels.astype(np.int64)]


def _trace(folder: Path) -> dict:
    return json.loads((folder / "tcurlora-export.json").read_text(encoding="utf-8"))


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ------------------------------------------------------------------------------------------------
# nnU-Net


@pytest.fixture(scope="module")
def nnunet_exports(nnunet_model, tmp_path_factory):
    """Two adapters of fold 0 (random cores; a new head) and their exports into one nnUNet_results folder."""
    from tcurlora.models import load_base

    folder = tmp_path_factory.mktemp("nnunet_export")
    adapters = {"site": _adapter(load_base(nnunet_model.folder, fold=0), folder / "site.safetensors"),
                "lumbar": _adapter(load_base(nnunet_model.folder, fold=0), folder / "lumbar.safetensors", True)}
    results = folder / "nnUNet_results"
    for adapter in adapters.values():
        assert _cli("export", "--base", nnunet_model.folder, "--fold", 0, "--adapter", adapter, "-o", results) == 0
    return SimpleNamespace(adapters=adapters, results=results, folder=folder,
                           exports={name: results / f"{nnunet_fixture.DATASET}_{name}" for name in adapters})


@pytest.mark.slow
def test_nnunet_export_is_what_nnunet_predict_reads(nnunet_model, nnunet_exports, parity_inputs, tmp_path):
    """nnUNetv2_predict on the export gives what segment --adapter gives on the base, voxel for voxel, with
    mirroring (both tools' default) and without (--disable_tta / --no-tta), and with a new head: on the CT as it
    is, and without mirroring (8 times faster) also on its resampled LPS copy."""
    env = dict(nnunet_fixture.nnunet_env(nnunet_model.work), nnUNet_results=str(nnunet_exports.results))
    ct_only = tmp_path / "ct_only"
    ct_only.mkdir()
    (ct_only / "ct_0000.nii.gz").write_bytes((parity_inputs / "ct_0000.nii.gz").read_bytes())
    inputs = {("site", True): ct_only, ("site", False): parity_inputs, ("lumbar", True): ct_only}
    runs = {(name, mirroring): nnunet_fixture.predict(env, nnunet_exports.exports[name].name, folder,
                                                      tmp_path / f"{name}-{mirroring}", mirroring)
            for (name, mirroring), folder in inputs.items()}
    ours = {}
    for (name, mirroring) in runs:
        out = tmp_path / f"segment-{name}-{mirroring}"
        for image in sorted(inputs[name, mirroring].glob("*_0000.nii.gz")):
            assert _cli("segment", "--base", nnunet_model.folder, "--fold", 0, "--device", "cpu", "--adapter",
                        nnunet_exports.adapters[name], *([] if mirroring else ["--no-tta"]), image,
                        "-o", out / image.name.replace("_0000", "")) == 0
        ours[name, mirroring] = out
    for (name, mirroring), proc in runs.items():
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
        trace = _trace(nnunet_exports.exports[name])
        for case in ("ct", "ctlps") if inputs[name, mirroring] is parity_inputs else ("ct",):
            predicted = _values(_array(tmp_path / f"{name}-{mirroring}" / f"{case}.nii.gz"), trace)
            segmented = _array(ours[name, mirroring] / f"{case}.nii.gz")
            np.testing.assert_array_equal(predicted, segmented, err_msg=f"{name}, mirroring {mirroring}: {case}")
    # each comparison was of what it names: the adapter changed the base's output, mirroring changed the adapted one,
    # and the new head segments its own labels
    base_out = tmp_path / "base.nii.gz"
    assert _cli("segment", "--base", nnunet_model.folder, "--fold", 0, "--device", "cpu", CT, "-o", base_out) == 0
    assert (_array(ours["site", True] / "ct.nii.gz") != _array(base_out)).any()
    assert (_array(ours["site", True] / "ct.nii.gz") != _array(ours["site", False] / "ct.nii.gz")).any()
    assert set(np.unique(_array(ours["lumbar", True] / "ct.nii.gz"))) - {0} <= {7, 9}


@pytest.mark.slow
def test_nnunet_export_layout(nnunet_model, nnunet_exports):
    """The folder is nnU-Net's (as SlicerNNUnet finds it: one dataset.json under the model path, its parent's parent
    named Trainer__Plans__configuration's dataset), the checkpoint has the keys nnU-Net's trainer writes, and the
    labels and the trace say where the weights came from."""
    from tcurlora.manifest import read_manifest
    from tcurlora.models.nnunet import read_checkpoint

    export = nnunet_exports.exports["lumbar"]
    dataset_files = list(export.rglob("dataset.json"))
    assert [p.relative_to(export).as_posix() for p in dataset_files] == [f"{nnunet_model.folder.name}/dataset.json"]
    model = export / nnunet_model.folder.name
    assert sorted(p.name for p in model.iterdir()) == ["dataset.json", "dataset_fingerprint.json", "fold_0",
                                                      "plans.json"]
    assert json.loads((model / "dataset.json").read_text())["labels"] == {"background": 0, "l3": 1, "lumbar spine": 2}
    assert json.loads((model / "plans.json").read_text())["dataset_name"] == export.name
    base_checkpoint = read_checkpoint(nnunet_model.folder / "fold_0" / "checkpoint_final.pth")
    checkpoint = read_checkpoint(model / "fold_0" / "checkpoint_final.pth")
    assert list(checkpoint) == list(base_checkpoint)
    assert list(checkpoint["network_weights"]) == list(base_checkpoint["network_weights"])
    weights = checkpoint["network_weights"]
    assert all(weights[k].shape[0] == 3 for k in weights if k.startswith("decoder.seg_layers."))  # every head widened
    assert checkpoint["init_args"]["dataset_json"]["labels"]["lumbar spine"] == 2
    assert checkpoint["optimizer_state"]["state"] == {}  # no momentum of other weights
    assert checkpoint["inference_allowed_mirroring_axes"] == base_checkpoint["inference_allowed_mirroring_axes"]
    trace = _trace(export)
    manifest = read_manifest(nnunet_exports.adapters["lumbar"])
    assert trace["base"]["fingerprint"] == manifest["base"]["fingerprint"] and trace["format"] == "nnunet"
    import hashlib

    assert trace["adapter"]["sha256"] == hashlib.sha256(nnunet_exports.adapters["lumbar"].read_bytes()).hexdigest()
    assert [(l["channel"], l["value"], l["name"]) for l in trace["labels"]] == [(1, 9, "l3"), (2, 7, "lumbar spine")]
    # two exports of one dataset ID in one results folder: nnU-Net's -d 901 is ambiguous there, the full name is not
    from tcurlora.export.nnunet import same_id_warning

    assert "-d Dataset901_TPTBoxCT_lumbar (-d 901 is ambiguous there)" in same_id_warning(export)
    # the export is a base of its own (tcurlora reads what it wrote), as large as the base; the adapter: kilobytes
    assert nnunet_exports.adapters["lumbar"].stat().st_size < 64 * 1024
    adapter_size = nnunet_exports.adapters["lumbar"].stat().st_size
    assert (model / "fold_0" / "checkpoint_final.pth").stat().st_size > 10 * adapter_size


@pytest.mark.slow
def test_refusals_are_one_line_and_write_nothing(nnunet_model, nnunet_exports, tmp_path):
    """An adapter of another base (fold 1), a format the base cannot take, an existing export: exit 2, one line,
    nothing written."""
    site = nnunet_exports.adapters["site"]
    cases = [
        (["--fold", "1"], "site.safetensors: trained on base model"),
        (["--fold", "0", "--format", "bundle"], "is an nnU-Net model: it exports as --format nnunet, not bundle"),
    ]
    for extra, message in cases:
        proc = subprocess.run(cli_subprocess("export", "--base", nnunet_model.folder, "--adapter", site, "-o", tmp_path,
                                             *extra), capture_output=True, text=True, env=SUBPROCESS_ENV)
        assert message in assert_one_line_error(proc)
    assert not list(tmp_path.iterdir())
    existing = nnunet_exports.exports["site"]
    before = sorted(p.relative_to(existing) for p in existing.rglob("*"))
    proc = subprocess.run(cli_subprocess("export", "--base", nnunet_model.folder, "--fold", "0", "--adapter", site,
                                         "-o", nnunet_exports.results), capture_output=True, text=True,
                          env=SUBPROCESS_ENV)
    assert f"{existing.name}: already exists" in assert_one_line_error(proc)
    assert sorted(p.relative_to(existing) for p in existing.rglob("*")) == before
    assert [p.name for p in nnunet_exports.results.iterdir() if p.name.startswith(".")] == []  # no temporary left


# ------------------------------------------------------------------------------------------------
# MONAI bundle


def write_runnable_bundle(folder: Path, inferer_mode=None) -> Path:
    """A MONAI bundle (the tiny UNet, random weights) whose ``configs/inference.json`` runs under ``monai.bundle``:
    load, orient to RAS, scale intensities, sliding window, softmax, invert, argmax, save; the number of classes
    is a top-level value ``network_def`` refers to, as model-zoo bundles write it."""
    from monai.networks.nets import UNet

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "docs").mkdir()
    (folder / "docs" / "README.md").write_text("test bundle\n")
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 1, "overlap": 0.25,
               **({"mode": inferer_mode} if inferer_mode else {})}
    config = {
        "imports": ["$import glob", "$import numpy"],
        "bundle_root": ".", "output_dir": "$@bundle_root + '/eval'", "dataset_dir": "/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cpu')", "num_classes": 4,
        "network_def": {"_target_": "UNet", **{k: v for k, v in BUNDLE_UNET.items() if k != "out_channels"},
                        "out_channels": "@num_classes"},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000, "a_max": 1500, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "resample": False, "separate_folder": False, "output_dtype": "$numpy.uint8"}]},
        "initialize": ["$torch.set_grad_enabled(False)",
                       "$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', map_location=@device, "
                       "weights_only=True))", "$@network.eval()"],
        "run": ["$[@postprocessing({**d, 'pred': @inferer(d['image'][None].to(@device), @network)[0]}) "
                "for d in @dataset]"],
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0", "network_data_format": {
        "outputs": {"pred": {"type": "image", "num_channels": 4,
                             "channel_def": {"0": "background", "1": "L2", "2": "L3", "3": "L4"}}}}}), encoding="utf-8")
    torch.manual_seed(0)
    network = UNet(**BUNDLE_UNET).eval()
    torch.save(network.state_dict(), str(folder / "models" / "model.pt"))
    with warnings.catch_warnings():  # TorchScript's deprecation notes
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(network), str(folder / "models" / "model.ts"))  # base weights: left out
    return folder


def run_bundle(bundle: Path, inputs: Path, out: Path) -> subprocess.CompletedProcess:
    """The bundle's inference config through MONAI's bundle runner (``monai.bundle.run``, what ``python -m
    monai.bundle run`` calls), in its own process."""
    code = ("import sys; from monai.bundle import run; run(config_file=sys.argv[1], bundle_root=sys.argv[2], "
            "dataset_dir=sys.argv[3], output_dir=sys.argv[4])")
    return subprocess.run([sys.executable, "-c", code, str(bundle / "configs" / "inference.json"), str(bundle),
                           str(inputs), str(out)], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)


@pytest.mark.parametrize("new_head", [False, True], ids=["same-labels", "new-head"])
def test_bundle_export_runs_in_monai_bundle(tmp_path, new_head):
    """monai.bundle's run of the exported bundle's own config gives what segment --adapter gives on the base; the
    bundle's blending (constant: MONAI's default, no mode in its config) is segment's too."""
    from tcurlora.models import load_base

    bundle = write_runnable_bundle(tmp_path / "vertebrae_bundle")
    base = load_base(bundle)
    assert base.inference_mode == "constant"
    adapter = _adapter(base, tmp_path / "site.safetensors", new_head=new_head, head=BUNDLE_HEAD)
    assert _cli("export", "--base", bundle, "--adapter", adapter, "-o", tmp_path / "exports") == 0
    export = tmp_path / "exports" / "vertebrae_bundle_site"
    assert sorted(p.name for p in (export / "models").iterdir()) == ["model.pt"]
    assert (export / "docs" / "README.md").is_file()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "ct.nii.gz").write_bytes(CT.read_bytes())
    proc = run_bundle(export, inputs, tmp_path / "bundle_out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _cli("segment", "--base", bundle, "--device", "cpu", "--adapter", adapter, CT,
                "-o", tmp_path / "segment.nii.gz") == 0
    trace = _trace(export)
    segmented = _array(tmp_path / "segment.nii.gz")
    np.testing.assert_array_equal(_values(_array(tmp_path / "bundle_out" / "ct_seg.nii.gz"), trace), segmented)
    config = json.loads((export / "configs" / "inference.json").read_text())
    metadata = json.loads((export / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"]
    if new_head:
        assert config["num_classes"] == 3 and config["network_def"]["out_channels"] == "@num_classes"
        assert metadata == {"type": "image", "num_channels": 3, "channel_def": {"0": "background", "1": "l3",
                                                                                  "2": "lumbar spine"}}
        assert set(np.unique(segmented)) - {0} == {7, 9}
    else:
        assert config["num_classes"] == 4 and metadata["num_channels"] == 4
        base_seg = tmp_path / "base.nii.gz"
        assert _cli("segment", "--base", bundle, "--device", "cpu", CT, "-o", base_seg) == 0
        assert (_array(base_seg) != segmented).any()  # the adapter changed the output


# ------------------------------------------------------------------------------------------------
# Auto3DSeg


@pytest.fixture(scope="module")
def auto3dseg_base(tmp_path_factory):
    """A model in SlicerMONAIAuto3DSeg's folder format (``auto3dseg_model.make_model``) and the CT as .nrrd."""
    root = tmp_path_factory.mktemp("auto3dseg_export")
    model = make_model(root / "models" / "vertebrae-test" / "segresnet", CT, CT_VERT)
    ct = root / "ct.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(CT)), str(ct))
    assert model.name == "segresnet"
    return SimpleNamespace(folder=model.parent, ct=ct)


@pytest.mark.parametrize("new_head", [False, True], ids=["same-labels", "new-head"])
def test_auto3dseg_export_runs_in_the_extensions_pipeline(auto3dseg_base, tmp_path, new_head):
    """The extension's inference on the exported model.pt gives what segment --adapter gives on the base; labels.csv
    has the extension's columns and the new labels."""
    from tcurlora.io import read_image, read_label
    from tcurlora.models import load_base
    from tcurlora.models.auto3dseg import read_labels_csv

    adapter = _adapter(load_base(auto3dseg_base.folder), tmp_path / "site.safetensors", new_head=new_head)
    assert _cli("export", "--base", auto3dseg_base.folder, "--adapter", adapter, "-o", tmp_path / "models") == 0
    export = tmp_path / "models" / "vertebrae-test_site"
    assert sorted(p.name for p in export.iterdir()) == ["labels.csv", "model.pt", "tcurlora-export.json"]
    assert _cli("segment", "--base", auto3dseg_base.folder, "--device", "cpu", "--adapter", adapter,
                auto3dseg_base.ct, "-o", tmp_path / "seg.seg.nrrd") == 0
    ours = sitk.GetArrayFromImage(read_label(tmp_path / "seg.seg.nrrd", read_image(auto3dseg_base.ct)))
    ours = ours.transpose(2, 1, 0)  # (i, j, k), as the extension's pipeline returns it
    theirs = _values(extension_inference(export / "model.pt", auto3dseg_base.ct), _trace(export))
    np.testing.assert_array_equal(theirs, ours)
    header = (export / "labels.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["LabelValue", "Name"] and len(header) == 17
    labels = read_labels_csv((export / "labels.csv").read_text(), "labels.csv")
    assert (theirs != extension_inference(auto3dseg_base.folder / "segresnet" / "model.pt", auto3dseg_base.ct)).any()
    if new_head:
        assert [(l["value"], l["name"]) for l in labels] == [(1, "l3"), (2, "lumbar spine")]
        assert set(np.unique(ours)) - {0} == {7, 9}
    else:  # the base's terminology codes come through
        base_labels = load_base(auto3dseg_base.folder).labels
        assert [(l["value"], l["name"], l.get("terminology")) for l in labels] == \
            [(l["value"], l["name"], l.get("terminology")) for l in base_labels]


def test_a_failed_export_leaves_nothing(auto3dseg_base, tmp_path, monkeypatch):
    """An error halfway through writing (here: after model.pt, before labels.csv) leaves neither the export nor its
    temporary folder, and is one line naming the export."""
    import tcurlora.export.auto3dseg as auto3dseg_format
    from tcurlora.errors import InputError
    from tcurlora.export import export_model
    from tcurlora.models import load_base

    adapter = _adapter(load_base(auto3dseg_base.folder), tmp_path / "site.safetensors")

    def broken(labels):
        raise OSError("disk full")

    monkeypatch.setattr(auto3dseg_format, "labels_csv", broken)
    with pytest.raises(InputError, match="vertebrae-test_site: not written \\(disk full\\)"):
        export_model(auto3dseg_base.folder, adapter, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_base_without_a_tool_format_is_refused(tiny_unet, tmp_path, capsys):
    """A network spec (tcurlora's own description) has no tool to export to: one line, nothing written."""
    from tcurlora.models import load_base

    adapter = _adapter(load_base(str(tiny_unet.spec), weights=str(tiny_unet.weights)), tmp_path / "a.safetensors")
    assert _cli("export", *tiny_unet.args, "--adapter", adapter, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no tool format to export to" in err[0]
    assert not (tmp_path / "out").exists()
