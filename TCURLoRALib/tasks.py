"""Segmentation and fine-tuning runs: export the inputs, drive the worker process, import the results.

A task touches the MRML scene only in :meth:`WorkerTask.start` and :meth:`WorkerTask.processEvents`, which the
module logic calls from the main thread (``processEvents`` from a ``qt.QTimer``); the worker's output is read
by :class:`tcurlora.jobs.WorkerJob`'s threads into a queue. Nothing here blocks except
:meth:`WorkerTask.waitForCompletion`, meant for tests and headless scripts.

The launcher is injected: ``launcher(job: dict, workdir: str) -> WorkerJob`` (see
:func:`TCURLoRALib.engine.defaultLauncher`).
"""

import logging
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from tcurlora import jobs

from . import nodeio

IDLE, RUNNING, CANCELLING, DONE, ERROR, CANCELLED = "idle", "running", "cancelling", "done", "error", "cancelled"
ACTIVE = (RUNNING, CANCELLING)


def progressBarFormat(event: Dict[str, Any]) -> str:
    """``QProgressBar.format`` for a progress event: the percentage and the ETA when known."""
    eta = jobs.format_eta(event.get("eta_s"))
    return f"%p%  (ETA {eta})" if eta else "%p%"


def progressText(event: Dict[str, Any]) -> Tuple[int, str]:
    """(percent 0..100, one-line text) for a progress event."""
    step, total = event.get("step") or 0, event.get("total") or 0
    percent = int(round(100.0 * step / total)) if total else 0
    phase = {"train": "Training", "segment": "Segmenting"}.get(event.get("phase"), str(event.get("phase", "")))
    parts = [f"{phase} {step}/{total}" if total else phase]
    if isinstance(event.get("loss"), (int, float)):
        parts.append(f"loss {event['loss']:.4f}")
    if isinstance(event.get("dice"), (int, float)):
        parts.append(f"Dice {event['dice']:.3f}")
    eta = jobs.format_eta(event.get("eta_s"))
    if eta:
        parts.append(f"ETA {eta}")
    return max(0, min(100, percent)), " - ".join(parts)


