"""The engine end to end on the vendored tptbox CT crop: cases in every format, training, job control,
inference on the input grid, evaluation, the worker, and the training curve.

The base model is the tiny network-spec UNet of ``conftest.tiny_unet`` with RANDOMLY INITIALISED weights:
a stand-in "pretrained" base for engine plumbing. These tests prove reading, training mechanics, events,
cancel/resume, grids and outputs, not segmentation quality (the demo test runs the real pretrained deepbet).
Numbers in the issue these tests prove are given as (1)..(8) in the docstrings.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from tcurlora.tuners import get_tuner
import torch
from safetensors.torch import load_file

from conftest import (CT, CT_VERT, SUBPROCESS_ENV, TRAIN_STEPS, VAL_EVERY, VERTEBRAE, assert_one_line_error, cli_subprocess,
                      finetune_args, read_events)
from tcurlora import cli

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.SUBPROCESS_ENV

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VALUES = {0, 21, 22, 23}  # background and the vertebra label values of the tptbox crop


def run(argv) -> int:
    return cli.main([os.fspath(a) for a in argv])


def progress(events):
    return [e for e in events if e["event"] == "progress"]


def assert_png(path: Path) -> None:
    """(8) a training-curve PNG: exists, non-empty, PNG signature."""
    assert path.is_file(), path
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def curve_of(adapter: Path) -> Path:
    from tcurlora.train import curve_path

    return curve_path(adapter)


def checkpoint_of(adapter: Path) -> Path:
    from tcurlora.train import checkpoint_path

    return checkpoint_path(adapter)


def adapter_tensors(path) -> dict:
    return load_file(str(path))


def manifest_of(path) -> dict:
    from tcurlora.manifest import read_manifest

    return read_manifest(str(path))


def grid(image: sitk.Image):
    return (image.GetSize(), np.array(image.GetSpacing()), np.array(image.GetOrigin()),
            np.array(image.GetDirection()))


def assert_same_grid(a: sitk.Image, b: sitk.Image, atol: float) -> None:
    sa, pa, oa, da = grid(a)
    sb, pb, ob, db = grid(b)
    assert sa == sb
    np.testing.assert_allclose(pa, pb, rtol=0, atol=atol)
    np.testing.assert_allclose(oa, ob, rtol=0, atol=atol)
    np.testing.assert_allclose(da, db, rtol=0, atol=atol)


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


@pytest.fixture(scope="session")
def oblique_ct(tmp_path_factory):
    """The CT with an oblique direction (the PIR axes turned 20 degrees), anisotropic spacing and an odd
    origin, saved as NRRD (double-precision geometry)."""
    image = sitk.ReadImage(str(CT))
    direction = rotation((1, 2, 3), 20.0) @ np.array(image.GetDirection()).reshape(3, 3)
    image.SetDirection(tuple(direction.ravel()))
    image.SetSpacing((1.3, 2.1, 0.9))
    image.SetOrigin((-12.5, 40.25, 7.75))
    path = tmp_path_factory.mktemp("oblique") / "oblique_ct.nrrd"
    sitk.WriteImage(image, str(path), True)
    return path


# ----------------------------------------------------------------------------------------------------------
# (1) cases from every format, by --image/--label, --cases and a JSON job


def test_every_input_format_reads_to_the_same_case(tiny_base, formats):
    """(1) NIfTI, NRRD, MHA, MHD, a DICOM series folder and a Slicer .seg.nrrd give the same model-space
    image and label; the .seg.nrrd stores other label values (1..3, other order) and is mapped by NAME."""
    from tcurlora.train import load_cases

    ref = load_cases(tiny_base, [formats.pairs["nifti"]], VERTEBRAE)[0]
    assert set(torch.unique(ref.label).tolist()) == {0, 1, 2, 3}  # values 21..23 -> channels in table order
    for name, pair in formats.pairs.items():
        case = load_cases(tiny_base, [pair], VERTEBRAE)[0]
        assert torch.equal(case.image, ref.image), name
        assert torch.equal(case.label, ref.label), name
    seg = slicerio.read_segmentation(str(formats.pairs["seg.nrrd"][1]))
    stored = {s["name"]: s["labelValue"] for s in seg["segments"]}
    assert stored == {"L4": 1, "L3": 2, "L2": 3}  # not the table's values: only names can map them


def test_finetune_takes_pairs_a_cases_folder_and_a_job_file(tiny_unet, formats, tmp_path):
    """(1) Repeated --image/--label (mixed formats), --cases FOLDER (side by side, with a DICOM series folder
    and a .seg.nrrd) and --job JOB.json all train (one step each) and report how many cases they read."""
    quick = ["--steps", "1", "--batch-size", "1"]
    p = formats.pairs
    ev = tmp_path / "pairs.jsonl"
    argv = ["finetune", *tiny_unet.args, *quick, "--out", tmp_path / "pairs.safetensors", "--events", ev]
    for name in ("nrrd", "seg.nrrd", "dicom"):
        argv += ["--image", p[name][0], "--label", p[name][1]]
    assert run(argv) == 0
    assert any(e["event"] == "log" and e["message"].startswith("read 3 training") for e in read_events(ev))
    assert (tmp_path / "pairs.safetensors").is_file()

    ev = tmp_path / "folder.jsonl"
    assert run(["finetune", *tiny_unet.args, *quick, "--cases", formats.cases,
                "--out", tmp_path / "folder.safetensors", "--events", ev]) == 0
    assert any(e["event"] == "log" and e["message"].startswith(f"read {formats.n_cases} training")
               for e in read_events(ev))

    job = {"command": "finetune", "base": str(tiny_unet.spec), "weights": str(tiny_unet.weights),
           "device": "cpu", "steps": 1, "batch_size": 1, "labels": VERTEBRAE,
           "cases": [{"image": str(p["mhd"][0]), "label": str(p["mhd"][1])},
                     {"image": str(p["dicom"][0]), "label": str(p["seg.nrrd"][1])}],
           "out": str(tmp_path / "job.safetensors")}
    (tmp_path / "job.json").write_text(json.dumps(job), encoding="utf-8")
    ev = tmp_path / "job.jsonl"
    assert run(["finetune", "--job", tmp_path / "job.json", "--events", ev]) == 0
    assert read_events(ev)[-1]["event"] == "result"
    assert (tmp_path / "job.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------
# (2) predictions exactly on the input grid


@pytest.mark.parametrize("spec", ["spec", "spec_resampled"])
def test_prediction_is_on_the_oblique_anisotropic_input_grid(tiny_unet, oblique_ct, tmp_path, spec):
    """(2) Oblique direction + anisotropic spacing in, .seg.nrrd and NIfTI label map out on that exact grid:
    size, spacing, origin, direction. ``spec``: no resampling (axis permutation back); ``spec_resampled``:
    the model works at 2 mm, so the way back resamples."""
    base = ["--base", getattr(tiny_unet, spec), "--weights", tiny_unet.weights, "--device", "cpu"]
    image = sitk.ReadImage(str(oblique_ct))
    seg_path, nii_path = tmp_path / "pred.seg.nrrd", tmp_path / "pred.nii.gz"
    assert run(["segment", *base, oblique_ct, "-o", seg_path]) == 0
    assert run(["segment", *base, oblique_ct, "-o", nii_path]) == 0

    seg = slicerio.read_segmentation(str(seg_path))
    expected = np.eye(4)
    expected[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    expected[:3, 3] = image.GetOrigin()
    assert seg["voxels"].shape == image.GetSize()  # slicerio: (i, j, k)
    np.testing.assert_allclose(seg["ijkToLPS"], expected, rtol=0, atol=1e-6)

    label = sitk.ReadImage(str(nii_path))
    assert_same_grid(label, image, atol=1e-5)  # NIfTI keeps geometry in float32
    assert set(np.unique(sitk.GetArrayViewFromImage(label)).tolist()) <= VALUES
    assert np.array_equal(sitk.GetArrayFromImage(label),
                          np.asarray(seg["voxels"]).transpose(2, 1, 0))  # both outputs: the same labels


def test_prediction_follows_the_anatomy_not_the_voxel_order(tiny_unet, tmp_path):
    """(2) The same anisotropic volume stored with permuted and flipped voxel axes (another direction matrix)
    is the same model input, so both predictions, each mapped back to its own grid, agree voxel for voxel
    once put on a common grid."""
    image = sitk.ReadImage(str(CT))
    image.SetSpacing((1.5, 2.25, 1.0))
    other = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, True])
    assert other.GetDirection() != image.GetDirection()
    a_path, b_path = tmp_path / "a.nrrd", tmp_path / "b.nrrd"
    sitk.WriteImage(image, str(a_path))
    sitk.WriteImage(other, str(b_path))
    assert run(["segment", *tiny_unet.args, a_path, b_path, "-o", tmp_path / "out"]) == 0
    pred_a = sitk.ReadImage(str(tmp_path / "out" / "a.seg.nrrd"))
    pred_b = sitk.ReadImage(str(tmp_path / "out" / "b.seg.nrrd"))
    assert_same_grid(pred_a, image, atol=1e-6)
    assert_same_grid(pred_b, other, atol=1e-6)
    b_on_a = sitk.Resample(pred_b, pred_a, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    a = sitk.GetArrayFromImage(pred_a)
    assert len(np.unique(a)) > 1  # not a vacuous all-background comparison
    assert np.array_equal(a, sitk.GetArrayFromImage(b_on_a))


# ----------------------------------------------------------------------------------------------------------
# (3) training


def test_same_seed_gives_a_bit_identical_adapter(trained, tiny_unet, tmp_path):
    """(3) --seed on the CPU: a second run with the same settings writes the same adapter tensors
    (torch.equal); another seed draws other patches (other losses)."""
    out = tmp_path / "again.safetensors"
    ev = tmp_path / "again.jsonl"
    assert run(finetune_args(tiny_unet, out, "--events", ev)) == 0
    first, second = adapter_tensors(trained.adapter), adapter_tensors(out)
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert any(bool(t.abs().sum() > 0) for t in first.values())  # it did train: not the zero start
    assert [e["loss"] for e in progress(trained.events)] == [e["loss"] for e in progress(read_events(ev))]

    other = tmp_path / "seed1.safetensors"
    ev1 = tmp_path / "seed1.jsonl"
    assert run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out", other, "--steps", "1",
                "--batch-size", "2", "--seed", "1", "--events", ev1]) == 0
    assert progress(read_events(ev1))[0]["loss"] != progress(trained.events)[0]["loss"]


def test_start_from_continues_an_adapter(trained, tiny_unet, tmp_path):
    """--start-from: the run starts at the given adapter's cores (the correct-and-retrain loop), keeps its
    stacks and indices, and refuses an adapter whose labels differ from the run's."""
    out = tmp_path / "continued.safetensors"
    assert run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out", out, "--steps", "1",
                "--batch-size", "2", "--lr", "1e-12", "--start-from", trained.adapter]) == 0
    before, after = adapter_tensors(trained.adapter), adapter_tensors(out)
    assert before.keys() == after.keys()
    for key in before:  # a vanishing learning rate: the continued adapter is where the first one ended
        torch.testing.assert_close(after[key], before[key], rtol=1e-6, atol=1e-9)
    assert any(bool(t.abs().sum() > 0) for t in after.values())
    first, second = manifest_of(trained.adapter), manifest_of(out)
    assert [s["I"] for s in first["method"]["stacks"]] == [s["I"] for s in second["method"]["stacks"]]

    other_labels = tmp_path / "labels.json"
    other_labels.write_text(json.dumps([{"value": 21, "name": "Sacrum"}, {"value": 22, "name": "L3"},
                                        {"value": 23, "name": "L4"}]))
    proc = subprocess.run(cli_subprocess("finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out",
                                         tmp_path / "refused.safetensors", "--steps", "1", "--labels", other_labels,
                                         "--start-from", trained.adapter),
                          capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert "its labels" in assert_one_line_error(proc)
    assert not (tmp_path / "refused.safetensors").exists()


def test_steps_validation_and_best_versus_last(trained):
    """(3) --steps N gives N progress events (step 1..N of N); validation Dice every --val-every steps;
    the adapter file holds the BEST validated state, the checkpoint the LAST; (8) curve beside it."""
    steps = progress(trained.events)
    assert [e["step"] for e in steps] == list(range(1, TRAIN_STEPS + 1))
    assert all(e["total"] == TRAIN_STEPS for e in steps)
    assert all(e["loss"] is not None and math.isfinite(e["loss"]) and e["loss"] > 0 for e in steps)
    dice = {e["step"]: e["dice"] for e in steps if e["dice"] is not None}
    assert sorted(dice) == list(range(VAL_EVERY, TRAIN_STEPS + 1, VAL_EVERY))
    assert all(0.0 <= d <= 1.0 for d in dice.values())
    assert all(e["eta_s"] is not None and e["eta_s"] >= 0 for e in steps) and steps[-1]["eta_s"] == 0

    ckpt = torch.load(str(checkpoint_of(trained.adapter)), map_location="cpu", weights_only=True)
    assert ckpt["step"] == TRAIN_STEPS
    best_step = max(dice, key=lambda s: (dice[s], -s))  # first step with the highest Dice
    assert ckpt["best_step"] == best_step
    saved = adapter_tensors(trained.adapter)
    for key, value in saved.items():
        assert torch.equal(value, ckpt["best_adapter"][key]), key
        if best_step == TRAIN_STEPS:
            assert torch.equal(value, ckpt["adapter"][key])
    result = trained.events[-1]
    assert result["event"] == "result" and result["cancelled"] is False
    assert result["metrics"]["best_step"] == best_step
    assert result["metrics"]["best_validation_dice"] == pytest.approx(dice[best_step], abs=1e-6)
    manifest = manifest_of(trained.adapter)
    assert manifest["provenance"]["validation_dice"] == pytest.approx(dice[best_step], abs=1e-6)
    assert manifest["provenance"]["steps"] == TRAIN_STEPS and manifest["method"]["name"] == "tcurlora"
    assert [l["name"] for l in manifest["labels"]] == ["L2", "L3", "L4"]
    assert_png(curve_of(trained.adapter))


def test_early_stop_and_the_loss_is_dice_ce(tiny_unet, tmp_path, monkeypatch):
    """(3) The training loss is MONAI DiceCELoss (one-hot labels, softmax, Dice over the labels pooled over the
    batch, as nnU-Net's) and is what progress reports;
    with no improvement (--lr 1e-12: the weights barely move) and --patience 1, training stops early and still writes the adapter."""
    import monai.losses

    seen = {"kwargs": None, "values": []}

    class SpyDiceCE(monai.losses.DiceCELoss):
        def __init__(self, *args, **kwargs):
            seen["kwargs"] = kwargs
            super().__init__(*args, **kwargs)

        def forward(self, *args):
            value = super().forward(*args)
            seen["values"].append(float(value.detach()))
            return value

    monkeypatch.setattr(monai.losses, "DiceCELoss", SpyDiceCE)
    out, ev = tmp_path / "early.safetensors", tmp_path / "early.jsonl"
    assert run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--val-image", CT,
                "--val-label", CT_VERT, "--out", out, "--steps", "6", "--val-every", "1", "--patience", "1",
                "--lr", "1e-12", "--batch-size", "1", "--events", ev]) == 0
    events = read_events(ev)
    steps = progress(events)
    assert seen["kwargs"] == {"to_onehot_y": True, "softmax": True, "include_background": False, "batch": True}
    assert [e["loss"] for e in steps] == pytest.approx(seen["values"], abs=1e-6)
    assert [e["step"] for e in steps] == [1, 2] and steps[-1]["total"] == 6
    assert steps[0]["dice"] == steps[1]["dice"]  # lr 0: nothing changes
    assert any(e["event"] == "log" and e["message"].startswith("early stop at step 2") for e in events)
    assert events[-1]["event"] == "result" and events[-1]["metrics"]["steps"] == 2
    assert out.is_file()
    assert_png(curve_of(out))


