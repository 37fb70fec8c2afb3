"""Segmentation and fine-tuning runs: export the inputs, drive the worker process, import the results.

A task touches the MRML scene only in :meth:`WorkerTask.start` (taking the input arrays) and
:meth:`WorkerTask.processEvents` (putting the results in), which the module logic calls from the main thread
(``processEvents`` from a ``qt.QTimer``, see :class:`TaskRunner`). Input and output files are written and read
on a :class:`Background` thread; the worker's output is read by :class:`tcurlora.jobs.WorkerJob`'s threads
into a queue. Nothing here blocks except the ``waitForCompletion`` methods, meant for tests and scripts.

The launcher is injected: ``launcher(job: dict, workdir: str) -> WorkerJob`` (see
:func:`TCURLoRALib.engine.defaultLauncher`).
"""

import logging
import os
import queue
import shutil
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from tcurlora import jobs, protocol
from tcurlora.atomic import atomic_copy

from . import nodeio

IDLE, PREPARING, RUNNING, CANCELLING, IMPORTING = "idle", "preparing", "running", "cancelling", "importing"
DONE, ERROR, CANCELLED = "done", "error", "cancelled"
ACTIVE = (PREPARING, RUNNING, CANCELLING, IMPORTING)
# Cancel = the stop file, then the process tree is killed: the worker is gone within 2 s.
CANCEL_GRACE_S = jobs.DEFAULT_GRACE_S


