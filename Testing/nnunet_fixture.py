"""Build a small, real nnU-Net v2 trained-model folder with nnU-Net's own planner, preprocessor and trainer.

    python Testing/nnunet_fixture.py WORK_FOLDER      # prints the trained-model folder it made

From the vendored tptbox CT crop (L2-L4 vertebra labels) it writes an nnU-Net raw dataset of 5 cases (the crop and
four mirrored copies), runs ``nnUNetv2_plan_and_preprocess`` (3d_fullres, fingerprint and plans only), copies the
plans as ``nnUNetPlansTiny`` with a narrow network (4..32 features per stage instead of 32..320) and runs
``nnUNetv2_preprocess`` on them, then trains the stock ``nnUNetTrainer`` on the CPU for 1 epoch of a few iterations,
on folds 0 and 1.
The result is the layout nnU-Net (and TotalSegmentator, SlicerNNUnet) ships:
``nnUNet_results/Dataset901_TPTBoxCT/nnUNetTrainer__nnUNetPlansTiny__3d_fullres/{dataset.json, plans.json,
dataset_fingerprint.json, fold_0/checkpoint_final.pth, fold_1/…}``. It segments nothing well: it is a test model.

The trainer is started by this script, not by ``nnUNetv2_train``: that command (and nnU-Net's predictor) looks the
trainer class up by name by importing nnU-Net's trainer modules one by one, and one of them (the Primus trainers)
needs timm, which is deliberately not installed (it pulls a CUDA torchvision that crashes on a CPU torch). The class
is the stock ``nnUNetTrainer``, so the checkpoint names it and ``nnUNetv2_predict`` (which finds ``nnUNetTrainer``
in the first module it imports) can use the folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
CT = HERE / "Data" / "tptbox" / "sub-ct_label-22_ct.nii.gz"
CT_VERT = HERE / "Data" / "tptbox" / "sub-ct_seg-vert_label-22_msk.nii.gz"

DATASET_ID = 901
DATASET = f"Dataset{DATASET_ID}_TPTBoxCT"
PLANS = "nnUNetPlansTiny"
LABELS = {"background": 0, "L2": 1, "L3": 2, "L4": 3}  # nnU-Net needs consecutive values; tptbox has 21..23
ITERATIONS = 3
FOLDS = (0, 1)  # two real folds: an adapter trained on one must be refused on the other


def nnunet_env(work: Path) -> dict:
    """The environment nnU-Net's commands read their folders (and the CPU settings) from."""
    return dict(os.environ, nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
                nnUNet_results=str(work / "nnUNet_results"), nnUNet_n_proc_DA="1", nnUNet_compile="false",
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def nnunet_command(name: str) -> str:
    """An nnU-Net console script of the running interpreter's environment."""
    return str(Path(sys.executable).with_name(name))


def predict(env: dict, dataset: str, inputs: Path, out: Path, mirroring: bool, plans: str = PLANS,
            fold: int = 0) -> "subprocess.Popen":
    """The real ``nnUNetv2_predict`` on the CPU, started (not waited for) with nnU-Net's folders from ``env``;
    ``mirroring`` False adds ``--disable_tta``."""
    cmd = [nnunet_command("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(dataset), "-c",
           "3d_fullres", "-p", plans, "-f", str(fold), "-device", "cpu", "-npp", "1", "-nps", "1"]
    return subprocess.Popen(cmd + ([] if mirroring else ["--disable_tta"]), env=dict(env, nnUNet_def_n_proc="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            errors="replace")


def write_raw_dataset(raw: Path) -> None:
    image, label = sitk.ReadImage(str(CT)), sitk.ReadImage(str(CT_VERT))
    x, y = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    y = np.where(y > 0, y - 20, 0).astype(np.uint8)  # 21, 22, 23 -> 1, 2, 3
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i, axes in enumerate([(), (0,), (1,), (2,), (0, 2)]):
        for array, path in ((x, raw / "imagesTr" / f"tptbox_{i:03d}_0000.nii.gz"),
                            (y, raw / "labelsTr" / f"tptbox_{i:03d}.nii.gz")):
            out = sitk.GetImageFromArray(np.ascontiguousarray(np.flip(array, axes) if axes else array))
            out.CopyInformation(image)
            sitk.WriteImage(out, str(path))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 5, "file_ending": ".nii.gz",
        "name": "TPTBox CT crop, 5 mirrored copies (test dataset)"}, indent=2))


def narrow_plans(preprocessed: Path, plans_name: str = PLANS, first: int = 4, widest: int = 32) -> None:
    """``plans_name``: nnU-Net's plans with ``first``, 2×, 4×… features per stage, at most ``widest``
    (the test model: 4, 8, 16, 32, 32...)."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    plans["plans_name"] = plans_name
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(first * 2 ** i, widest) for i in range(len(arch["features_per_stage"]))]
    (preprocessed / f"{plans_name}.json").write_text(json.dumps(plans, indent=2))


def train(work: Path, fold: int, dataset: str = DATASET, plans_name: str = PLANS, iterations: int = ITERATIONS,
          val_iterations: int = 1) -> Path:
    """Train the stock nnUNetTrainer on one fold for one epoch of ``iterations``; returns the trained-model folder."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.manual_seed(fold)
    np.random.seed(fold)
    pre = work / "nnUNet_preprocessed" / dataset
    plans = json.loads((pre / f"{plans_name}.json").read_text())
    plans["continue_training"] = False  # what nnU-Net's run_training passes for a fresh run
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainer = nnUNetTrainer(plans, "3d_fullres", fold, dataset_json, device=torch.device("cpu"))
    trainer.num_epochs = 1
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations
    trainer.run_training()  # writes plans.json, dataset.json, fold_N/checkpoint_final.pth (no validation export)
    return Path(trainer.output_folder_base)


def plan_and_train(work: Path, dataset_id: int, dataset: str, write_raw, *, plans_name: str = PLANS, first: int = 4,
                   widest: int = 32, folds=FOLDS, iterations: int = ITERATIONS, val_iterations: int = 1) -> Path:
    """nnU-Net's own pipeline on the raw dataset ``write_raw(folder)`` writes: plan, narrow the plans
    (:func:`narrow_plans`), preprocess, train each fold; returns the trained-model folder."""
    work = Path(work)
    env = nnunet_env(work)
    # the trainer runs in this process; 0 augmentation workers = nnU-Net's single-threaded loader (the planner
    # needs at least 1: it sets torch's thread count from it)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_compile")},
                      nnUNet_n_proc_DA="0")
    write_raw(work / "nnUNet_raw" / dataset)
    quiet = dict(env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres",
                    "-npfp", "1", "--no_pp"], **quiet)
    narrow_plans(work / "nnUNet_preprocessed" / dataset, plans_name, first, widest)
    subprocess.run([nnunet_command("nnUNetv2_preprocess"), "-d", str(dataset_id), "-plans_name", plans_name,
                    "-c", "3d_fullres", "-np", "1"], **quiet)
    for fold in folds:
        folder = train(work, fold, dataset, plans_name, iterations, val_iterations)
    return folder


def build(work: Path) -> Path:
    """The test model: the tptbox crop dataset, nnUNetPlansTiny, folds 0 and 1."""
    return plan_and_train(work, DATASET_ID, DATASET, write_raw_dataset)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python Testing/nnunet_fixture.py WORK_FOLDER")
    print(build(Path(sys.argv[1])))