def _dice_ce_reference(logits, target):
    """nnU-Net's Dice + CE, written out: soft Dice over the label channels only (not the background), each
    channel's sums pooled over the batch (MONAI's smoothing 1e-5), plus mean cross-entropy."""
    p = torch.softmax(logits, 1)
    onehot = torch.nn.functional.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1).float()
    dims = [0] + list(range(2, logits.dim()))
    inter, total = (p * onehot).sum(dims)[1:], (p + onehot).sum(dims)[1:]
    dice = 1 - ((2 * inter + 1e-5) / (total + 1e-5)).mean()
    return dice + torch.nn.functional.cross_entropy(logits, target[:, 0].long())


def test_the_loss_and_validation_dice_leave_ignored_voxels_out():
    """(3) The training loss is nnU-Net's (Dice over the labels, not the background, pooled over the batch,
    plus cross-entropy: a small structure's Dice is the whole Dice term, not half of it). Voxels labelled
    'ignore' (a partly annotated case) count in neither term: their logits get exactly zero gradient, and the
    loss equals the same loss over the annotated voxels alone. Validation Dice does not see them either."""
    from tcurlora.train import IGNORE_INDEX, DiceCEOnAnnotated
    from tcurlora.train.loop import _dice_per_label

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 7, 5, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 6, 7, 5), generator=g).float()
    loss_fn = DiceCEOnAnnotated()
    with torch.no_grad():
        assert float(loss_fn(logits, target)) == pytest.approx(float(_dice_ce_reference(logits, target)), rel=1e-5)

    target[..., :3, :] = IGNORE_INDEX
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.count_nonzero(logits.grad[..., :3, :]) == 0 and torch.count_nonzero(logits.grad[..., 3:, :]) > 0
    annotated = (target != IGNORE_INDEX)[0, 0]
    n = int(annotated.sum())
    reference = _dice_ce_reference(logits[:, :, annotated].reshape(2, 3, n, 1, 1),
                                   target[:, :, annotated].reshape(2, 1, n, 1, 1))
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    assert float(loss_fn(logits, torch.full_like(target, IGNORE_INDEX)).detach()) == 0.0

    ref = torch.zeros(8, 8, 8, dtype=torch.long)
    ref[2:6, 2:6, 2:6] = 1
    pred = ref.clone()
    ref[:, :, 6:] = IGNORE_INDEX
    pred[:, :, 6:] = 1  # wrong only where nobody annotated
    assert _dice_per_label(pred, ref, 1) == 1.0


