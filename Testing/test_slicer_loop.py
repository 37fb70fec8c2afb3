"""The clinician's loop and the bugs a real Slicer session hit, on real MRML (``slicer-core``) with the stand-in
worker (``Testing/standin_worker.py``): scene close during training, the default keep-largest-component choice,
"create new segmentation" on every Apply, cancel within 2 s, files written and read off the main thread, the
persistent case library, fine-tune -> per-case validation Dice -> re-segment, the model card and input checks,
models found on the computer, and the Extensions Index metadata."""

import json
import os
import re
import sys
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.mrml

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.fail("the slicer-core wheel (real MRML) is needed: pip install -e .[test]")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from TCURLoRALib import caselibrary, engine, finetune, logic, models, nodeio, plots, tasks  # noqa: E402

from test_mrml_nodes import STANDIN_WORKER, converter_rules, scene, wait_for_phase  # noqa: E402,F401  (shared fixtures)

LABELS = [{"value": 1, "name": "Brain", "color": [0.9, 0.7, 0.6]}]
SHAPE = (12, 14, 16)  # K, J, I
IJK_TO_RAS = np.array([[0, -1.2, 0, 20.0], [1.1, 0, 0, -15.0], [0, 0, 1.5, 5.0], [0, 0, 0, 1]])


def standin(**env):
    extra = {"TCURLORA_FAKE_STEP_S": "0.002"}
    extra.update(env)
    return engine.defaultLauncher(pythonExecutable=sys.executable, script=STANDIN_WORKER, pythonpath=[REPO],
                                  extraEnv=extra)


def add_case(scene, name="Case", offset=0):
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    inside = (k ** 2 + j ** 2 + (i - 0.1 * offset) ** 2) < 0.5
    volume = nodeio.addVolumeFromArray(scene, (1000.0 * inside).astype(np.int16), IJK_TO_RAS, f"{name} volume")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
    nodeio.updateSegmentationFromLabelArray(segmentation, inside.astype(np.uint8), IJK_TO_RAS, LABELS)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return volume, segmentation


def toy_registry(**entry):
    base = {"name": "toy", "title": "Toy model", "labels": LABELS, "fingerprint": "toy-fp", "cached": True}
    base.update(entry)
    return models.ModelRegistry(catalog=[base])


def segment_logic(**kwargs):
    args = dict(launcher=standin(), registry=toy_registry(), dependencyInstaller=lambda: True)
    args.update(kwargs)
    return logic.SegmentLogic(**args)


class Parameters:
    """The attributes of TCUR Segment's parameter node, with its defaults (see TCURSegment.py)."""

    def __init__(self, inputVolume):
        self.inputVolume = inputVolume
        self.outputSegmentation = None
        self.model = "toy"
        self.adapterPath = ""
        self.device = "cpu"
        self.testTimeAugmentation = False
        self.largestComponent = "default"
        self.showIn3D = True


def segmentation_nodes(scene):
    return [n for n in nodeio.iterSegmentationNodes(scene)]


def finetune_task(pairs, launcher, tmp_path, steps=200, curves=None):
    job_labels, table, segment_to_value = models.labelsFromMapping(models.defaultLabelMapping(["Brain"], LABELS),
                                                                   LABELS)
    return tasks.FinetuneTask(pairs, "toy", launcher, segment_to_value, table, job_labels, steps=steps,
                              curves=curves, adapterStore=str(tmp_path / "store"))


# ----------------------------------------------------------------------------------------------------------
# the bugs


def test_closing_the_scene_during_training_ends_the_task_and_a_new_run_can_start(scene, tmp_path):
    """TCUR Finetune's scene-close handler calls shutdown(): the task must end (not stay 'running' forever)."""
    runner = tasks.TaskRunner()
    finished = []
    task = finetune_task([add_case(scene)], standin(TCURLORA_FAKE_STEP_S="0.05"), tmp_path, steps=500)
    task.onFinished = finished.append
    runner.run(task)
    wait_for_phase(task, "train", runner.poll)
    process = task.workerJob.proc
    runner.shutdown()  # what onSceneStartClose does
    assert not runner.isRunning and task.status == tasks.CANCELLED and finished == [task]
    assert process.poll() is not None, "the worker outlived the scene"
    assert not os.path.exists(task.workdir)
    scene.Clear(0)
    second = finetune_task([add_case(scene, "After")], standin(), tmp_path, steps=3)
    runner.run(second)  # refused with "already running" before the fix
    assert runner.waitForCompletion(60) == tasks.DONE, second.errorMessage


