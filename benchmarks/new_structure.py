"""New-structure benchmark: teach a pretrained base a label it never had (a new output head), on two images.

Tasks (``--task``), each leave-one-image-out in both directions:

* ``ventricles`` (default): the Neuromorphometrics atlas's lateral ventricles (CAT12, in the deepmriprep wheel)
  on CAT12's skull-stripped T1 template (the atlas's own template, 1 mm) and on FSL's MNI152 head (the atlas
  resampled onto it by world coordinates): two T1 images of one space (:func:`ventricle_cases`).
* ``lesion``: the two pyradiomics brain MRI cases with manual lesion labels, ``brain1`` (≈ 16 ml) and
  ``brain2`` (≈ 1.8 ml), 0.78 × 0.78 × 6.5 mm slices.

The label differs from the base's, so ``tcurlora.train.finetune`` gives every method a new output head.
Every method gets the same steps, batch and seeds, at the package's default learning rates or (``--rates
comparison``) at the rate ``benchmarks/comparison.py`` chose for it; ``--lr-scale`` multiplies them (a
diagnostic).

Two bases, both brain-MRI nets whose labels ({brain}) differ from the task's:

* ``deepbet``: the real pretrained deepbet brain-extraction net (``quality.load_benchmark_base``).
* ``nnunet``: an nnU-Net v2 folder made by nnU-Net's own planner and stock ``nnUNetTrainer`` (started as
  ``Testing/nnunet_fixture.py`` starts it), trained here on brain extraction of the two real heads ``mni152``
  and ``robex`` (each plus mirrored copies), with narrow plans so it trains in minutes on one CPU core.  It is
  built once and cached under ``<cache>/benchmarks/new_structure_nnunet``.

Per held-out image: Dice and HD95 (``tcurlora.metrics.evaluate``) and the Dice on the training image ("fit");
per run: trainable values (the new head included), adapter file size, train time.  Two images, not a cohort:
the numbers compare methods on one task, they validate nothing clinically.

    OMP_NUM_THREADS=1 python benchmarks/new_structure.py --base deepbet --resolution 96 --steps 60 --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/new_structure.py --base nnunet --steps 60 --seeds 0 1 2 --rates comparison
    python benchmarks/new_structure.py --report     # tables and plot from the runs recorded so far

Runs are appended to ``<out>/new_structure_runs.jsonl`` and skipped when already there for the same base weights
(resumable); the tables show the runs of the weights recorded last for each base. A run records its head start
(``--head-start``, passed to ``finetune`` for every method: the prototype, or the low prior) and how training
padded patches (``patch_pad``); nnU-Net runs from before patches were padded with zeros are shown apart.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "Testing"))

from quality import BASELINE_NAMES, adapt_and_segment, load_benchmark_base, weights_tag  # noqa: E402  (benchmarks/ is on sys.path as a script)
from new_structure_report import (CORE_OPTIONS, ENGINE_HEAD_START, HEAD_STARTS, PATCH_PAD, RATES,  # noqa: E402
                                  RUNS_FILE, TASK_IMAGES, TASK_LABELS, head_start_of, method_of, options_of,
                                  patch_pad_of, rates_of, task_of, write_report)
ATLAS_DIR = "deepmriprep/data/templates"
VENTRICLES = ("Right Lateral Ventricle", "Left Lateral Ventricle")  # Neuromorphometrics structure names


def lesion_cases(work: Path) -> dict:
    """The pyradiomics cases as shipped: image and manual lesion label."""
    from tcurlora.datasets import get_scan

    return {name: tuple(str(p) for p in get_scan(name)) for name in ("brain1", "brain2")}


def ventricle_cases(work: Path) -> dict:
    """Two T1 templates of MNI152 space with the Neuromorphometrics atlas's lateral ventricles on their grids:
    CAT12's skull-stripped template (the atlas's own template, resampled from 0.5 to 1 mm) and FSL's MNI152
    head (the atlas resampled by world coordinates: the two templates are different averages, so there the
    label is the atlas's, not a tracing of that image)."""
    import numpy as np
    import SimpleITK as sitk

    from tcurlora.datasets import DEEPMRIPREP_PIN, get_scan
    from tcurlora.fetch import extract_member
    from tcurlora.io import write_image  # atomic, under a unique temporary name: two runs may build the cases at once

    work.mkdir(parents=True, exist_ok=True)
    cases = {"cat12": (work / "cat12_t1_1mm.nii.gz", work / "cat12_ventricles.nii.gz"),
             "mni152": (Path(get_scan("mni152")[0]), work / "mni152_ventricles.nii.gz")}
    if not all(label.is_file() for _, label in cases.values()) or not cases["cat12"][0].is_file():
        atlas = sitk.ReadImage(str(extract_member(DEEPMRIPREP_PIN, f"{ATLAS_DIR}/neuromorphometrics.nii.gz")))
        names = extract_member(DEEPMRIPREP_PIN, f"{ATLAS_DIR}/neuromorphometrics.csv").read_text().splitlines()
        ids = [int(row.split(";")[1]) for row in names[1:] if row.split(";")[2] in VENTRICLES]
        assert len(ids) == len(VENTRICLES), f"neuromorphometrics.csv: {VENTRICLES} not found"
        mask = sitk.GetImageFromArray(np.isin(sitk.GetArrayFromImage(atlas), ids).astype(np.uint8))
        mask.CopyInformation(atlas)
        template = sitk.ReadImage(str(extract_member(DEEPMRIPREP_PIN, f"{ATLAS_DIR}/Template_05mm_bet.nii.gz")),
                                  sitk.sitkFloat32)
        size = [int(round(n * sp)) for n, sp in zip(template.GetSize(), template.GetSpacing())]  # to 1 mm
        template = sitk.Resample(template, size, sitk.Transform(), sitk.sitkLinear, template.GetOrigin(),
                                 (1.0, 1.0, 1.0), template.GetDirection(), 0.0, sitk.sitkFloat32)
        write_image(cases["cat12"][0], template)
        for image_path, label_path in cases.values():
            image = sitk.ReadImage(str(image_path))
            write_image(label_path, sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    return {name: (str(image), str(label)) for name, (image, label) in cases.items()}


def comparison_rates(out: Path) -> dict:
    """method label -> the learning rate benchmarks/comparison.py chose for it on deepbet's validation split."""
    path = out / "comparison_summary.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run benchmarks/comparison.py first (or use --rates default)")
    return {row["method"]: row["lr"] for row in json.loads(path.read_text()) if row.get("lr")}


#: task -> (label table, the two cases in table order, the function that gives them)
TASKS = {task: (TASK_LABELS[task], TASK_IMAGES[task], cases)
         for task, cases in (("lesion", lesion_cases), ("ventricles", ventricle_cases))}


# the nnU-Net base: brain extraction on the two real heads
NNUNET_DATASET_ID = 902
NNUNET_DATASET = f"Dataset{NNUNET_DATASET_ID}_BrainHeads"
NNUNET_PLANS = "nnUNetPlansNarrow"
NNUNET_SPACING_MM = 3.0  # the heads are resampled to this before planning: a patch one CPU core can train
NNUNET_FLIPS = [(), (2,), (1,)]  # each head and two mirrored copies (array axes): 6 cases, nnU-Net's 5 folds
NNUNET_ITERATIONS = 400  # the stock trainer, 1 epoch of this many iterations


def methods(preset: str) -> list:
    """(label, FinetuneOptions kwargs) in table order: the rank-8 adapters, then decoder-only and full."""
    rows = [(f"{BASELINE_NAMES[m]} r=8", {"method": m, "rank": 8, "preset": preset})
            for m in ("tcurlora", "curlora", "lora", "pissa", "dora", "lorapt")]
    return rows + [("decoder-only", {"method": "decoder"}), ("full fine-tuning", {"method": "full"})]


# --- the nnU-Net base ------------------------------------------------------------------------------------

def nnunet_base_folder(work: Path) -> Path:
    return work / "nnUNet_results" / NNUNET_DATASET / f"nnUNetTrainer__{NNUNET_PLANS}__3d_fullres"


def write_heads_dataset(raw: Path) -> None:
    """nnU-Net raw dataset: mni152 and robex (resampled to NNUNET_SPACING_MM) and mirrored copies, brain = 1."""
    import numpy as np
    import SimpleITK as sitk

    from tcurlora.datasets import get_scan

    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    n = 0
    for name in ("mni152", "robex"):
        image_path, mask_path = get_scan(name)
        image, mask = sitk.ReadImage(str(image_path), sitk.sitkFloat32), sitk.ReadImage(str(mask_path))
        size = [int(round(s * sp / NNUNET_SPACING_MM)) for s, sp in zip(image.GetSize(), image.GetSpacing())]
        spacing = [NNUNET_SPACING_MM] * 3
        image = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                              image.GetDirection(), 0.0, sitk.sitkFloat32)
        mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        x, y = sitk.GetArrayFromImage(image), (sitk.GetArrayFromImage(mask) > 0).astype(np.uint8)
        for axes in NNUNET_FLIPS:
            for array, path in ((x, raw / "imagesTr" / f"head_{n:03d}_0000.nii.gz"),
                                (y, raw / "labelsTr" / f"head_{n:03d}.nii.gz")):
                out = sitk.GetImageFromArray(np.ascontiguousarray(np.flip(array, axes) if axes else array))
                out.CopyInformation(image)
                sitk.WriteImage(out, str(path))
            n += 1
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "brain": 1}, "numTraining": n,
        "file_ending": ".nii.gz", "name": "mni152 and robex heads, brain masks, mirrored copies"}, indent=2))


