"""What the module logics do, without Qt or the module framework (tested on real MRML with ``slicer-core``).

* :class:`EngineLogic` - base models (catalog, models found on this computer, the user's own entries), the
  model card, input checks against the base, dependency installation;
* :class:`SegmentLogic` - segmentation runs and the adapters shown before applying them;
* :class:`LibraryLogic` - the loop on a case library: train, segment each validation case, record its Dice.

Training is :class:`TCURLoRALib.finetune.FinetuneLogic`. The module scripts (``TCURSegment.py``,
``TCURFinetune.py``) add only the parameter node and the widgets. A *parameters* object is anything with the
parameter node's attributes (the typed parameter node in Slicer).
"""

import contextlib
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import engine, models, nodeio, tasks

# A volume spacing more than this factor away from the base's (per axis) gets a warning.
SPACING_FACTOR_WARNING = 2.0


def guessModality(volumeNode) -> Optional[str]:
    """"CT" / "MR" / ... from the DICOM modality the DICOM reader stores on the node; else "CT" when the
    voxels look like Hounsfield units (air at about -1000), else None (unknown: MR, or anything else)."""
    for key in ("DICOM.Modality", "Modality"):
        value = volumeNode.GetAttribute(key) if hasattr(volumeNode, "GetAttribute") else None
        if value:
            return str(value).upper()
    array = nodeio.arrayFromVolume(volumeNode)[::2, ::2, ::2]  # a sample is enough for a percentile
    if array.size and float(np.percentile(array, 1)) < -700.0:
        return "CT"
    return None


def inputWarnings(volumeNode, card: Optional[Dict[str, Any]]) -> List[str]:
    """Why the volume may be far from what the base model was made for (modality, spacing); [] when fine."""
    if volumeNode is None or not card:
        return []
    warnings = []
    expected = (card.get("modality") or "").upper()
    found = guessModality(volumeNode)
    if expected and found is not None and found != expected:
        warnings.append(f"The base model expects {expected} images; this volume looks like {found}.")
    elif expected == "CT" and found is None:
        warnings.append("The base model expects CT images; this volume does not look like a CT (no air at "
                        "about -1000 HU).")
    spacing = card.get("spacing_mm")
    if spacing:
        have = [float(s) for s in volumeNode.GetSpacing()]
        far = [i for i, (h, e) in enumerate(zip(have, spacing))
               if e and (h / float(e) > SPACING_FACTOR_WARNING or float(e) / h > SPACING_FACTOR_WARNING)]
        if far:
            warnings.append("Voxel spacing {} mm is far from the base model's {} mm: results may be poor.".format(
                " x ".join(f"{h:.2g}" for h in have), " x ".join(f"{float(e):.2g}" for e in spacing)))
    return warnings


def modelCard(entry: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """What a clinician needs before trusting a base model: ``{"title", "task", "modality", "intendedUse",
    "licence", "credit", "spacing_mm", "text"}`` (``text`` = the model card file, when shipped)."""
    if not entry:
        return None
    card = {"title": entry.get("title") or entry.get("name"), "task": entry.get("task") or "not stated",
            "modality": entry.get("modality") or "", "intendedUse": entry.get("intended_use") or "not stated",
            "licence": entry.get("licence") or entry.get("license") or "not stated",
            "credit": entry.get("credit") or "", "spacing_mm": entry.get("spacing_mm"), "text": ""}
    path = entry.get("model_card")
    catalogFile = entry.get("catalog_file")
    if path and catalogFile and not os.path.isabs(path):
        # catalog entries live in <root>/Resources/Catalog; their card paths are relative to <root>
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(catalogFile))), path)
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            card["text"] = f.read()
    return card


def modelCardText(card: Optional[Dict[str, Any]]) -> str:
    if not card:
        return ""
    lines = [f"Task: {card['task']}"]
    if card["modality"]:
        lines.append(f"Modality: {card['modality']}" + (
            f", about {' x '.join(f'{s:g}' for s in card['spacing_mm'])} mm voxels" if card["spacing_mm"] else ""))
    lines += [f"Intended use: {card['intendedUse']}", f"Licence: {card['licence']}"]
    return "\n".join(lines)


def modifying(parameters):
    """``with modifying(p):`` several changes, one modified event (the GUI updates once) when ``p`` is a
    parameter node; any other parameters object is changed as it is."""
    if hasattr(parameters, "StartModify"):
        from slicer.util import NodeModify

        return NodeModify(parameters)
    return contextlib.nullcontext()


