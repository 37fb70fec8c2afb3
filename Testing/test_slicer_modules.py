"""The two module scripts and the logic they stand on, run headless on real MRML (``slicer-core``).

The module scripts import with a stand-in for what only the Slicer application has (``Testing/
slicer_app_standin.py``: qt, the scripted-module base classes, the typed parameter node), so their parameter
nodes are the ones used here. The self-test scenarios (``TCURLoRALib/selftests.py``, which the modules' Test
classes run inside Slicer) run on the Lib's logic with the stand-in worker, and the fine-tuning logic once with
the real worker process."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.mrml

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.fail("the slicer-core wheel (real MRML) is needed: pip install -e .[test]")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTING = os.path.join(REPO, "Testing")
for folder in (REPO, TESTING):
    if folder not in sys.path:
        sys.path.insert(0, folder)

from TCURLoRALib import engine, finetune, logic, models, nodeio, selftests, tasks  # noqa: E402
from tcurlora import protocol  # noqa: E402

from test_mrml_nodes import converter_rules, scene  # noqa: E402,F401  (shared fixtures)

MODULES = ("TCURSegment", "TCURFinetune")


@pytest.fixture(scope="module")
def module_scripts():
    """The module scripts, imported from the source tree with the application stand-in."""
    import slicer_app_standin

    undo = slicer_app_standin.install()
    loaded = {}
    try:
        for name in MODULES:
            spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, name, name + ".py"))
            loaded[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(loaded[name])
        yield loaded
    finally:
        for name in MODULES + ("TCURLoRALib.slicerapp",):  # imported with the stand-in qt
            sys.modules.pop(name, None)
        undo()


def segment_logic(**kwargs):
    return logic.SegmentLogic(**dict(selftests.standInArguments(), **kwargs))


@pytest.fixture
def finetune_logic(scene, tmp_path):
    def make(**kwargs):
        return finetune.FinetuneLogic(**dict(selftests.standInArguments(), scene=scene,
                                             adapterStore=str(tmp_path / "store"), **kwargs))

    return make


# ----------------------------------------------------------------------------------------------------------
# the module scripts' declarations


def test_the_parameter_nodes_take_ranges_choices_and_defaults_from_the_job_protocol(module_scripts):
    finetuneFields = module_scripts["TCURFinetune"].TCURFinetuneParameterNode.allParameters
    for field, key in (("rank", "rank"), ("steps", "steps"), ("learningRate", "lr"), ("seed", "seed")):
        default, (withinRange,) = finetuneFields[field]
        assert (withinRange.minimum, withinRange.maximum) == protocol.bounds(key), field
        assert default == (0.0 if key == "lr" else protocol.default(key)), field  # lr 0: the method's default
    assert protocol.bounds("seed")[1] == 2 ** 32 - 1 and protocol.bounds("lr")[1] == 10.0
    assert protocol.bounds("rank")[1] == protocol.MAX_RANK
    for fields, field, choices in ((finetuneFields, "method", protocol.METHODS),
                                   (finetuneFields, "device", protocol.DEVICES),
                                   (module_scripts["TCURSegment"].TCURSegmentParameterNode.allParameters, "device",
                                    protocol.DEVICES)):
        default, (choice,) = fields[field]
        assert choice.choices == list(choices) and default == protocol.default(field)
    segmentFields = module_scripts["TCURSegment"].TCURSegmentParameterNode.allParameters
    for field, option in (("largestComponent", tasks.largestComponentOption),
                          ("testTimeAugmentation", tasks.testTimeAugmentationOption)):
        default, (choice,) = segmentFields[field]
        assert default == "default" and [option(c) for c in choice.choices] == [None, True, False], field
    assert issubclass(module_scripts["TCURFinetune"].TCURFinetuneLogic, finetune.FinetuneLogic)
    assert issubclass(module_scripts["TCURSegment"].TCURSegmentLogic, logic.SegmentLogic)


def test_every_value_the_finetune_parameters_accept_makes_a_job_the_worker_accepts(module_scripts, scene,
                                                                                     finetune_logic):
    """The parameter node's extremes, through the module logic's job builder, pass the worker's own check; a
    value past them is refused by the parameter node (the GUI), not first by the worker."""
    p = module_scripts["TCURFinetune"].TCURFinetuneParameterNode()
    jobs = []

    def record(job, workdir):
        jobs.append(job)
        raise RuntimeError("recorded, not run")

    logic_ = finetune_logic(launcher=record)
    p.model = "toy"
    logic_.addCase(p, *selftests.makeCase(scene))
    logic_.refreshLabelMapping(p)
    for extreme in (0, 1):
        for field, key in (("rank", "rank"), ("steps", "steps"), ("learningRate", "lr"), ("seed", "seed")):
            setattr(p, field, protocol.bounds(key)[extreme])
        p.patchSize = " x ".join([str(protocol.bounds("patch_size")[extreme] or 1)] * 3)
        logic_.finetuneFromParameters(p)
        assert logic_.waitForCompletion(60) == tasks.ERROR
        assert protocol.validate_job(jobs[-1]) == jobs[-1]
    assert jobs[0]["lr"] is None and jobs[1]["lr"] == 10.0 and jobs[1]["seed"] == 2 ** 32 - 1
    for field, key in (("rank", "rank"), ("steps", "steps"), ("learningRate", "lr"), ("seed", "seed")):
        with pytest.raises(ValueError):
            setattr(p, field, protocol.bounds(key)[1] + 1)
    with pytest.raises(ValueError, match="three whole numbers from 1 to 1024"):
        finetune.parsePatchSize("64, 64, 2048")


def test_the_module_scripts_find_the_library_from_the_source_tree(tmp_path):
    """A module script loaded from ``<repo>/TCURSegment`` (Slicer's "Additional module paths") with neither
    package importable puts the repository root on sys.path itself."""
    script = (f"import sys; sys.path[:] = [p for p in sys.path if p not in ({REPO!r}, '')]; "
              f"sys.path.insert(0, {TESTING!r}); import slicer_app_standin; slicer_app_standin.install(); "
              f"sys.path.insert(0, {os.path.join(REPO, 'TCURSegment')!r}); import TCURSegment; "
              "print(TCURSegment.engine.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == os.path.join(REPO, "TCURLoRALib", "engine.py")


def test_reload_imports_the_library_afresh_in_dependency_order():
    """The widgets' onReload: every loaded TCURLoRALib module is new, and each sees the others' new versions."""
    script = ("import json; from TCURLoRALib import engine, finetune, logic; old = finetune.FinetuneLogic; "
              "names = engine.reloadLibrary(); import sys; new = sys.modules['TCURLoRALib.finetune']; "
              "print(json.dumps({'names': names, 'new': new.FinetuneLogic is not old, "
              "'bases': new.FinetuneLogic.__bases__[0] is sys.modules['TCURLoRALib.logic'].EngineLogic}))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"TCURLoRALib", "TCURLoRALib.engine", "TCURLoRALib.finetune", "TCURLoRALib.logic"} <= set(result["names"])
    assert result["new"] and result["bases"]


# ----------------------------------------------------------------------------------------------------------
# the self-test scenarios, headless


@pytest.mark.parametrize("scenario", selftests.SEGMENT, ids=lambda s: s.__name__)
def test_segment_scenario(scenario, module_scripts, scene):
    parameters = module_scripts["TCURSegment"].TCURSegmentParameterNode
    scenario(scene, segment_logic, lambda logic_: parameters())


@pytest.mark.parametrize("scenario", selftests.FINETUNE, ids=lambda s: s.__name__)
def test_finetune_scenario(scenario, module_scripts, scene, finetune_logic):
    parameters = module_scripts["TCURFinetune"].TCURFinetuneParameterNode
    scenario(scene, finetune_logic, lambda logic_: parameters())


def test_adding_an_adapter_offers_it_once_and_selects_it_with_its_base(module_scripts, tmp_path):
    """What "Apply in TCUR Segment" does to TCUR Segment's parameters."""
    p = module_scripts["TCURSegment"].TCURSegmentParameterNode()
    adapter = str(tmp_path / "a.safetensors")
    for _ in range(2):
        logic.SegmentLogic.addAdapter(p, adapter, "toy")
    assert (p.loadedAdapters, p.adapterPath, p.model) == ([adapter], adapter, "toy")


# ----------------------------------------------------------------------------------------------------------
# copies are atomic


def failing_copy(source, target, **kwargs):
    with open(target, "wb") as f:
        f.write(b"half an adapter")
    raise OSError("disk full")


def test_saving_an_adapter_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    source, target = tmp_path / "trained.safetensors", tmp_path / "shared" / "site.safetensors"
    source.write_bytes(b"the new adapter")
    assert finetune.saveAdapter(str(source), str(target)[:-len(".safetensors")]) == str(target)
    assert target.read_bytes() == b"the new adapter"
    target.write_bytes(b"the colleague's adapter")
    monkeypatch.setattr("shutil.copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        finetune.saveAdapter(str(source), str(target))
    assert target.read_bytes() == b"the colleague's adapter" and os.listdir(target.parent) == [target.name]
    with pytest.raises(ValueError, match="no trained adapter"):
        finetune.saveAdapter(str(tmp_path / "missing.safetensors"), str(target))


def test_a_failed_copy_into_the_adapter_store_leaves_nothing_there(scene, tmp_path, monkeypatch, finetune_logic):
    logic_ = finetune_logic()
    mapping = models.defaultLabelMapping(["Brain"], selftests.LABELS)
    monkeypatch.setattr("shutil.copyfile", failing_copy)
    task = logic_.finetune([selftests.makeCase(scene)], mapping, modelName="toy", steps=2)
    assert logic_.waitForCompletion(60) == tasks.ERROR and "disk full" in task.errorMessage
    assert os.listdir(tmp_path / "store") == [] and task.adapterPath is None


# ----------------------------------------------------------------------------------------------------------
# the module logic with the REAL worker process


def test_finetune_from_the_parameters_then_apply_in_segment_with_the_real_worker(module_scripts, scene, tiny_unet,
                                                                                   tmp_path):
    """TCUR Finetune's parameters (the real tptbox CT and its vertebrae in the case table) -> the real worker
    trains an adapter of the tiny base -> "Apply in TCUR Segment" -> TCUR Segment's parameters segment the CT
    with it."""
    from conftest import CT, CT_VERT, VERTEBRAE

    registry = models.ModelRegistry(catalog=[])
    modelName = registry.addSpec(str(tiny_unet.spec), str(tiny_unet.weights))["name"]
    real = engine.defaultLauncher(pythonExecutable=sys.executable, pythonpath=[REPO],
                                  extraEnv={"OMP_NUM_THREADS": "1"})
    trainer = finetune.FinetuneLogic(launcher=real, registry=registry, dependencyInstaller=lambda: True,
                                     adapterStore=str(tmp_path / "store"), scene=scene)
    volume = nodeio.readVolume(scene, str(CT), name="CT")
    segmentation = nodeio.readSegmentation(str(CT_VERT), scene=scene, name="CT vertebrae")
    nodeio.applyLabels(segmentation, VERTEBRAE)
    p = module_scripts["TCURFinetune"].TCURFinetuneParameterNode()
    p.model, p.steps, p.rank, p.device, p.adapterName = modelName, 2, 2, "cpu", "site"
    trainer.addCase(p, volume, segmentation)
    rows = trainer.refreshLabelMapping(p)
    assert {r["label"] for r in rows} <= {e["name"] for e in VERTEBRAE} and trainer.mappingSummary(p)[0]
    task = trainer.finetuneFromParameters(p)
    assert trainer.waitForCompletion(300) == tasks.DONE, task.errorMessage
    assert p.lastAdapterPath == str(tmp_path / "store" / "site.safetensors")
    assert "Adapter: " + p.lastAdapterPath in finetune.resultDescription(task)

    s = module_scripts["TCURSegment"].TCURSegmentParameterNode()
    logic.SegmentLogic.addAdapter(s, p.lastAdapterPath, p.model)
    segmenter = logic.SegmentLogic(launcher=real, registry=registry, dependencyInstaller=lambda: True)
    text, fits = segmenter.adapterText(s.adapterPath, s.model)
    assert fits and "1 training case, 2 steps" in text
    s.inputVolume, s.device, s.showIn3D = volume, "cpu", False
    segmenter.segmentFromParameters(s)
    assert segmenter.waitForCompletion(300) == tasks.DONE, segmenter.task.errorMessage
    assert set(nodeio.segmentNames(s.outputSegmentation)) <= {"L2", "L3", "L4"}
    assert nodeio.labelArrayFromSegmentation(s.outputSegmentation, volume).shape == \
        np.asarray(nodeio.arrayFromVolume(volume)).shape
