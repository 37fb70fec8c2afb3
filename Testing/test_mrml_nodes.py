"""The Slicer side of the job protocol against real MRML (the ``slicer-core`` wheel, no Slicer application):
node <-> file / array conversion, the training-curve nodes, and whole segmentation / fine-tuning runs with the
stand-in worker (``Testing/standin_worker.py``), and one run of training then segmentation with the real worker."""

import os
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.mrml

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the slicer-core wheel (real MRML) is not installed", allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from TCURLoRALib import engine, models, nodeio, plots, tasks  # noqa: E402

STANDIN_WORKER = os.path.join(REPO, "Testing", "standin_worker.py")

# Oblique, anisotropic, permuted axes: IJK-to-RAS far from identity.
_ROT = np.array([[0.0, -1.0, 0.0], [0.8, 0.0, 0.6], [-0.6, 0.0, 0.8]])
IJK_TO_RAS = np.eye(4)
IJK_TO_RAS[:3, :3] = _ROT @ np.diag([0.9, 1.3, 2.0])
IJK_TO_RAS[:3, 3] = [12.5, -30.0, 7.25]
SHAPE = (9, 11, 14)  # K, J, I
LABELS = [{"value": 1, "name": "Brain", "color": [0.8, 0.5, 0.4]},
          {"value": 4, "name": "Lesion", "color": [0.1, 0.6, 0.9]}]


@pytest.fixture(scope="module", autouse=True)
def converter_rules():
    nodeio.registerSegmentationConverterRules()


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def wait_for_phase(task, phase, poll, timeout_s=30.0):
    """Call ``poll`` until the task reports progress of ``phase`` (or ``timeout_s`` passes)."""
    deadline = time.monotonic() + timeout_s
    while (task.lastProgress or {}).get("phase") != phase and time.monotonic() < deadline:
        poll()
        time.sleep(0.01)


@pytest.fixture
def volume(scene):
    voxels = np.random.RandomState(0).randint(-1000, 3000, size=SHAPE).astype(np.int16)
    return nodeio.addVolumeFromArray(scene, voxels, IJK_TO_RAS, "Head")


def label_array():
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 3:8, 4:10] = 1
    labels[6:8, 1:4, 1:3] = 4
    return labels


def fake_launcher(**env):
    extra = {"TCURLORA_FAKE_STEP_S": "0.002"}
    extra.update(env)
    return engine.defaultLauncher(pythonExecutable=sys.executable, script=STANDIN_WORKER, pythonpath=[REPO],
                                  extraEnv=extra)


def recording(launcher, folder):
    """``launcher`` that first copies the job folder as the worker will find it (inputs are written in the
    background, so they exist only once the worker is launched); returns (launcher, [(job, copy folder)])."""
    import shutil

    seen = []

    def launch(job, workdir):
        copy = os.path.join(str(folder), f"launch{len(seen)}")
        shutil.copytree(workdir, copy)
        seen.append((dict(job), copy))
        return launcher(job, workdir)

    return launch, seen


def ras_to_lps(matrix):
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix


# ----------------------------------------------------------------------------------------------------------
# volumes


def test_volume_array_and_geometry_round_trip(scene, volume, tmp_path):
    original = nodeio.arrayFromVolume(volume)
    assert original.shape == SHAPE
    np.testing.assert_allclose(nodeio.ijkToRAS(volume), IJK_TO_RAS)
    path = nodeio.writeVolume(volume, str(tmp_path / "input.nrrd"))
    loaded = nodeio.readVolume(scene, path)
    np.testing.assert_array_equal(nodeio.arrayFromVolume(loaded), original)
    np.testing.assert_allclose(nodeio.ijkToRAS(loaded), IJK_TO_RAS, atol=1e-6)
    # what the engine reads: an LPS NRRD whose index order is I-J-K
    import nrrd

    data, header = nrrd.read(path)
    np.testing.assert_array_equal(data, original.transpose(2, 1, 0))
    lps = ras_to_lps(IJK_TO_RAS)
    np.testing.assert_allclose(np.asarray(header["space directions"]).T, lps[:3, :3], atol=1e-6)
    np.testing.assert_allclose(header["space origin"], lps[:3, 3], atol=1e-6)