def test_default_apply_leaves_keep_largest_component_to_the_base(scene, tmp_path):
    """A default Apply sends largest_component = null (deepbet then keeps its largest component, as the CLI
    does), not false."""
    volume, _ = add_case(scene)
    seen = []
    launcher = standin()
    segmentLogic = segment_logic(launcher=lambda job, workdir: seen.append(job) or launcher(job, workdir))
    segmentLogic.segmentFromParameters(Parameters(volume))
    assert segmentLogic.waitForCompletion(60) == tasks.DONE
    assert seen[0]["largest_component"] is None
    assert [tasks.largestComponentOption(c) for c in ("default", "yes", "no")] == [None, True, False]
    with pytest.raises(ValueError, match="largest component"):
        tasks.largestComponentOption("false")


def test_create_new_segmentation_is_remembered_so_apply_again_replaces_it(scene):
    volume, _ = add_case(scene)
    before = len(segmentation_nodes(scene))
    segmentLogic = segment_logic()
    p = Parameters(volume)
    segmentLogic.segmentFromParameters(p)
    assert segmentLogic.waitForCompletion(60) == tasks.DONE
    first = p.outputSegmentation
    assert first is not None and first is segmentLogic.task.outputSegmentation
    segmentLogic.segmentFromParameters(p)
    assert segmentLogic.waitForCompletion(60) == tasks.DONE
    assert p.outputSegmentation is first and len(segmentation_nodes(scene)) == before + 1


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM is a POSIX signal")
def test_cancel_stops_a_stuck_worker_within_two_seconds(scene):
    volume, _ = add_case(scene)
    segmentLogic = segment_logic(launcher=standin(TCURLORA_FAKE_MODE="stubborn"))
    task = segmentLogic.segment(volume, modelName="toy")
    wait_for_phase(task, "segment", segmentLogic.runner.poll)
    process = task.workerJob.proc
    start = time.monotonic()
    segmentLogic.cancel()
    assert time.monotonic() - start < 0.2, "cancel must return at once"
    status = segmentLogic.waitForCompletion(10)
    elapsed = time.monotonic() - start
    assert status == tasks.CANCELLED and process.poll() is not None
    assert elapsed < 2.0, f"the worker took {elapsed:.1f} s to stop"


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM is a POSIX signal")
def test_a_training_killed_before_its_checkpoint_offers_no_resume(scene, tmp_path):
    task = finetune_task([add_case(scene)], standin(TCURLORA_FAKE_MODE="stubborn"), tmp_path)
    runner = tasks.TaskRunner()
    runner.run(task)
    wait_for_phase(task, "finetune", runner.poll)
    runner.cancel()
    assert runner.waitForCompletion(10) == tasks.CANCELLED
    assert task.checkpoint is None and not task.canResume
    assert not os.path.exists(task.workdir)  # nothing to resume: the folder is not kept
    with pytest.raises(RuntimeError, match="no cancelled training to resume"):
        task.resume()


def test_files_are_written_and_read_off_the_main_thread(scene, monkeypatch):
    volume, _ = add_case(scene)
    threads = {}
    for name in ("writeVolumeArray", "readLabelFile", "buildSurfaces"):
        original = getattr(nodeio, name)

        def spy(*args, _original=original, _name=name):
            threads[_name] = threading.current_thread() is threading.main_thread()
            return _original(*args)

        monkeypatch.setattr(nodeio, name, spy)
    segmentLogic = segment_logic()
    task = segmentLogic.segment(volume, modelName="toy", createSurfaces=True)
    assert segmentLogic.waitForCompletion(60) == tasks.DONE, task.errorMessage
    assert threads == {"writeVolumeArray": False, "readLabelFile": False, "buildSurfaces": False}
    assert task.outputSegmentation.GetSegmentation().ContainsRepresentation("Closed surface")
    phases = []
    segmentLogic.onProgress = lambda e: phases.append(e["phase"])
    segmentLogic.segment(volume, modelName="toy", createSurfaces=False)  # Show 3D off: no surfaces built
    assert segmentLogic.waitForCompletion(60) == tasks.DONE
    assert "surfaces" not in phases and phases[0] == "export" and "import" in phases
    assert not segmentLogic.task.outputSegmentation.GetSegmentation().ContainsRepresentation("Closed surface")


