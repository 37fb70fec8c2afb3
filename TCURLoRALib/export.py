"""TCUR Finetune's "Export model...": the adapter merged into its base and written in the base's own format, into
a folder the user picks, for the base's own tool (SlicerNNUnet, SlicerMONAIAuto3DSeg, MONAI bundle runners).

The worker process does the work (``export`` job, the same code as ``tcurlora export``); this side only starts
it, reads the export's ``tcurlora-export.json`` and says which tool opens the result. Nothing here touches the
scene, so it runs headless like the other logics. The widget calls::

    task = ExportLogic(registry=..., runner=logic.runner).exportModel(modelName, adapterPath, folder,
                                                                      onDone=lambda task: show(task.summary))
"""

import json
import os
from typing import Any, Callable, Dict, List, Optional

from tcurlora import jobs
from tcurlora.protocol import EXPORT_TRACE_FILE as TRACE_FILE

from . import engine, logic, models, tasks


class ExportTask(tasks.WorkerTask):
    """Export ``adapterPath`` merged into ``base`` into ``folder``; afterwards :attr:`exportFolder` is the export,
    :attr:`trace` its ``tcurlora-export.json`` and :attr:`summary` what to tell the user."""

    def __init__(self, base: Any, adapterPath: str, folder: str, launcher: Callable, format: Optional[str] = None,
                 baseSettings: Optional[Dict[str, Any]] = None, **kwargs) -> None:
        super().__init__(launcher, **kwargs)
        self.base = base
        self.adapterPath = adapterPath
        self.folder = folder
        self.format = format
        self.baseSettings = dict(baseSettings or {})
        self.exportFolder: Optional[str] = None
        self.trace: Dict[str, Any] = {}
        self.summary = ""

    def _snapshot(self):
        if not self.adapterPath or not os.path.isfile(self.adapterPath):
            raise ValueError(f"The adapter file '{self.adapterPath}' does not exist.")
        if not self.folder:
            raise ValueError("Choose a folder to export into.")
        return None

    def _writeInputs(self, snapshot, report) -> Dict[str, Any]:
        report({"phase": "export", "step": 1, "total": 1})
        return jobs.export_job(base=self.base, adapter=self.adapterPath, output=self.folder, format=self.format,
                               stop_file=os.path.join(self.workdir, jobs.STOP_FILE_NAME), **self.baseSettings)

    def _readOutputs(self, result, report):
        folder = (result.get("outputs") or {}).get("export")
        if not folder or not os.path.isfile(os.path.join(folder, TRACE_FILE)):
            raise IOError("the worker reported success but wrote no export")
        with open(os.path.join(folder, TRACE_FILE), encoding="utf-8") as f:
            return folder, json.load(f)

    def _applyOutputs(self, data):
        self.exportFolder, self.trace = data
        self.summary = exportSummary(self.exportFolder, self.trace)
        self._log(self.summary)
        return None


def exportSummary(folder: str, trace: Dict[str, Any]) -> str:
    """What the user is told: where the export is, which tool opens it and how (for nnU-Net, the nnUNet_results
    layout SlicerNNUnet expects)."""
    fmt = trace.get("format")
    lines = [f"Exported to {folder}"]
    if fmt == "nnunet":
        lines += ["Open it with SlicerNNUnet: set its model path to this folder (or nnUNetv2_predict with "
                  f"nnUNet_results={os.path.dirname(folder)}). The nnUNet_results layout:"]
        lines += layout(os.path.dirname(folder), folder)
    elif fmt == "auto3dseg":
        lines.append("Open it with SlicerMONAIAuto3DSeg: it holds model.pt and labels.csv, as that extension's "
                     "models do.")
    elif fmt == "bundle":
        lines.append("It is a MONAI bundle: run it with MONAI's bundle tools, MONAI Label or MONAI Deploy.")
    lines += [f"  {line}" for line in trace.get("open_with", [])]
    labels = trace.get("labels") or []
    if labels:
        lines.append("Labels: " + ", ".join(f"{l['channel']} {l['name']}" for l in labels))
    return "\n".join(lines)


def layout(root: str, top: str) -> List[str]:
    """The folders and files under ``top``, indented, relative to ``root`` (one line each)."""
    lines = [os.path.basename(root.rstrip(os.sep)) + "/"]
    for current, folders, files in os.walk(top):
        folders.sort()
        depth = os.path.relpath(current, root).count(os.sep) + 1
        lines.append("  " * depth + os.path.basename(current) + "/")
        lines += ["  " * (depth + 1) + name for name in sorted(files)]
    return lines


class ExportLogic(logic.EngineLogic):
    """Exports (and the :class:`TCURLoRALib.logic.EngineLogic` parameters; pass the module logic's ``runner`` so
    that one run at a time holds across training, segmentation and export).

    :param launcher: ``launcher(job, workdir) -> WorkerJob`` (default: ``PythonSlicer -m tcurlora.worker``).
    """

    def __init__(self, launcher=None, **kwargs) -> None:
        logic.EngineLogic.__init__(self, **kwargs)
        self.launcher = launcher

    def exportModel(self, modelName: str, adapterPath: str, folder: str, format: Optional[str] = None,
                    onDone: Optional[Callable] = None) -> ExportTask:
        """Start exporting ``adapterPath`` merged into the base ``modelName`` into ``folder``; returns the task.
        ``onDone(task)`` runs after a successful export (``task.summary``: what to tell the user)."""
        entry = self.modelEntry(modelName)
        if entry is None:
            raise ValueError(f"The base model '{modelName}' is not available.")

        def finished(task):
            if task.status == tasks.DONE and onDone is not None:
                onDone(task)
            if self.onFinished:
                self.onFinished(task)

        task = ExportTask(models.ModelRegistry.jobBase(entry), adapterPath, folder,
                          self.launcher or engine.defaultLauncher(), format=format,
                          baseSettings=models.ModelRegistry.jobSettings(entry), onLog=self._log,
                          onProgress=self._progress, onFinished=finished)
        return self.runner.run(task)