def test_write_volume_refuses_non_scalar(scene):
    labelmap = nodeio.addVolumeFromArray(scene, np.zeros(SHAPE, np.uint8), IJK_TO_RAS, "lm",
                                         className="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(ValueError, match="scalar"):
        nodeio.writeVolume(labelmap, "/nonexistent/x.nrrd")


# ----------------------------------------------------------------------------------------------------------
# segmentations


def test_segmentation_array_round_trip_is_bit_exact(scene, volume):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Seg")
    nodeio.updateSegmentationFromLabelArray(segmentation, label_array(), IJK_TO_RAS, LABELS)
    info = {s["name"]: s for s in nodeio.segments(segmentation)}
    assert set(info) == {"Brain", "Lesion"}
    assert info["Lesion"]["labelValue"] == 4
    np.testing.assert_allclose(info["Lesion"]["color"], LABELS[1]["color"], atol=1e-6)
    ids = [info["Brain"]["id"], info["Lesion"]["id"]]
    back = nodeio.labelArrayFromSegmentation(segmentation, volume, ids, [1, 4])
    np.testing.assert_array_equal(back, label_array())
    # default values are 1..N in the given order
    np.testing.assert_array_equal(nodeio.labelArrayFromSegmentation(segmentation, volume, ids[::-1]),
                                  np.select([label_array() == 1, label_array() == 4], [2, 1], 0))
    # no temporary nodes left in the scene
    names = [scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())]
    assert nodeio.TEMP_NODE_NAME not in names


def test_empty_labels_get_empty_segments_and_empty_export(scene, volume):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Seg")
    nodeio.updateSegmentationFromLabelArray(segmentation, np.zeros(SHAPE, np.uint8), IJK_TO_RAS, LABELS)
    assert nodeio.segmentNames(segmentation) == ["Brain", "Lesion"]
    assert not nodeio.labelArrayFromSegmentation(segmentation, volume).any()


def test_segment_names_and_colours_round_trip_through_seg_nrrd(scene, volume, tmp_path):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Seg")
    nodeio.updateSegmentationFromLabelArray(segmentation, label_array(), IJK_TO_RAS, LABELS)
    path = nodeio.writeSegmentation(segmentation, str(tmp_path / "s.seg.nrrd"), volume)
    import slicerio

    seg = slicerio.read_segmentation(str(path))
    by_name = {s["name"]: s for s in seg["segments"]}
    assert set(by_name) == {"Brain", "Lesion"}
    np.testing.assert_allclose(by_name["Lesion"]["color"], LABELS[1]["color"], atol=1e-5)
    np.testing.assert_allclose(seg["ijkToLPS"], ras_to_lps(IJK_TO_RAS), atol=1e-6)  # the volume's grid exactly
    assert seg["voxels"].shape == SHAPE[::-1]
    loaded = nodeio.readSegmentation(str(path), scene=scene, name="Loaded", referenceVolumeNode=volume)
    assert sorted(nodeio.segmentNames(loaded)) == ["Brain", "Lesion"]
    values = {s["name"]: s["labelValue"] for s in nodeio.segments(loaded)}
    ids = [s["id"] for s in nodeio.segments(loaded)]
    back = nodeio.labelArrayFromSegmentation(loaded, volume, ids, [values[s["name"]] for s in nodeio.segments(loaded)])
    np.testing.assert_array_equal(back, label_array())