def test_a_partly_annotated_case_trains_its_classes_and_never_outputs_ignore(tiny_unet, tmp_path):
    """(3) A case whose upper slabs nobody annotated (value 99, named 'ignore' in the table): it trains; the
    adapter's labels are the base's three vertebrae (no 'ignore' class, so no new head) and segmentations
    never contain 99; a table holding only 'ignore' is one clear error and writes nothing."""
    label = sitk.ReadImage(str(CT_VERT))
    arr = sitk.GetArrayFromImage(label)
    arr[arr.shape[0] // 2:] = 99
    partial = sitk.GetImageFromArray(arr)
    partial.CopyInformation(label)
    sitk.WriteImage(partial, str(tmp_path / "partial_label.nii.gz"))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(VERTEBRAE + [{"value": 99, "name": "ignore"}]))
    out = tmp_path / "partial.safetensors"
    assert run(["finetune", *tiny_unet.args, "--image", CT, "--label", tmp_path / "partial_label.nii.gz",
                "--labels", labels, "--out", out, "--steps", "2", "--batch-size", "1"]) == 0
    assert [(l["value"], l["name"]) for l in manifest_of(out)["labels"]] == [(e["value"], e["name"]) for e in VERTEBRAE]
    assert manifest_of(out)["method"]["config"]["new_head"] is None
    seg = tmp_path / "seg.nii.gz"
    assert run(["segment", *tiny_unet.args, "--adapter", out, CT, "-o", seg]) == 0
    assert 99 not in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(seg))))

    labels.write_text(json.dumps([{"value": 99, "name": "Ignore"}]))
    proc = subprocess.run(cli_subprocess("finetune", *tiny_unet.args, "--image", CT, "--label",
                                         tmp_path / "partial_label.nii.gz", "--labels", labels, "--out",
                                         tmp_path / "x.safetensors", "--steps", "1"),
                          capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert "only the 'ignore' label" in assert_one_line_error(proc)
    assert not (tmp_path / "x.safetensors").exists()


def test_methods_and_rank(tiny_unet, tmp_path):
    """(3) --method tcurlora|lora|decoder|full and --rank: each trains and writes an adapter (with its curve,
    (8)); tCURLoRA trains K·r² values per stack (cores K×r×r); the baselines train more."""
    counts = {}
    for method, rank in (("tcurlora", 2), ("tcurlora", 4), ("lora", 2), ("decoder", 2), ("full", 2)):
        out = tmp_path / f"{method}_r{rank}.safetensors"
        assert run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--val-image", CT,
                    "--val-label", CT_VERT, "--val-every", "1", "--out", out, "--steps", "1", "--batch-size", "1",
                    "--method", method, "--rank", str(rank)]) == 0
        manifest = manifest_of(out)
        assert manifest["method"]["name"] == method
        assert 0.0 <= manifest["provenance"]["validation_dice"] <= 1.0
        assert manifest["method"]["config"]["rank"] == rank
        assert_png(curve_of(out))
        counts[(method, rank)] = manifest["method"]["trainable_values"]
        tensors = adapter_tensors(out)
        if method == "tcurlora":
            stacks = manifest["method"]["stacks"]
            assert stacks
            for stack in stacks:
                r = min(rank, *stack["shape"])
                assert stack["rank"] == r
                assert tuple(tensors[f"stacks.{stack['name']}.delta_u"].shape) == (stack["k"], r, r)
            assert counts[(method, rank)] == sum(s["k"] * s["rank"] ** 2 for s in stacks)
        if method == "lora":
            assert any("lora_A" in k for k in tensors) and manifest["method"]["lora_targets"]
    n_base = sum(v.numel() for v in load_file(str(tiny_unet.weights)).values())
    assert counts[("full", 2)] == n_base
    assert counts[("tcurlora", 2)] < counts[("tcurlora", 4)] < counts[("lora", 2)] < counts[("decoder", 2)] < n_base


