"""nnU-Net v2 model folders as bases, against the real nnU-Net.

The model folder is made once per session by nnU-Net's own planner, preprocessor and trainer
(``Testing/nnunet_fixture.py``: the tptbox CT crop, 5 mirrored copies, a narrow network, 3 iterations on folds 0
and 1, about half a minute on 2 cores). It segments badly, but it is a real nnU-Net folder, and the reference label
maps come from the real ``nnUNetv2_predict`` command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

os.environ.setdefault("nnUNet_def_n_proc", "1")  # nnU-Net's thread count for resampling/export (read at import)

from conftest import CT, REPO  # noqa: E402

sys.path.insert(0, str(REPO / "Testing"))
import nnunet_fixture  # noqa: E402

FOLDER_NAME = f"nnUNetTrainer__{nnunet_fixture.PLANS}__3d_fullres"


@pytest.fixture(scope="session")
def parity_inputs(tmp_path_factory):
    """Inputs in nnU-Net's raw naming: the CT crop as it is, and the same CT reoriented (LPS) and resampled to
    1.2 x 1.6 x 2.0 mm, so that nnU-Net's resampling back and forth is part of what is compared."""
    folder = tmp_path_factory.mktemp("nnunet_inputs")
    ct = sitk.ReadImage(str(CT))
    shutil.copy(CT, folder / "ct_0000.nii.gz")
    lps = sitk.DICOMOrient(ct, "LPS")
    size = [int(round(n * s / t)) for n, s, t in zip(lps.GetSize(), lps.GetSpacing(), (1.2, 1.6, 2.0))]
    resampled = sitk.Resample(lps, size, sitk.Transform(), sitk.sitkLinear, lps.GetOrigin(), (1.2, 1.6, 2.0),
                              lps.GetDirection(), -1000.0, sitk.sitkInt16)
    sitk.WriteImage(resampled, str(folder / "ctlps_0000.nii.gz"))
    return folder