class WorkerTask:
    """Common life cycle: start -> events -> result import -> cleanup.

    Callbacks (all optional, all called on the thread that calls :meth:`processEvents`):
    ``onLog(text)``, ``onProgress(event)``, ``onFinished(task)``.
    """

    keepWorkdirOnCancel = False

    def __init__(self, launcher: Callable, onLog: Optional[Callable[[str], None]] = None,
                 onProgress: Optional[Callable[[Dict[str, Any]], None]] = None,
                 onFinished: Optional[Callable[["WorkerTask"], None]] = None,
                 graceSeconds: float = jobs.DEFAULT_GRACE_S) -> None:
        self.launcher = launcher
        self.onLog = onLog
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.graceSeconds = graceSeconds
        self.status = IDLE
        self.workdir: Optional[str] = None
        self.jobDict: Optional[Dict[str, Any]] = None
        self.workerJob = None
        self.result: Optional[Dict[str, Any]] = None
        self.errorMessage = ""
        self.warnings: List[str] = []
        self.lastProgress: Optional[Dict[str, Any]] = None
        self.returncode: Optional[int] = None
        self._rawTail: List[str] = []
        self.startTime: Optional[float] = None

    # -- state

    @property
    def isActive(self) -> bool:
        return self.status in ACTIVE

    def _log(self, text: str) -> None:
        logging.info(f"TCURLoRA: {text}")
        if self.onLog:
            self.onLog(text)

    # -- life cycle

    def _prepare(self) -> Dict[str, Any]:
        """Export the inputs into ``self.workdir`` and return the job dict (subclasses)."""
        raise NotImplementedError

    def start(self) -> "WorkerTask":
        if self.isActive:
            raise RuntimeError("this task is already running")
        self.workdir = jobs.new_workdir()
        try:
            self.jobDict = self._prepare()
        except Exception:
            self._removeWorkdir()
            raise
        self._launch(self.jobDict)
        return self

    def _launch(self, jobDict: Dict[str, Any]) -> None:
        self.status = RUNNING
        self.result = None
        self.errorMessage = ""
        self.returncode = None
        self._rawTail = []
        self.startTime = time.monotonic()
        try:
            self.workerJob = self.launcher(jobDict, self.workdir)
            self.workerJob.start()
        except Exception as exc:
            self.status = ERROR
            self.errorMessage = f"Could not start the worker process: {exc}"
            self._removeWorkdir()
            raise RuntimeError(self.errorMessage)
        self._log("Worker started: " + " ".join(self.workerJob.command_line))

    def processEvents(self) -> bool:
        """Handle every event the worker sent since the last call. True while the task is still active."""
        if self.workerJob is None or not self.isActive:
            return False
        for event in self.workerJob.poll_events():
            self._handle(event)
            if not self.isActive:
                break
        return self.isActive

    def _handle(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            self.lastProgress = event
            self._onProgressEvent(event)
            if self.onProgress:
                self.onProgress(event)
        elif kind == "log":
            message = str(event.get("message", ""))
            if event.get("raw"):
                self._rawTail = (self._rawTail + [message])[-20:]
            self._log(message)
        elif kind == "warning":
            message = str(event.get("message", ""))
            self.warnings.append(message)
            self._log("Warning: " + message)
        elif kind == "error":
            self.errorMessage = str(event.get("message", "")) or "the worker reported an error"
            self._log("Error: " + self.errorMessage)
        elif kind == "result":
            self.result = event
        elif kind == "exit":
            self._finish(int(event.get("returncode", 1)), bool(event.get("cancelled")))
        else:
            self._log(f"(unknown event {kind!r})")

    def _onProgressEvent(self, event: Dict[str, Any]) -> None:
        pass

    def _finish(self, returncode: int, cancelled: bool) -> None:
        self.returncode = returncode
        resultCancelled = bool(self.result and self.result.get("cancelled"))
        if returncode == jobs.EXIT_OK and not resultCancelled:  # finished (even if a cancel came too late)
            try:
                self._importResults(self.result or {"outputs": {}, "metrics": {}})
                self.status = DONE
            except Exception as exc:
                logging.exception("TCURLoRA: importing the results failed")
                self.status = ERROR
                self.errorMessage = f"Importing the results failed: {exc}"
        elif returncode == jobs.EXIT_CANCELLED or resultCancelled or cancelled or self.status == CANCELLING:
            self.status = CANCELLED
        else:
            self.status = ERROR
            if not self.errorMessage:
                detail = " | ".join(self._rawTail[-5:])
                self.errorMessage = f"The worker process stopped with exit status {returncode}" + (
                    f": {detail}" if detail else ".")
        elapsed = time.monotonic() - self.startTime if self.startTime else 0.0
        self._log(f"Finished: {self.status} ({elapsed:.1f} s)" + (f" - {self.errorMessage}"
                                                                  if self.status == ERROR else ""))
        if not (self.status == CANCELLED and self.keepWorkdirOnCancel):
            self.cleanup()
        if self.onFinished:
            self.onFinished(self)

    def _importResults(self, result: Dict[str, Any]) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        """Ask the worker to stop; it is killed after the grace period. Returns at once."""
        if not self.isActive or self.workerJob is None:
            return
        self.status = CANCELLING
        self._log("Cancelling...")
        self.workerJob.cancel(self.graceSeconds)

    def _removeWorkdir(self) -> None:
        if self.workdir and os.path.isdir(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def cleanup(self) -> None:
        """Stop the worker if needed and remove the temporary folder."""
        if self.workerJob is not None:
            self.workerJob.cleanup()
        self._removeWorkdir()

    def waitForCompletion(self, timeoutSeconds: float = 600.0, idle: Optional[Callable[[], None]] = None,
                          pollSeconds: float = 0.02) -> str:
        """Block until the task ends (tests / headless use); ``idle`` is called between polls (e.g.
        ``slicer.app.processEvents``). Returns the final status; cancels and raises TimeoutError on time-out."""
        deadline = time.monotonic() + timeoutSeconds
        while self.processEvents():
            if time.monotonic() > deadline:
                self.cancel()
                if self.workerJob is not None:
                    self.workerJob.kill()
                raise TimeoutError(f"the worker did not finish within {timeoutSeconds:.0f} s")
            if idle:
                idle()
            time.sleep(pollSeconds)
        return self.status


class SegmentationTask(WorkerTask):
    """Segment one volume; the result goes into ``outputSegmentation`` (or a new segmentation node)."""

    def __init__(self, inputVolume, base: Any, launcher: Callable, adapterPath: Optional[str] = None,
                 device: str = "auto", outputSegmentation=None, labels: Sequence[Dict[str, Any]] = (),
                 tta: bool = False, largestComponent: bool = False, createSurfaces: bool = True,
                 outputName: Optional[str] = None, **kwargs) -> None:
        super().__init__(launcher, **kwargs)
        if inputVolume is None:
            raise ValueError("Select an input volume.")
        self.inputVolume = inputVolume
        self.scene = inputVolume.GetScene()
        self.base = base
        self.adapterPath = adapterPath or None
        self.device = device
        self.outputSegmentation = outputSegmentation
        self.labels = list(labels)
        self.tta = tta
        self.largestComponent = largestComponent
        self.createSurfaces = createSurfaces
        self.outputName = outputName

    def _prepare(self) -> Dict[str, Any]:
        if self.adapterPath and not os.path.isfile(self.adapterPath):
            raise ValueError(f"The adapter file '{self.adapterPath}' does not exist.")
        inputPath = os.path.join(self.workdir, "input.nrrd")
        nodeio.writeVolume(self.inputVolume, inputPath)
        return jobs.segment_job(base=self.base, inputs=[inputPath],
                                output=os.path.join(self.workdir, "segmentation.seg.nrrd"),
                                stop_file=os.path.join(self.workdir, jobs.STOP_FILE_NAME),
                                adapter=self.adapterPath, device=self.device, tta=self.tta,
                                largest_component=self.largestComponent)

    def _importResults(self, result: Dict[str, Any]) -> None:
        path = (result.get("outputs") or {}).get("segmentation") or self.jobDict["output"]
        if self.inputVolume.GetScene() is not self.scene or self.scene.GetNodeByID(self.inputVolume.GetID()) is None:
            raise RuntimeError("the input volume was removed from the scene while it was being segmented")
        if not os.path.isfile(path):
            raise IOError("the worker reported success but wrote no segmentation file")
        node = self.outputSegmentation
        if node is None or node.GetScene() is not self.scene:  # none chosen, or deleted while running
            name = self.outputName or f"{self.inputVolume.GetName()} segmentation"
            node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        nodeio.readSegmentation(path, node, labels=self.labels, referenceVolumeNode=self.inputVolume)
        nodeio.showSegmentation(node, surfaces=self.createSurfaces)
        self.outputSegmentation = node
        self._log(f"Segmentation '{node.GetName()}': " + ", ".join(nodeio.segmentNames(node)))


class FinetuneTask(WorkerTask):
    """Train an adapter on (volume, segmentation) pairs of the scene.

    ``segmentToValue`` maps segment names to label values (unmapped segments are background); ``labelTable``
    names/colours the values (written as the segment names of the training labels, which the engine maps by
    name); ``jobLabels`` is the job's ``"labels"`` (None = the base's labels). On success the adapter is copied
    to ``adapterStore`` (:attr:`adapterPath`); a cancelled run keeps its folder so it can be resumed.
    """

    keepWorkdirOnCancel = True

    def __init__(self, cases: Sequence[Tuple[Any, Any]], base: Any, launcher: Callable,
                 segmentToValue: Dict[str, int], labelTable: Sequence[Dict[str, Any]],
                 jobLabels: Optional[Sequence[Dict[str, Any]]] = None,
                 validation: Sequence[Tuple[Any, Any]] = (), method: str = "tcurlora", rank: int = 8,
                 steps: int = 300, lr: Optional[float] = None, patchSize: Optional[Sequence[int]] = None,
                 seed: int = 0, device: str = "auto", adapterStore: Optional[str] = None,
                 adapterName: str = "adapter", curves=None, **kwargs) -> None:
        super().__init__(launcher, **kwargs)
        if not cases:
            raise ValueError("Add at least one training case (a volume and its segmentation).")
        self.cases = list(cases)
        self.validation = list(validation)
        self.base = base
        self.segmentToValue = dict(segmentToValue)
        self.labelTable = list(labelTable)
        self.jobLabels = list(jobLabels) if jobLabels is not None else None
        self.method, self.rank, self.steps, self.lr = method, rank, steps, lr
        self.patchSize = list(patchSize) if patchSize else None
        self.seed, self.device = seed, device
        self.adapterStore = adapterStore
        self.adapterName = adapterName
        self.curves = curves
        self.adapterPath: Optional[str] = None
        self.metrics: Dict[str, Any] = {}

    def _exportCase(self, index: int, volumeNode, segmentationNode, prefix: str) -> Dict[str, str]:
        if volumeNode is None or segmentationNode is None:
            raise ValueError(f"{prefix} case {index + 1}: select both a volume and a segmentation.")
        mapped = {s["id"]: self.segmentToValue[s["name"]] for s in nodeio.segments(segmentationNode)
                  if s["name"] in self.segmentToValue}
        if not mapped:
            raise ValueError(f"{prefix} case {index + 1}: '{segmentationNode.GetName()}' has no segment that is "
                             "mapped to a label.")
        stem = os.path.join(self.workdir, f"{prefix.lower()}_{index:03d}")
        image = nodeio.writeVolume(volumeNode, stem + "_image.nrrd")
        label = stem + "_label.seg.nrrd"
        present = nodeio.writeTrainingLabel(segmentationNode, volumeNode, label, mapped, self.labelTable)
        if not present:
            self._log(f"Warning: {prefix.lower()} case {index + 1} ('{segmentationNode.GetName()}') has no "
                      "labelled voxels inside the volume.")
        return {"image": image, "label": label}

    def _prepare(self) -> Dict[str, Any]:
        cases = [self._exportCase(i, v, s, "Training") for i, (v, s) in enumerate(self.cases)]
        validation = [self._exportCase(i, v, s, "Validation") for i, (v, s) in enumerate(self.validation)]
        if self.curves is not None:
            self.curves.clear()
        return jobs.finetune_job(base=self.base, cases=cases, validation=validation, labels=self.jobLabels,
                                 method=self.method, rank=self.rank, steps=self.steps, lr=self.lr,
                                 patch_size=self.patchSize, out=os.path.join(self.workdir, "adapter.safetensors"),
                                 stop_file=os.path.join(self.workdir, jobs.STOP_FILE_NAME), resume=False,
                                 seed=self.seed, device=self.device)

    @property
    def canResume(self) -> bool:
        return self.status == CANCELLED and bool(self.workdir) and os.path.isdir(self.workdir) \
            and self.jobDict is not None

    def resume(self) -> "FinetuneTask":
        """Run the cancelled job again with ``"resume": true`` in the same folder."""
        if not self.canResume:
            raise RuntimeError("There is no cancelled training to resume.")
        self.jobDict = dict(self.jobDict, resume=True)
        self._launch(self.jobDict)
        return self

    def _onProgressEvent(self, event: Dict[str, Any]) -> None:
        if self.curves is not None:
            self.curves.addProgressEvent(event)

    def _importResults(self, result: Dict[str, Any]) -> None:
        outputs = result.get("outputs") or {}
        path = outputs.get("adapter") or self.jobDict["out"]
        if not os.path.isfile(path):
            raise IOError("the worker reported success but wrote no adapter file")
        self.metrics = dict(result.get("metrics") or {})
        store = self.adapterStore or os.path.join(os.path.dirname(self.workdir), "tcurlora-adapters")
        os.makedirs(store, exist_ok=True)
        target = uniquePath(os.path.join(store, safeFileName(self.adapterName) + ".safetensors"))
        shutil.copyfile(path, target)
        self.adapterPath = target
        self._log(f"Adapter stored as {target}")


def safeFileName(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name).strip())
    return keep.strip("._") or "adapter"


def uniquePath(path: str) -> str:
    """``path``, or ``path`` with ``-2``, ``-3``... before the extension when it exists."""
    if not os.path.exists(path):
        return path
    folder, name = os.path.split(path)
    stem, ext = (name[:-len(".safetensors")], ".safetensors") if name.endswith(".safetensors") \
        else os.path.splitext(name)
    index = 2
    while os.path.exists(os.path.join(folder, f"{stem}-{index}{ext}")):
        index += 1
    return os.path.join(folder, f"{stem}-{index}{ext}")
