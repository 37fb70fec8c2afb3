"""Pieces that need the running Slicer application (``qt``, ``slicer.app``), shared by both modules.

* :class:`TaskDriver` - polls a running task from a ``qt.QTimer`` on the main thread (the GUI never blocks);
* custom base models remembered across sessions (application settings);
* small widget helpers (model / device combo boxes, the "Add model..." menu, file dialogs).

Not importable without Slicer; everything testable lives in the other ``TCURLoRALib`` modules.
"""

import json
import os
from typing import Callable, List, Optional

import qt

import slicer

from .models import ModelRegistry

DEVICE_CHOICES = (("Auto (GPU if available)", "auto"), ("CPU", "cpu"), ("GPU (CUDA)", "cuda"))
CUSTOM_MODELS_SETTINGS_KEY = "TCURLoRA/CustomModels"
POLL_INTERVAL_MS = 200


class TaskDriver:
    """Runs one :class:`TCURLoRALib.tasks.WorkerTask` at a time; its events are handled on the main thread by a
    timer, so callbacks may touch the scene and the GUI."""

    def __init__(self, intervalMs: int = POLL_INTERVAL_MS) -> None:
        self.task = None
        self.timer = qt.QTimer()
        self.timer.setInterval(intervalMs)
        self.timer.connect("timeout()", self._onTimeout)

    @property
    def isRunning(self) -> bool:
        return self.task is not None and self.task.isActive

    def run(self, task) -> None:
        if self.isRunning:
            raise RuntimeError("A TCURLoRA job is already running; cancel it first.")
        self.task = task
        task.start()
        self.timer.start()

    def resume(self, task) -> None:
        self.task = task
        task.resume()
        self.timer.start()

    def _onTimeout(self) -> None:
        if self.task is None or not self.task.processEvents():
            self.timer.stop()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def waitForCompletion(self, timeoutSeconds: float = 600.0) -> Optional[str]:
        """Block (self-tests, scripts) while keeping the application responsive."""
        if self.task is None:
            return None
        try:
            return self.task.waitForCompletion(timeoutSeconds, idle=slicer.app.processEvents)
        finally:
            if not self.task.isActive:
                self.timer.stop()

    def shutdown(self) -> None:
        """Stop polling and stop/clean the task (module cleanup, scene close)."""
        self.timer.stop()
        if self.task is not None:
            self.task.cleanup()


class EngineLogicMixin:
    """Base models and dependencies, shared by both module logics (which set ``self.registry`` and
    ``self.dependencyInstaller``)."""

    registry = None
    dependencyInstaller = None

    def models(self):
        return self.registry.entries()

    def modelEntry(self, name: str):
        return self.registry.ensure(name)

    @staticmethod
    def modelDescription(entry) -> str:
        from .models import labelsText

        text = f"Labels: {labelsText(entry.get('labels', []))}"
        if entry.get("kind") == "catalog" and not entry.get("cached", True):
            text += " - the weights are downloaded on first use."
        return text

    def addBundleModel(self, folder: str):
        entry = self.registry.addBundle(folder)
        saveCustomModels(self.registry)
        return entry

    def addSpecModel(self, spec: str, weights: str):
        entry = self.registry.addSpec(spec, weights)
        saveCustomModels(self.registry)
        return entry

    def ensureDependencies(self) -> bool:
        """True when the engine's packages are importable (asking, then installing, if they are not)."""
        if self.dependencyInstaller is not None:
            return self.dependencyInstaller()
        import logging

        from .dependencies import slicerInstaller

        return slicerInstaller(log=logging.info).ensure()


# ----------------------------------------------------------------------------------------------------------
# settings


def loadCustomModels() -> List[dict]:
    text = qt.QSettings().value(CUSTOM_MODELS_SETTINGS_KEY, "")
    try:
        entries = json.loads(text) if text else []
    except (TypeError, ValueError):
        return []
    return [e for e in entries if isinstance(e, dict)]


def saveCustomModels(registry: ModelRegistry) -> None:
    qt.QSettings().setValue(CUSTOM_MODELS_SETTINGS_KEY, json.dumps(registry.customEntries()))


def adapterStoreDir() -> str:
    """Where trained adapters are kept until the user saves them (Slicer's cache folder)."""
    folder = os.path.join(slicer.app.cachePath, "TCURLoRA", "adapters")
    os.makedirs(folder, exist_ok=True)
    return folder


# ----------------------------------------------------------------------------------------------------------
# widgets


def populateModelComboBox(comboBox, entries, selectedName: str) -> None:
    wasBlocked = comboBox.blockSignals(True)
    try:
        comboBox.clear()
        for entry in entries:
            title = entry.get("title") or entry["name"]
            if entry.get("kind") == "catalog" and not entry.get("cached", True):
                title += "  (downloaded on first use)"
            comboBox.addItem(title, entry["name"])
        index = comboBox.findData(selectedName)
        comboBox.setCurrentIndex(index if index >= 0 else (0 if comboBox.count else -1))
    finally:
        comboBox.blockSignals(wasBlocked)


def populateDeviceComboBox(comboBox) -> None:
    wasBlocked = comboBox.blockSignals(True)
    try:
        comboBox.clear()
        for text, value in DEVICE_CHOICES:
            comboBox.addItem(text, value)
    finally:
        comboBox.blockSignals(wasBlocked)


def selectComboData(comboBox, value) -> None:
    index = comboBox.findData(value)
    if index >= 0 and index != comboBox.currentIndex:
        wasBlocked = comboBox.blockSignals(True)
        comboBox.setCurrentIndex(index)
        comboBox.blockSignals(wasBlocked)


def setupAddModelMenu(button, onBundle: Callable[[], None], onSpec: Callable[[], None]) -> qt.QMenu:
    menu = qt.QMenu(button)
    bundleAction = menu.addAction("MONAI bundle folder...")
    bundleAction.connect("triggered()", onBundle)
    specAction = menu.addAction("Network spec JSON + weights file...")
    specAction.connect("triggered()", onSpec)
    button.setMenu(menu)
    return menu


def askBundleFolder(parent=None) -> str:
    return qt.QFileDialog.getExistingDirectory(parent, "Select a MONAI bundle folder", "") or ""


def askSpecAndWeights(parent=None):
    spec = qt.QFileDialog.getOpenFileName(parent, "Select the network spec (JSON)", "", "Network spec (*.json)")
    if not spec:
        return None, None
    weights = qt.QFileDialog.getOpenFileName(parent, "Select the network weights", os.path.dirname(spec),
                                             "Weights (*.safetensors *.pt *.pth *.ckpt);;All files (*)")
    return (spec, weights) if weights else (None, None)


def askAdapterFile(parent=None) -> str:
    return qt.QFileDialog.getOpenFileName(parent, "Load a TCURLoRA adapter", "",
                                          "TCURLoRA adapter (*.safetensors);;All files (*)") or ""


def askSaveAdapterPath(parent=None, suggestedName: str = "adapter.safetensors") -> str:
    path = qt.QFileDialog.getSaveFileName(parent, "Save the adapter", suggestedName,
                                          "TCURLoRA adapter (*.safetensors)") or ""
    if path and not path.lower().endswith(".safetensors"):
        path += ".safetensors"
    return path


def showChart(chartNode) -> None:
    """Show a plot chart in the current layout (switching to a layout with a plot view if needed)."""
    if chartNode is None or not hasattr(slicer.modules, "plots"):
        return
    slicer.modules.plots.logic().ShowChartInLayout(chartNode)