class EngineLogic:
    """Base models and dependencies, shared by both module logics.

    :param registry: :class:`TCURLoRALib.models.ModelRegistry`.
    :param saveCustomModels: ``saveCustomModels(registry)`` after the user adds or removes an entry
        (application settings in Slicer).
    :param dependencyInstaller: ``() -> bool`` (default: ask once, then install what is missing).
    :param discoverModels: ``() -> [model entry]`` of bases found on this computer (TotalSegmentator,
        SlicerNNUnet, MONAIAuto3DSeg, MONAI bundles); listed after the catalog.
    :param runner: :class:`TCURLoRALib.tasks.TaskRunner` (a timer-driven one in Slicer).

    Callbacks ``onLog(text)``, ``onProgress(event)``, ``onFinished(task)`` run on the main thread.
    """

    def __init__(self, registry=None, saveCustomModels: Optional[Callable] = None,
                 dependencyInstaller: Optional[Callable[[], bool]] = None,
                 discoverModels: Optional[Callable[[], Sequence[Dict[str, Any]]]] = None, runner=None) -> None:
        self.registry = registry if registry is not None else models.ModelRegistry()
        self.saveCustomModels = saveCustomModels or (lambda registry: None)
        self.dependencyInstaller = dependencyInstaller
        self.discoverModels = discoverModels
        self._warningsCache: Tuple[Any, List[str]] = (None, [])
        self.runner = runner if runner is not None else tasks.TaskRunner()
        self.onLog = None
        self.onProgress = None
        self.onFinished = None

    # -- the one run at a time

    def isRunning(self) -> bool:
        return self.runner.isRunning

    @property
    def task(self):
        return self.runner.task

    def cancel(self) -> None:
        self.runner.cancel()

    def waitForCompletion(self, timeoutSeconds: float = 600.0, idle=None):
        return self.runner.waitForCompletion(timeoutSeconds, idle=idle)

    def shutdown(self) -> None:
        """End any run now (module cleanup, scene close): afterwards a new run may start."""
        self.runner.shutdown()

    def _log(self, text):
        if self.onLog:
            self.onLog(text)

    def _progress(self, event):
        if self.onProgress:
            self.onProgress(event)

    # -- models

    def discovered(self) -> List[Dict[str, Any]]:
        """Entries of ``discoverModels`` (which caches its own search, see :class:`engine.ModelDiscovery`)."""
        if self.discoverModels is None:
            return []
        try:
            return [dict(e, discovered=True) for e in self.discoverModels()]
        except Exception as exc:  # a broken model folder must not stop the module from opening
            logging.error(f"TCURLoRA: looking for models on this computer failed: {exc}")
            return []

    def models(self) -> List[Dict[str, Any]]:
        known = set(self.registry.names())
        return self.registry.entries() + [e for e in self.discovered() if e["name"] not in known]

    def modelEntry(self, name: str):
        for entry in self.discovered():
            if entry["name"] == name and self.registry.entry(name) is None:
                return entry
        return self.registry.ensure(name)

    @staticmethod
    def modelDescription(entry) -> str:
        names = entry.get("labelNames")
        text = "Labels: " + (", ".join(names) if names and not entry.get("labels") else
                             models.labelsText(entry.get("labels", [])))
        if entry.get("kind") == "catalog" and not entry.get("cached", True):
            text += " - the weights are downloaded on first use."
        if entry.get("discovered"):
            text += " - found on this computer."
        return text

    def modelCard(self, name: str):
        return modelCard(self.modelEntry(name))

    def inputWarnings(self, volumeNode, modelName: str) -> List[str]:
        """:func:`inputWarnings`, remembered for the last volume version (the GUI asks on every update)."""
        if volumeNode is None:
            return []
        image = volumeNode.GetImageData()
        key = (volumeNode.GetID(), volumeNode.GetMTime(), image.GetMTime() if image is not None else 0, modelName)
        if self._warningsCache[0] != key:
            self._warningsCache = (key, inputWarnings(volumeNode, self.modelCard(modelName)))
        return self._warningsCache[1]

    def isCustomModel(self, name: str) -> bool:
        return any(e["name"] == name for e in self.registry.custom)

    def addBundleModel(self, folder: str):
        entry = self.registry.addBundle(folder)
        self.saveCustomModels(self.registry)
        return entry

    def addSpecModel(self, spec: str, weights: str):
        entry = self.registry.addSpec(spec, weights)
        self.saveCustomModels(self.registry)
        return entry

    def removeModel(self, name: str) -> None:
        """Forget a user-added entry (catalog entries and models found on this computer stay)."""
        if not self.isCustomModel(name):
            raise ValueError(f"'{name}' is not a model you added: only those can be removed.")
        self.registry.remove(name)
        self.saveCustomModels(self.registry)

    def ensureDependencies(self) -> bool:
        """True when the engine's packages are importable (asking once, then installing, if they are not)."""
        if self.dependencyInstaller is not None:
            return self.dependencyInstaller()
        from .dependencies import slicerInstaller

        return slicerInstaller(log=logging.info).ensure()


