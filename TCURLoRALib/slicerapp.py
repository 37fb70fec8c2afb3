"""Pieces that need the running Slicer application (``qt``, ``slicer.app``), shared by both modules.

* :func:`timerRunner` - polls a running task from a ``qt.QTimer`` on the main thread (the GUI never blocks);
* custom base models remembered across sessions (application settings);
* small widget helpers (model / device combo boxes, the "Add model..." menu, file dialogs).

Not importable without Slicer; everything testable lives in the other ``TCURLoRALib`` modules.
"""

import json
import os
from typing import Callable, List, Optional

import qt
import vtk

import slicer

from .models import ModelRegistry

DEVICE_CHOICES = (("Auto (GPU if available)", "auto"), ("CPU", "cpu"), ("GPU (CUDA)", "cuda"))
CUSTOM_MODELS_SETTINGS_KEY = "TCURLoRA/CustomModels"
POLL_INTERVAL_MS = 200


def timerRunner(intervalMs: int = POLL_INTERVAL_MS):
    """A :class:`TCURLoRALib.tasks.TaskRunner` polled by a ``qt.QTimer`` on the main thread, so the task's
    callbacks may touch the scene and the GUI."""
    from .tasks import TaskRunner

    timer = qt.QTimer()
    timer.setInterval(intervalMs)
    runner = TaskRunner(timer)
    timer.connect("timeout()", runner.poll)
    return runner


def engineLogicArguments() -> dict:
    """What :class:`TCURLoRALib.logic.EngineLogic` gets inside Slicer: the user's models from the application
    settings, saved back there, the models found on this computer, and a timer-driven runner."""
    return {"registry": ModelRegistry(custom=loadCustomModels()), "saveCustomModels": saveCustomModels,
            "discoverModels": modelDiscovery(), "runner": timerRunner()}


_DISCOVERY = []


def modelDiscovery():
    """One search for the models on this computer per Slicer session, shared by both modules."""
    from .engine import ModelDiscovery

    if not _DISCOVERY:
        _DISCOVERY.append(ModelDiscovery())
    return _DISCOVERY[0]


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


def populateChoiceComboBox(comboBox, choices) -> None:
    """(text, value) or (text, value, tool tip) items; the value is the item data."""
    wasBlocked = comboBox.blockSignals(True)
    try:
        comboBox.clear()
        for choice in choices:
            comboBox.addItem(choice[0], choice[1])
            if len(choice) > 2:
                comboBox.setItemData(comboBox.count - 1, choice[2], qt.Qt.ToolTipRole)
    finally:
        comboBox.blockSignals(wasBlocked)


def ensureDependencies(engineLogic, progressBar=None, statusLabel=None) -> bool:
    """Install what the engine needs (one question), showing each step in the module's progress bar."""
    if engineLogic.dependencyInstaller is not None:
        return engineLogic.dependencyInstaller()
    import logging

    from .dependencies import slicerInstaller

    def progress(done, total, text):
        if progressBar is not None:
            progressBar.maximum = max(total, 1)
            progressBar.value = done
        if statusLabel is not None:
            statusLabel.text = text
        slicer.app.processEvents()  # pip runs on this thread (Slicer's pip_install): show the step first

    if not slicerInstaller(log=logging.info, progress=progress).ensure():
        return False
    if hasattr(engineLogic.discoverModels, "retryIfFailed"):
        engineLogic.discoverModels.retryIfFailed()  # the search needs the packages just installed
    return True


def nodeComboBox(nodeType: str, toolTip: str):
    """A node selector of the scene for one node class (no add, remove or child classes)."""
    combo = slicer.qMRMLNodeComboBox()
    combo.nodeTypes = [nodeType]
    combo.showChildNodeTypes = False
    combo.noneEnabled = True
    combo.addEnabled = False
    combo.removeEnabled = False
    combo.setMRMLScene(slicer.mrmlScene)
    combo.toolTip = toolTip
    return combo


MAPPING_COLUMNS = ("segment", "include", "label", "value")


def _mappingRow(row) -> tuple:
    return str(row["segment"]), bool(row.get("include", True)), str(row["label"]), str(row["value"])


