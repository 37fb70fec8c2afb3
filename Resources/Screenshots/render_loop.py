"""Run the clinician's loop through the Slicer side, on real scans, and draw it (docs/slicer.md, step 4-6).

    PYTHONPATH=. python Resources/Screenshots/render_loop.py [--steps 24]

Needs the ``slicer-core`` wheel (real MRML), the engine's packages and the cached deepbet weights and scans
(``tcurlora.fetch``, pinned by sha256). Everything is real and goes through the code the modules use:

1. two corrected cases are added to a case library on disk (``TCURLoRALib.caselibrary``): the FSL MNI152 T1
   head (training) and the ROBEX reference T1 head (validation), each with the demo's site convention as
   the correction (the expert brain mask grown by 3 mm, ``tcurlora.demo.site_convention``);
2. ``TCURLoRALib.logic.LibraryLogic.train`` trains a tCURLoRA adapter for deepbet with the real worker
   process (CPU), then segments the validation case with it and records its Dice in the library;
3. the validation case is also segmented by the base model alone (zero-shot), for comparison.

The picture: the live training chart's data (loss, validation Dice), the case table as TCUR Finetune shows
it, and the validation head with both results against the site's mask.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)


def add_corrected_case(scene, library, scan: str, validation: bool, folder: str):
    from pathlib import Path

    from tcurlora.datasets import get_scan
    from tcurlora.demo import site_convention
    from TCURLoRALib import nodeio as nio

    image, mask = get_scan(scan)
    site = site_convention(str(image), str(mask), Path(folder) / f"{scan}_site.nii.gz")
    volume = nio.readVolume(scene, str(image), name=f"{scan} T1")
    segmentation = nio.readSegmentation(str(site), scene=scene, name=f"{scan} corrected",
                                        referenceVolumeNode=volume)
    nio.applyLabels(segmentation, [{"value": 1, "name": "Brain", "color": [0.949, 0.757, 0.659]}])
    library.addCase(volume, segmentation, name=f"{scan} head", validation=validation)
    return volume, segmentation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import slicer
    from render_screenshots import anatomical_slice
    from TCURLoRALib import caselibrary, engine, logic, models, nodeio, plots, tasks

    nodeio.registerSegmentationConverterRules()
    scene = slicer.vtkMRMLScene()
    work = tempfile.mkdtemp(prefix="tcurlora-loop-")
    library = caselibrary.CaseLibrary(os.path.join(work, "library"), "Demo site")
    add_corrected_case(scene, library, "mni152", False, work)
    robex, robexSite = add_corrected_case(scene, library, "robex", True, work)

    launcher = engine.defaultLauncher(pythonExecutable=sys.executable, pythonpath=[REPO])
    segmentLogic = logic.SegmentLogic(launcher=launcher, dependencyInstaller=lambda: True)
    base = segmentLogic.modelEntry("deepbet")
    baseLabels = list(base["labels"])
    curves = plots.TrainingCurves(scene, name="Demo site training")
    runner = tasks.TaskRunner()
    log = []

    def start(pairs, validationCount, onEnd):  # what TCUR Finetune's logic does with its settings
        jobLabels, table, segmentToValue = models.labelsFromMapping(
            models.defaultLabelMapping(["Brain"], baseLabels), baseLabels)
        task = tasks.FinetuneTask(pairs[:len(pairs) - validationCount], models.ModelRegistry.jobBase(base), launcher,
                                  segmentToValue, table, jobLabels, validation=pairs[len(pairs) - validationCount:],
                                  steps=args.steps, rank=8, device="cpu", adapterStore=os.path.join(work, "adapters"),
                                  adapterName="demo-site", curves=curves, onFinished=onEnd, onLog=log.append)
        return runner.run(task)

    results = {}
    loop = logic.LibraryLogic(library, scene, segmentLogic)
    train = loop.train(start, "deepbet", device="cpu", onValidated=results.update)
    if runner.waitForCompletion(7200) != tasks.DONE:
        print("training failed: " + train.errorMessage, file=sys.stderr)
        return 1
    segmentLogic.waitForCompletion(1800)
    [(validationId, adapted)] = results.items()

    # the same validation head: base alone, and with the adapter (kept for the picture this time)
    outputs = {}
    for key, adapter in (("zero-shot", None), ("adapted", train.adapterPath)):
        task = segmentLogic.segment(robex, modelName="deepbet", adapterPath=adapter, device="cpu",
                                    createSurfaces=False)
        if segmentLogic.waitForCompletion(1800) != tasks.DONE:
            print(f"segmentation failed: {task.errorMessage}", file=sys.stderr)
            return 1
        outputs[key] = nodeio.labelArrayFromSegmentation(task.outputSegmentation, robex) > 0
    reference = nodeio.labelArrayFromSegmentation(robexSite, robex) > 0
    zeroShot = caselibrary.diceByName(reference.astype(np.uint8), {1: "Brain"},
                                      outputs["zero-shot"].astype(np.uint8), {1: "Brain"})["Brain"]

    steps, losses = curves.values("loss")
    diceSteps, dices = curves.values("dice")
    figure = plt.figure(figsize=(15, 5.0), facecolor="white")
    chart = figure.add_subplot(1, 3, 1)
    chart.plot(steps, losses, color="#1f77b4", label="training loss")
    chart.set_xlabel("step")
    chart.set_ylabel("loss")
    if dices:
        twin = chart.twinx()
        twin.plot(diceSteps, dices, "o-", color="#d62728", label="validation Dice")
        twin.set_ylabel("validation Dice")
    chart.set_title("TCUR Finetune: the live chart's data")
    table = figure.add_subplot(1, 3, 2)
    table.axis("off")
    rows = caselibrary.caseTableRows(library.cases())
    cell = table.table(cellText=rows, colLabels=["Case", "Use", "Segments", "Validation Dice"], loc="center")
    cell.scale(1, 2)
    table.set_title("Case library 'Demo site' (on disk)")
    table.text(0.5, 0.18, f"validation head: Dice {zeroShot:.3f} zero-shot -> {adapted['Brain']:.3f} adapted\n"
               f"({args.steps} steps, rank 8, CPU; one training head: not a cohort)", ha="center",
               transform=table.transAxes, fontsize=9)
    view = figure.add_subplot(1, 3, 3)
    geometry = nodeio.ijkToRAS(robex)
    voxels = nodeio.arrayFromVolume(robex).astype(float)
    axis = 2 - int(np.argmax(np.abs(geometry[1, :3])))  # a coronal cut through the middle of the mask
    index = int(round(np.argwhere(reference)[:, axis].mean()))
    picture = anatomical_slice(voxels, geometry, 1, 2, index)
    low, high = np.percentile(picture, [1, 99.5])
    view.imshow(np.clip((picture - low) / (high - low), 0, 1), cmap="gray")
    for mask, color, style, label in ((reference, "white", "--", "site's mask"),
                                      (outputs["zero-shot"], "gold", "-", "base zero-shot"),
                                      (outputs["adapted"], "red", "-", "adapted")):
        view.contour(anatomical_slice(mask.astype(float), geometry, 1, 2, index), levels=[0.5], colors=color,
                     linestyles=style, linewidths=1.2)
        view.plot([], [], color=color, linestyle=style, label=label)
    view.legend(loc="lower center", fontsize=8, framealpha=0.7)
    view.axis("off")
    view.set_title("TCUR Segment again: the validation head")
    figure.tight_layout()
    out = os.path.join(REPO, "docs", "slicer-loop.png")
    figure.savefig(out, dpi=80)
    print(out)
    print(f"zero-shot {zeroShot:.4f} adapted {adapted['Brain']:.4f} steps {args.steps}")
    loop.unload()
    return 0


if __name__ == "__main__":
    sys.exit(main())