def _nnunet_predict(model, inputs: Path, out: Path, mirroring: bool) -> subprocess.Popen:
    cmd = [nnunet_fixture.nnunet_command("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out),
           "-d", str(nnunet_fixture.DATASET_ID), "-c", "3d_fullres", "-p", nnunet_fixture.PLANS, "-f", "0",
           "-device", "cpu", "-npp", "1", "-nps", "1"] + ([] if mirroring else ["--disable_tta"])
    env = dict(nnunet_fixture.nnunet_env(model.work), nnUNet_def_n_proc="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", errors="replace")


@pytest.fixture(scope="session")
def nnunet_reference(nnunet_model, parity_inputs, tmp_path_factory):
    """``{mirroring: {case: label array}}`` from the real ``nnUNetv2_predict`` (both runs at once)."""
    out = tmp_path_factory.mktemp("nnunet_predict")
    runs = {m: _nnunet_predict(nnunet_model, parity_inputs, out / str(m), m) for m in (False, True)}
    refs = {}
    for mirroring, proc in runs.items():
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
        refs[mirroring] = {p.name[:-len(".nii.gz")]: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
                           for p in sorted((out / str(mirroring)).glob("*.nii.gz"))}
        assert sorted(refs[mirroring]) == ["ct", "ctlps"]
    return refs


def _cli(*args) -> int:
    from tcurlora.cli import main

    return main([str(a) for a in args])


def _segment(model_folder, inputs, out: Path, *extra) -> dict:
    """``tcurlora segment`` (in this process) on the parity inputs; returns {case: label array}."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(inputs).glob("*_0000.nii.gz"))
    for f in files:
        assert _cli("segment", "--base", model_folder, "--fold", 0, "--device", "cpu", f,
                    "-o", out / f"{f.name[:-len('_0000.nii.gz')]}.nii.gz", *extra) == 0
    return {p.name[:-len(".nii.gz")]: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
            for p in sorted(out.glob("*.nii.gz"))}


def _zero_adapter(model_folder, path: Path) -> Path:
    """A freshly injected tCURLoRA adapter (zero core: the adapted network is the base) saved to ``path``."""
    from tcurlora.adapter import inject_adapter
    from tcurlora.adapter_file import save_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.models import load_base

    base = load_base(model_folder, fold=0)
    inject_adapter(base.network, TCURLoRAConfig(rank=4), "zero")
    save_adapter(base.network, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mirroring", [False, True], ids=["no-mirroring", "mirroring"])
def test_segment_equals_nnunetv2_predict(nnunet_model, parity_inputs, nnunet_reference, tmp_path, single_thread,
                                         mirroring):
    """No adapter and a zero adapter both give nnUNetv2_predict's label maps, voxel for voxel, with and without
    nnU-Net's mirroring (--tta)."""
    tta = ["--tta"] if mirroring else []
    reference = nnunet_reference[mirroring]
    assert all(len(np.unique(ref)) >= 2 for ref in reference.values())  # the test model predicts vertebrae
    plain = _segment(nnunet_model.folder, parity_inputs, tmp_path / "plain", *tta)
    zero = _segment(nnunet_model.folder, parity_inputs, tmp_path / "zero", *tta,
                    "--adapter", _zero_adapter(nnunet_model.folder, tmp_path / "zero.safetensors"))
    for case, ref in reference.items():
        np.testing.assert_array_equal(plain[case], ref, err_msg=f"{case}: no adapter")
        np.testing.assert_array_equal(zero[case], ref, err_msg=f"{case}: zero adapter")
    # mirroring changes this model's output, so each run above really compared the mode it names
    assert any((nnunet_reference[True][c] != nnunet_reference[False][c]).any() for c in reference)


@pytest.fixture(scope="session")
def trained_adapter(nnunet_model, tmp_path_factory):
    """An adapter trained with ``tcurlora finetune`` on two of the model's own training cases (fold 0)."""
    out = tmp_path_factory.mktemp("nnunet_adapter") / "site.safetensors"
    raw = nnunet_model.raw
    cases = []
    for i in (0, 1):
        cases += ["--image", raw / "imagesTr" / f"tptbox_{i:03d}_0000.nii.gz",
                  "--label", raw / "labelsTr" / f"tptbox_{i:03d}.nii.gz"]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _cli("finetune", "--base", nnunet_model.folder, "--fold", 0, *cases, "--steps", 6, "--lr", 0.05,
                    "--device", "cpu", "--out", out) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_trained_adapter_changes_output_and_round_trips(nnunet_model, parity_inputs, nnunet_reference,
                                                        trained_adapter, tmp_path, single_thread):
    from tcurlora.adapter import get_adapter, merge_adapter
    from tcurlora.adapter_file import load_adapter
    from tcurlora.manifest import read_manifest
    from tcurlora.models import load_base

    manifest = read_manifest(trained_adapter)
    assert manifest["base"]["kind"] == "nnunet"
    assert manifest["base"]["name"].endswith(f"{FOLDER_NAME}/fold_0")
    assert [l["name"] for l in manifest["labels"]] == ["L2", "L3", "L4"]
    adapted = _segment(nnunet_model.folder, parity_inputs, tmp_path / "adapted", "--adapter", trained_adapter)
    assert any((adapted[c] != ref).mean() > 0.001 for c, ref in nnunet_reference[False].items())
    # round trip: the file loaded into a fresh base (as the API does it) predicts what `segment --adapter` wrote
    import torch

    from tcurlora.io import read_image

    base = load_base(nnunet_model.folder, fold=0)
    load_adapter(base.network, trained_adapter, "site")
    merge_adapter(base.network)
    direct, _ = base.segment_image(read_image(parity_inputs / "ct_0000.nii.gz"), manifest["labels"],
                                   torch.device("cpu"))
    np.testing.assert_array_equal(direct, adapted["ct"])
    # every stack learned: the adapter reaches every conv, including those nnU-Net's blocks hold twice
    # (as .conv and as .all_modules.0, which forward runs)
    untrained = [name for name, stack in get_adapter(base.network).stacks.items() if not stack.delta_u.abs().sum() > 0]
    assert not untrained, f"stacks with a zero core after training (adapter inert there): {untrained}"


@pytest.mark.slow
def test_adapter_for_another_fold_is_refused(nnunet_model, trained_adapter, tmp_path, capsys):
    """The base fingerprint ties an adapter to its fold: fold 1 of the same model refuses a fold-0 adapter."""
    rc = _cli("segment", "--base", nnunet_model.folder, "--fold", 1, "--device", "cpu", CT,
              "-o", tmp_path / "x.nii.gz", "--adapter", trained_adapter)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: site.safetensors: trained on base model")
    assert "fold_0" in err[0] and "fold_1" in err[0]
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.slow
def test_new_labels_train_a_new_head(nnunet_model, tmp_path, single_thread):
    """Labels other than the base's train a new output layer; nnU-Net's predictor exports the adapter's values.
    A label the base has (L3) keeps its channel under a new value and position, so two steps already find it;
    a label new to the base ('lumbar spine', the other vertebrae) starts at a low prior."""
    raw = nnunet_model.raw
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([{"value": 9, "name": "l3", "color": [0.2, 0.7, 0.3]},
                                  {"value": 7, "name": "lumbar spine", "color": [0.9, 0.6, 0.1]}]))
    vertebrae = sitk.ReadImage(str(raw / "labelsTr" / "tptbox_000.nii.gz"))
    l3 = nnunet_fixture.LABELS["L3"]
    relabelled = sitk.Cast(vertebrae == l3, sitk.sitkUInt8) * 9 + sitk.Cast((vertebrae > 0) & (vertebrae != l3), sitk.sitkUInt8) * 7
    sitk.WriteImage(relabelled, str(tmp_path / "lumbar.nii.gz"))
    out = tmp_path / "lumbar.safetensors"
    assert _cli("finetune", "--base", nnunet_model.folder, "--fold", 0, "--image", raw / "imagesTr" /
                "tptbox_000_0000.nii.gz", "--label", tmp_path / "lumbar.nii.gz", "--labels", labels, "--steps", 2,
                "--device", "cpu", "--out", out) == 0
    assert _cli("segment", "--base", nnunet_model.folder, "--fold", 0, "--device", "cpu", "--adapter", out, CT,
                "-o", tmp_path / "seg.nii.gz") == 0
    values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg.nii.gz")))).tolist())
    assert values <= {0, 7, 9} and 9 in values