def mappingTableRows(table):
    """(segment, include, label, value text) per row of the label table widget; None while a row is incomplete."""
    rows = []
    for index in range(table.rowCount):
        items = [table.item(index, column) for column in range(len(MAPPING_COLUMNS))]
        if any(item is None for item in items):
            return None
        rows.append((items[0].text(), items[1].checkState() == qt.Qt.Checked, items[2].text(), items[3].text()))
    return rows


def fillMappingTable(table, rows) -> None:
    """Show label-table rows (``{"segment", "include", "label", "value"}``) in the table widget: the segment
    read-only, "include" a check box, label and value editable. Nothing changes when it shows them already."""
    if mappingTableRows(table) == [_mappingRow(r) for r in rows]:
        return
    wasBlocked = table.blockSignals(True)
    try:
        table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            segment, include, label, value = _mappingRow(row)
            segmentItem = qt.QTableWidgetItem(segment)
            segmentItem.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
            useItem = qt.QTableWidgetItem()
            useItem.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsUserCheckable)
            useItem.setCheckState(qt.Qt.Checked if include else qt.Qt.Unchecked)
            for column, item in enumerate((segmentItem, useItem, qt.QTableWidgetItem(label),
                                           qt.QTableWidgetItem(value))):
                table.setItem(index, column, item)
    finally:
        table.blockSignals(wasBlocked)


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


# ----------------------------------------------------------------------------------------------------------
# case library location (application settings)

CASE_LIBRARY_ROOT_KEY = "TCURLoRA/CaseLibraryFolder"
CASE_PROJECT_KEY = "TCURLoRA/CaseLibraryProject"
DEFAULT_PROJECT = "My site"


def caseLibraryRoot() -> str:
    """Where the case libraries live (default: ``TCURLoRA/CaseLibrary`` in the user's documents folder)."""
    folder = qt.QSettings().value(CASE_LIBRARY_ROOT_KEY, "")
    if not folder:
        documents = qt.QStandardPaths.writableLocation(qt.QStandardPaths.DocumentsLocation) or os.path.expanduser("~")
        folder = os.path.join(documents, "TCURLoRA", "CaseLibrary")
    return folder


def setCaseLibraryRoot(folder: str) -> None:
    qt.QSettings().setValue(CASE_LIBRARY_ROOT_KEY, folder)


def caseProject() -> str:
    return qt.QSettings().value(CASE_PROJECT_KEY, "") or DEFAULT_PROJECT


def setCaseProject(name: str) -> None:
    qt.QSettings().setValue(CASE_PROJECT_KEY, name)


def openCaseLibrary():
    from .caselibrary import CaseLibrary

    return CaseLibrary(caseLibraryRoot(), caseProject())


def segmentEditorSelection():
    """(source volume, segmentation) selected in the Segment Editor module, or (None, None)."""
    try:
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        return editor.sourceVolumeNode(), editor.segmentationNode()
    except AttributeError:
        return None, None


def showModelCard(card, parent=None) -> None:
    from .logic import modelCardText

    if not card:
        return
    slicer.util.infoDisplay(modelCardText(card), windowTitle=f"Model card: {card['title']}",
                            detailedText=card.get("text") or None, parent=parent)


def showIn3D(segmentationNode, show: bool, pollMs: int = 100) -> None:
    """Show or hide a segmentation in the 3D view; missing closed surfaces are built on a background thread
    (from a detached copy) and taken over on the main thread when ready."""
    from . import nodeio
    from .tasks import Background

    nodeio.showSegmentation(segmentationNode, surfaces=False)
    displayNode = segmentationNode.GetDisplayNode()
    displayNode.SetVisibility3D(show)
    segmentation = segmentationNode.GetSegmentation()
    if not show or segmentation.ContainsRepresentation("Closed surface") \
            or segmentation.GetNumberOfSegments() == 0:
        return
    copy = nodeio.surfaceCopy(segmentationNode)
    job = Background(lambda report: nodeio.buildSurfaces(copy))

    def check():
        if not job.done:
            qt.QTimer.singleShot(pollMs, check)
            return
        job.outcome()
        if segmentationNode.GetScene() is not None:
            nodeio.adoptSurfaces(segmentationNode, copy)

    qt.QTimer.singleShot(pollMs, check)