def test_extension_index_metadata_has_screenshots_that_exist():
    """Mirrors the Extensions Index's CMake checks: every metadata field set, screenshot and icon URLs point
    at files of this repository (raw.githubusercontent.com/<owner>/<repo>/<branch>/<path>)."""
    text = open(os.path.join(REPO, "CMakeLists.txt"), encoding="utf-8").read()
    fields = dict(re.findall(r'set\(EXTENSION_(\w+)\s+"([^"]*)"\)', text))
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert fields.get(key, "").strip(), f"EXTENSION_{key} is empty"
    screenshots = fields["SCREENSHOTURLS"].split()
    assert screenshots, "EXTENSION_SCREENSHOTURLS is empty"
    for url in screenshots + [fields["ICONURL"]]:
        match = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(.+)$", url)
        assert match, url
        path = os.path.join(REPO, match.group(1))
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    entry = json.load(open(os.path.join(REPO, "TCURLoRA.json"), encoding="utf-8"))
    assert entry["category"] == fields["CATEGORY"]


# ----------------------------------------------------------------------------------------------------------
# the case library


def test_case_library_add_list_persist_preview_remove(scene, tmp_path):
    volume, segmentation = add_case(scene, "Patient 7")
    library = caselibrary.CaseLibrary(str(tmp_path), "Site A")
    entry = library.addCase(volume, segmentation)
    assert entry["name"] == "Patient 7 volume" and entry["segments"] == ["Brain"] and not entry["validation"]
    taken = library.takeCase(*add_case(scene, "Other", 2), name="second", validation=True)
    written = {}
    writer = threading.Thread(target=lambda: written.update(library.writeCase(taken)))  # as the GUI does
    writer.start()
    writer.join()
    assert [c["id"] for c in library.cases()] == [entry["id"]]  # written, not yet in the index
    second = library.commitCase(written)
    # a new instance (Slicer restarted) reads the same cases from disk
    again = caselibrary.CaseLibrary(str(tmp_path), "Site A")
    assert [c["id"] for c in again.cases()] == [entry["id"], second["id"]]
    assert caselibrary.projects(str(tmp_path)) == ["Site A"]
    assert again.split() == {"training": [entry["id"]], "validation": [second["id"]]}
    # preview: the stored case is the scene's case, voxel for voxel and on the same grid
    other = slicer.vtkMRMLScene()
    loadedVolume, loadedSegmentation = again.loadCase(entry["id"], other)
    np.testing.assert_array_equal(nodeio.arrayFromVolume(loadedVolume), nodeio.arrayFromVolume(volume))
    np.testing.assert_allclose(nodeio.ijkToRAS(loadedVolume), IJK_TO_RAS, atol=1e-6)
    np.testing.assert_array_equal(nodeio.labelArrayFromSegmentation(loadedSegmentation, loadedVolume),
                                  nodeio.labelArrayFromSegmentation(segmentation, volume))
    assert nodeio.segmentNames(loadedSegmentation) == ["Brain"]
    names, colors = again.segmentInfo()  # what the label table of TCUR Finetune offers
    assert names == ["Brain"] and np.allclose(colors["Brain"], LABELS[0]["color"])
    again.recordDice(second["id"], {"Brain": 0.91234}, "a.safetensors")
    assert caselibrary.CaseLibrary(str(tmp_path), "Site A").case(second["id"])["dice"] == {"Brain": 0.9123}
    assert caselibrary.caseTableRows(again.cases())[1] == ["second", "validation", "Brain", "0.912"]
    again.removeCase(entry["id"])
    assert [c["id"] for c in caselibrary.CaseLibrary(str(tmp_path), "Site A").cases()] == [second["id"]]
    assert not os.path.exists(os.path.join(again.folder, "cases", entry["id"]))


