"""Adapter training without Qt or the module framework (tested on real MRML with ``slicer-core``).

:class:`FinetuneLogic` is what the TCUR Finetune module does: the case table and the segment-to-label table
of its parameters, a training run on the scene's cases or on the case library's (then the library's
validation cases are segmented with the new adapter, :class:`TCURLoRALib.logic.LibraryLogic`), resume after
a cancel, and saving the adapter. The module script ``TCURFinetune.py`` adds the parameter node and the
widgets. A *parameters* object is anything with the parameter node's attributes (see ``TCURFinetune.py``).
"""

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from tcurlora import protocol
from tcurlora.atomic import atomic_copy

from . import caselibrary, engine, logic, models, nodeio, plots, tasks

DEFAULT_ADAPTER_NAME = "tcurlora-adapter"
#: Most validation cases the case table may hold out (a GUI bound; the engine takes any number).
MAX_VALIDATION_CASES = 1000


def parsePatchSize(text: str) -> Optional[List[int]]:
    """``""`` -> None (the base's patch); ``"96, 96, 64"`` or ``"96x96x64"`` -> [96, 96, 64] (each side in the
    job's range); ValueError with a readable message otherwise."""
    text = (text or "").strip()
    if not text:
        return None
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    lo, hi = protocol.bounds("patch_size")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < lo or max(values) > hi:
        raise ValueError(f"Patch size '{text}' must be three whole numbers from {lo} to {hi}, e.g. 96,96,96.")
    return values


def segmentInfo(segmentationNodes) -> Tuple[List[str], Dict[str, Any]]:
    """Segment names in first-seen order and a colour per name."""
    names, colors = [], {}
    for node in segmentationNodes:
        if node is None:
            continue
        for segment in nodeio.segments(node):
            if segment["name"] not in colors:
                names.append(segment["name"])
                colors[segment["name"]] = segment["color"]
    return names, colors


def mappingFromTable(previousRows: Sequence[Dict[str, Any]], tableRows) -> List[Dict[str, Any]]:
    """Label-table rows from what the GUI table shows, ``(segment, include, label, value text)`` per row,
    keeping what the table does not show (the colour); a value that is not a whole number is kept as typed
    (:func:`TCURLoRALib.models.labelsFromMapping` reports it)."""
    previous = {r["segment"]: r for r in previousRows}
    rows = []
    for segment, include, label, value in tableRows:
        row = dict(previous.get(segment, {}), segment=segment, include=include, label=label.strip())
        try:
            row["value"] = int(value)
        except ValueError:
            row["value"] = value
        rows.append(row)
    return rows


def resultDescription(task) -> str:
    """What a finished training produced: the adapter, its validation Dice and the other metrics."""
    lines = [f"Adapter: {task.adapterPath}"]
    diceKeys = ("best_validation_dice", "validation_dice")
    dice = next((task.metrics[k] for k in diceKeys if isinstance(task.metrics.get(k), (int, float))), None)
    if dice is not None:
        lines.append(f"Validation Dice: {dice:.3f}")
    others = {k: v for k, v in task.metrics.items() if k not in diceKeys and isinstance(v, (int, float))}
    if others:
        lines.append(", ".join(f"{k}: {v:g}" for k, v in sorted(others.items())))
    return "\n".join(lines)


def finishedStatus(task) -> str:
    """The status line after a training ended."""
    if task.status == tasks.DONE:
        return "Training finished."
    if task.status == tasks.CANCELLED:
        return "Cancelled. Resume continues from the last checkpoint." if task.canResume \
            else "Cancelled before a checkpoint was written: Start trains again."
    return "Failed: " + task.errorMessage


def validationSummary(results: Dict[str, Dict[str, Optional[float]]]) -> str:
    """One line on the case library's validation after a training ("" when nothing was scored)."""
    scores = [v for case in results.values() for v in case.values() if v is not None]
    if not scores:
        return ""
    return (f"Case library: {len(results)} validation case(s) segmented with the new adapter, mean Dice "
            f"{sum(scores) / len(scores):.3f} (per case in the table).")