def test_training_label_maps_segments_to_label_names(scene, volume, tmp_path):
    """Two segments merged into one label, one segment left out, names = label names (what the engine maps)."""
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Annotation")
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:4, 2:6, 2:6] = 1  # "left"
    labels[5:8, 2:6, 7:12] = 2  # "right"
    labels[0, 0, 0] = 3  # "ignored"
    nodeio.updateSegmentationFromLabelArray(segmentation, labels, IJK_TO_RAS, [
        {"value": 1, "name": "left"}, {"value": 2, "name": "right"}, {"value": 3, "name": "ignored"}])
    ids = {s["name"]: s["id"] for s in nodeio.segments(segmentation)}
    table = [{"value": 3, "name": "Kidney", "color": [0.2, 0.9, 0.2]}]
    path = str(tmp_path / "case_label.seg.nrrd")
    present = nodeio.writeTrainingLabel(segmentation, volume, path, {ids["left"]: 3, ids["right"]: 3}, table)
    assert present == [3]
    import slicerio

    seg = slicerio.read_segmentation(path)
    assert [(s["name"], s["labelValue"]) for s in seg["segments"]] == [("Kidney", 3)]
    np.testing.assert_allclose(seg["segments"][0]["color"], [0.2, 0.9, 0.2], atol=1e-5)
    np.testing.assert_allclose(seg["ijkToLPS"], ras_to_lps(IJK_TO_RAS), atol=1e-6)
    expected = np.where((labels == 1) | (labels == 2), 3, 0).astype(np.uint8)
    np.testing.assert_array_equal(seg["voxels"].transpose(2, 1, 0), expected)
    with pytest.raises(ValueError, match="no entry"):
        nodeio.writeTrainingLabel(segmentation, volume, path, {ids["left"]: 9}, table)


def test_training_files_are_what_the_engine_reads(scene, volume, tmp_path):
    """Contract check with the engine's own reader, when it is importable."""
    tio = pytest.importorskip("tcurlora.io")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Annotation")
    nodeio.updateSegmentationFromLabelArray(segmentation, label_array(), IJK_TO_RAS, LABELS)
    ids = {s["name"]: s["id"] for s in nodeio.segments(segmentation)}
    image_path = nodeio.writeVolume(volume, str(tmp_path / "case_image.nrrd"))
    label_path = str(tmp_path / "case_label.seg.nrrd")
    nodeio.writeTrainingLabel(segmentation, volume, label_path, {ids["Brain"]: 1, ids["Lesion"]: 4}, LABELS)
    image = tio.read_image(image_path)
    label = tio.read_label(label_path, image, LABELS)
    import SimpleITK as sitk

    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), label_array())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), nodeio.arrayFromVolume(volume))


def test_engine_written_segmentation_is_imported_with_labels(scene, volume, tmp_path):
    """The worker writes results with tcurlora.io.write_segmentation: import them with names, colours, grid."""
    tio = pytest.importorskip("tcurlora.io")
    image = tio.read_image(nodeio.writeVolume(volume, str(tmp_path / "input.nrrd")))
    path = tio.write_segmentation(str(tmp_path / "out.seg.nrrd"), tio.array_to_image(label_array(), image), LABELS)
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Result")
    target.GetSegmentation().AddEmptySegment("", "stale segment")
    renamed = [{"value": 1, "name": "Whole brain", "color": [1.0, 1.0, 0.0]}]
    nodeio.readSegmentation(path, target, labels=renamed, referenceVolumeNode=volume)
    segs = {s["name"]: s for s in nodeio.segments(target)}
    assert set(segs) == {"Whole brain", "Lesion"}  # stale segment replaced; label 1 renamed, label 4 as written
    np.testing.assert_allclose(segs["Whole brain"]["color"], [1.0, 1.0, 0.0])
    back = nodeio.labelArrayFromSegmentation(target, volume, [segs["Whole brain"]["id"], segs["Lesion"]["id"]],
                                             [1, 4])
    np.testing.assert_array_equal(back, label_array())


def test_closed_surface_for_3d_view(scene, volume):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Seg")
    nodeio.updateSegmentationFromLabelArray(segmentation, label_array(), IJK_TO_RAS, LABELS)
    nodeio.showSegmentation(segmentation)
    assert segmentation.GetDisplayNode() is not None
    assert segmentation.GetSegmentation().ContainsRepresentation("Closed surface")


# ----------------------------------------------------------------------------------------------------------
# plots