class SegmentLogic(EngineLogic):
    """Segmentation runs (and the :class:`EngineLogic` parameters).

    :param launcher: ``launcher(job, workdir) -> WorkerJob`` (default: ``PythonSlicer -m tcurlora.worker``).
    :param manifestReader: ``path -> manifest dict`` (default: ``tcurlora.manifest.read_manifest``).
    """

    def __init__(self, launcher=None, manifestReader=None, **kwargs) -> None:
        EngineLogic.__init__(self, **kwargs)
        self.launcher = launcher
        self.manifestReader = manifestReader
        self._manifestCache: Dict[Any, Dict[str, Any]] = {}

    # -- adapters

    def readAdapter(self, path: str) -> dict:
        """The adapter's manifest; raises with a one-line message on a bad file (cached per file version)."""
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_mtime, stat.st_size)
        if key not in self._manifestCache:
            if self.manifestReader is not None:
                manifest = self.manifestReader(path)
            else:
                from tcurlora.manifest import read_manifest

                manifest = read_manifest(path)
            self._manifestCache = {key: manifest}  # only the latest: the GUI asks again and again for one file
        return self._manifestCache[key]

    def describeAdapter(self, path: str, modelName: str) -> dict:
        """``{"summary", "compatible", "message", "labels", "manifest"}`` for showing before applying (the
        summary is the adapter's provenance: cases, steps, validation Dice, date)."""
        try:
            manifest = self.readAdapter(path)
        except Exception as exc:
            return {"summary": "", "compatible": False, "message": f"Cannot read {os.path.basename(path)}: {exc}",
                    "labels": [], "manifest": None}
        ok, message = models.checkAdapterCompatibility(manifest, self.modelEntry(modelName))
        return {"summary": models.adapterSummary(manifest), "compatible": ok, "message": message,
                "labels": list(manifest.get("labels") or []), "manifest": manifest}

    def adapterText(self, path: str, modelName: str) -> Tuple[str, bool]:
        """(what the GUI shows about the chosen adapter, whether it fits ``modelName``)."""
        if not path:
            return "No adapter: the base model as it is.", True
        info = self.describeAdapter(path, modelName)
        return (info["summary"] + "\n" if info["summary"] else "") + info["message"], info["compatible"]

    @staticmethod
    def addAdapter(parameters, path: str, modelName: Optional[str] = None) -> None:
        """Offer ``path`` in the parameters' adapter list and select it (and its base model when given)."""
        path = os.path.abspath(path)
        with modifying(parameters):
            if path not in list(parameters.loadedAdapters):
                parameters.loadedAdapters.append(path)
            if modelName:
                parameters.model = modelName
            parameters.adapterPath = path

    # -- running

    def segment(self, inputVolume, modelName: str = "deepbet", adapterPath: Optional[str] = None,
                device: str = "auto", outputSegmentation=None, tta: Optional[bool] = None,
                largestComponent: Optional[bool] = None, createSurfaces: bool = True,
                onDone: Optional[Callable] = None, onEnd: Optional[Callable] = None):
        """Start segmenting ``inputVolume`` in the background; returns the task. ``onDone(task)`` runs after a
        successful run (before ``onFinished``), ``onEnd(task)`` after any end (after ``onFinished``). ``tta=None``:
        the base's own default (nnU-Net mirrors when its trainer allows)."""
        if inputVolume is None:
            raise ValueError("Select an input volume.")
        entry = self.modelEntry(modelName)
        if entry is None:
            raise ValueError(f"The base model '{modelName}' is not available.")
        labels = list(entry.get("labels") or [])
        if adapterPath:
            info = self.describeAdapter(adapterPath, modelName)
            if not info["compatible"]:
                raise ValueError(info["message"])
            labels = info["labels"] or labels

        def finished(task):
            if task.status == tasks.DONE and onDone is not None:
                onDone(task)
            if self.onFinished:
                self.onFinished(task)
            if onEnd is not None:
                onEnd(task)

        task = tasks.SegmentationTask(
            inputVolume, models.ModelRegistry.jobBase(entry), self.launcher or engine.defaultLauncher(),
            baseSettings=models.ModelRegistry.jobSettings(entry), adapterPath=adapterPath, device=device,
            outputSegmentation=outputSegmentation, labels=labels, tta=tta, largestComponent=largestComponent,
            createSurfaces=createSurfaces, onLog=self._log, onProgress=self._progress, onFinished=finished)
        return self.runner.run(task)

    def segmentFromParameters(self, p):
        """Segment with the parameter node's choices. A new output node (none selected) becomes the selected
        output, so the next Apply replaces it instead of adding another node."""

        def remember(task):
            if p.outputSegmentation is None or p.outputSegmentation is not task.outputSegmentation:
                p.outputSegmentation = task.outputSegmentation

        return self.segment(p.inputVolume, modelName=p.model, adapterPath=p.adapterPath or None, device=p.device,
                            outputSegmentation=p.outputSegmentation,
                            tta=tasks.testTimeAugmentationOption(p.testTimeAugmentation),
                            largestComponent=tasks.largestComponentOption(p.largestComponent),
                            createSurfaces=p.showIn3D, onDone=remember)