def saveAdapter(sourcePath: str, targetPath: str) -> str:
    """Copy a trained adapter (its labels and provenance are inside the file) to ``targetPath`` (``.safetensors``
    added when missing) through a temporary name: an existing file is replaced whole or left as it was."""
    if not sourcePath or not os.path.isfile(sourcePath):
        raise ValueError("There is no trained adapter to save.")
    if not targetPath.lower().endswith(protocol.ADAPTER_SUFFIX):
        targetPath += protocol.ADAPTER_SUFFIX
    if os.path.abspath(sourcePath) != os.path.abspath(targetPath):
        atomic_copy(sourcePath, targetPath)
    return targetPath


class FinetuneLogic(logic.EngineLogic):
    """Adapter training (models and dependencies: :class:`TCURLoRALib.logic.EngineLogic`).

    :param launcher: ``launcher(job, workdir) -> WorkerJob`` (default: ``PythonSlicer -m tcurlora.worker``).
    :param adapterStore: folder where trained adapters are kept until saved (default: ``tcurlora-adapters``
        beside the run's temporary folder; Slicer's cache in the module).
    :param openLibrary: ``() -> CaseLibrary``: the case library to train on when the parameters say so (the
        application setting's in the module).
    :param scene: where the case library's cases are loaded for a run.
    :param segmentRunner: runner of the validation segmentations of the case library (default: one polled by
        :meth:`waitForCompletion`; a timer-driven one in Slicer).
    :param manifestReader: see :class:`TCURLoRALib.logic.SegmentLogic`.
    :param kwargs: see :class:`TCURLoRALib.logic.EngineLogic` (registry, dependencyInstaller, discoverModels,
        saveCustomModels, runner).

    Callbacks ``onLog(text)``, ``onProgress(event)``, ``onFinished(task)`` and ``onValidated(results)`` (the case
    library's validation Dice) run on the thread that polls the runners (the main thread in Slicer).
    """

    def __init__(self, launcher=None, adapterStore: Optional[str] = None,
                 openLibrary: Optional[Callable[[], Any]] = None, scene=None, segmentRunner=None,
                 manifestReader=None, **kwargs) -> None:
        logic.EngineLogic.__init__(self, **kwargs)
        self.launcher = launcher
        self.adapterStore = adapterStore
        self.openLibrary = openLibrary
        self.scene = scene
        self.segmentLogic = logic.SegmentLogic(launcher=launcher, manifestReader=manifestReader,
                                               **dict(kwargs, runner=segmentRunner or tasks.TaskRunner()))
        self._parametersOfTask = None
        self.onValidated = None

    # -- the case table (row i pairs trainingVolumes[i] with trainingSegmentations[i])

    @staticmethod
    def cases(parameters) -> List[Tuple[Any, Any]]:
        volumes, segmentations = list(parameters.trainingVolumes), list(parameters.trainingSegmentations)
        count = max(len(volumes), len(segmentations))
        volumes += [None] * (count - len(volumes))
        segmentations += [None] * (count - len(segmentations))
        return list(zip(volumes, segmentations))

    @staticmethod
    def setCases(parameters, pairs) -> None:
        with logic.modifying(parameters):
            parameters.trainingVolumes = [v for v, _ in pairs]
            parameters.trainingSegmentations = [s for _, s in pairs]

    def addCase(self, parameters, volumeNode=None, segmentationNode=None) -> None:
        self.setCases(parameters, self.cases(parameters) + [(volumeNode, segmentationNode)])

    def removeCase(self, parameters, index: int) -> None:
        pairs = self.cases(parameters)
        if 0 <= index < len(pairs):
            del pairs[index]
            self.setCases(parameters, pairs)

    def hasCases(self, parameters) -> bool:
        """Whether there is something to train on: a complete table row, or the library's training cases."""
        if parameters.useCaseLibrary:
            return self.libraryHasTrainingCases()
        return any(v and s for v, s in self.cases(parameters))

    @staticmethod
    def splitCases(pairs, validationCount: int):
        """(training, validation): the last ``validationCount`` complete pairs validate; one always trains."""
        complete = [(v, s) for v, s in pairs if v is not None and s is not None]
        count = max(0, min(int(validationCount), len(complete) - 1))
        return (complete[:len(complete) - count], complete[len(complete) - count:]) if count else (complete, [])

    # -- the label table (JSON rows {"segment", "include", "label", "value", "color"})

    @staticmethod
    def labelMapping(parameters) -> List[Dict[str, Any]]:
        try:
            rows = json.loads(parameters.labelMapping or "[]")
        except ValueError:
            return []
        return [r for r in rows if isinstance(r, dict) and "segment" in r]

    @staticmethod
    def setLabelMapping(parameters, rows) -> None:
        text = json.dumps(list(rows))
        if text != parameters.labelMapping:
            parameters.labelMapping = text

    def baseLabels(self, modelName: str) -> List[Dict[str, Any]]:
        entry = self.modelEntry(modelName)
        return list(entry.get("labels") or []) if entry else []

    def refreshLabelMapping(self, parameters) -> List[Dict[str, Any]]:
        """Rows for the segment names of the current cases (the case library's or the table's), keeping the
        user's earlier choices."""
        if parameters.useCaseLibrary:
            try:
                names, colors = self.library().segmentInfo()
            except caselibrary.CaseLibraryError:
                names, colors = [], {}
        else:
            names, colors = segmentInfo([s for _, s in self.cases(parameters)])
        rows = models.mergeLabelMapping(self.labelMapping(parameters), names, self.baseLabels(parameters.model),
                                        colors)
        self.setLabelMapping(parameters, rows)
        return rows

    def mappingSummary(self, parameters) -> Tuple[bool, str]:
        """(ok, text) describing what the label table trains."""
        rows = self.labelMapping(parameters)
        if not rows:
            return False, "Add training cases: their segment names appear here."
        try:
            jobLabels, table, _ = models.labelsFromMapping(rows, self.baseLabels(parameters.model))
        except ValueError as exc:
            return False, str(exc)
        text = "Trains: " + models.labelsText(table) + "."
        if jobLabels is None:
            return True, text + " These are base-model labels: the model's own output is fine-tuned."
        return True, text + " New labels: the engine trains a new output head for this label table."

    # -- the case library

    def library(self):
        if self.openLibrary is None:
            raise caselibrary.CaseLibraryError("No case library is set up.")
        return self.openLibrary()

    def libraryHasTrainingCases(self) -> bool:
        try:
            return bool(self.library().split()["training"])
        except caselibrary.CaseLibraryError:
            return False

    # -- running

    def canResume(self) -> bool:
        task = self.runner.task
        return task is not None and not task.isActive and getattr(task, "canResume", False)

    def finetune(self, cases, mapping, modelName: str = "deepbet", method: str = protocol.default("method"),
                 rank: int = protocol.default("rank"), steps: int = protocol.default("steps"),
                 learningRate: Optional[float] = None, patchSize: Optional[Sequence[int]] = None,
                 validationCount: int = 0, seed: int = protocol.default("seed"),
                 device: str = protocol.default("device"), adapterName: str = DEFAULT_ADAPTER_NAME, chartNode=None,
                 scene=None, onEnd: Optional[Callable] = None, startFrom: Optional[str] = None):
        """Start training in the background on ``cases`` (volume, segmentation) with the label table
        ``mapping``; returns the task (see :meth:`waitForCompletion`). The last ``validationCount`` cases
        validate; ``onEnd(task)`` runs when it ends (after ``onFinished``); ``startFrom`` (an adapter file)
        continues that adapter."""
        entry = self.modelEntry(modelName)
        if entry is None:
            raise ValueError(f"The base model '{modelName}' is not available.")
        training, validation = self.splitCases(cases, validationCount)
        if not training:
            raise ValueError("Add at least one training case with both a volume and a segmentation.")
        jobLabels, labelTable, segmentToValue = models.labelsFromMapping(mapping, list(entry.get("labels") or []))
        scene = scene or training[0][0].GetScene()
        curves = plots.TrainingCurves(scene, name=f"{adapterName} training", chartNode=chartNode)
        if self.canResume():
            self.runner.task.cleanup()  # a new training replaces the checkpoint of a cancelled one

        def finished(task):
            self._finished(task)
            if onEnd is not None:
                onEnd(task)

        task = tasks.FinetuneTask(
            training, models.ModelRegistry.jobBase(entry), self.launcher or engine.defaultLauncher(), segmentToValue,
            labelTable, jobLabels, validation=validation, method=method, rank=rank, steps=steps,
            lr=learningRate or None, patchSize=patchSize, seed=seed, device=device, adapterStore=self.adapterStore,
            adapterName=adapterName, curves=curves, startFrom=startFrom,
            baseSettings=models.ModelRegistry.jobSettings(entry), onLog=self._log, onProgress=self._progress,
            onFinished=finished)
        self.runner.run(task)
        return task

    def finetuneFromParameters(self, parameters):
        """Train with the parameters' choices: on the case library (then its validation cases are segmented
        with the new adapter and their Dice recorded, ``onValidated(results)``) or on the case table. The
        parameters get the run's chart; ``lastAdapterPath`` is set when it succeeds."""
        p = parameters
        startFrom = p.lastAdapterPath if p.continueAdapter and p.lastAdapterPath and os.path.isfile(
            p.lastAdapterPath) else None

        def start(cases, validationCount, onEnd=None):
            return self.finetune(cases, self.labelMapping(p), modelName=p.model, method=p.method, rank=p.rank,
                                 steps=p.steps, learningRate=p.learningRate or None,
                                 patchSize=parsePatchSize(p.patchSize), validationCount=validationCount,
                                 seed=int(p.seed), device=p.device, adapterName=p.adapterName or DEFAULT_ADAPTER_NAME,
                                 chartNode=p.trainingChart, scene=self.scene, onEnd=onEnd, startFrom=startFrom)

        if p.useCaseLibrary:
            loop = logic.LibraryLogic(self.library(), self.scene, self.segmentLogic)
            task = loop.train(start, p.model, p.device, onValidated=self._validated)
        else:
            task = start(self.cases(p), p.validationCases)
        self._parametersOfTask = p
        with logic.modifying(p):
            p.trainingChart = task.curves.chartNode
            p.lastAdapterPath = ""
        return task

    def resume(self):
        if not self.canResume():
            raise RuntimeError("There is no cancelled training to resume.")
        self.runner.resume(self.runner.task)
        return self.runner.task

    def waitForCompletion(self, timeoutSeconds: float = 600.0, idle=None):
        """Block (self-tests, scripts) until the training, and the case library's validation after it, end."""
        status = logic.EngineLogic.waitForCompletion(self, timeoutSeconds, idle=idle)
        self.segmentLogic.waitForCompletion(timeoutSeconds, idle=idle)
        return status

    def shutdown(self) -> None:
        """End any run now (module cleanup, scene close): afterwards Start works again."""
        logic.EngineLogic.shutdown(self)
        self.segmentLogic.shutdown()

    def _validated(self, results) -> None:
        if self.onValidated:
            self.onValidated(results)

    def _finished(self, task) -> None:
        p = self._parametersOfTask
        if task.status == tasks.DONE and p is not None and task.adapterPath:
            p.lastAdapterPath = task.adapterPath
        if self.onFinished:
            self.onFinished(task)