def test_training_curves(scene):
    curves = plots.TrainingCurves(scene, name="run")
    for step in range(1, 6):
        curves.addProgressEvent({"event": "progress", "phase": "train", "step": step, "total": 5,
                                 "loss": 1.0 / step, "dice": 0.5 if step % 2 == 0 else None, "eta_s": 1})
    curves.addProgressEvent({"event": "progress", "phase": "segment", "step": 9, "loss": 9.0})  # ignored
    curves.add(6, float("nan"), float("inf"))  # ignored
    assert curves.values("loss") == ([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 0.5, 1.0 / 3, 0.25, 0.2])
    assert curves.values("dice") == ([2.0, 4.0], [0.5, 0.5])
    chart = curves.chartNode
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNode() is curves.lossTable and series.GetXColumnName() == "step"
    again = plots.TrainingCurves(scene, name="run", chartNode=chart)  # reuses the nodes of the saved scene
    assert again.lossTable is curves.lossTable and again.values("loss")[0][-1] == 5.0
    count = scene.GetNumberOfNodes()
    again.clear()
    assert again.values("loss") == ([], []) and scene.GetNumberOfNodes() == count
    again.removeNodes()
    assert scene.GetNumberOfNodes() == count - 5


# ----------------------------------------------------------------------------------------------------------
# whole runs with the stand-in worker


def test_segmentation_task_end_to_end(scene, volume, tmp_path):
    logs, progress, finished = [], [], []
    launcher, launched = recording(fake_launcher(TCURLORA_FAKE_MODE="noisy"), tmp_path)
    task = tasks.SegmentationTask(volume, "deepbet", launcher, labels=LABELS[:1], device="cpu", onLog=logs.append,
                                  onProgress=progress.append, onFinished=finished.append)
    task.start()
    assert task.isActive
    assert task.waitForCompletion(60) == tasks.DONE, task.errorMessage
    job, folder = launched[0]
    assert job["command"] == "segment" and job["device"] == "cpu" and job["adapter"] is None
    written = nodeio.readVolume(scene, os.path.join(folder, "input.nrrd"))  # the input as the worker read it
    np.testing.assert_array_equal(nodeio.arrayFromVolume(written), nodeio.arrayFromVolume(volume))
    np.testing.assert_allclose(nodeio.ijkToRAS(written), IJK_TO_RAS, atol=1e-6)
    assert finished == [task]
    assert [e["step"] for e in progress if e["phase"] == "segment"] == [1, 2, 3]
    assert [e["phase"] for e in progress][0] == "export" and "import" in [e["phase"] for e in progress]
    assert any("not json" in line for line in logs)  # non-JSON output shown as log
    segmentation = task.outputSegmentation
    assert segmentation.GetName() == "Head segmentation"
    assert nodeio.segmentNames(segmentation) == ["Brain"]  # renamed from the stand-in's "Fake 1"
    result = nodeio.labelArrayFromSegmentation(segmentation, volume)
    expected = np.zeros(SHAPE, np.uint8)
    k, j, i = SHAPE
    expected[k // 4:(3 * k) // 4, j // 4:(3 * j) // 4, i // 4:(3 * i) // 4] = 1
    np.testing.assert_array_equal(result, expected)  # on the input's grid, through LPS files and back
    assert segmentation.GetSegmentation().ContainsRepresentation("Closed surface")
    assert not os.path.exists(task.workdir)


def test_segmentation_task_into_existing_node_and_parent_transform(scene, volume):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Target")
    task = tasks.SegmentationTask(volume, "deepbet", fake_launcher(), outputSegmentation=target)
    task.start()
    assert task.waitForCompletion(60) == tasks.DONE, task.errorMessage
    assert task.outputSegmentation is target
    assert target.GetTransformNodeID() == transform.GetID()
    assert nodeio.segmentNames(target) == ["Fake 1"]  # no labels given: the file's names


@pytest.mark.parametrize("mode,fragment", [("error", "fake failure requested"), ("crash", "RuntimeError: fake crash")])
def test_worker_failures_are_reported(scene, volume, mode, fragment):
    task = tasks.SegmentationTask(volume, "deepbet", fake_launcher(TCURLORA_FAKE_MODE=mode))
    task.start()
    assert task.waitForCompletion(60) == tasks.ERROR
    assert fragment in task.errorMessage
    assert task.outputSegmentation is None and not os.path.exists(task.workdir)


def test_launch_failure_is_reported_and_cleaned(scene, volume):
    launcher = engine.defaultLauncher(pythonExecutable="/nonexistent/PythonSlicer", script=STANDIN_WORKER)
    finished = []
    task = tasks.SegmentationTask(volume, "deepbet", launcher, onFinished=finished.append)
    task.start()
    assert task.waitForCompletion(30) == tasks.ERROR and "Could not start the worker process" in task.errorMessage
    assert finished == [task] and not os.path.exists(task.workdir)


def two_cases(scene):
    pairs = []
    for index in range(2):
        voxels = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 97).astype(np.int16)
        vol = nodeio.addVolumeFromArray(scene, voxels, IJK_TO_RAS, f"Case{index}")
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"Case{index} seg")
        nodeio.updateSegmentationFromLabelArray(seg, label_array(), IJK_TO_RAS,
                                                [{"value": 1, "name": "brain"}, {"value": 4, "name": "Tumour"}])
        pairs.append((vol, seg))
    return pairs


