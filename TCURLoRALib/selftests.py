"""The scenarios of the module self-tests: run inside Slicer by ``TCURSegmentTest`` and ``TCURFinetuneTest``,
and headless on real MRML (``slicer-core``) by ``Testing/test_slicer_modules.py``.

A scenario is ``scenario(scene, makeLogic, parametersOf)``: ``makeLogic(**kwargs)`` builds the logic under test
(the module's Logic in Slicer, the :mod:`TCURLoRALib` one headless) with the stand-in worker and a toy base
model unless ``kwargs`` say otherwise; ``parametersOf(logic)`` gives a parameters object with the module's
parameter node fields and defaults. A scenario raises AssertionError when the behaviour is wrong.

The stand-in worker (``Testing/standin_worker.py``) is test-only: it is found in the source tree (or through
``TCURLORA_TESTING_DIR``). :data:`SEGMENT_ENGINE` and :data:`FINETUNE_ENGINE` run the real engine on deepbet
and are left out when :func:`engineAvailable` says it cannot run.
"""

import os
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np

from . import caselibrary, engine, finetune, models, nodeio, tasks

LABELS = [{"value": 1, "name": "Brain", "color": [0.9, 0.7, 0.6]}]
SHAPE = (24, 28, 32)  # K, J, I
IJK_TO_RAS = np.array([[0, -1.2, 0, 20.0], [1.1, 0, 0, -15.0], [0, 0, 1.5, 5.0], [0, 0, 0, 1]])