def test_case_library_refuses_bad_input_with_one_line(scene, tmp_path):
    volume, segmentation = add_case(scene)
    library = caselibrary.CaseLibrary(str(tmp_path), "p")
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Empty")
    with pytest.raises(caselibrary.CaseLibraryError, match="no segment"):
        library.addCase(volume, empty)
    with pytest.raises(caselibrary.CaseLibraryError, match="needs a volume"):
        library.addCase(volume, None)
    assert library.cases() == []
    with open(library.indexPath, "w") as f:
        f.write("{not json")
    with pytest.raises(caselibrary.CaseLibraryError, match=r"index.json: not a readable case index"):
        caselibrary.CaseLibrary(str(tmp_path), "p")
    with pytest.raises(caselibrary.CaseLibraryError, match="name"):
        caselibrary.CaseLibrary(str(tmp_path), " / ")


def test_the_loop_add_cases_finetune_validate_per_case_then_resegment(scene, tmp_path):
    """Segment -> (correct) -> add as training case -> fine-tune on the library -> validation Dice per case
    recorded -> segment again with the new adapter."""
    segmentLogic = segment_logic(manifestReader=lambda path: {
        "base": {"name": "toy", "fingerprint": "toy-fp"}, "labels": LABELS,
        "provenance": {"cases": 1, "steps": 12, "validation_dice": 0.8, "date": "2026-12-01"}})
    library = caselibrary.CaseLibrary(str(tmp_path / "library"), "Site A")
    for index in range(3):
        library.addCase(*add_case(scene, f"P{index}", index), validation=index == 2)
    curves = plots.TrainingCurves(scene)
    before = scene.GetNumberOfNodes()
    loop = logic.LibraryLogic(library, scene, segmentLogic)
    runner = tasks.TaskRunner()
    started = []

    def start(pairs, validationCount, onEnd):  # what TCUR Finetune's logic does with its settings
        task = finetune_task(pairs[:len(pairs) - validationCount], standin(), tmp_path, steps=12, curves=curves)
        task.validation = pairs[len(pairs) - validationCount:]
        task.onFinished = onEnd
        started.append(task)
        return runner.run(task)

    scores = []
    task = loop.train(start, "toy", onValidated=lambda results: scores.append(results))
    assert len(task.cases) == 2 and len(task.validation) == 1
    assert runner.waitForCompletion(60) == tasks.DONE, task.errorMessage
    assert len(curves.values("loss")[0]) == 12 and curves.values("dice")[0] == [5.0, 10.0]  # live chart data
    assert segmentLogic.waitForCompletion(60) == tasks.DONE  # the validation case, segmented with the adapter
    validationId = library.split()["validation"][0]
    [results] = scores
    dice = results[validationId]["Brain"]
    assert 0.0 < dice < 1.0  # the stand-in's box against the case's sphere: a real, imperfect overlap
    assert library.case(validationId)["dice"]["Brain"] == pytest.approx(dice, abs=1e-4)
    assert library.case(validationId)["adapter"] == task.adapterPath
    assert scene.GetNumberOfNodes() == before  # the loaded cases and validation outputs are gone again
    # re-segment a new volume with the adapter; its provenance is shown before applying
    info = segmentLogic.describeAdapter(task.adapterPath, "toy")
    assert info["compatible"] and "1 training case, 12 steps, validation Dice 0.800" in info["summary"]
    assert "2026-12-01" in info["summary"]
    newVolume, _ = add_case(scene, "New patient", 1)
    segmentLogic.segment(newVolume, modelName="toy", adapterPath=task.adapterPath)
    assert segmentLogic.waitForCompletion(60) == tasks.DONE
    assert nodeio.segmentNames(segmentLogic.task.outputSegmentation) == ["Brain"]


def test_a_loop_that_cannot_start_leaves_the_scene_as_it_was(scene, tmp_path):
    library = caselibrary.CaseLibrary(str(tmp_path), "p")
    with pytest.raises(ValueError, match="no training case"):
        logic.LibraryLogic(library, scene, segment_logic()).train(lambda *args: None, "toy")
    library.addCase(*add_case(scene))
    before = scene.GetNumberOfNodes()

    def refuse(pairs, validationCount, onEnd):
        raise ValueError("No segment is mapped to a label")

    with pytest.raises(ValueError, match="No segment is mapped"):
        logic.LibraryLogic(library, scene, segment_logic()).train(refuse, "toy")
    assert scene.GetNumberOfNodes() == before