@pytest.mark.slow
def test_worker_job_keeps_stdout_for_events(nnunet_model, tmp_path):
    """The Slicer worker on an nnU-Net base: standard output carries only JSON events (nnU-Net's own prints go
    to stderr), and --probabilities writes nnU-Net's class probabilities on the input grid."""
    job = tmp_path / "job.json"
    out = tmp_path / "ct.seg.nrrd"
    job.write_text(json.dumps({"command": "segment", "base": str(nnunet_model.folder), "fold": 0, "device": "cpu",
                               "inputs": [str(CT)], "output": str(out), "probabilities": True}))
    env = dict(os.environ, OMP_NUM_THREADS="1", nnUNet_def_n_proc="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "tcurlora.worker", str(job)], env=env, capture_output=True,
                            text=True, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["event"] == "result"
    probabilities = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ct_probabilities.nii.gz")))
    assert probabilities.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(CT))).shape + (3,)
    assert probabilities.min() >= 0 and probabilities.sum(-1).max() <= 1 + 1e-4


# ------------------------------------------------------------------------------------------------
# reading: what is accepted, what is refused (no inference)


def _copy_model(nnunet_model, tmp_path, dataset="Dataset901_TPTBoxCT", folds=(0,)) -> Path:
    folder = tmp_path / dataset / FOLDER_NAME
    folder.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy(nnunet_model.folder / name, folder / name)
    for fold in folds:
        shutil.copytree(nnunet_model.folder / f"fold_{fold}", folder / f"fold_{fold}")
    return folder


