"""``tcurlora models --discover``: the models already on the machine, found where their tools keep them
(every root moved to a temporary folder through the environment or ``--root``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SUBPROCESS_ENV, assert_one_line_error, cli_subprocess

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auto3dseg_model import CONFIG, write_labels_csv  # noqa: E402
from test_bundle_settings import TRANSFORMS, write_bundle  # noqa: E402


def nnunet_folder(results: Path, dataset: str, trainer: str, labels: dict, folds=(0,)) -> Path:
    """An nnU-Net v2 results folder as nnU-Net writes it (listing reads only dataset.json and file sizes)."""
    folder = results / dataset / trainer
    for fold in folds:
        (folder / f"fold_{fold}").mkdir(parents=True)
        torch.save({"network_weights": {"w": torch.zeros(256, 256)}, "trainer_name": trainer.split("__")[0]},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, "channel_names": {"0": "CT"},
                                                     "file_ending": ".nii.gz"}), encoding="utf-8")
    (folder / "plans.json").write_text(json.dumps({"dataset_name": dataset, "configurations": {}}), encoding="utf-8")
    return folder


@pytest.fixture
def machine(tmp_path):
    """A home folder holding one model of every kind, and the environment that points at it."""
    from monai.bundle import ConfigParser

    home = tmp_path / "home"
    ts = nnunet_folder(home / ".totalsegmentator" / "nnunet" / "results", "Dataset291_TotalSegmentator_part1_organs_1559subj",
                       "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres",
                       {"background": 0, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5})
    own = nnunet_folder(tmp_path / "nnUNet_results", "Dataset501_Spine", "nnUNetTrainer__nnUNetPlans__3d_fullres",
                        {"background": 0, "L2": 1, "L3": 2}, folds=(0, 1))
    regions = nnunet_folder(tmp_path / "nnUNet_results", "Dataset502_Brats", "nnUNetTrainer__nnUNetPlans__3d_fullres",
                            {"background": 0, "whole tumour": [1, 2, 3], "core": [2, 3]})
    slicer_models = tmp_path / "SlicerNNUnetModels"
    slicer = nnunet_folder(slicer_models, "Dataset777_Prostate", "nnUNetTrainer__nnUNetPlans__3d_lowres", {"background": 0, "prostate": 1})
    settings = tmp_path / "Slicer.ini"
    parameter = json.dumps({"folds": "", "device": "cuda", "modelPath": {"_path": str(slicer_models)}})
    settings.write_text("[General]\nfoo=1\n\n[SlicerNNUNet]\nParameter=\"" + parameter.replace('"', '\\"') + "\"\n",
                        encoding="utf-8")

    auto3dseg = home / ".MONAIAuto3DSeg" / "models" / "vertebrae-v1.0.0"
    (auto3dseg / "model").mkdir(parents=True)
    torch.manual_seed(0)
    net = ConfigParser(CONFIG["network"]).get_parsed_content()
    torch.save({"state_dict": net.state_dict(), "config": CONFIG, "epoch": 0, "best_metric": 0.0},
               auto3dseg / "model" / "model.pt")
    write_labels_csv(auto3dseg / "model" / "labels.csv")
    bundle = write_bundle(home / ".cache" / "torch" / "hub" / "bundle" / "spine_bundle", TRANSFORMS)

    env = dict(SUBPROCESS_ENV, HOME=str(home), nnUNet_results=str(tmp_path / "nnUNet_results"),
               TCURLORA_SLICER_SETTINGS=str(settings))
    for name in ("TOTALSEG_HOME_DIR", "TORCH_HOME"):
        env.pop(name, None)
    return dict(env=env, ts=ts, own=own, regions=regions, slicer=slicer, auto3dseg=auto3dseg, bundle=bundle,
                tmp=tmp_path)


def discover(env, *extra):
    return subprocess.run(cli_subprocess("models", "--discover", *extra), capture_output=True, text=True,
                          timeout=120, env=env)


def test_discover_lists_every_kind_one_line_each(machine):
    proc = discover(machine["env"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 6, proc.stdout
    by_base = {line.split("--base ")[1].split("  [")[0]: line for line in lines}
    ts = by_base[str(machine["ts"])]
    assert ts.startswith("totalsegmentator ") and "spleen, kidney_right, kidney_left, gallbladder, ... (5 labels)" in ts
    assert "folds 0;" in ts and "0.3 MB" in ts  # one 256x256 float32 checkpoint
    assert by_base[str(machine["own"])].startswith("nnunet ") and "L2, L3; folds 0,1;" in by_base[str(machine["own"])]
    assert "[cannot be used: region-based labels]" in by_base[str(machine["regions"])]
    assert "prostate" in by_base[str(machine["slicer"])]  # from SlicerNNUnet's saved model folder
    a3d = by_base[str(machine["auto3dseg"])]
    assert a3d.startswith("auto3dseg ") and "L2 vertebra, L3 vertebra, L4 vertebra;" in a3d
    assert by_base[str(machine["bundle"])].startswith("bundle ") and "L2, L3, L4" in by_base[str(machine["bundle"])]


def test_discovered_bases_load(machine, monkeypatch):
    """What discovery lists is what --base takes (the Slicer model list calls discover_models)."""
    from tcurlora.models import load_base
    from tcurlora.models.discover import discover_models

    for key in ("HOME", "nnUNet_results", "TCURLORA_SLICER_SETTINGS"):
        monkeypatch.setenv(key, machine["env"][key])
    monkeypatch.delenv("TOTALSEG_HOME_DIR", raising=False)
    monkeypatch.delenv("TORCH_HOME", raising=False)
    entries = {e["kind"]: e for e in discover_models() if e["kind"] in ("auto3dseg", "bundle")}
    base = load_base(entries["auto3dseg"]["base"])
    assert base.kind == "auto3dseg" and [l["name"] for l in base.labels] == entries["auto3dseg"]["labels"]
    assert [l["name"] for l in load_base(entries["bundle"]["base"]).labels] == entries["bundle"]["labels"]


def test_roots_from_the_flag_and_the_environment(machine, tmp_path):
    proc = discover(machine["env"], "--root", f"auto3dseg={machine['auto3dseg'].parent}", "--json")
    assert proc.returncode == 0, proc.stderr
    entries = json.loads(proc.stdout)
    assert [(e["kind"], e["name"]) for e in entries] == [("auto3dseg", "vertebrae-v1.0.0")]
    assert entries[0]["size_bytes"] == (machine["auto3dseg"] / "model" / "model.pt").stat().st_size

    moved = dict(machine["env"], TOTALSEG_HOME_DIR=str(tmp_path / "elsewhere"), HOME=str(tmp_path / "empty"))
    moved.pop("nnUNet_results")
    moved["TCURLORA_SLICER_SETTINGS"] = str(tmp_path / "none.ini")
    proc = discover(moved)
    assert proc.returncode == 0 and proc.stdout.startswith("no models found (looked in: totalsegmentator: ")
    assert str(tmp_path / "elsewhere" / "nnunet" / "results") in proc.stdout

    assert_one_line_error(discover(machine["env"], "--root", "weights=/tmp"))