def test_validation_leaves_the_base_weights_exact(tiny_base, tmp_path):
    """(3) Validation merges Δ𝒲 into the weights for speed and restores them: after training with
    validation at every step, the frozen base weights are bit for bit those of the weights file."""
    from tcurlora.adapter import base_state_dict
    from tcurlora.train import FinetuneOptions, finetune

    before = {k: v.clone() for k, v in base_state_dict(tiny_base.network).items()}
    result = finetune(tiny_base, [(str(CT), str(CT_VERT))], tmp_path / "a.safetensors",
                      val_pairs=[(str(CT), str(CT_VERT))],
                      options=FinetuneOptions(steps=2, val_every=1, batch_size=1, device="cpu"))
    assert result.metrics.best_validation_dice is not None
    after = base_state_dict(tiny_base.network)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("method", ["lora", "pissa", "dora", "curlora", "lorapt"])
def test_baseline_adapters_can_be_applied(tiny_unet, tmp_path, method):
    """(3)/(5) A baseline adapter (--method lora, pissa, …) is trained by `finetune` and applied by `segment`."""
    out = tmp_path / "lora.safetensors"
    assert run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out", out, "--steps", "2",
                "--batch-size", "1", "--method", method, "--rank", "2", "--lr", "0.05"]) == 0
    assert run(["segment", *tiny_unet.args, "--adapter", out, CT, "-o", tmp_path / "lora.nii.gz",
                "--probabilities"]) == 0
    assert run(["segment", *tiny_unet.args, CT, "-o", tmp_path / "plain.nii.gz", "--probabilities"]) == 0
    lora, plain = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{n}_probabilities.nii.gz")))
                   for n in ("lora", "plain"))
    assert np.abs(lora - plain).max() > 1e-4