def build_nnunet_base(work: Path, iterations: int = NNUNET_ITERATIONS) -> Path:
    """The cached trained-model folder, built with nnU-Net's own commands when missing."""
    from nnunet_fixture import plan_and_train

    folder = nnunet_base_folder(work)
    if (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return folder
    t0 = time.time()  # planning, preprocessing and training
    folder = plan_and_train(work, NNUNET_DATASET_ID, NNUNET_DATASET, write_heads_dataset, plans_name=NNUNET_PLANS,
                            first=8, widest=64, folds=(0,), iterations=iterations, val_iterations=2)
    (folder / "build_seconds.txt").write_text(f"{time.time() - t0:.0f}\n")
    return folder


def nnunet_sanity(base, work: Path) -> dict:
    """The nnU-Net base's own brain Dice on the robex head at its native 1.5 mm (a head it was trained on, resampled)."""
    from tcurlora.datasets import get_scan
    from tcurlora.events import Events
    from tcurlora.infer import segment
    from tcurlora.metrics import evaluate

    image, mask = get_scan("robex")
    out = work / "sanity_robex_brain.nii.gz"
    segment(base, [str(image)], str(out), device="cpu", tta=False, events=Events())
    return evaluate([str(out)], [str(mask)])[0]


# --- the runs ------------------------------------------------------------------------------------------------

def load_base_for(args):
    from tcurlora.models import load_base

    if args.base == "deepbet":
        return load_benchmark_base("deepbet", args.resolution), args.resolution
    folder = build_nnunet_base(Path(args.nnunet_work))
    base = load_base(str(folder), fold=0)
    return base, int(max(base.preprocessing.patch_size))


def run(args) -> None:
    import torch

    from tcurlora.metrics import evaluate
    from tcurlora.protocol import DEFAULT_LR, MAX_STEPS
    from tcurlora.train import FinetuneOptions

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) / args.task / args.base
    work.mkdir(parents=True, exist_ok=True)
    runs_file = out / RUNS_FILE
    done = {}
    if runs_file.is_file():
        for line in runs_file.read_text().splitlines():
            r = json.loads(line)
            done[(task_of(r), rates_of(r), patch_pad_of(r), head_start_of(r), options_of(r), r["base"], r.get("weights"), r["method"], r["train"], r["seed"], r["steps"],
                  r["resolution"])] = r
    table, names, case_files = TASKS[args.task]
    cases = case_files(Path(args.work) / "cases")
    directions = [names, names[::-1]][:args.directions]
    base, resolution = load_base_for(args)
    if args.base == "nnunet":
        sanity = nnunet_sanity(base, work)
        print(f"nnU-Net base {base.name}: brain Dice {sanity['dice']:.3f}, HD95 {sanity['hd95_mm']:.1f} mm on robex",
              flush=True)
        (out / "new_structure_nnunet_base.json").write_text(json.dumps({
            "folder": nnunet_base_folder(Path(".")).as_posix(), "patch_size": list(base.preprocessing.patch_size),
            "iterations": NNUNET_ITERATIONS, "build_seconds": float(
                (nnunet_base_folder(Path(args.nnunet_work)) / "build_seconds.txt").read_text()),
            "spacing": list(base.preprocessing.spacing) if base.preprocessing.spacing else None,
            "parameters": sum(p.numel() for p in base.network.parameters()),
            "brain_dice_robex": sanity["dice"], "brain_hd95_mm_robex": sanity["hd95_mm"]}, indent=2) + "\n")
    pristine = copy.deepcopy(base.network)
    weights = weights_tag(pristine)
    preset = "conv"
    # seed by seed: a run cut short still has every method at the first seeds
    chosen = comparison_rates(out) if args.rates == "comparison" else {}
    rates = args.rates if args.lr_scale == 1 else f"{args.rates}×{args.lr_scale:g}"
    for seed in args.seeds:
        for label, kwargs in methods(preset):
            if args.methods and not any(m in label for m in args.methods):
                continue
            kwargs = {**kwargs, "lr": args.lr_scale * (chosen[label] if chosen else DEFAULT_LR[kwargs["method"]])}
            tcurlora = kwargs["method"] == "tcurlora"
            basis = args.basis if tcurlora else "cur"
            core = {k: getattr(args, k) for k, (default, _) in CORE_OPTIONS.items()
                    if tcurlora and getattr(args, k) != default}
            for train, test in directions:
                key = (args.task, rates, PATCH_PAD, args.head_start, options_of({"basis": basis, "options": core}), args.base, weights,
                       label, train, seed, args.steps, resolution)
                if key in done:
                    continue
                same = done.get((key[0], "default") + key[2:])
                if rates != "default" and same is not None and same["lr"] == kwargs["lr"]:
                    # the chosen rate is the default: that run is this run
                    with open(runs_file, "a") as f:
                        f.write(json.dumps({**same, "rates": rates, "reused": True}) + "\n")
                    continue
                # the run's whole key in the name: runs of one method at other rates or options may run at once
                tag = "".join(c if c.isalnum() else "_" for c in label) + "_" + hashlib.sha256(
                    json.dumps(key, default=str).encode()).hexdigest()[:10]
                seg = work / f"{tag}_{train}_to_{test}_s{seed}.nii.gz"
                # the training case too: did the method fit what it saw (tells "did not learn" from "did not carry
                # over to the other case")
                seen = seg.with_name(seg.name.replace(".nii.gz", "_train.nii.gz"))
                # exactly the row's options (finetune's new-label recipe would otherwise fill in its own)
                options = FinetuneOptions(steps=args.steps, batch_size=args.batch, seed=seed, device="cpu", basis=basis,
                                          val_every=MAX_STEPS, new_label_recipe=False,
                                          head_start=ENGINE_HEAD_START[args.head_start], **core, **kwargs)
                # the network's own output, without the deepbet base's largest-component post-processing (a
                # brain-mask rule): the same for both bases
                got = adapt_and_segment(base, pristine, cases[train], options,
                                        [(cases[test][0], seg), (cases[train][0], seen)], labels=table,
                                        largest_component=False)
                train_s = got["train_s"]
                m = evaluate([str(seg)], [cases[test][1]], label_table=table)[0]
                fit = evaluate([str(seen)], [cases[train][1]], label_table=table)[0]
                row = {"task": args.task, "rates": rates, "patch_pad": PATCH_PAD, "head_start": args.head_start, "basis": basis,
                       **({"options": core} if core else {}), "base": args.base, "weights": weights, "method": label, "train": train, "test": test, "seed": seed,
                       "steps": args.steps, "batch": args.batch, "lr": kwargs["lr"],
                       "resolution": resolution, "dice": m["dice"], "hd95_mm": m["hd95_mm"], "dice_train_case": fit["dice"],
                       "trainable": got["trainable"], "adapter_bytes": got["adapter_bytes"],
                       "train_s": round(train_s, 1), "segment_s": round(got["segment_s"][0], 1),
                       "final_loss": got["final_loss"]}
                with open(runs_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"  {args.base:8s} {method_of(row):22s} {train}->{test} seed {seed}: Dice {row['dice']:.3f}  "
                      f"HD95 {row['hd95_mm']:6.2f} mm  (train case {fit['dice']:.3f})  trainable {row['trainable']:>9,d}  "
                      f"file {row['adapter_bytes'] / 1024:8.1f} KB  train {train_s:5.0f} s  loss {row['final_loss']:.3f}",
                      flush=True)