def test_finetune_task_with_validation_curves_and_new_label(scene, tmp_path):
    pairs = two_cases(scene)
    mapping = models.defaultLabelMapping(["brain", "Tumour"], LABELS[:1])
    assert [(r["label"], r["value"]) for r in mapping] == [("Brain", 1), ("Tumour", 2)]
    job_labels, table, segment_to_value = models.labelsFromMapping(mapping, LABELS[:1])
    assert job_labels == table and segment_to_value == {"brain": 1, "Tumour": 2}
    curves = plots.TrainingCurves(scene)
    launcher, launched = recording(fake_launcher(), tmp_path)
    task = tasks.FinetuneTask(pairs[:1], "deepbet", launcher, segment_to_value, table, job_labels,
                              validation=pairs[1:], steps=20, rank=4, curves=curves,
                              adapterStore=str(tmp_path / "store"), adapterName="my adapter")
    task.start()
    assert task.waitForCompletion(60) == tasks.DONE, task.errorMessage
    job, folder = launched[0]
    assert job["labels"] == [{"value": 1, "name": "Brain", "color": LABELS[0]["color"]},
                             {"value": 2, "name": "Tumour", "color": models.defaultColor(2)}]
    assert job["rank"] == 4 and job["method"] == "tcurlora" and len(job["validation"]) == 1
    import slicerio

    seg = slicerio.read_segmentation(os.path.join(folder, os.path.basename(job["cases"][0]["label"])))
    assert sorted((s["name"], s["labelValue"]) for s in seg["segments"]) == [("Brain", 1), ("Tumour", 2)]
    np.testing.assert_array_equal(seg["voxels"].transpose(2, 1, 0), np.where(label_array() == 4, 2, label_array()))
    assert task.adapterPath == str(tmp_path / "store" / "my_adapter.safetensors")
    assert open(task.adapterPath, "rb").read().startswith(b"FAKE-TCURLORA-ADAPTER")
    assert len(curves.values("loss")[0]) == 20 and curves.values("dice")[0] == [5.0, 10.0, 15.0, 20.0]
    assert task.metrics["steps"] == 20 and not os.path.exists(task.workdir)


def test_a_segment_named_ignore_reaches_the_engine_as_unannotated_voxels():
    """A segment painted over what nobody checked, named 'ignore': the job carries it as a label, and the
    engine reads it as unannotated voxels, not as a class, so the base's own head is still the one adapted."""
    from tcurlora.train import same_labels, split_ignore

    mapping = models.defaultLabelMapping(["brain", "ignore"], LABELS[:1])
    job_labels, table, segment_to_value = models.labelsFromMapping(mapping, LABELS[:1])
    classes, ignore_value = split_ignore(job_labels)
    assert same_labels(classes, LABELS[:1]) and ignore_value == segment_to_value["ignore"] != segment_to_value["brain"]