# ----------------------------------------------------------------------------------------------------------
# (4) job control: events, SIGTERM, resume, stop file


def test_events_file_protocol(trained):
    """(4) --events FILE: one JSON object per line; progress carries step/total/loss/dice/eta_s; logs;
    the last event is the result with the output paths."""
    kinds = {e["event"] for e in trained.events}
    assert kinds <= {"log", "progress", "warning", "error", "result"}
    assert {"log", "progress", "result"} <= kinds
    for e in progress(trained.events):
        assert {"step", "total", "loss", "dice", "eta_s"} <= set(e)
    result = trained.events[-1]
    assert result["event"] == "result" and [e["event"] for e in trained.events].count("result") == 1
    for key in ("adapter", "curve", "checkpoint"):
        assert Path(result["outputs"][key]).is_file()
    assert Path(result["outputs"]["adapter"]) == trained.adapter


def test_warning_event_for_a_label_no_case_contains(tiny_unet, tmp_path):
    """(4) A warning event (and a 'warning:' console line): L4 occurs in no training case."""
    label = sitk.ReadImage(str(CT_VERT))
    arr = sitk.GetArrayFromImage(label)
    arr[arr == 23] = 0
    no_l4 = sitk.GetImageFromArray(arr)
    no_l4.CopyInformation(label)
    sitk.WriteImage(no_l4, str(tmp_path / "no_l4.nii.gz"))
    ev = tmp_path / "ev.jsonl"
    assert run(["finetune", *tiny_unet.args, "--image", CT, "--label", tmp_path / "no_l4.nii.gz", "--out",
                tmp_path / "a.safetensors", "--steps", "1", "--batch-size", "1", "--events", ev]) == 0
    warnings = [e for e in read_events(ev) if e["event"] == "warning"]
    assert len(warnings) == 1 and "L4" in warnings[0]["message"] and "L2" not in warnings[0]["message"]


def test_cuda_out_of_memory_retries_smaller_then_on_the_cpu(tiny_unet, tmp_path, monkeypatch):
    """(4) An out-of-memory step is retried with a smaller patch, then on the CPU, each announced as a warning.
    No GPU here: the error is raised by a wrapper around the real step, which then runs for real."""
    from tcurlora.train import loop

    real = loop._accumulate
    patches = []

    def flaky(network, transforms, cases, rng, loss_fn, device, amp, options):
        patch = tuple(transforms({"image": cases[0].image, "label": cases[0].label})[0]["image"].shape[1:])
        patches.append(patch)
        if len(patches) <= 2:  # the first patch, then the halved one, "do not fit"
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(network, transforms, cases, rng, loss_fn, device, amp, options)

    monkeypatch.setattr(loop, "_accumulate", flaky)
    ev = tmp_path / "ev.jsonl"
    assert run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out", tmp_path / "a.safetensors",
                "--steps", "2", "--batch-size", "1", "--patch-size", "64", "32", "32", "--events", ev]) == 0
    warnings = [e["message"] for e in read_events(ev) if e["event"] == "warning"]
    assert len(warnings) == 2
    assert "retrying step 1 with patch 32x32x32" in warnings[0] and "continuing on the CPU" in warnings[1]
    assert patches[:3] == [(64, 32, 32), (32, 32, 32), (32, 32, 32)]
    assert progress(read_events(ev))[-1]["step"] == 2 and (tmp_path / "a.safetensors").is_file()