class LibraryLogic:
    """The clinician's loop on a :class:`TCURLoRALib.caselibrary.CaseLibrary`: fine-tune on its training
    cases, then segment each validation case with the new adapter and record its Dice per label.

    Cases are loaded into ``scene`` for the run and removed again afterwards. ``segmentLogic`` runs the
    validation segmentations (its runner must be free); the training goes through ``finetune(pairs, ...)``,
    a callable that starts a :class:`TCURLoRALib.tasks.FinetuneTask` and returns it (the module logic's
    ``finetune``).
    """

    def __init__(self, library, scene, segmentLogic: SegmentLogic) -> None:
        self.library = library
        self.scene = scene
        self.segmentLogic = segmentLogic
        self.loaded: Dict[str, Any] = {}

    def load(self, caseIds: Sequence[str]):
        pairs = []
        for caseId in caseIds:
            if caseId not in self.loaded:
                self.loaded[caseId] = self.library.loadCase(caseId, self.scene)
            pairs.append(self.loaded[caseId])
        return pairs

    def unload(self) -> None:
        for volume, segmentation in self.loaded.values():
            nodeio.removeNode(segmentation)
            nodeio.removeNode(volume)
        self.loaded = {}

    def trainingPairs(self):
        """(training pairs, validation pairs) loaded into the scene."""
        split = self.library.split()
        if not split["training"]:
            raise ValueError("The case library has no training case yet: add one with 'Add as training case'.")
        return self.load(split["training"]), self.load(split["validation"])

    def train(self, startFinetune: Callable, modelName: str, device: str = "auto",
              onValidated: Optional[Callable[[Dict[str, Dict[str, Optional[float]]]], None]] = None):
        """The loop after "Add as training case": load the cases, start the training with
        ``startFinetune(pairs, validationCount, onEnd) -> task`` (the last ``validationCount`` pairs validate;
        ``onEnd(task)`` is called when it ends), then segment each validation case with the new adapter and
        record its Dice (:meth:`validate`), ``onValidated(results)``; the loaded cases leave the scene at the
        end. Returns the training task."""
        training, validation = self.trainingPairs()

        def validated(results):
            self.unload()
            if onValidated:
                onValidated(results)

        def ended(task):
            if task.status == tasks.DONE and validation:
                self.validate(task.adapterPath, modelName, device=device, onDone=validated)
            else:
                self.unload()

        try:
            return startFinetune(training + validation, len(validation), ended)
        except Exception:
            self.unload()
            raise

    def validate(self, adapterPath: str, modelName: str, device: str = "auto",
                 onCase: Optional[Callable[[str, Dict[str, Optional[float]]], None]] = None,
                 onDone: Optional[Callable[[Dict[str, Dict[str, Optional[float]]]], None]] = None) -> None:
        """Segment every validation case with ``adapterPath`` (one after the other, in the background) and
        record the Dice per label in the library; ``onCase(caseId, scores)`` after each, ``onDone(all)``."""
        from .caselibrary import diceByName

        caseIds = list(self.library.split()["validation"])
        results: Dict[str, Dict[str, Optional[float]]] = {}
        pairs = dict(zip(caseIds, self.load(caseIds)))

        def next_case():
            if not caseIds:
                if onDone:
                    onDone(results)
                return
            caseId = caseIds.pop(0)
            volume, _ = pairs[caseId]

            def scored(task):
                if task.status != tasks.DONE:
                    if onDone:
                        onDone(results)
                    return
                reference, referenceNames = self.library.labelArray(caseId)
                names = {s["labelValue"]: s["name"] for s in nodeio.segments(task.outputSegmentation)}
                ids = [s["id"] for s in nodeio.segments(task.outputSegmentation)]
                predicted = nodeio.labelArrayFromSegmentation(task.outputSegmentation, volume, ids,
                                                              [s["labelValue"] for s in
                                                               nodeio.segments(task.outputSegmentation)])
                scores = diceByName(reference, referenceNames, predicted, names)
                nodeio.removeNode(task.outputSegmentation)
                self.library.recordDice(caseId, scores, adapterPath)
                results[caseId] = scores
                if onCase:
                    onCase(caseId, scores)
                next_case()

            self.segmentLogic.segment(volume, modelName=modelName, adapterPath=adapterPath, device=device,
                                      createSurfaces=False, onEnd=scored)

        next_case()