def test_models_on_this_computer_are_found_by_a_separate_process(tmp_path):
    """The real ``tcurlora models --discover --json`` in a separate process (Slicer never imports torch): an
    nnU-Net results folder is listed; one with region-based labels is left out; the catalog stays first."""
    from test_discover import nnunet_folder

    results = tmp_path / "nnUNet_results"
    spine = nnunet_folder(results, "Dataset501_Spine", "nnUNetTrainer__nnUNetPlans__3d_fullres",
                          {"background": 0, "L2": 1, "L3": 2})
    nnunet_folder(results, "Dataset502_Brats", "nnUNetTrainer__nnUNetPlans__3d_fullres",
                  {"background": 0, "whole tumour": [1, 2, 3], "core": [2, 3]})
    discovery = engine.ModelDiscovery(pythonExecutable=sys.executable, pythonpath=[REPO],
                                      roots={"nnunet": [str(results)]})
    engineLogic = logic.EngineLogic(registry=toy_registry(), discoverModels=discovery)
    assert [e["name"] for e in engineLogic.models()] == ["toy"]  # the search runs in the background
    assert discovery.wait(300) and discovery.error == ""
    names = [e["name"] for e in engineLogic.models()]
    assert names == ["toy", "found:" + str(spine)]
    entry = engineLogic.modelEntry("found:" + str(spine))
    assert entry["title"].endswith("(nnunet, on this computer)") and entry["labelNames"] == ["L2", "L3"]
    assert models.ModelRegistry.jobBase(entry) == str(spine)
    broken = engine.ModelDiscovery(pythonExecutable=sys.executable, pythonpath=[REPO], roots={"nowhere": ["x"]})
    broken()
    assert broken.wait(300) and "nowhere" in broken.error and broken() == []
    broken.retryIfFailed()
    assert not broken.done


# ----------------------------------------------------------------------------------------------------------
# before trusting a model


def test_model_card_of_the_shipped_catalog_entry():
    card = logic.modelCard(models.ModelRegistry().entry("deepbet"))
    assert card["modality"] == "MR" and card["licence"] == "MIT"
    assert "brain" in card["task"].lower() and "research" in card["intendedUse"].lower()
    assert card["text"].startswith("# Model card: `deepbet`")  # the shipped model card file
    text = logic.modelCardText(card)
    assert "Licence: MIT" in text and "Intended use:" in text and "Modality: MR" in text


def test_warnings_when_the_volume_is_far_from_the_base(scene):
    card = {"modality": "MR", "spacing_mm": [1.0, 1.0, 1.0]}
    k = np.linspace(-1, 1, 10)[:, None, None] * np.ones((10, 10, 10))
    mri = nodeio.addVolumeFromArray(scene, (500 + 400 * k).astype(np.int16), np.diag([1.0, 1.0, 1.0, 1.0]), "t1")
    assert logic.inputWarnings(mri, card) == []
    ct = nodeio.addVolumeFromArray(scene, np.where(k > 0, 40, -1000).astype(np.int16), np.diag([1.0, 1.0, 1.0, 1.0]),
                                   "ct")
    assert logic.guessModality(ct) == "CT"
    assert any("expects MR" in w for w in logic.inputWarnings(ct, card))
    coarse = nodeio.addVolumeFromArray(scene, (500 + 400 * k).astype(np.int16), np.diag([1.0, 1.0, 5.0, 1.0]), "thick")
    [warning] = logic.inputWarnings(coarse, card)
    assert "spacing 1 x 1 x 5 mm" in warning
    assert logic.inputWarnings(mri, {"modality": "CT"})[0].startswith("The base model expects CT images; this "
                                                                      "volume does not look like a CT")
    mri.SetAttribute("DICOM.Modality", "PT")
    assert any("looks like PT" in w for w in logic.inputWarnings(mri, card))
    # the module logic: the shipped deepbet card, remembered per volume version
    engineLogic = logic.EngineLogic()
    assert engineLogic.inputWarnings(coarse, "deepbet") == [warning]
    assert engineLogic.inputWarnings(ct, "deepbet")[0].startswith("The base model expects MR images")
    nodeio.updateVolumeFromArray(ct, (500 + 400 * k).astype(np.int16), np.diag([1.0, 1.0, 1.0, 1.0]))
    assert engineLogic.inputWarnings(ct, "deepbet") == []  # new voxels: checked again