def addTrainingCase(openLibrary: Callable, volumeNode, segmentationNode, statusLabel, onDone: Optional[Callable] = None,
                    hint: str = "", pollMs: int = 100) -> None:
    """Add a case to the library ``openLibrary()``, its progress shown in ``statusLabel`` (then ``hint``): the
    arrays are taken now, the files written on a background thread, the index updated on the main thread;
    then ``onDone(entry)``. Errors are shown in a dialog."""
    from .tasks import Background

    with slicer.util.tryWithErrorDisplay("Could not add the training case."):
        library = openLibrary()
        case = library.takeCase(volumeNode, segmentationNode)  # raises with a readable message on bad input
        job = Background(lambda report: library.writeCase(case))
        statusLabel.text = "Storing the training case..."

        def check():
            if not job.done:
                qt.QTimer.singleShot(pollMs, check)
                return
            with slicer.util.tryWithErrorDisplay("Could not add the training case."):
                entry = library.commitCase(job.outcome())
                statusLabel.text = (f"Added '{entry['name']}' to the case library '{library.project}' "
                                    f"({len(library.cases())} cases).{hint}")
                if onDone is not None:
                    onDone(entry)

        qt.QTimer.singleShot(pollMs, check)


ADAPTER_NONE, ADAPTER_LOAD = "", "__load__"


def populateAdapterComboBox(comboBox, paths, selected: str) -> None:
    """"None", the adapter files offered (file name; the path as tool tip), then "Load adapter file..."."""
    populateChoiceComboBox(comboBox, [("None", ADAPTER_NONE)] + [(os.path.basename(p), p, p) for p in paths]
                           + [("Load adapter file...", ADAPTER_LOAD)])
    selectComboData(comboBox, selected)