def test_finetune_cancel_then_resume(scene, tmp_path):
    pairs = two_cases(scene)
    job_labels, table, segment_to_value = models.labelsFromMapping(
        models.defaultLabelMapping(["brain"], LABELS[:1]), LABELS[:1])
    assert job_labels is None  # only base labels: the base head is fine-tuned
    curves = plots.TrainingCurves(scene)
    launcher, launched = recording(fake_launcher(TCURLORA_FAKE_STEP_S="0.01"), tmp_path)
    task = tasks.FinetuneTask(pairs, "deepbet", launcher, segment_to_value, table,
                              job_labels, steps=300, curves=curves, adapterStore=str(tmp_path / "store"))
    task.start()
    wait_for_phase(task, "train", task.processEvents)
    task.cancel()
    assert task.waitForCompletion(30) == tasks.CANCELLED
    assert task.canResume and os.path.isdir(task.workdir)  # checkpoint kept
    done_before = len(curves.values("loss")[0])
    assert 0 < done_before < 300
    task.resume()
    assert launched[-1][0]["resume"] is True
    assert task.waitForCompletion(60) == tasks.DONE, task.errorMessage
    assert curves.values("loss")[0] == [float(s) for s in range(1, 301)]
    assert os.path.isfile(task.adapterPath) and not os.path.exists(task.workdir)


def test_finetune_refuses_case_without_mapped_segments(scene, tmp_path):
    pairs = two_cases(scene)
    task = tasks.FinetuneTask(pairs[:1], "deepbet", fake_launcher(), {"Liver": 1},
                              [{"value": 1, "name": "Liver"}], None)
    with pytest.raises(ValueError, match="no segment that is mapped"):
        task.start()
    assert not os.path.exists(task.workdir)


# ----------------------------------------------------------------------------------------------------------
# the Slicer side with the REAL worker process (python -m tcurlora.worker), on a real CT from the scene


def test_finetune_then_segment_with_the_real_worker(scene, tiny_unet, tmp_path):
    """Volume and segmentation nodes (the real tptbox CT and its vertebra labels) -> FinetuneTask -> the real
    worker trains an adapter for the tiny base -> SegmentationTask applies it -> a segmentation node on the
    volume's grid with the adapter's segment names and colours."""
    from conftest import CT, CT_VERT, VERTEBRAE

    volume = nodeio.readVolume(scene, str(CT), name="CT")
    segmentation = nodeio.readSegmentation(str(CT_VERT), scene=scene, name="CT vertebrae")
    nodeio.applyLabels(segmentation, VERTEBRAE)  # a label map's segments get the base's names by value
    mapping = models.defaultLabelMapping(nodeio.segmentNames(segmentation), VERTEBRAE)
    job_labels, table, segment_to_value = models.labelsFromMapping(mapping, VERTEBRAE)
    assert job_labels is None  # every segment is a base label: the base's head is adapted, no new head
    base = {"spec": str(tiny_unet.spec), "weights": str(tiny_unet.weights)}
    real = engine.defaultLauncher(pythonExecutable=sys.executable, pythonpath=[REPO],
                                  extraEnv={"OMP_NUM_THREADS": "1"})
    progress = []
    train = tasks.FinetuneTask([(volume, segmentation)], base, real, segment_to_value, table, job_labels,
                               steps=2, rank=2, device="cpu", adapterStore=str(tmp_path / "store"),
                               adapterName="site", onProgress=progress.append)
    train.start()
    assert train.waitForCompletion(300) == tasks.DONE, train.errorMessage
    assert [e["step"] for e in progress if e.get("phase") == "train"][-1] == 2
    from tcurlora.manifest import read_manifest

    manifest = read_manifest(train.adapterPath)
    assert manifest["provenance"]["cases"] == 1 and manifest["base"]["name"] == "tiny-unet-vertebrae"

    segment = tasks.SegmentationTask(volume, base, real, adapterPath=train.adapterPath, device="cpu",
                                     labels=manifest["labels"])
    segment.start()
    assert segment.waitForCompletion(300) == tasks.DONE, segment.errorMessage
    result = segment.outputSegmentation
    assert set(nodeio.segmentNames(result)) <= {"L2", "L3", "L4"}
    labels = nodeio.labelArrayFromSegmentation(result, volume)
    assert labels.shape == nodeio.arrayFromVolume(volume).shape  # on the volume's own grid
    assert not os.path.exists(segment.workdir)