# --- tables and plot -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=["deepbet", "nnunet"])
    parser.add_argument("--rates", choices=sorted(RATES), default="default",
                        help="default: the package's learning rates; comparison: each method's rate chosen by "
                             "benchmarks/comparison.py (comparison_summary.json)")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiply every method's rate (a diagnostic)")
    parser.add_argument("--task", choices=sorted(TASKS), default="ventricles",
                        help="ventricles: CAT12 template <-> FSL MNI152 head, atlas labels; lesion: pyradiomics brain1 <-> brain2")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--directions", type=int, default=2, choices=[1, 2],
                        help="2: each image to the other; 1: the first image of the task to the second only")
    parser.add_argument("--resolution", type=int, default=96, help="deepbet model input (256 = its real setting)")
    parser.add_argument("--head-start", choices=HEAD_STARTS, default=HEAD_STARTS[0],
                        help="a new label's head channel, for every method: at its prototype or at a low prior")
    parser.add_argument("--basis", choices=["cur", "orthonormal"], default="cur",
                        help="tCURLoRA's core basis (TCURLoRAConfig.basis); the other methods have none")
    parser.add_argument("--rank-stable", action="store_true", help="tCURLoRA: TCURLoRAConfig.rank_stable")
    parser.add_argument("--norm-scale-shift", action="store_true", help="tCURLoRA: TCURLoRAConfig.norm_scale_shift")
    parser.add_argument("--selection", choices=["deterministic", "gradient"], default="deterministic",
                        help="tCURLoRA's columns and rows (TCURLoRAConfig.selection)")
    parser.add_argument("--rank-budget", type=int, default=None, help="tCURLoRA: TCURLoRAConfig.rank_budget")
    parser.add_argument("--methods", nargs="*", help="only methods whose label contains one of these strings")
    parser.add_argument("--report", action="store_true", help="only write the table and plot from recorded runs")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks-results"))
    parser.add_argument("--work", default=None, help="adapters and segmentations (default: cache)")
    parser.add_argument("--nnunet-work", default=None, help="the nnU-Net base's folders (default: cache)")
    args = parser.parse_args(argv)
    from tcurlora.fetch import cache_dir

    args.work = args.work or str(cache_dir() / "benchmarks" / "work" / "new_structure")
    args.nnunet_work = args.nnunet_work or str(cache_dir() / "benchmarks" / "new_structure_nnunet")
    if not args.report:
        if not args.base:
            parser.error("--base is required (or --report)")
        run(args)
    print(write_report(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