class ModuleWidgetMixin:
    """What both module widgets share: the parameter node wiring of Slicer's scripted-module template, scene
    close, the base-model / device widgets (``modelComboBox``, ``addModelButton``, ``removeModelButton``,
    ``modelCardButton``, ``modelInfoLabel``, ``modelCardLabel``, ``deviceComboBox``) and the run widgets
    (``progressBar``, ``statusLabel``, ``logTextEdit``). The widget sets ``self.ui``, ``self.logic`` (an
    :class:`TCURLoRALib.logic.EngineLogic`) and ``self._parameterNode`` / ``self._parameterNodeGuiTag`` /
    ``self._updatingGUI``, and defines ``updateGUIFromParameterNode``."""

    def __init__(self) -> None:
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGUI = False
        self._choiceComboBoxes = []

    def connectLogic(self, logic) -> None:
        """Use ``logic`` and show its runs in the run widgets."""
        self.logic = logic
        logic.onLog = self.onLog
        logic.onProgress = self.onProgress
        logic.onFinished = self.onFinished

    def setupModelWidgets(self) -> None:
        self.logic.models()  # starts the search for models on this computer (in the background)
        self._refreshWhenModelsFound()
        self.bindChoiceComboBox(self.ui.deviceComboBox, "device", DEVICE_CHOICES)
        setupAddModelMenu(self.ui.addModelButton, self.onAddBundleModel, self.onAddSpecModel)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.modelCardButton.connect("clicked(bool)", self.onModelCard)

    def updateModelWidgets(self, p):
        """Fill the model widgets from the parameter node; returns the selected model entry (or None)."""
        from .logic import modelCard, modelCardText

        entry = self.logic.modelEntry(p.model)
        populateModelComboBox(self.ui.modelComboBox, self.logic.models(), p.model)
        self.ui.modelInfoLabel.text = self.logic.modelDescription(entry) if entry else \
            f"Model '{p.model}' is not available: select another one."
        card = modelCard(entry)
        self.ui.modelCardLabel.text = modelCardText(card)
        self.ui.modelCardButton.enabled = bool(card and card["text"])
        self.ui.removeModelButton.enabled = self.logic.isCustomModel(p.model)
        for comboBox, field in self._choiceComboBoxes:
            selectComboData(comboBox, getattr(p, field))
        return entry

    def _refreshWhenModelsFound(self, pollMs: int = 500) -> None:
        if not getattr(self.logic.discoverModels, "done", True):
            qt.QTimer.singleShot(pollMs, self._refreshWhenModelsFound)
        elif self._parameterNode is not None:
            self.updateGUIFromParameterNode()

    # -- life cycle (Slicer's scripted-module template)

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.shutdown()  # ends any run now: nothing is imported into the closing scene
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    # -- model and device choices

    def onModelSelected(self, index: int) -> None:
        if self._parameterNode and index >= 0 and not self._updatingGUI:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index)

    def bindChoiceComboBox(self, comboBox, field: str, choices) -> None:
        """Offer (text, value) ``choices`` for the parameter ``field``: a choice is written to it, and
        :meth:`updateModelWidgets` shows its value."""
        populateChoiceComboBox(comboBox, choices)
        self._choiceComboBoxes.append((comboBox, field))
        comboBox.connect("currentIndexChanged(int)", lambda index: self._onChoice(comboBox, field, index))

    def _onChoice(self, comboBox, field: str, index: int) -> None:
        if self._parameterNode and index >= 0 and not self._updatingGUI:
            setattr(self._parameterNode, field, comboBox.itemData(index))

    def onAddBundleModel(self) -> None:
        folder = askBundleFolder(slicer.util.mainWindow())
        if folder:
            with slicer.util.tryWithErrorDisplay("Could not add the model."):
                self._parameterNode.model = self.logic.addBundleModel(folder)["name"]

    def onAddSpecModel(self) -> None:
        spec, weights = askSpecAndWeights(slicer.util.mainWindow())
        if spec and weights:
            with slicer.util.tryWithErrorDisplay("Could not add the model."):
                self._parameterNode.model = self.logic.addSpecModel(spec, weights)["name"]

    def onRemoveModel(self) -> None:
        p = self._parameterNode
        if p and slicer.util.confirmYesNoDisplay(f"Remove '{p.model}' from the model list? Its files stay on disk."):
            with slicer.util.tryWithErrorDisplay("Could not remove the model."):
                self.logic.removeModel(p.model)
                p.model = self.logic.models()[0]["name"] if self.logic.models() else ""

    def onModelCard(self) -> None:
        if self._parameterNode:
            showModelCard(self.logic.modelCard(self._parameterNode.model), slicer.util.mainWindow())

    # -- runs

    def startRun(self, statusText: str, failure: str, start: Callable[[], None]) -> None:
        """Install the engine's packages if needed (asking first), reset the run widgets, then ``start()``;
        a failure to start is shown in a dialog headed ``failure``."""
        with slicer.util.tryWithErrorDisplay("The Python packages TCURLoRA needs could not be installed."):
            if not ensureDependencies(self.logic, self.ui.progressBar, self.ui.statusLabel):
                return
        with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
            self.ui.logTextEdit.clear()
            self.ui.progressBar.maximum = 100
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = statusText
            start()
        self.updateGUIFromParameterNode()

    def cancelRun(self, statusText: str) -> None:
        self.logic.cancel()
        self.ui.statusLabel.text = statusText

    def onLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        slicer.util.showStatusMessage(text, 3000)

    def onProgress(self, event: dict) -> None:
        from .tasks import progressBarFormat, progressText

        percent, text = progressText(event)
        self.ui.progressBar.value = percent
        self.ui.progressBar.format = progressBarFormat(event)
        self.ui.statusLabel.text = text

    def showFinished(self, task, statusText: str, failedText: str, windowTitle: str) -> None:
        """A run ended: the status line says how; a failure also opens a dialog ("<failedText>: <why>")."""
        from .tasks import DONE, ERROR

        self.ui.progressBar.format = "%p%"
        if task.status == DONE:
            self.ui.progressBar.value = 100
        self.ui.statusLabel.text = statusText
        if task.status == ERROR:
            slicer.util.errorDisplay(f"{failedText}:\n\n{task.errorMessage}", windowTitle=windowTitle)
        self.updateGUIFromParameterNode()