def expect(condition, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def expectStatus(status: str, wanted: str, task) -> None:
    expect(status == wanted, f"the run ended {status}, not {wanted}: {task.errorMessage}")


def toyRegistry(fingerprint: str = "toy-fingerprint"):
    return models.ModelRegistry(catalog=[{"name": "toy", "title": "Toy model", "labels": LABELS,
                                          "fingerprint": fingerprint, "cached": True}])


def standInArguments(stepSeconds: float = 0.005, pythonExecutable: Optional[str] = None) -> Dict[str, Any]:
    """Logic arguments for the stand-in worker and the toy base; no dependency installation."""
    launcher = engine.defaultLauncher(pythonExecutable=pythonExecutable,
                                      script=engine.testingFile(__file__, "standin_worker.py"),
                                      pythonpath=[engine.engineRoot()],
                                      extraEnv={"TCURLORA_FAKE_STEP_S": str(stepSeconds)})
    return {"launcher": launcher, "registry": toyRegistry(), "dependencyInstaller": lambda: True}


def engineAvailable(modelName: str = "deepbet") -> bool:
    """Whether the real engine can run: its packages are installed and the base model is cached (or
    ``TCURLORA_SELFTEST_ENGINE=1``; ``=0`` says no)."""
    flag = os.environ.get("TCURLORA_SELFTEST_ENGINE", "")
    if flag == "0":
        return False
    from . import dependencies

    if dependencies.missingPackages(dependencies.readRequirements()):
        return False
    entry = models.ModelRegistry().entry(modelName)
    return entry is not None and (bool(entry.get("cached")) or flag == "1")


def makeVolume(scene, name: str = "TCURTestVolume", offset: int = 0):
    """A bright ball (1000) on a dark background under an oblique, anisotropic IJK-to-RAS."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    inside = (k ** 2 + j ** 2 + (i - 0.1 * offset) ** 2) < 0.5
    return nodeio.addVolumeFromArray(scene, (1000.0 * inside).astype(np.int16), IJK_TO_RAS, name), inside


def makeCase(scene, name: str = "Case", offset: int = 0):
    """(volume, segmentation): the ball of :func:`makeVolume` segmented as "Brain"."""
    volume, inside = makeVolume(scene, f"{name} volume", offset)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
    nodeio.updateSegmentationFromLabelArray(segmentation, inside.astype(np.uint8), IJK_TO_RAS,
                                            [{"value": 1, "name": "Brain", "color": [1, 0, 0]}])
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return volume, segmentation


def recordingLauncher(logic) -> List[Dict[str, Any]]:
    """Make ``logic`` (and its validation segmentations) record each job it launches; returns the list."""
    seen: List[Dict[str, Any]] = []
    launch = logic.launcher or engine.defaultLauncher()
    logic.launcher = lambda job, workdir: seen.append(dict(job)) or launch(job, workdir)
    if hasattr(logic, "segmentLogic"):
        logic.segmentLogic.launcher = logic.launcher
    return seen


# ----------------------------------------------------------------------------------------------------------
# TCUR Segment


def segmentWithStandInWorker(scene, makeLogic, parametersOf):
    """Segment a volume: the result comes in with its labels and 3D surfaces; no temporary folder is left."""
    volume, _ = makeVolume(scene)
    logic = makeLogic()
    progress = []
    logic.onProgress = progress.append
    task = logic.segment(volume, modelName="toy", device="cpu")
    expectStatus(logic.waitForCompletion(60), tasks.DONE, task)
    segmentation = task.outputSegmentation
    expect(nodeio.segmentNames(segmentation) == ["Brain"], f"segments {nodeio.segmentNames(segmentation)}")
    expect(progress, "no progress event")
    labelArray = nodeio.labelArrayFromSegmentation(segmentation, volume)
    expect(labelArray.shape == SHAPE and labelArray.any(), "the result is not on the volume's grid, or empty")
    expect(segmentation.GetSegmentation().ContainsRepresentation("Closed surface"), "no 3D surfaces")
    expect(not os.path.exists(task.workdir), "temporary folder left behind")


def applyTwiceReplacesTheNewSegmentation(scene, makeLogic, parametersOf):
    """Apply twice with "Create new segmentation": one new node, replaced; keep-largest left to the base."""
    volume, _ = makeVolume(scene)
    logic = makeLogic()
    p = parametersOf(logic)
    p.inputVolume, p.outputSegmentation, p.model, p.device = volume, None, "toy", "cpu"
    expect(p.largestComponent == "default", "the default must leave keep-largest-component to the base model")
    for _ in range(2):
        logic.segmentFromParameters(p)
        expectStatus(logic.waitForCompletion(60), tasks.DONE, logic.task)
        expect(logic.task.jobDict["largest_component"] is None, "the job overrides the base's largest component")
    expect(p.outputSegmentation is logic.task.outputSegmentation, "the new node is not the selected output")
    expect(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1, "a second node was added")


#: The manifest the stand-in worker's adapters would have (its adapter files are not real safetensors).
TOY_MANIFEST = {"format_version": "1.0", "method": {"name": "tcurlora", "rank": 8},
                "base": {"name": "toy", "fingerprint": "toy-fingerprint"}, "labels": LABELS,
                "provenance": {"cases": 2, "steps": 6, "validation_dice": 0.8}}
OTHER_BASE_MANIFEST = {"format_version": "1.0", "method": {"name": "tcurlora", "rank": 8},
                       "base": {"name": "other", "fingerprint": "sha256:0123456789abcdef"}, "labels": LABELS,
                       "provenance": {"cases": 3, "steps": 10, "validation_dice": 0.8}}


def refuseAdapterForOtherBase(scene, makeLogic, parametersOf):
    """An adapter trained on another base model is shown as not fitting and refused."""
    adapter = os.path.join(tempfile.mkdtemp(prefix="tcurlora-test-"), "other.safetensors")
    with open(adapter, "wb") as f:
        f.write(b"not read: the manifest reader is a stand-in")
    logic = makeLogic(manifestReader=lambda path: OTHER_BASE_MANIFEST)
    text, compatible = logic.adapterText(adapter, "toy")
    expect(not compatible and "other" in text, f"an adapter of 'other' offered for 'toy': {text}")
    volume, _ = makeVolume(scene)
    try:
        logic.segment(volume, modelName="toy", adapterPath=adapter)
    except ValueError:
        pass
    else:
        raise AssertionError("segmenting with an adapter of another base started")
    expect(not logic.isRunning(), "a run started")


def segmentWithEngine(scene, makeLogic, parametersOf):
    """Segment with the real engine (deepbet, CPU)."""
    volume, _ = makeVolume(scene)
    logic = makeLogic(launcher=None, registry=None)
    task = logic.segment(volume, modelName="deepbet", device="cpu")
    expectStatus(logic.waitForCompletion(900), tasks.DONE, task)
    expect(nodeio.segmentNames(task.outputSegmentation), "no segment")


SEGMENT = (segmentWithStandInWorker, applyTwiceReplacesTheNewSegmentation, refuseAdapterForOtherBase)
SEGMENT_ENGINE = (segmentWithEngine,)


# ----------------------------------------------------------------------------------------------------------
# TCUR Finetune


def finetuneTheCaseTable(scene, makeLogic, parametersOf):
    """Train on the case table (the last case validates); the adapter is stored, then saved under a new name."""
    logic = makeLogic()
    p = parametersOf(logic)
    p.model = "toy"
    for index in range(3):
        logic.addCase(p, *makeCase(scene, f"Case{index}", index))
    rows = logic.refreshLabelMapping(p)
    expect([(r["segment"], r["label"], r["value"]) for r in rows] == [("Brain", "Brain", 1)], f"label rows {rows}")
    expect(logic.mappingSummary(p)[0] and logic.hasCases(p), "the case table is not ready to train")
    p.steps, p.validationCases = 12, 1
    task = logic.finetuneFromParameters(p)
    expectStatus(logic.waitForCompletion(60), tasks.DONE, task)
    expect(task.jobDict["labels"] is None, "base labels must not ask for a new head")
    expect((len(task.jobDict["cases"]), len(task.jobDict["validation"])) == (2, 1), "not 2 training + 1 validation")
    expect(len(task.curves.values("loss")[1]) == 12 and task.curves.values("dice")[0] == [5.0, 10.0],
           "the chart did not get every loss and validation Dice")
    expect(p.trainingChart.GetID() == task.curves.chartNode.GetID(), "the parameters do not hold the run's chart")
    expect(os.path.isfile(p.lastAdapterPath), "no adapter stored")
    saved = finetune.saveAdapter(p.lastAdapterPath, os.path.join(tempfile.mkdtemp(prefix="tcurlora-test-"), "shared"))
    expect(saved.endswith(".safetensors") and os.path.isfile(saved), f"not saved: {saved}")
    expect(not os.path.exists(task.workdir), "temporary folder left behind")


def continueTheLastAdapter(scene, makeLogic, parametersOf):
    """"Continue the last trained adapter": the next job starts from it (and only while it is ticked)."""
    logic = makeLogic()
    seen = recordingLauncher(logic)
    p = parametersOf(logic)
    p.model, p.steps = "toy", 3
    logic.addCase(p, *makeCase(scene))
    logic.refreshLabelMapping(p)
    for continueAdapter in (False, True, False):
        p.continueAdapter = continueAdapter
        last = p.lastAdapterPath
        task = logic.finetuneFromParameters(p)
        expectStatus(logic.waitForCompletion(60), tasks.DONE, task)
        expect(seen[-1]["start_from"] == (last if continueAdapter and last else None),
               f"start_from {seen[-1]['start_from']!r} with continueAdapter={continueAdapter}")


def cancelAndResume(scene, makeLogic, parametersOf):
    """Cancel a training, then resume it: it goes on where it stopped, not from the start."""
    import time

    logic = makeLogic(**standInArguments(stepSeconds=0.02))
    volume, segmentation = makeCase(scene)
    mapping = models.defaultLabelMapping(["Brain"], LABELS)
    task = logic.finetune([(volume, segmentation)], mapping, modelName="toy", steps=400)
    deadline = time.monotonic() + 30
    while (task.lastProgress or {}).get("phase") != "train" and time.monotonic() < deadline:
        logic.runner.poll()
        time.sleep(0.02)
    expect(task.lastProgress is not None, "no progress before cancelling")
    logic.cancel()
    expectStatus(logic.waitForCompletion(30), tasks.CANCELLED, task)
    expect(logic.canResume() and len(task.curves.values("loss")[0]) < 400, "no resumable checkpoint")
    logic.resume()
    expectStatus(logic.waitForCompletion(60), tasks.DONE, task)
    expect(task.curves.values("loss")[0] == [float(s) for s in range(1, 401)], "resumed from the start")
    expect(not os.path.exists(task.workdir), "temporary folder left behind")


def sceneCloseEndsTraining(scene, makeLogic, parametersOf):
    """Closing the scene during a training ends it at once; Start works again afterwards."""
    logic = makeLogic(**standInArguments(stepSeconds=0.05))
    mapping = models.defaultLabelMapping(["Brain"], LABELS)
    task = logic.finetune([makeCase(scene)], mapping, modelName="toy", steps=400)
    expect(logic.isRunning(), "the training did not start")
    logic.shutdown()  # what the widget's scene-close handler calls
    expect(not logic.isRunning() and task.status == tasks.CANCELLED, f"still {task.status}")
    scene.Clear(0)
    task = logic.finetune([makeCase(scene, "After")], mapping, modelName="toy", steps=3)
    expectStatus(logic.waitForCompletion(60), tasks.DONE, task)


def newLabelTrainsNewHead(scene, makeLogic, parametersOf):
    """A segment name the base lacks becomes a new label value, and the job asks for a new head."""
    logic = makeLogic()
    volume, segmentation = makeCase(scene)
    segmentation.GetSegmentation().GetNthSegment(0).SetName("Lesion")
    mapping = models.defaultLabelMapping(["Lesion"], LABELS)
    expect(mapping[0]["value"] == 2, f"value {mapping[0]['value']}")
    task = logic.finetune([(volume, segmentation)], mapping, modelName="toy", steps=3)
    expectStatus(logic.waitForCompletion(60), tasks.DONE, task)
    expect([(e["value"], e["name"]) for e in task.jobDict["labels"]] == [(2, "Lesion")], "no new head asked for")


def trainOnTheCaseLibrary(scene, makeLogic, parametersOf):
    """Train on the case library: its validation case is segmented with the new adapter, its Dice recorded,
    and the loaded cases leave the scene again."""
    library = caselibrary.CaseLibrary(tempfile.mkdtemp(prefix="tcurlora-test-library-"), "Self-test")
    for index in range(3):
        library.addCase(*makeCase(scene, f"P{index}", index), validation=index == 2)
    logic = makeLogic(openLibrary=lambda: library, manifestReader=lambda path: TOY_MANIFEST)
    validated = []
    logic.onValidated = validated.append
    p = parametersOf(logic)
    p.model, p.steps, p.useCaseLibrary = "toy", 6, True
    rows = logic.refreshLabelMapping(p)
    expect([r["segment"] for r in rows] == ["Brain"] and logic.hasCases(p), "the library's segments are not offered")
    before = [scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode")]
    task = logic.finetuneFromParameters(p)
    expect((len(task.cases), len(task.validation)) == (2, 1), "not 2 training + 1 validation case")
    expectStatus(logic.waitForCompletion(60), tasks.DONE, task)
    validationId = library.split()["validation"][0]
    expect(validated and 0.0 < validated[0][validationId]["Brain"] < 1.0, f"validation results {validated}")
    expect(library.case(validationId)["adapter"] == task.adapterPath == p.lastAdapterPath, "Dice not recorded")
    expect(finetune.validationSummary(validated[0]).startswith("Case library: 1 validation case(s)"), "summary")
    after = [scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode")]
    expect(after == before, "the loaded cases or the validation results stayed in the scene")


def finetuneAndShareWithEngine(scene, makeLogic, parametersOf):
    """Fine-tune deepbet for a few steps with the real engine, then apply the adapter as a shared file."""
    logic = makeLogic(launcher=None, registry=None)
    volume, segmentation = makeCase(scene)
    mapping = models.defaultLabelMapping(["Brain"], logic.baseLabels("deepbet"))
    task = logic.finetune([(volume, segmentation)], mapping, modelName="deepbet", steps=3, device="cpu")
    expectStatus(logic.waitForCompletion(1800), tasks.DONE, task)
    shared = finetune.saveAdapter(task.adapterPath, os.path.join(tempfile.mkdtemp(prefix="tcurlora-test-"),
                                                                 "shared.safetensors"))
    text, compatible = logic.segmentLogic.adapterText(shared, "deepbet")
    expect(compatible, text)
    segmentTask = logic.segmentLogic.segment(volume, modelName="deepbet", adapterPath=shared, device="cpu")
    expectStatus(logic.segmentLogic.waitForCompletion(900), tasks.DONE, segmentTask)


FINETUNE = (finetuneTheCaseTable, continueTheLastAdapter, cancelAndResume, sceneCloseEndsTraining,
            newLabelTrainsNewHead, trainOnTheCaseLibrary)
FINETUNE_ENGINE = (finetuneAndShareWithEngine,)


def run(scenarios, scene, makeLogic, parametersOf, say=print) -> None:
    """Run ``scenarios`` one after the other on an emptied ``scene``; ``say(text)`` before and after each."""
    for scenario in scenarios:
        scene.Clear(0)
        title = (scenario.__doc__ or scenario.__name__).strip().splitlines()[0]
        say(title)
        scenario(scene, makeLogic, parametersOf)
        say(f"{title} passed")
