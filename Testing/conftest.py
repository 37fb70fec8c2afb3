"""Shared fixtures for the engine tests: the vendored tptbox CT/MRI crops, a tiny network-spec base model,
the same CT in every supported input format, and one small training run reused by several tests.

The tiny base (``tiny_unet``) is a MONAI UNet (3D, 1 -> 4 channels: background + L2, L3, L4; channels
8/16/32) with **randomly initialised** weights (seed 0) saved as safetensors: it is a stand-in "pretrained"
base for engine plumbing (reading, training, job control, inference, grids), not a model that segments
anything. The real pretrained base (deepbet) is exercised by the demo test.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
TPTBOX = REPO / "Testing" / "Data" / "tptbox"
CT = TPTBOX / "sub-ct_label-22_ct.nii.gz"  # 73x47x73 @ 1.5 mm, PIR, int16 HU
CT_VERT = TPTBOX / "sub-ct_seg-vert_label-22_msk.nii.gz"  # 0, 21 (L2), 22 (L3), 23 (L4)
CT_SUBREG = TPTBOX / "sub-ct_seg-subreg_label-22_msk.nii.gz"  # 0, 41..50 (not in the tiny base's table)
MRI = TPTBOX / "sub-mri_label-6_T2w.nii.gz"  # 68x52x67: another grid
MRI_VERT = TPTBOX / "sub-mri_seg-vert_label-6_msk.nii.gz"

VERTEBRAE = [
    {"value": 21, "name": "L2", "color": [0.9, 0.3, 0.2]},
    {"value": 22, "name": "L3", "color": [0.2, 0.7, 0.3]},
    {"value": 23, "name": "L4", "color": [0.2, 0.4, 0.9]},
]

UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [8, 16, 32],
             "strides": [2, 2], "num_res_units": 1}


def tiny_spec(spacing=None) -> dict:
    """A network spec (the format ``tcurlora.models._load_spec`` reads) for the tiny UNet."""
    return {
        "name": "tiny-unet-vertebrae",
        "network": {"class": "UNet", "args": UNET_ARGS},
        "labels": VERTEBRAE,
        "preprocessing": {"orientation": "RAS", "spacing": spacing,
                          "intensity": {"kind": "range", "a_min": -1000, "a_max": 1500},
                          "patch_size": [32, 32, 32], "divisible_by": 8},
        "head": "model.2.1.conv.unit0.conv",
        "decoder_modules": [r"model\.2(\..*)?", r"model\.1\.submodule\.2(\..*)?"],
    }


# The networks here are tiny: on a busy 2-core machine OpenMP intra-op threads only contend (measured: a 4-step
# training run took 31 s with 2 threads and 2.1 s with 1). Test modules use one thread (``single_thread``) and
# start their subprocesses with SUBPROCESS_ENV. Same-seed runs are compared at the same thread count.
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def single_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_unet(tmp_path_factory):
    """``spec`` (.json), ``weights`` (.safetensors, random init, seed 0), ``spec_resampled`` (same net, model
    spacing 2 mm so inputs are resampled), and ``args``: the CLI options selecting this base on the CPU."""
    import torch
    from monai.networks.nets import UNet
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_unet")
    torch.manual_seed(0)
    net = UNet(**UNET_ARGS)
    weights = folder / "tiny_unet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    spec = folder / "tiny_unet.json"
    spec.write_text(json.dumps(tiny_spec(), indent=1), encoding="utf-8")
    spec_resampled = folder / "tiny_unet_2mm.json"
    spec_resampled.write_text(json.dumps(tiny_spec(spacing=[2.0, 2.0, 2.0]), indent=1), encoding="utf-8")
    return SimpleNamespace(spec=spec, weights=weights, spec_resampled=spec_resampled,
                           args=["--base", str(spec), "--weights", str(weights), "--device", "cpu"])


@pytest.fixture
def tiny_base(tiny_unet):
    """A freshly loaded tiny base (training and adapters modify the network in place)."""
    from tcurlora.models import load_base

    return load_base(str(tiny_unet.spec), weights=str(tiny_unet.weights))


# ----------------------------------------------------------------------------------------------------------
# files


def read_events(path) -> list:
    """JSON-lines events from a file (every line must be a JSON object with an "event")."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            assert isinstance(record, dict) and "event" in record, line
            events.append(record)
    return events


