"""TCUR Finetune's "Export model..." logic (``TCURLoRALib.export``) headless, with the real worker process: it
exports into the folder the user picked, says which tool opens the result and, for nnU-Net, shows the
nnUNet_results layout SlicerNNUnet expects; a refused export ends as the task's one-line error. And the segment
job's mirroring choice: the base's own default unless the user says yes or no."""

import os
import sys

import pytest

pytestmark = pytest.mark.mrml

from test_mrml_nodes import REPO  # noqa: E402  (skips this module too without the slicer-core wheel's real MRML)

from TCURLoRALib import engine, export, models, tasks  # noqa: E402
from tcurlora import jobs  # noqa: E402

from conftest import CT, CT_VERT  # noqa: E402
from test_export import _adapter  # noqa: E402


def export_logic(found):
    """The logic with the real worker (this interpreter) and the bases ``found`` on "this computer"."""
    launcher = engine.defaultLauncher(pythonExecutable=sys.executable, pythonpath=[REPO],
                                      extraEnv={"OMP_NUM_THREADS": "1"})
    return export.ExportLogic(launcher=launcher, registry=models.ModelRegistry(catalog=[]),
                              discoverModels=lambda: models.discoveredEntries(found), dependencyInstaller=lambda: True)


@pytest.mark.slow
def test_export_for_slicernnunet_shows_the_nnunet_results_layout(nnunet_model, tmp_path):
    from tcurlora.models import load_base

    adapter = _adapter(load_base(nnunet_model.folder, fold=0), tmp_path / "site.safetensors")
    logic = export_logic([{"base": str(nnunet_model.folder), "kind": "nnunet", "folds": [0, 1]}])
    model = f"found:{nnunet_model.folder}#fold_0"
    picked = tmp_path / "picked"
    done = []
    task = logic.exportModel(model, str(adapter), str(picked), onDone=done.append)
    assert logic.waitForCompletion(300) == tasks.DONE, task.errorMessage
    assert done == [task]
    assert task.exportFolder == str(picked / "Dataset901_TPTBoxCT_site")
    summary = task.summary.splitlines()
    assert any("SlicerNNUnet" in line and "model path" in line for line in summary)
    layout = ["picked/", "  Dataset901_TPTBoxCT_site/", "    tcurlora-export.json", f"    {nnunet_model.folder.name}/",
              "      dataset.json",
              "      dataset_fingerprint.json", "      plans.json", "      fold_0/", "        checkpoint_final.pth"]
    start = summary.index(layout[0])
    assert summary[start:start + len(layout)] == layout
    checkpoint = picked / "Dataset901_TPTBoxCT_site" / nnunet_model.folder.name / "fold_0" / "checkpoint_final.pth"
    assert checkpoint.is_file()

    again = logic.exportModel(model, str(adapter), str(picked))
    assert logic.waitForCompletion(300) == tasks.ERROR
    assert "Dataset901_TPTBoxCT_site: already exists" in again.errorMessage and "\n" not in again.errorMessage


def test_export_for_slicermonaiauto3dseg(tmp_path):
    from auto3dseg_model import make_model

    from tcurlora.models import load_base

    folder = make_model(tmp_path / "models" / "vertebrae" / "segresnet", CT, CT_VERT).parent
    adapter = _adapter(load_base(folder), tmp_path / "site.safetensors", new_head=True)
    logic = export_logic([{"base": str(folder), "kind": "auto3dseg"}])
    task = logic.exportModel(f"found:{folder}", str(adapter), str(tmp_path / "exports"))
    assert logic.waitForCompletion(300) == tasks.DONE, task.errorMessage
    assert task.exportFolder == str(tmp_path / "exports" / "vertebrae_site")
    assert "SlicerMONAIAuto3DSeg" in task.summary and "Labels: 1 l3, 2 lumbar spine" in task.summary
    assert sorted(os.listdir(task.exportFolder)) == ["labels.csv", "model.pt", "tcurlora-export.json"]
    assert task.trace["adapter"]["new_head"] is True


def test_segment_job_mirroring_follows_the_base_unless_chosen():
    assert [tasks.testTimeAugmentationOption(c) for c in ("default", "yes", "no", True, False)] == \
        [None, True, False, True, False]
    with pytest.raises(ValueError):
        tasks.testTimeAugmentationOption("maybe")
    job = jobs.segment_job(base="deepbet", inputs=["a.nrrd"], output="b.seg.nrrd", stop_file="STOP")
    assert job["tta"] is None  # the worker lets the base decide (nnU-Net: mirror when its trainer allows)
    assert jobs.segment_job(base="deepbet", inputs=["a.nrrd"], output="b.seg.nrrd", stop_file="STOP",
                            tta=False)["tta"] is False