class Background:
    """One function on a background thread; :attr:`done`, then :meth:`outcome` on the main thread. The
    function must not touch MRML or Qt (files and arrays only). ``report(event)`` queues progress events."""

    def __init__(self, function: Callable, *args) -> None:
        self._events: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self._result = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(function,) + args, daemon=True)
        self._thread.start()

    def _run(self, function, *args) -> None:
        try:
            self._result = function(*args, self._events.put)
        except BaseException as exc:  # handed to the main thread
            self._error = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def events(self) -> List[Dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def outcome(self):
        if self._error is not None:
            raise self._error
        return self._result


def progressBarFormat(event: Dict[str, Any]) -> str:
    """``QProgressBar.format`` for a progress event: the percentage and the ETA when known."""
    eta = jobs.format_eta(event.get("eta_s"))
    return f"%p%  (ETA {eta})" if eta else "%p%"


PHASES = {"train": "Training", "segment": "Segmenting", "export": "Exporting", "import": "Importing",
          "surfaces": "Building 3D surfaces", "install": "Installing packages", "download": "Downloading"}


def progressText(event: Dict[str, Any]) -> Tuple[int, str]:
    """(percent 0..100, one-line text) for a progress event."""
    step, total = event.get("step") or 0, event.get("total") or 0
    percent = int(round(100.0 * step / total)) if total else 0
    phase = PHASES.get(event.get("phase"), str(event.get("phase", "")))
    if event.get("unit") == "bytes":  # a model download: sizes, not steps
        parts = [" ".join(p for p in (phase, event.get("file"), jobs.format_size(step, total)) if p)]
    else:
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
    """Common life cycle, driven by :meth:`processEvents` from a timer on the main thread:

    PREPARING (arrays taken from the nodes on the main thread, files written on a background thread) ->
    RUNNING (the worker process; its events) -> IMPORTING (result files read on a background thread, then
    put into the scene on the main thread; optional follow-up such as 3D surfaces) -> DONE / ERROR / CANCELLED.

    Callbacks (all optional, all called on the thread that calls :meth:`processEvents`):
    ``onLog(text)``, ``onProgress(event)``, ``onFinished(task)``.
    """

    def __init__(self, launcher: Callable, onLog: Optional[Callable[[str], None]] = None,
                 onProgress: Optional[Callable[[Dict[str, Any]], None]] = None,
                 onFinished: Optional[Callable[["WorkerTask"], None]] = None,
                 graceSeconds: float = CANCEL_GRACE_S) -> None:
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
        self._background: Optional[Background] = None
        self._onBackgroundDone: Optional[Callable[[Any], None]] = None
        self._cancelRequested = False
        self._aborted = False

    # -- state

    @property
    def isActive(self) -> bool:
        return self.status in ACTIVE

    def _log(self, text: str) -> None:
        logging.info(f"TCURLoRA: {text}")
        if self.onLog:
            self.onLog(text)

    def _report(self, event: Dict[str, Any]) -> None:
        event = dict(event, event="progress")
        self.lastProgress = event
        self._onProgressEvent(event)
        if self.onProgress:
            self.onProgress(event)

    # -- the steps a subclass provides

    def _snapshot(self) -> Any:
        """Main thread: take what the job needs from the scene (arrays, names); raise ValueError on bad input."""
        raise NotImplementedError

    def _writeInputs(self, snapshot: Any, report: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
        """Background thread: write the input files into ``self.workdir``; return the job dict."""
        raise NotImplementedError

    def _readOutputs(self, result: Dict[str, Any], report: Callable[[Dict[str, Any]], None]) -> Any:
        """Background thread: read what the worker wrote."""
        raise NotImplementedError

    def _applyOutputs(self, data: Any) -> Optional[Tuple[Callable, Callable]]:
        """Main thread: put the outputs into the scene. May return ``(backgroundStep, mainStep)`` for a
        follow-up (3D surfaces): ``mainStep(backgroundStep(report))``."""
        raise NotImplementedError

    # -- life cycle

    def start(self) -> "WorkerTask":
        """Export the inputs (in the background) and start the worker. Returns at once."""
        if self.isActive:
            raise RuntimeError("this task is already running")
        self.workdir = jobs.new_workdir()
        self.startTime = time.monotonic()
        self._cancelRequested = False
        try:
            snapshot = self._snapshot()
        except Exception:
            self._removeWorkdir()
            raise
        self.status = PREPARING
        self._report({"phase": "export", "step": 0, "total": 1})
        self._inBackground(lambda report: self._writeInputs(snapshot, report), self._inputsWritten)
        return self

    def _inBackground(self, function: Callable, then: Callable[[Any], None]) -> None:
        self._background = Background(function)
        self._onBackgroundDone = then

    def _inputsWritten(self, jobDict: Dict[str, Any]) -> None:
        self.jobDict = jobDict
        if self._cancelRequested:
            self._end(CANCELLED)
            return
        self._launch(jobDict)

    def _launch(self, jobDict: Dict[str, Any]) -> None:
        self.status = RUNNING
        self.result = None
        self.errorMessage = ""
        self.returncode = None
        self._rawTail = []
        try:
            self.workerJob = self.launcher(jobDict, self.workdir)
            self.workerJob.start()
        except Exception as exc:
            raise RuntimeError(f"Could not start the worker process: {exc}")
        self._log("Worker started: " + " ".join(self.workerJob.command_line))

    def processEvents(self) -> bool:
        """Handle what happened since the last call (background steps, worker events). True while active."""
        if not self.isActive:
            return False
        if self._background is not None:
            for event in self._background.events():
                self._report(event)
            if not self._background.done:
                return True
            background, then = self._background, self._onBackgroundDone
            self._background = self._onBackgroundDone = None
            importing = self.status == IMPORTING
            try:
                then(background.outcome())
            except Exception as exc:
                logging.exception("TCURLoRA: a preparation or import step failed")
                self.errorMessage = f"Importing the results failed: {exc}" if importing else str(exc)
                self._end(ERROR)
            return self.isActive
        if self.workerJob is None:
            return self.isActive
        for event in self.workerJob.poll_events():
            self._handle(event)
            if self.status not in (RUNNING, CANCELLING):
                break
        return self.isActive

    def _handle(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            self._report(event)
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
            self._workerExited(int(event.get("returncode", 1)), bool(event.get("cancelled")))
        else:
            self._log(f"(unknown event {kind!r})")

    def _onProgressEvent(self, event: Dict[str, Any]) -> None:
        pass

    def _workerExited(self, returncode: int, cancelled: bool) -> None:
        self.returncode = returncode
        resultCancelled = bool(self.result and self.result.get("cancelled"))
        if returncode == jobs.EXIT_OK and not resultCancelled:  # finished (even if a cancel came too late)
            self.status = IMPORTING
            self._report({"phase": "import", "step": 0, "total": 1})
            result = self.result or {"outputs": {}, "metrics": {}}
            self._inBackground(lambda report: self._readOutputs(result, report), self._outputsRead)
        elif returncode == jobs.EXIT_CANCELLED or resultCancelled or cancelled or self.status == CANCELLING:
            self._end(CANCELLED)
        else:
            if not self.errorMessage:
                detail = " | ".join(self._rawTail[-5:])
                self.errorMessage = f"The worker process stopped with exit status {returncode}" + (
                    f": {detail}" if detail else ".")
            self._end(ERROR)

    def _outputsRead(self, data: Any) -> None:
        followUp = self._applyOutputs(data)
        self._report({"phase": "import", "step": 1, "total": 1})
        if followUp is None:
            self._end(DONE)
            return
        backgroundStep, mainStep = followUp

        def finish(value):
            mainStep(value)
            self._end(DONE)

        self._inBackground(backgroundStep, finish)

    def _end(self, status: str) -> None:
        self.status = status
        self._background = self._onBackgroundDone = None
        elapsed = time.monotonic() - self.startTime if self.startTime else 0.0
        self._log(f"Finished: {self.status} ({elapsed:.1f} s)" + (f" - {self.errorMessage}"
                                                                  if self.status == ERROR else ""))
        if not (self.status == CANCELLED and not self._aborted and self._keepsWorkdir()):
            self.cleanup()
        if self.onFinished:
            self.onFinished(self)

    def cancel(self) -> None:
        """Ask the worker to stop (stop file); it is killed after :data:`CANCEL_GRACE_S`. Returns at once.
        Before the worker started, it is not started; once it has finished, the import completes."""
        if not self.isActive:
            return
        self._cancelRequested = True
        if self.status == RUNNING and self.workerJob is not None:
            self.status = CANCELLING
            self._log("Cancelling...")
            self.workerJob.cancel(self.graceSeconds)

    def abort(self) -> None:
        """End the task now (scene closed, module cleanup): kill the worker, status CANCELLED, remove the
        temporary folder, ``onFinished`` called. Nothing is imported afterwards."""
        if not self.isActive:
            self.cleanup()
            return
        self._aborted = True  # nothing to resume into: the scene is gone
        self._log("Stopped: the scene was closed")
        self._end(CANCELLED)

    def _keepsWorkdir(self) -> bool:
        """Whether a cancelled run keeps its folder (to be resumed)."""
        return False

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
        _pollUntilDone(self.processEvents, self.abort, timeoutSeconds, idle, pollSeconds)
        return self.status


def _pollUntilDone(poll: Callable[[], bool], stop: Callable[[], None], timeoutSeconds: float,
                   idle: Optional[Callable[[], None]], pollSeconds: float) -> None:
    """Call ``poll`` until it returns False, ``idle`` between calls; on time-out ``stop()`` and TimeoutError."""
    deadline = time.monotonic() + timeoutSeconds
    while poll():
        if time.monotonic() > deadline:
            stop()
            raise TimeoutError(f"the task did not finish within {timeoutSeconds:.0f} s")
        if idle:
            idle()
        time.sleep(pollSeconds)


class TaskRunner:
    """One task at a time; :meth:`poll` handles its events and is called by ``timer`` (an object with
    ``start()``/``stop()``, a ``qt.QTimer`` in Slicer, see :mod:`TCURLoRALib.slicerapp`) or by hand in tests."""

    def __init__(self, timer=None) -> None:
        self.task: Optional[WorkerTask] = None
        self.timer = timer

    @property
    def isRunning(self) -> bool:
        return self.task is not None and self.task.isActive

    def run(self, task: WorkerTask) -> WorkerTask:
        if self.isRunning:
            raise RuntimeError("A TCURLoRA job is already running; cancel it first.")
        self.task = task
        task.start()
        self._startTimer()
        return task

    def resume(self, task) -> None:
        self.task = task
        task.resume()
        self._startTimer()

    def _startTimer(self) -> None:
        if self.timer is not None:
            self.timer.start()

    def poll(self) -> bool:
        """Handle the task's events; True while a task runs (a callback may have started the next one)."""
        if self.task is not None:
            self.task.processEvents()
        active = self.isRunning
        if not active and self.timer is not None:
            self.timer.stop()
        return active

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def waitForCompletion(self, timeoutSeconds: float = 600.0, idle: Optional[Callable[[], None]] = None,
                          pollSeconds: float = 0.02):
        """Block (self-tests, scripts) until nothing runs, tasks chained by callbacks included, keeping the
        application responsive through ``idle``; the last task's status. TimeoutError (task ended) on time-out."""
        _pollUntilDone(self.poll, self.shutdown, timeoutSeconds, idle, pollSeconds)
        return self.task.status if self.task is not None else None

    def shutdown(self) -> None:
        """End the task now (module cleanup, scene close): afterwards nothing runs and a new run may start."""
        if self.timer is not None:
            self.timer.stop()
        if self.task is not None:
            self.task.abort()


DEFAULT_YES_NO = {"default": None, "yes": True, "no": False}


def largestComponentOption(choice: str) -> Optional[bool]:
    """The GUI's "keep largest component" choice -> the job value: ``"default"`` -> None (the base model
    decides: deepbet keeps its largest component), ``"yes"`` -> True, ``"no"`` -> False."""
    return _defaultYesNo(choice, "largest component")


def testTimeAugmentationOption(choice) -> Optional[bool]:
    """The GUI's test-time augmentation (mirroring) choice -> the job value: ``"default"`` -> None (the base's own
    tool decides: nnU-Net mirrors when its trainer allows, as nnUNetv2_predict does; the others do not),
    ``"yes"`` -> True, ``"no"`` -> False; a check box's True/False as it is."""
    return choice if isinstance(choice, bool) else _defaultYesNo(choice, "test-time augmentation")


def _defaultYesNo(choice: str, what: str) -> Optional[bool]:
    if choice not in DEFAULT_YES_NO:
        raise ValueError(f"{what} must be one of {', '.join(DEFAULT_YES_NO)}, got {choice!r}")
    return DEFAULT_YES_NO[choice]


class SegmentationTask(WorkerTask):
    """Segment one volume; the result goes into ``outputSegmentation`` (or a new segmentation node, which then
    becomes :attr:`outputSegmentation`). ``largestComponent=None`` and ``tta=None`` leave the choice to the base
    model."""

    def __init__(self, inputVolume, base: Any, launcher: Callable, adapterPath: Optional[str] = None,
                 device: str = "auto", outputSegmentation=None, labels: Sequence[Dict[str, Any]] = (),
                 tta: Optional[bool] = None, largestComponent: Optional[bool] = None, createSurfaces: bool = True,
                 outputName: Optional[str] = None, baseSettings: Optional[Dict[str, Any]] = None,
                 **kwargs) -> None:
        super().__init__(launcher, **kwargs)
        if inputVolume is None:
            raise ValueError("Select an input volume.")
        self.inputVolume = inputVolume
        self.scene = inputVolume.GetScene()
        self.base = base
        self.baseSettings = dict(baseSettings or {})
        self.adapterPath = adapterPath or None
        self.device = device
        self.outputSegmentation = outputSegmentation
        self.labels = list(labels)
        self.tta = tta
        self.largestComponent = largestComponent
        self.createSurfaces = createSurfaces
        self.outputName = outputName

    def _snapshot(self):
        if self.adapterPath and not os.path.isfile(self.adapterPath):
            raise ValueError(f"The adapter file '{self.adapterPath}' does not exist.")
        return nodeio.arrayFromVolume(self.inputVolume), nodeio.ijkToRAS(self.inputVolume)

    def _writeInputs(self, snapshot, report) -> Dict[str, Any]:
        array, geometry = snapshot
        inputPath = nodeio.writeVolumeArray(os.path.join(self.workdir, "input.nrrd"), array, geometry)
        report({"phase": "export", "step": 1, "total": 1})
        return jobs.segment_job(base=self.base, inputs=[inputPath],
                                output=os.path.join(self.workdir, "segmentation.seg.nrrd"),
                                stop_file=os.path.join(self.workdir, jobs.STOP_FILE_NAME),
                                adapter=self.adapterPath, device=self.device, tta=self.tta,
                                largest_component=self.largestComponent, **self.baseSettings)

    def _readOutputs(self, result, report):
        path = (result.get("outputs") or {}).get("segmentation") or self.jobDict["output"]
        if not os.path.isfile(path):
            raise IOError("the worker reported success but wrote no segmentation file")
        return nodeio.readLabelFile(path)

    def _applyOutputs(self, data):
        labelArray, geometry, fileNames = data
        if self.inputVolume.GetScene() is not self.scene or self.scene.GetNodeByID(self.inputVolume.GetID()) is None:
            raise RuntimeError("the input volume was removed from the scene while it was being segmented")
        node = self.outputSegmentation
        if node is None or node.GetScene() is not self.scene:  # none chosen, or deleted while running
            name = self.outputName or f"{self.inputVolume.GetName()} segmentation"
            node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        known = {int(e["value"]) for e in self.labels}
        labels = self.labels + [{"value": v, "name": n} for v, n in sorted(fileNames.items()) if v not in known]
        nodeio.updateSegmentationFromLabelArray(node, labelArray, geometry, labels)
        node.SetReferenceImageGeometryParameterFromVolumeNode(self.inputVolume)
        node.SetAndObserveTransformNodeID(self.inputVolume.GetTransformNodeID())
        nodeio.showSegmentation(node, surfaces=False)
        self.outputSegmentation = node
        self._log(f"Segmentation '{node.GetName()}': " + ", ".join(nodeio.segmentNames(node)))
        if not self.createSurfaces or not nodeio.segmentNames(node):
            return None
        copy = nodeio.surfaceCopy(node)

        def build(report):
            report({"phase": "surfaces", "step": 0, "total": 1})
            nodeio.buildSurfaces(copy)
            return copy

        return build, lambda built: nodeio.adoptSurfaces(node, built)


class FinetuneTask(WorkerTask):
    """Train an adapter on (volume, segmentation) pairs of the scene.

    ``segmentToValue`` maps segment names to label values (unmapped segments are background); ``labelTable``
    names/colours the values (written as the segment names of the training labels, which the engine maps by
    name); ``jobLabels`` is the job's ``"labels"`` (None = the base's labels). On success the adapter is copied
    to ``adapterStore`` (:attr:`adapterPath`); a cancelled run keeps its folder so it can be resumed.
    ``startFrom`` (an adapter file of this base with the same labels) continues that adapter instead of
    starting a new one.
    """

    def __init__(self, cases: Sequence[Tuple[Any, Any]], base: Any, launcher: Callable,
                 segmentToValue: Dict[str, int], labelTable: Sequence[Dict[str, Any]],
                 jobLabels: Optional[Sequence[Dict[str, Any]]] = None,
                 validation: Sequence[Tuple[Any, Any]] = (), method: str = "tcurlora", rank: int = 8,
                 steps: int = protocol.default("steps"), lr: Optional[float] = None, patchSize: Optional[Sequence[int]] = None,
                 seed: int = 0, device: str = "auto", adapterStore: Optional[str] = None,
                 adapterName: str = "adapter", curves=None, startFrom: Optional[str] = None,
                 baseSettings: Optional[Dict[str, Any]] = None, **kwargs) -> None:
        super().__init__(launcher, **kwargs)
        self.startFrom = startFrom
        if not cases:
            raise ValueError("Add at least one training case (a volume and its segmentation).")
        self.cases = list(cases)
        self.validation = list(validation)
        self.base = base
        self.baseSettings = dict(baseSettings or {})  # e.g. the fold of an nnU-Net folder
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

    def _caseArrays(self, index: int, volumeNode, segmentationNode, prefix: str):
        if volumeNode is None or segmentationNode is None:
            raise ValueError(f"{prefix} case {index + 1}: select both a volume and a segmentation.")
        mapped = {s["id"]: self.segmentToValue[s["name"]] for s in nodeio.segments(segmentationNode)
                  if s["name"] in self.segmentToValue}
        if not mapped:
            raise ValueError(f"{prefix} case {index + 1}: '{segmentationNode.GetName()}' has no segment that is "
                             "mapped to a label.")
        ids = list(mapped)
        label = nodeio.labelArrayFromSegmentation(segmentationNode, volumeNode, ids, [mapped[i] for i in ids])
        if not label.any():
            self._log(f"Warning: {prefix.lower()} case {index + 1} ('{segmentationNode.GetName()}') has no "
                      "labelled voxels inside the volume.")
        stem = f"{prefix.lower()}_{index:03d}"
        return stem, nodeio.arrayFromVolume(volumeNode), nodeio.ijkToRAS(volumeNode), label

    def _snapshot(self):
        training = [self._caseArrays(i, v, s, "Training") for i, (v, s) in enumerate(self.cases)]
        validation = [self._caseArrays(i, v, s, "Validation") for i, (v, s) in enumerate(self.validation)]
        if self.curves is not None:
            self.curves.clear()
        return training, validation

    def _writeInputs(self, snapshot, report) -> Dict[str, Any]:
        training, validation = snapshot
        total, done = len(training) + len(validation), 0
        written = ([], [])
        for group, cases in zip(written, snapshot):
            for stem, image, geometry, label in cases:
                stem = os.path.join(self.workdir, stem)
                group.append({"image": nodeio.writeVolumeArray(stem + "_image.nrrd", image, geometry),
                              "label": stem + "_label.seg.nrrd"})
                nodeio.writeLabelArray(stem + "_label.seg.nrrd", label, geometry, self.labelTable)
                done += 1
                report({"phase": "export", "step": done, "total": total})
        return jobs.finetune_job(base=self.base, cases=written[0], validation=written[1], labels=self.jobLabels,
                                 method=self.method, rank=self.rank, steps=self.steps, lr=self.lr,
                                 patch_size=self.patchSize, out=os.path.join(self.workdir, "adapter.safetensors"),
                                 stop_file=os.path.join(self.workdir, jobs.STOP_FILE_NAME), resume=False,
                                 seed=self.seed, device=self.device, start_from=self.startFrom, **self.baseSettings)

    @property
    def checkpoint(self) -> Optional[str]:
        """The checkpoint a cancelled worker reported (None when it was killed before reaching one)."""
        path = ((self.result or {}).get("outputs") or {}).get("checkpoint")
        return path if path and os.path.isfile(path) else None

    def _keepsWorkdir(self) -> bool:
        return self.checkpoint is not None

    @property
    def canResume(self) -> bool:
        return self.status == CANCELLED and self.jobDict is not None and self.checkpoint is not None

    def resume(self) -> "FinetuneTask":
        """Run the cancelled job again with ``"resume": true`` in the same folder."""
        if not self.canResume:
            raise RuntimeError("There is no cancelled training to resume.")
        self.jobDict = dict(self.jobDict, resume=True)
        self._cancelRequested = False
        try:
            self._launch(self.jobDict)
        except RuntimeError as exc:
            self.errorMessage = str(exc)
            self._end(ERROR)
            raise
        return self

    def _onProgressEvent(self, event: Dict[str, Any]) -> None:
        if self.curves is not None and event.get("phase") == "train":
            self.curves.addProgressEvent(event)

    def _readOutputs(self, result, report):
        outputs = result.get("outputs") or {}
        path = outputs.get("adapter") or self.jobDict["out"]
        if not os.path.isfile(path):
            raise IOError("the worker reported success but wrote no adapter file")
        store = self.adapterStore or os.path.join(os.path.dirname(self.workdir), "tcurlora-adapters")
        os.makedirs(store, exist_ok=True)
        target = uniquePath(os.path.join(store, safeFileName(self.adapterName) + ".safetensors"))
        atomic_copy(path, target)
        return target, dict(result.get("metrics") or {})

    def _applyOutputs(self, data):
        self.adapterPath, self.metrics = data
        self._log(f"Adapter stored as {self.adapterPath}")
        return None


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