def test_models_found_on_the_computer_are_listed_and_custom_entries_can_be_removed(tmp_path):
    found_folder = tmp_path / "Dataset001_Liver" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    found_folder.mkdir(parents=True)
    bundle = tmp_path / "my_bundle"
    (bundle / "configs").mkdir(parents=True)
    saved = []
    found = [{"kind": "nnunet", "name": "Dataset001_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres",
              "base": str(found_folder), "labels": ["liver", "tumour"]},
             {"kind": "bundle", "name": "broken", "base": str(tmp_path / "broken"), "labels": [],
              "problem": "no weights in models/"}]
    engineLogic = logic.EngineLogic(registry=toy_registry(), saveCustomModels=lambda r: saved.append(r.customEntries()),
                                    discoverModels=lambda: models.discoveredEntries(found))
    names = [e["name"] for e in engineLogic.models()]
    assert names == ["toy", "found:" + str(found_folder)]  # the one with a problem is not offered
    entry = engineLogic.modelEntry("found:" + str(found_folder))
    assert models.ModelRegistry.jobBase(entry) == str(found_folder)
    assert entry["title"] == "Dataset001_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres (nnunet, on this computer)"
    assert engineLogic.modelDescription(entry).startswith("Labels: liver, tumour")
    added = engineLogic.addBundleModel(str(bundle))
    assert engineLogic.isCustomModel(added["name"]) and len(saved[-1]) == 1
    engineLogic.removeModel(added["name"])
    assert saved[-1] == [] and added["name"] not in [e["name"] for e in engineLogic.models()]
    for name in ("toy", "found:" + str(found_folder)):
        with pytest.raises(ValueError, match="only those can be removed"):
            engineLogic.removeModel(name)
    broken = logic.EngineLogic(registry=toy_registry(), discoverModels=lambda: 1 / 0)
    assert [e["name"] for e in broken.models()] == ["toy"]  # a failing search never stops the module


def test_the_loop_with_the_real_worker(scene, tiny_unet, tmp_path):
    """The library's files are what the real engine reads: the real tptbox CT with its vertebra labels is
    added as a training case and again as a validation case; the real worker trains an adapter on the tiny
    base, then segments the validation case with it; its Dice per label is recorded in the library."""
    from conftest import CT, CT_VERT, VERTEBRAE

    volume = nodeio.readVolume(scene, str(CT), name="CT")
    segmentation = nodeio.readSegmentation(str(CT_VERT), scene=scene, name="CT vertebrae")
    nodeio.applyLabels(segmentation, VERTEBRAE)
    library = caselibrary.CaseLibrary(str(tmp_path / "library"), "Spine site")
    library.addCase(volume, segmentation, name="train")
    library.addCase(volume, segmentation, name="validate", validation=True)
    base = {"spec": str(tiny_unet.spec), "weights": str(tiny_unet.weights)}
    registry = models.ModelRegistry(catalog=[])
    registry.addSpec(base["spec"], base["weights"])
    modelName = registry.custom[0]["name"]
    real = engine.defaultLauncher(pythonExecutable=sys.executable, pythonpath=[REPO],
                                  extraEnv={"OMP_NUM_THREADS": "1"})
    segmentLogic = logic.SegmentLogic(launcher=real, registry=registry, dependencyInstaller=lambda: True)
    loop = logic.LibraryLogic(library, scene, segmentLogic)
    training, validation = loop.trainingPairs()
    names = nodeio.segmentNames(training[0][1])
    assert sorted(names) == sorted(e["name"] for e in VERTEBRAE if e["name"] in names) and names
    job_labels, table, segment_to_value = models.labelsFromMapping(models.defaultLabelMapping(names, VERTEBRAE),
                                                                   VERTEBRAE)
    runner = tasks.TaskRunner()
    train = runner.run(tasks.FinetuneTask(training, base, real, segment_to_value, table, job_labels, steps=2,
                                          rank=2, device="cpu", adapterStore=str(tmp_path / "store")))
    assert runner.waitForCompletion(300) == tasks.DONE, train.errorMessage
    results = {}
    loop.validate(train.adapterPath, modelName, device="cpu", onDone=results.update)
    assert segmentLogic.waitForCompletion(300) == tasks.DONE, segmentLogic.task.errorMessage
    [(caseId, scores)] = results.items()
    assert caseId == library.split()["validation"][0] and set(scores) == set(names)
    assert all(v is None or 0.0 <= v <= 1.0 for v in scores.values())
    assert caselibrary.CaseLibrary(str(tmp_path / "library"), "Spine site").case(caseId)["dice"] == \
        {k: (None if v is None else round(v, 4)) for k, v in scores.items()}
    loop.unload()