def _load_error(*args, **kwargs) -> str:
    from tcurlora.errors import TCURLoRAError
    from tcurlora.models import load_base

    with pytest.raises(TCURLoRAError) as info:
        load_base(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.slow
def test_model_folder_forms_and_folds(nnunet_model, tmp_path):
    from tcurlora.models import load_base

    # the dataset folder above one trainer folder is accepted too; several folds need --fold
    base = load_base(nnunet_model.folder.parent, fold=1)
    assert base.kind == "nnunet" and base.name.endswith("fold_1") and [l["value"] for l in base.labels] == [1, 2, 3]
    assert base.mirror_axes == (0, 1, 2) and base.tile_step == 0.5 and not base.totalsegmentator
    assert "pass --fold N" in _load_error(nnunet_model.folder)
    assert "no checkpoint for fold 3" in _load_error(nnunet_model.folder, fold=3)
    one = _copy_model(nnunet_model, tmp_path / "one")
    assert load_base(one).name.endswith("fold_0")  # the only fold
    (one / "fold_0" / "checkpoint_final.pth").rename(one / "fold_0" / "checkpoint_best.pth")
    assert load_base(one).source.endswith("fold_0/checkpoint_best.pth")
    two = tmp_path / "one" / "Dataset901_TPTBoxCT" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(one, two)
    assert "holds 2 nnU-Net trained-model folders" in _load_error(one.parent)


@pytest.mark.slow
@pytest.mark.parametrize("edit, problem", [
    (lambda d, p: d.update(labels={"background": 0, "spine": [1, 2, 3], "L3": 2}), "region-based"),
    (lambda d, p: d["labels"].update(ignore=4), "ignore label"),
    (lambda d, p: d.update(channel_names={"0": "T1", "1": "T2"}), "2 input channels"),
    (lambda d, p: p["configurations"]["3d_fullres"]["architecture"].update(
        network_class_name="dynamic_network_architectures.architectures.primus.Primus"), "is not one of"),
    (lambda d, p: p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].update(nonlin="os.system"),
     "network nonlin 'os.system'"),
    (lambda d, p: p["configurations"]["3d_fullres"].update(previous_stage="3d_lowres"), "cascade"),
    (lambda d, p: p.update(image_reader_writer="load_pickle"), "image_reader_writer 'load_pickle'"),
    (lambda d, p: p["configurations"]["3d_fullres"].update(preprocessor_name="shutil"), "preprocessor_name"),
], ids=["regions", "ignore", "channels", "network", "layer", "cascade", "reader", "preprocessor"])
def test_unsupported_models_are_refused_in_one_line(nnunet_model, tmp_path, edit, problem):
    folder = _copy_model(nnunet_model, tmp_path)
    dataset, plans = json.loads((folder / "dataset.json").read_text()), json.loads((folder / "plans.json").read_text())
    edit(dataset, plans)
    (folder / "dataset.json").write_text(json.dumps(dataset))
    (folder / "plans.json").write_text(json.dumps(plans))
    message = _load_error(folder)
    assert problem in message and (folder.name in message or "json" in message)


def _rewrite_pickle(checkpoint: Path, out: Path, rewrite) -> None:
    """Copy a torch zip checkpoint, passing its data.pkl through ``rewrite``."""
    with zipfile.ZipFile(checkpoint) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, rewrite(data) if info.filename.endswith("/data.pkl") else data)