def write_dicom_series(volume: sitk.Image, folder, series_uid: str = "1.2.826.0.1.3680043.2.1125.7.1",
                       description: str = "test") -> list:
    """Write a 3D volume as an int16 DICOM series (one file per slice, position/orientation tags set) into
    ``folder`` (several series may share it); returns the slice files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vol = sitk.Cast(volume, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = vol.GetDirection()
    common = {
        "0008|0060": "CT", "0008|0021": time.strftime("%Y%m%d"), "0008|0031": time.strftime("%H%M%S"),
        "0020|000d": "1.2.826.0.1.3680043.2.1125.7", "0020|000e": series_uid, "0008|103e": description,
        "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
    }
    import locale

    files = []
    for k in range(vol.GetDepth()):
        s = vol[:, :, k]
        for tag, value in common.items():
            s.SetMetaData(tag, value)
        s.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in vol.TransformIndexToPhysicalPoint((0, 0, k))))
        s.SetMetaData("0020|0013", str(k + 1))
        s.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        path = str(folder / f"s{series_uid.split('.')[-1]}_{k:03d}.dcm")
        writer.SetFileName(path)
        ctype = locale.setlocale(locale.LC_CTYPE)
        writer.Execute(s)
        # GDCM's writer sets the C library's LC_CTYPE to "C" and leaves it: every later test in this process
        # would decode subprocess output as ASCII (reading DICOM, which the engine does, leaves it alone)
        locale.setlocale(locale.LC_CTYPE, ctype)
        files.append(path)
    return files


def write_seg_nrrd_by_name(label: sitk.Image, path, values_to_names: dict) -> Path:
    """A Slicer segmentation whose segments carry only *names* from ``values_to_names`` (value -> name), stored
    in another order and with other label values than the base's table (1, 2, 3...), so the reader must map
    segments to labels by name."""
    from tcurlora.io import write_segmentation

    arr = sitk.GetArrayFromImage(label)
    order = sorted(values_to_names, reverse=True)  # file order differs from the table order
    remapped = np.zeros_like(arr, dtype=np.uint8)
    table = []
    for new_value, old_value in enumerate(order, start=1):
        remapped[arr == old_value] = new_value
        table.append({"value": new_value, "name": values_to_names[old_value], "color": [0.5, 0.5, 0.5]})
    out = sitk.GetImageFromArray(remapped)
    out.CopyInformation(label)
    write_segmentation(str(path), out, table)
    return Path(path)


@pytest.fixture(scope="session")
def formats(tmp_path_factory):
    """The tptbox CT case in every input format: ``pairs[name] = (image, label)``; plus a ``--cases`` folder
    (side-by-side layout: X + X_label / X.seg.nrrd, and a DICOM series sub-folder) holding one case each."""
    folder = tmp_path_factory.mktemp("formats")
    image = sitk.ReadImage(str(CT))
    label = sitk.ReadImage(str(CT_VERT))
    for img in (image, label):  # NIfTI header fields MetaImage cannot store would only print warnings
        for key in img.GetMetaDataKeys():
            img.EraseMetaData(key)
    names = {e["value"]: e["name"] for e in VERTEBRAE}
    pairs = {"nifti": (CT, CT_VERT)}
    for ext, name in ((".nrrd", "nrrd"), (".mha", "mha"), (".mhd", "mhd")):
        img_path, lab_path = folder / f"ct_{name}{ext}", folder / f"ct_{name}_label{ext}"
        sitk.WriteImage(image, str(img_path), True)
        sitk.WriteImage(label, str(lab_path), True)
        pairs[name] = (img_path, lab_path)
    pairs["seg.nrrd"] = (folder / "ct_nrrd.nrrd", write_seg_nrrd_by_name(label, folder / "ct_by_name.seg.nrrd", names))
    write_dicom_series(image, folder / "ct_dicom")
    pairs["dicom"] = (folder / "ct_dicom", CT_VERT)

    cases = folder / "cases"
    cases.mkdir()
    sitk.WriteImage(image, str(cases / "a_nifti.nii.gz"), True)
    sitk.WriteImage(label, str(cases / "a_nifti_label.nii.gz"), True)
    sitk.WriteImage(image, str(cases / "b_slicer.nrrd"), True)
    write_seg_nrrd_by_name(label, cases / "b_slicer.seg.nrrd", names)
    sitk.WriteImage(image, str(cases / "c_mha.mha"), True)
    sitk.WriteImage(label, str(cases / "c_mha-label.mha"), True)
    write_dicom_series(image, cases / "d_dicom", series_uid="1.2.826.0.1.3680043.2.1125.7.2")
    sitk.WriteImage(label, str(cases / "d_dicom_seg.nii.gz"), True)
    return SimpleNamespace(folder=folder, pairs=pairs, cases=cases, n_cases=4)


# ----------------------------------------------------------------------------------------------------------
# one small training run shared by the event, best/last, determinism, resume, curve and inference tests

TRAIN_STEPS = 6
VAL_EVERY = 2


def finetune_args(tiny_unet, out, *extra) -> list:
    """The reference training run: CT case, validated on itself every VAL_EVERY steps, seed 0, CPU."""
    return (["finetune", *tiny_unet.args, "--image", str(CT), "--label", str(CT_VERT),
             "--val-image", str(CT), "--val-label", str(CT_VERT), "--out", str(out),
             "--steps", str(TRAIN_STEPS), "--val-every", str(VAL_EVERY), "--patience", "0", "--seed", "0",
             "--batch-size", "2"] + list(extra))


@pytest.fixture(scope="module")
def trained(single_thread, tiny_unet, tmp_path_factory):
    """The reference run done once, in-process: ``adapter``, ``events`` (parsed), ``dir``, ``argv``."""
    from tcurlora import cli

    folder = tmp_path_factory.mktemp("trained")
    out = folder / "vertebrae.safetensors"
    events = folder / "events.jsonl"
    argv = finetune_args(tiny_unet, out, "--events", str(events))
    assert cli.main(argv) == 0
    return SimpleNamespace(adapter=out, events=read_events(events), dir=folder, argv=argv)


def cli_subprocess(*args):
    """``[python, -m, tcurlora.cli, *args]`` (the ``tcurlora`` console script runs the same ``main``);
    run it with ``env=SUBPROCESS_ENV``."""
    return [sys.executable, "-m", "tcurlora.cli", *[os.fspath(a) for a in args]]


def assert_one_line_error(proc):
    """A CLI failure as users must see it: exit 2 and one stderr line ``error: ...``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.fixture(scope="session")
def nnunet_model(tmp_path_factory):
    """A real nnU-Net v2 trained-model folder made by nnU-Net's own planner and trainer
    (``Testing/nnunet_fixture.py``, about half a minute on 2 cores): ``work`` (nnU-Net's raw/preprocessed/results
    folders), ``folder`` (the trained-model folder), ``raw`` (the raw dataset)."""
    import subprocess

    import nnunet_fixture

    work = tmp_path_factory.mktemp("nnunet")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / "Testing" / "nnunet_fixture.py"), str(work)], env=env,
                            capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder.name == f"nnUNetTrainer__{nnunet_fixture.PLANS}__3d_fullres"
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    return SimpleNamespace(work=work, folder=folder, raw=work / "nnUNet_raw" / nnunet_fixture.DATASET)


class Evil:
    """A pickle payload that creates a file when unpickled: if that file exists, something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