def test_sigterm_checkpoints_and_resume_finishes(trained, tiny_unet, tmp_path):
    """(4) A real `tcurlora finetune` process gets SIGTERM after step 2: exit 3, a checkpoint, a result event
    with cancelled=true, no adapter. `--resume` continues to the same end step, writes the adapter (and its
    curve), and since every step's randomness depends only on (seed, step) it equals the uninterrupted
    reference run bit for bit."""
    out, ev = tmp_path / "vertebrae.safetensors", tmp_path / "events.jsonl"
    argv = finetune_args(tiny_unet, out, "--events", ev)
    proc = subprocess.Popen(cli_subprocess(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=SUBPROCESS_ENV)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if ev.is_file() and any(e["step"] >= 2 for e in progress(read_events(ev))):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be stopped: " + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, stderr
    assert "Traceback" not in stderr
    events = read_events(ev)
    assert events[-1]["event"] == "result" and events[-1]["cancelled"] is True
    stopped = progress(events)[-1]["step"]
    assert 2 <= stopped < TRAIN_STEPS
    assert checkpoint_of(out).is_file() and not out.exists()
    ckpt = torch.load(str(checkpoint_of(out)), map_location="cpu", weights_only=True)
    assert ckpt["step"] == stopped

    assert run(argv + ["--resume"]) == 0
    events = read_events(ev)  # the file is appended to
    assert any(e["event"] == "log" and e["message"] == f"resuming at step {stopped} of {TRAIN_STEPS}"
               for e in events)
    resumed = progress(events)[-1]
    assert resumed["step"] == resumed["total"] == TRAIN_STEPS
    assert events[-1]["event"] == "result" and events[-1]["cancelled"] is False
    assert out.is_file()
    assert_png(curve_of(out))
    reference, resumed_tensors = adapter_tensors(trained.adapter), adapter_tensors(out)
    assert reference.keys() == resumed_tensors.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed_tensors[key]), key


def test_stop_file_cancels_with_a_checkpoint(tiny_unet, tmp_path, monkeypatch):
    """(4) --stop-file: the file appearing after step 2 ends training cleanly: exit 3, checkpoint at step 2,
    result cancelled=true, no adapter."""
    from tcurlora.events import Events

    stop = tmp_path / "STOP"
    plain = Events.progress

    def progress_then_stop(self, phase, step, total, *args, **kwargs):
        plain(self, phase, step, total, *args, **kwargs)
        if step == 2:
            stop.write_text("stop", encoding="utf-8")

    monkeypatch.setattr(Events, "progress", progress_then_stop)
    out, ev = tmp_path / "a.safetensors", tmp_path / "ev.jsonl"
    rc = run(["finetune", *tiny_unet.args, "--image", CT, "--label", CT_VERT, "--out", out, "--steps", "6",
              "--batch-size", "1", "--stop-file", stop, "--events", ev])
    assert rc == 3
    events = read_events(ev)
    assert [e["step"] for e in progress(events)] == [1, 2]
    assert events[-1]["event"] == "result" and events[-1]["cancelled"] is True
    assert Path(events[-1]["outputs"]["checkpoint"]).is_file() and not out.exists()
    assert torch.load(str(checkpoint_of(out)), map_location="cpu", weights_only=True)["step"] == 2


# ----------------------------------------------------------------------------------------------------------
# (5) inference


def test_segment_merges_the_adapter(trained, tiny_unet, tmp_path, monkeypatch):
    """(5) The adapter is merged into the weights before the sliding window, and the merged network predicts
    what the unmerged adapted one does (probabilities within 1e-5), which differs from the base alone."""
    import tcurlora.infer as infer
    from tcurlora.models import load_base

    def probabilities(name):
        img = sitk.ReadImage(str(tmp_path / f"{name}_probabilities.nii.gz"))
        assert img.GetNumberOfComponentsPerPixel() == 3  # L2, L3, L4 (background left out)
        assert_same_grid(img, sitk.ReadImage(str(CT)), atol=1e-5)
        return sitk.GetArrayFromImage(img)

    base = load_base(str(tiny_unet.spec), weights=str(tiny_unet.weights))
    infer.segment(base, [str(CT)], str(tmp_path / "merged.nii.gz"), adapter=str(trained.adapter), device="cpu",
                  probabilities=True)
    assert get_tuner(base.network).merged == "segment"
    merged = probabilities("merged")
    assert merged.min() >= 0 and merged.max() <= 1

    monkeypatch.setattr(infer, "merge_adapter", lambda network: network)
    assert run(["segment", *tiny_unet.args, "--adapter", trained.adapter, CT, "-o", tmp_path / "unmerged.nii.gz",
                "--probabilities"]) == 0
    np.testing.assert_allclose(merged, probabilities("unmerged"), rtol=0, atol=1e-5)

    assert run(["segment", *tiny_unet.args, CT, "-o", tmp_path / "plain.nii.gz", "--probabilities"]) == 0
    assert np.abs(merged - probabilities("plain")).max() > 1e-4