def test_finetune_can_continue_an_adapter(scene, tmp_path):
    """'Continue the last trained adapter': the job carries start_from, so the engine trains on from it."""
    seen = []
    launcher = standin()
    job_labels, table, segment_to_value = models.labelsFromMapping(models.defaultLabelMapping(["Brain"], LABELS),
                                                                   LABELS)
    old = tmp_path / "old.safetensors"
    task = tasks.FinetuneTask([add_case(scene)], "toy", lambda job, workdir: seen.append(job) or launcher(job, workdir),
                              segment_to_value, table, job_labels, steps=3, adapterStore=str(tmp_path / "store"),
                              startFrom=str(old))
    runner = tasks.TaskRunner()
    runner.run(task)
    runner.waitForCompletion(60)
    assert seen and seen[0]["start_from"] == str(old)


def test_a_model_download_shows_its_bytes():
    """The worker's download events (``unit: bytes``) read as sizes in the status line, not as steps."""
    event = {"event": "progress", "phase": "download", "step": 4_100_000, "total": 10_252_582,
             "file": "deepbet-1.0.2-py3-none-any.whl", "unit": "bytes"}
    percent, text = tasks.progressText(event)
    assert percent == 40
    assert text == "Downloading deepbet-1.0.2-py3-none-any.whl 4.1 of 10.3 MB"
    assert tasks.progressText(dict(event, total=0))[1] == "Downloading deepbet-1.0.2-py3-none-any.whl 4.1 MB"
    assert tasks.progressText({"phase": "train", "step": 3, "total": 10})[1] == "Training 3/10"


def test_an_nnunet_folder_with_several_folds_offers_each_fold_and_the_jobs_carry_it(scene, tmp_path):
    """An adapter fits one fold: a cross-validated nnU-Net folder is offered once per fold, and both the
    segmentation and the fine-tuning jobs name the chosen fold (else the engine refuses the folder)."""
    folder = tmp_path / "Dataset001_Liver" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    found = [{"kind": "nnunet", "name": "Dataset001_Liver/3d_fullres", "base": str(folder), "labels": ["liver"],
              "folds": [0, 1]}]
    engineLogic = logic.EngineLogic(registry=toy_registry(), discoverModels=lambda: models.discoveredEntries(found))
    names = [e["name"] for e in engineLogic.models()]
    assert names == ["toy", f"found:{folder}#fold_0", f"found:{folder}#fold_1"]
    entry = engineLogic.modelEntry(f"found:{folder}#fold_1")
    assert entry["title"].startswith("Dataset001_Liver/3d_fullres fold 1")
    assert models.ModelRegistry.jobBase(entry) == str(folder)
    assert models.ModelRegistry.jobSettings(entry) == {"fold": 1}
    assert models.ModelRegistry.jobSettings(engineLogic.modelEntry("toy")) == {}

    volume, segmentation = add_case(scene)
    seen = []
    launcher = standin()
    recording = lambda job, workdir: seen.append(job) or launcher(job, workdir)  # noqa: E731
    segmentLogic = segment_logic(launcher=recording, discoverModels=lambda: models.discoveredEntries(found))
    parameters = Parameters(volume)
    parameters.model = f"found:{folder}#fold_1"
    segmentLogic.segmentFromParameters(parameters)
    assert segmentLogic.waitForCompletion(60) == tasks.DONE
    trainer = finetune.FinetuneLogic(launcher=recording, registry=toy_registry(), dependencyInstaller=lambda: True,
                                     discoverModels=lambda: models.discoveredEntries(found),
                                     adapterStore=str(tmp_path / "store"))
    task = trainer.finetune([(volume, segmentation)], models.defaultLabelMapping(["Brain"], LABELS),
                            modelName=f"found:{folder}#fold_1", steps=3)
    assert trainer.waitForCompletion(60) == tasks.DONE, task.errorMessage
    assert [(job["command"], job["base"], job["fold"]) for job in seen] == [
        ("segment", str(folder), 1), ("finetune", str(folder), 1)]