@pytest.mark.slow
def test_checkpoint_allow_list(nnunet_model, tmp_path):
    """Real checkpoints load with weights_only and the numpy allow-list, also under numpy 1's module name;
    anything else pickled in a checkpoint is refused before it can run."""
    import torch

    from tcurlora.models.nnunet import read_checkpoint

    original = nnunet_model.folder / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(Exception):  # what plain weights_only refuses: nnU-Net's numpy training log
        torch.load(str(original), weights_only=True)
    reference = read_checkpoint(original)["network_weights"]

    numpy1 = tmp_path / "numpy1.pth"
    _rewrite_pickle(original, numpy1, lambda b: b.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray" in zipfile.ZipFile(numpy1).read(
        next(n for n in zipfile.ZipFile(numpy1).namelist() if n.endswith("data.pkl")))
    weights = read_checkpoint(numpy1)["network_weights"]
    assert all(torch.equal(weights[k], reference[k]) for k in reference)

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    checkpoint = torch.load(str(original), map_location="cpu", weights_only=False)  # our own test file
    checkpoint["logging"]["hook"] = Payload()
    folder = _copy_model(nnunet_model, tmp_path / "evil")
    torch.save(checkpoint, str(folder / "fold_0" / "checkpoint_final.pth"))
    message = _load_error(folder)
    assert "checkpoint_final.pth: refused or unreadable nnU-Net checkpoint" in message and "system" in message
    assert not marker.exists()


@pytest.mark.slow
def test_totalsegmentator_preset(nnunet_model, tmp_path, single_thread):
    """A TotalSegmentator task folder: RAS canonical input at the task's spacing, step 0.8, no mirroring. The same
    CT stored in another voxel order gives the same label map with the preset, not without it."""
    import torch

    from tcurlora.io import read_image
    from tcurlora.models import load_base

    totalseg = _copy_model(nnunet_model, tmp_path, dataset="Dataset902_TotalSegmentator_test")
    preset = load_base(totalseg)
    plain = load_base(nnunet_model.folder, fold=0)
    assert preset.totalsegmentator and preset.tile_step == 0.8 and preset.task_spacing() == (1.5, 1.5, 1.5)
    image = read_image(CT)  # PIR
    flipped_path = tmp_path / "lps.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(image, "LPS"), str(flipped_path))
    flipped = read_image(flipped_path)
    cpu = torch.device("cpu")

    def on_image_grid(base, img):
        label, _ = base.segment_image(img, base.labels, cpu, tta=True)  # --tta is ignored by the preset
        out = sitk.GetImageFromArray(label)
        out.CopyInformation(img)
        return sitk.GetArrayFromImage(sitk.Resample(out, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))

    np.testing.assert_array_equal(on_image_grid(preset, image), on_image_grid(preset, flipped))
    assert (on_image_grid(plain, image) != on_image_grid(plain, flipped)).any()


def test_nnunet_install_brings_no_torchvision():
    """The nnunet extra and requirements-nnunet.txt leave timm and torchvision out (a CUDA torchvision crashes on
    the CPU torch); nnU-Net's code paths used here run without them."""
    assert importlib.util.find_spec("nnunetv2") is not None
    assert importlib.util.find_spec("timm") is None and importlib.util.find_spec("torchvision") is None


def test_federated_server_and_site_load_the_fold_asked_for(nnunet_model, tmp_path, capsys):
    """``--fold`` reaches the base in both federated roles (this folder has folds 0 and 1: without the fold a
    base refuses to load); ``--stop-file``, which a federation does not honour, is not offered."""
    from tcurlora.cli import main

    server = ["federated", "server", "--base", nnunet_model.folder, "--insecure", "--out", tmp_path / "g.safetensors"]
    site = ["federated", "client", "--base", nnunet_model.folder, "--server", "127.0.0.1:1", "--insecure",
            "--image", CT, "--label", CT, "--out", tmp_path / "s.safetensors"]
    for argv in (server, site):
        assert main([str(a) for a in argv + ["--fold", "5"]]) == 2
        assert "has no checkpoint for fold 5 (folds with one: 0, 1)" in capsys.readouterr().err.strip().splitlines()[-1]
        with pytest.raises(SystemExit):
            main([str(a) for a in argv + ["--fold", "0", "--stop-file", tmp_path / "STOP"]])
        assert "unrecognized arguments: --stop-file" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