def test_segment_stops_between_sliding_windows(tiny_base, tmp_path):
    """(5) A stop file is honoured between two sliding windows of one volume, not only between volumes:
    the network ran once, the result says cancelled, and no segmentation was written."""
    import tcurlora.infer as infer

    stop_file, out = tmp_path / "stop", tmp_path / "ct.seg.nrrd"
    tiny_base.inference_roi = (16, 16, 16)  # many windows over the CT crop
    calls = []

    def first_window_requests_a_stop(module, args):
        calls.append(1)
        stop_file.touch()

    hook = tiny_base.network.register_forward_pre_hook(first_window_requests_a_stop)
    result = infer.segment(tiny_base, [str(CT)], str(out), device="cpu", stop_file=str(stop_file))
    assert result.cancelled and result.metrics_dict()["segmented"] == 0
    assert len(calls) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [stop_file]

    stop_file.unlink()  # without the stop request the same call runs every window and writes the output
    calls.clear()
    hook.remove()
    tiny_base.network.register_forward_pre_hook(lambda module, args: calls.append(1))
    assert not infer.segment(tiny_base, [str(CT)], str(out), device="cpu", stop_file=str(stop_file)).cancelled
    assert len(calls) > 1 and out.exists()


def test_segment_outputs_tta_largest_component_and_folders(trained, tiny_unet, oblique_ct, tmp_path,
                                                            capsys):
    """(5) .seg.nrrd with the adapter's segment names, colours and values (read back with slicerio);
    --largest-component keeps one component per label (exactly what --all-components has, reduced);
    --tta changes the probabilities; a NIfTI label map; a folder of inputs in one call (--events -)."""
    from scipy import ndimage

    from tcurlora.infer import keep_largest_component

    common = ["segment", *tiny_unet.args, "--adapter", trained.adapter, CT]
    assert run(common + ["-o", tmp_path / "all.seg.nrrd", "--all-components"]) == 0
    assert run(common + ["-o", tmp_path / "lcc.seg.nrrd", "--largest-component"]) == 0
    seg = slicerio.read_segmentation(str(tmp_path / "lcc.seg.nrrd"))
    assert [(s["name"], s["labelValue"]) for s in seg["segments"]] == [("L2", 21), ("L3", 22), ("L4", 23)]
    for segment, entry in zip(seg["segments"], VERTEBRAE):
        np.testing.assert_allclose(segment["color"], entry["color"], atol=1e-5)
    lcc = np.asarray(seg["voxels"])
    every = np.asarray(slicerio.read_segmentation(str(tmp_path / "all.seg.nrrd"))["voxels"])
    assert set(np.unique(lcc).tolist()) <= VALUES and len(np.unique(lcc)) > 1
    for value in (21, 22, 23):
        assert ndimage.label(lcc == value, structure=np.ones((3, 3, 3)))[1] <= 1
    assert np.array_equal(lcc, keep_largest_component(every, [21, 22, 23]))
    assert any(ndimage.label(every == v, structure=np.ones((3, 3, 3)))[1] > 1 for v in (21, 22, 23)), \
        "the plain prediction has one component per label already: --largest-component is not exercised"

    assert run(common + ["-o", tmp_path / "tta.nii.gz", "--tta", "--probabilities"]) == 0
    assert run(common + ["-o", tmp_path / "notta.nii.gz", "--probabilities"]) == 0
    tta = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "tta_probabilities.nii.gz")))
    notta = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "notta_probabilities.nii.gz")))
    assert np.abs(tta - notta).max() > 1e-4
    label_map = sitk.ReadImage(str(tmp_path / "notta.nii.gz"))
    assert "int" in label_map.GetPixelIDTypeAsString()
    assert set(np.unique(sitk.GetArrayViewFromImage(label_map)).tolist()) <= VALUES
    assert_same_grid(label_map, sitk.ReadImage(str(CT)), atol=1e-5)

    folder = tmp_path / "inputs"
    folder.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(CT)), str(folder / "first.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(oblique_ct)), str(folder / "second.mha"))
    capsys.readouterr()
    assert run(["segment", *tiny_unet.args, "--adapter", trained.adapter, folder, "-o", tmp_path / "outputs",
                "--events", "-"]) == 0
    stdout = capsys.readouterr().out
    events = [json.loads(line) for line in stdout.splitlines()]  # --events -: only JSON lines on stdout
    assert [(e["step"], e["total"]) for e in progress(events)] == [(1, 2), (2, 2)]
    assert events[-1]["event"] == "result"
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["first.seg.nrrd", "second.seg.nrrd"]
    second = sitk.ReadImage(str(tmp_path / "outputs" / "second.seg.nrrd"))
    assert_same_grid(second, sitk.ReadImage(str(oblique_ct)), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# (6) evaluate


def test_evaluate_csv_and_json(tmp_path, capsys):
    """(6) `tcurlora evaluate PRED REF` on folders: Dice and HD95 per label and case, as CSV (stdout or
    --csv FILE) and as --json; a .seg.nrrd prediction is compared with a NIfTI reference."""
    from tcurlora.io import write_segmentation
    from tcurlora.metrics import dice, hd95

    ref = sitk.ReadImage(str(CT_VERT))
    arr = sitk.GetArrayFromImage(ref)
    shifted = np.zeros_like(arr)
    shifted[:, :, 1:] = arr[:, :, :-1]  # one voxel along i
    moved = sitk.GetImageFromArray(shifted)
    moved.CopyInformation(ref)
    preds, refs = tmp_path / "pred", tmp_path / "ref"
    preds.mkdir()
    refs.mkdir()
    sitk.WriteImage(ref, str(refs / "same.nii.gz"))
    sitk.WriteImage(ref, str(refs / "moved.nii.gz"))
    sitk.WriteImage(ref, str(preds / "same.nii.gz"))
    write_segmentation(str(preds / "moved.seg.nrrd"), moved, VERTEBRAE)

    assert run(["evaluate", preds, refs, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["case"], r["label"]): r for r in report["rows"]}
    assert set(rows) == {(c, v) for c in ("same", "moved") for v in (21, 22, 23)}
    spacing = ref.GetSpacing()[::-1]
    for v in (21, 22, 23):
        assert rows[("same", v)]["dice"] == 1.0 and rows[("same", v)]["hd95_mm"] == 0.0
        expected_dice = dice(shifted, arr, v)
        assert 0.5 < expected_dice < 1.0
        assert rows[("moved", v)]["dice"] == pytest.approx(expected_dice)
        assert rows[("moved", v)]["hd95_mm"] == pytest.approx(hd95(shifted, arr, v, spacing))
        assert 0.0 < rows[("moved", v)]["hd95_mm"] <= 1.5 + 1e-6  # a 1.5 mm translation
    assert "2 cases" in report["summary"]

    assert run(["evaluate", preds, refs]) == 0
    captured = capsys.readouterr()
    table = list(csv.DictReader(_io.StringIO(captured.out)))
    assert len(table) == 6 and set(table[0]) >= {"case", "label", "name", "dice", "hd95_mm"}
    assert {(r["case"], int(r["label"])): float(r["dice"]) for r in table} == \
        pytest.approx({k: r["dice"] for k, r in rows.items()})
    assert "Dice" in captured.err  # the summary line goes to stderr when the CSV is on stdout

    assert run(["evaluate", preds / "moved.seg.nrrd", refs / "moved.nii.gz", "--csv", tmp_path / "m.csv"]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "m.csv", encoding="utf-8")))) == 3


# ----------------------------------------------------------------------------------------------------------
# (7) the worker


def test_worker_runs_a_finetune_job(tiny_unet, tmp_path):
    """(7) `python -m tcurlora.worker JOB.json` (a real process): stdout is JSON lines only, the last is
    the result; the adapter and its curve (8) are written."""
    out = tmp_path / "worker.safetensors"
    job = {"version": 1, "command": "finetune", "base": str(tiny_unet.spec), "weights": str(tiny_unet.weights),
           "device": "cpu", "cases": [{"image": str(CT), "label": str(CT_VERT)}],
           "validation": [{"image": str(CT), "label": str(CT_VERT)}], "out": str(out), "steps": 2,
           "val_every": 2, "batch_size": 1, "stop_file": str(tmp_path / "STOP")}
    (tmp_path / "job.json").write_text(json.dumps(job), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "tcurlora.worker", str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert events[-1]["event"] == "result" and events[-1]["cancelled"] is False
    assert [e["step"] for e in progress(events)] == [1, 2]
    assert progress(events)[-1]["dice"] is not None
    assert Path(events[-1]["outputs"]["adapter"]) == out and out.is_file()
    assert_png(curve_of(out))


@pytest.mark.parametrize("method", ["tcurlora", "lora"])
def test_a_new_head_starts_each_label_from_the_base_channel_of_its_name_or_at_a_low_prior(method):
    """New labels (a new head, here deepbet's transposed-conv output layer): the background and a label the
    base has (matched by name, any case) start as the base's channels, whatever their position; a label new
    to the base starts as the base's background less log(99), i.e. at 1 % of the background's probability
    everywhere (not as a copy of whatever base channel sat at its position: a new 'lesion' as 'brain')."""
    from types import SimpleNamespace

    from tcurlora.adapter import inject_adapter, set_active_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.models.deepbet import LinkNet3d
    from tcurlora.train.setup import _start_new_head

    torch.manual_seed(0)
    network = LinkNet3d().eval()
    x = torch.randn(1, 1, 64, 64, 64)  # deepbet's bottom level needs > 1 voxel (instance norm)
    with torch.no_grad():
        base_out = network(x)
    base = SimpleNamespace(head="tp_conv2", labels=[{"value": 1, "name": "Brain"}])
    table = [{"value": 1, "name": "lesion"}, {"value": 2, "name": "brain"}]
    inject_adapter(network, TCURLoRAConfig(method=method, rank=2, target_modules=["conv.0"] if method == "lora" else [],
                                           new_head={"module": "tp_conv2", "out_channels": 3}), "finetune")
    _start_new_head(network, base, table)
    with torch.no_grad():
        out = network(x)
    assert torch.allclose(out[:, 0], base_out[:, 0], atol=1e-5)  # background
    assert torch.allclose(out[:, 2], base_out[:, 1], atol=1e-5)  # 'brain', at another position than the base's
    assert torch.allclose(out[:, 1], base_out[:, 0] - math.log(99), atol=1e-5)  # 'lesion': new, at a low prior
    set_active_adapter(network, None)
    with torch.no_grad():
        assert torch.equal(network(x), base_out)  # the base's own head is untouched
