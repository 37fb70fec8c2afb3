import json
import os
import shutil
import sys
from typing import Annotated, Optional

import qt

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin


def _addLibraryPath():
    """Make ``TCURLoRALib`` and the ``tcurlora`` engine importable: next to this file when the extension is
    installed, at the repository root when the module is loaded from the source tree."""
    try:
        import TCURLoRALib  # noqa: F401
        import tcurlora  # noqa: F401
        return
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (here, os.path.dirname(here)):
        if os.path.isdir(os.path.join(root, "TCURLoRALib")) and os.path.isdir(os.path.join(root, "tcurlora")):
            if root not in sys.path:
                sys.path.insert(0, root)
            return


_addLibraryPath()

from TCURLoRALib import caselibrary, engine, logic, models, nodeio, plots, slicerapp, tasks  # noqa: E402

from tcurlora.protocol import METHODS, default as protocolDefault  # noqa: E402  (standard library only)
CASE_COLUMNS = (("vtkMRMLScalarVolumeNode", "Volume of this training case."),
                ("vtkMRMLSegmentationNode", "Segmentation of this volume (the annotation to learn)."))
MAPPING_SEGMENT, MAPPING_USE, MAPPING_LABEL, MAPPING_VALUE = range(4)


#
# TCURFinetune
#


class TCURFinetune(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "TCUR Finetune"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerTCURLoRA developers"]
        self.parent.helpText = """
Adapt a pretrained segmentation network to your own annotations: pick pairs of volumes and segmentations, map
segment names to labels, and train a tCURLoRA adapter (a small file) in a background process. The adapter can
be saved, shared and applied in the TCUR Segment module.
"""
        self.parent.acknowledgementText = """
tCURLoRA: tensor CUR decomposition based low-rank parameter adaptation (arXiv 2501.02227, MICCAI 2025).
"""


#
# Parameter node
#


@parameterNodeWrapper
class TCURFinetuneParameterNode:
    """
    trainingVolumes / trainingSegmentations - the case table (row i pairs element i of both lists).
    labelMapping - JSON list of rows {"segment", "include", "label", "value", "color"}.
    model - base model name; method, rank - the adapter; device - "auto", "cpu" or "cuda".
    steps, learningRate (0 = engine default), patchSize ("" = engine default, else "x,y,z"),
    validationCases (the last N rows), seed - advanced training settings.
    adapterName - name of the trained adapter; lastAdapterPath - the adapter of the last finished training.
    trainingChart - the loss / validation Dice chart.
    useCaseLibrary - train on the case library's cases (on disk) instead of the case table.
    """

    trainingVolumes: list[slicer.vtkMRMLScalarVolumeNode]
    trainingSegmentations: list[slicer.vtkMRMLSegmentationNode]
    labelMapping: str = "[]"
    model: str = "deepbet"
    method: Annotated[str, Choice(list(METHODS))] = "tcurlora"
    rank: Annotated[int, WithinRange(1, 256)] = 8
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    steps: Annotated[int, WithinRange(1, 1000000)] = protocolDefault("steps")
    learningRate: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    patchSize: str = ""
    validationCases: Annotated[int, WithinRange(0, 1000)] = 0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    adapterName: str = "tcurlora-adapter"
    lastAdapterPath: str = ""
    continueAdapter: bool = False
    trainingChart: slicer.vtkMRMLPlotChartNode
    useCaseLibrary: bool = False


#
# TCURFinetuneWidget
#


class TCURFinetuneWidget(slicerapp.ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGUI = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TCURFinetune.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = TCURFinetuneLogic()
        self.logic.onLog = self.onLog
        self.logic.onProgress = self.onProgress
        self.logic.onFinished = self.onFinished
        self.logic.onValidated = self.onValidated

        self.setupModelWidgets()
        self.ui.casesTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.casesTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.labelMappingTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.libraryTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.libraryTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.libraryTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.projectComboBox.connect("currentTextChanged(QString)", self.onProjectChanged)
        self.ui.useLibraryCheckBox.connect("toggled(bool)", self.onLibraryChanged)
        self.ui.libraryFolderButton.connect("clicked(bool)", self.onLibraryFolder)
        self.ui.addLibraryCaseButton.connect("clicked(bool)", self.onAddLibraryCase)
        self.ui.previewLibraryCaseButton.connect("clicked(bool)", self.onPreviewLibraryCase)
        self.ui.toggleValidationButton.connect("clicked(bool)", self.onToggleValidation)
        self.ui.removeLibraryCaseButton.connect("clicked(bool)", self.onRemoveLibraryCase)
        self._populateProjects()

        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.refreshLabelsButton.connect("clicked(bool)", self.onRefreshLabels)
        self.ui.labelMappingTable.connect("itemChanged(QTableWidgetItem*)", self.onMappingEdited)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.ui.saveAdapterButton.connect("clicked(bool)", self.onSaveAdapter)
        self.ui.applyInSegmentButton.connect("clicked(bool)", self.onApplyInSegment)

        self.initializeParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self._parameterNode
            if p is None:
                self.ui.startButton.enabled = False
                return
            self._updateCasesTable(TCURFinetuneLogic.cases(p))
            self._updateLibraryTable()
            self._updateMappingTable(self.logic.labelMapping(p))
            entry = self.updateModelWidgets(p)
            ok, summary = self.logic.mappingSummary(p)
            self.ui.labelInfoLabel.text = summary
            self.ui.labelInfoLabel.setStyleSheet("" if ok else "color: #c00000;")
            running = self.logic.isRunning()
            hasCases = self.logic.libraryHasTrainingCases() if p.useCaseLibrary else \
                any(v and s for v, s in TCURFinetuneLogic.cases(p))
            canStart = ok and entry is not None and hasCases
            self.ui.startButton.text = "Cancel" if running else "Start"
            self.ui.startButton.enabled = running or canStart
            self.ui.resumeButton.enabled = not running and self.logic.canResume()
            hasAdapter = bool(p.lastAdapterPath) and os.path.isfile(p.lastAdapterPath)
            self.ui.saveAdapterButton.enabled = hasAdapter and not running
            self.ui.applyInSegmentButton.enabled = hasAdapter and not running
            self.ui.continueAdapterCheckBox.enabled = hasAdapter and not running
            for widget in (self.ui.addCaseButton, self.ui.removeCaseButton, self.ui.refreshLabelsButton,
                           self.ui.addLibraryCaseButton, self.ui.removeLibraryCaseButton,
                           self.ui.toggleValidationButton, self.ui.projectComboBox, self.ui.libraryFolderButton):
                widget.enabled = not running
        finally:
            self._updatingGUI = False

    def _updateCasesTable(self, pairs) -> None:
        table = self.ui.casesTable
        shown = [tuple(table.cellWidget(r, c).currentNode() if table.cellWidget(r, c) else None for c in range(2))
                 for r in range(table.rowCount)]
        if shown == [tuple(pair) for pair in pairs]:
            return
        table.setRowCount(len(pairs))
        for row, pair in enumerate(pairs):
            for column, node in enumerate(pair):
                combo = table.cellWidget(row, column)
                if combo is None:
                    combo = self._newCaseComboBox(*CASE_COLUMNS[column])
                    table.setCellWidget(row, column, combo)
                wasBlocked = combo.blockSignals(True)
                combo.setCurrentNode(node)
                combo.blockSignals(wasBlocked)

    def _newCaseComboBox(self, nodeType: str, toolTip: str):
        combo = slicer.qMRMLNodeComboBox()
        combo.nodeTypes = [nodeType]
        combo.showChildNodeTypes = False
        combo.noneEnabled = True
        combo.addEnabled = False
        combo.removeEnabled = False
        combo.setMRMLScene(slicer.mrmlScene)
        combo.toolTip = toolTip
        combo.connect("currentNodeChanged(vtkMRMLNode*)", self.onCaseNodeChanged)
        return combo

    def _updateMappingTable(self, rows) -> None:
        table = self.ui.labelMappingTable
        if self._mappingRowsFromTable() == [self._comparable(r) for r in rows]:
            return
        wasBlocked = table.blockSignals(True)
        try:
            table.setRowCount(len(rows))
            for index, row in enumerate(rows):
                segmentItem = qt.QTableWidgetItem(str(row["segment"]))
                segmentItem.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
                table.setItem(index, MAPPING_SEGMENT, segmentItem)
                useItem = qt.QTableWidgetItem()
                useItem.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsUserCheckable)
                useItem.setCheckState(qt.Qt.Checked if row.get("include", True) else qt.Qt.Unchecked)
                table.setItem(index, MAPPING_USE, useItem)
                table.setItem(index, MAPPING_LABEL, qt.QTableWidgetItem(str(row["label"])))
                table.setItem(index, MAPPING_VALUE, qt.QTableWidgetItem(str(row["value"])))
        finally:
            table.blockSignals(wasBlocked)

    @staticmethod
    def _comparable(row):
        return (str(row["segment"]), bool(row.get("include", True)), str(row["label"]), str(row["value"]))

    def _mappingRowsFromTable(self):
        table = self.ui.labelMappingTable
        rows = []
        for index in range(table.rowCount):
            items = [table.item(index, c) for c in range(4)]
            if any(item is None for item in items):
                return None
            rows.append((items[MAPPING_SEGMENT].text(), items[MAPPING_USE].checkState() == qt.Qt.Checked,
                         items[MAPPING_LABEL].text(), items[MAPPING_VALUE].text()))
        return rows

    def _updateLibraryTable(self) -> None:
        table = self.ui.libraryTable
        try:
            cases = self.logic.library().cases()
        except caselibrary.CaseLibraryError as exc:
            cases = []
            self.ui.statusLabel.text = str(exc)
        rows = caselibrary.caseTableRows(cases)
        table.setRowCount(len(rows))
        for index, (row, case) in enumerate(zip(rows, cases)):
            for column, text in enumerate(row):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, case["id"])
                if column == 3 and case.get("dice"):
                    item.setToolTip("\n".join(f"{k}: {'-' if v is None else f'{v:.3f}'}"
                                              for k, v in case["dice"].items()))
                table.setItem(index, column, item)

    def _populateProjects(self) -> None:
        combo = self.ui.projectComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            current = slicerapp.caseProject()
            for name in sorted(set(caselibrary.projects(slicerapp.caseLibraryRoot())) | {current}):
                combo.addItem(name)
            combo.setCurrentText(current)
        finally:
            combo.blockSignals(wasBlocked)

    def _selectedLibraryCase(self) -> Optional[str]:
        row = self.ui.libraryTable.currentRow()
        item = self.ui.libraryTable.item(row, 0) if row >= 0 else None
        return item.data(qt.Qt.UserRole) if item is not None else None

    # -- GUI -> parameter node / logic

    def onProjectChanged(self, name: str) -> None:
        if name.strip():
            slicerapp.setCaseProject(name.strip())
            self.onLibraryChanged()

    def onLibraryChanged(self, *args) -> None:
        """The case library, or whether to train on it, changed: its segment names feed the label table."""
        if self._parameterNode is not None and not self._updatingGUI:
            self.logic.refreshLabelMapping(self._parameterNode)
            self.updateGUIFromParameterNode()

    def onLibraryFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Case library folder",
                                                     slicerapp.caseLibraryRoot())
        if folder:
            slicerapp.setCaseLibraryRoot(folder)
            self._populateProjects()
            self.onLibraryChanged()

    def onAddLibraryCase(self) -> None:
        volume, segmentation = slicerapp.segmentEditorSelection()
        def added(entry):
            self.ui.statusLabel.text = f"Added '{entry['name']}' to the case library."
            self.onLibraryChanged()

        with slicer.util.tryWithErrorDisplay("Could not add the training case."):
            slicerapp.addTrainingCase(self.logic.library(), volume, segmentation, added)
            self.ui.statusLabel.text = "Storing the training case..."

    def onPreviewLibraryCase(self) -> None:
        caseId = self._selectedLibraryCase()
        if caseId:
            with slicer.util.tryWithErrorDisplay("Could not load the case.", waitCursor=True):
                volume, _ = self.logic.library().loadCase(caseId, slicer.mrmlScene)
                slicer.util.setSliceViewerLayers(background=volume, fit=True)

    def onToggleValidation(self) -> None:
        caseId = self._selectedLibraryCase()
        if caseId:
            library = self.logic.library()
            library.setValidation(caseId, not library.case(caseId).get("validation"))
            self.updateGUIFromParameterNode()

    def onRemoveLibraryCase(self) -> None:
        caseId = self._selectedLibraryCase()
        if caseId and slicer.util.confirmYesNoDisplay("Delete this case (and its files) from the case library?"):
            self.logic.library().removeCase(caseId)
            self.onLibraryChanged()

    def onCaseNodeChanged(self, node=None) -> None:
        if self._parameterNode is None or self._updatingGUI:
            return
        table = self.ui.casesTable
        pairs = [tuple(table.cellWidget(r, c).currentNode() for c in range(2)) for r in range(table.rowCount)]
        self.logic.setCases(self._parameterNode, pairs)
        self.logic.refreshLabelMapping(self._parameterNode)

    def onAddCase(self) -> None:
        self.logic.addCase(self._parameterNode)

    def onRemoveCase(self) -> None:
        row = self.ui.casesTable.currentRow()
        self.logic.removeCase(self._parameterNode, row if row >= 0 else self.ui.casesTable.rowCount - 1)
        self.logic.refreshLabelMapping(self._parameterNode)

    def onRefreshLabels(self) -> None:
        self.logic.refreshLabelMapping(self._parameterNode)

    def onMappingEdited(self, item=None) -> None:
        if self._parameterNode is None or self._updatingGUI:
            return
        tableRows = self._mappingRowsFromTable()
        if tableRows is None:
            return
        previous = {r["segment"]: r for r in self.logic.labelMapping(self._parameterNode)}
        rows = []
        for segment, include, label, value in tableRows:
            row = dict(previous.get(segment, {}), segment=segment, include=include, label=label.strip())
            try:
                row["value"] = int(value)
            except ValueError:
                row["value"] = value  # kept as typed; the logic reports it
            rows.append(row)
        self.logic.setLabelMapping(self._parameterNode, rows)

    def onModelSelected(self, index: int) -> None:
        slicerapp.ModuleWidgetMixin.onModelSelected(self, index)
        if self._parameterNode and index >= 0 and not self._updatingGUI:
            self.logic.refreshLabelMapping(self._parameterNode)

    def onStartButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling (a checkpoint is kept for Resume)..."
            return
        with slicer.util.tryWithErrorDisplay("The Python packages TCURLoRA needs could not be installed."):
            if not slicerapp.ensureDependencies(self.logic, self.ui.progressBar, self.ui.statusLabel):
                return
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            self.ui.logTextEdit.clear()
            self.ui.progressBar.maximum = 100
            self.ui.progressBar.value = 0
            self.ui.resultLabel.text = ""
            self.ui.statusLabel.text = "Exporting the training cases..."
            task = self.logic.finetuneFromParameterNode(self._parameterNode)
            slicerapp.showChart(task.curves.chartNode if task.curves else None)
        self.updateGUIFromParameterNode()

    def onResumeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Training could not resume."):
            self.logic.resume()
            self.ui.statusLabel.text = "Resuming..."
        self.updateGUIFromParameterNode()

    def onSaveAdapter(self) -> None:
        p = self._parameterNode
        path = slicerapp.askSaveAdapterPath(slicer.util.mainWindow(), (p.adapterName or "adapter") + ".safetensors")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not save the adapter."):
                self.logic.saveAdapter(p.lastAdapterPath, path)
                self.ui.statusLabel.text = f"Adapter saved as {path}"

    def onApplyInSegment(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not open the adapter in TCUR Segment."):
            self.logic.applyInSegment(p.lastAdapterPath, p.model)
            slicer.util.selectModule("TCURSegment")

    # -- logic callbacks (main thread)

    def onLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onProgress(self, event: dict) -> None:
        percent, text = tasks.progressText(event)
        self.ui.progressBar.value = percent
        self.ui.progressBar.format = tasks.progressBarFormat(event)
        self.ui.statusLabel.text = text

    def onValidated(self, results) -> None:
        scores = [v for case in results.values() for v in case.values() if v is not None]
        if scores:
            self.ui.resultLabel.text += (f"\nCase library: {len(results)} validation case(s) segmented with the new "
                                         f"adapter, mean Dice {sum(scores) / len(scores):.3f} (per case in the table).")
        self.updateGUIFromParameterNode()

    def onFinished(self, task) -> None:
        self.ui.progressBar.format = "%p%"
        if task.status == tasks.DONE:
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = "Training finished."
            self.ui.resultLabel.text = self.logic.resultDescription(task)
        elif task.status == tasks.CANCELLED:
            self.ui.statusLabel.text = "Cancelled. Resume continues from the last checkpoint." if task.canResume \
                else "Cancelled before a checkpoint was written: Start trains again."
        else:
            self.ui.statusLabel.text = "Failed: " + task.errorMessage
            slicer.util.errorDisplay("Training failed:\n\n" + task.errorMessage, windowTitle="TCUR Finetune")
        self.updateGUIFromParameterNode()


#
# TCURFinetuneLogic
#


class TCURFinetuneLogic(ScriptedLoadableModuleLogic, logic.EngineLogic):
    """Adapter training without the GUI (models and dependencies: :class:`TCURLoRALib.logic.EngineLogic`).

    :param launcher: ``launcher(job, workdir) -> WorkerJob`` (default: ``PythonSlicer -m tcurlora.worker``).
    :param adapterStore: folder where trained adapters are kept until saved (default: Slicer's cache).
    :param libraryRoot: folder of the case libraries (default: the application setting).
    :param kwargs: registry, dependencyInstaller, discoverModels, runner, manifestReader (see
        :class:`TCURLoRALib.logic.SegmentLogic`); the defaults are the application's.

    Callbacks ``onLog(text)``, ``onProgress(event)``, ``onFinished(task)`` run on the main thread.
    """

    def __init__(self, launcher=None, adapterStore=None, libraryRoot=None, manifestReader=None, **kwargs) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        arguments = dict(slicerapp.engineLogicArguments(), **kwargs)
        logic.EngineLogic.__init__(self, **arguments)
        self.launcher = launcher
        self.adapterStore = adapterStore
        self.libraryRoot = libraryRoot
        # validation cases of the library are segmented with the new adapter by a segmentation logic
        self.segmentLogic = logic.SegmentLogic(launcher=launcher, manifestReader=manifestReader,
                                               **dict(arguments, runner=slicerapp.timerRunner()))
        self._parameterNodeOfTask = None
        self.onValidated = None

    def getParameterNode(self):
        return TCURFinetuneParameterNode(super().getParameterNode())

    # -- cases

    @staticmethod
    def cases(parameterNode):
        volumes, segmentations = list(parameterNode.trainingVolumes), list(parameterNode.trainingSegmentations)
        count = max(len(volumes), len(segmentations))
        volumes += [None] * (count - len(volumes))
        segmentations += [None] * (count - len(segmentations))
        return list(zip(volumes, segmentations))

    @staticmethod
    def setCases(parameterNode, pairs) -> None:
        with slicer.util.NodeModify(parameterNode):
            parameterNode.trainingVolumes = [v for v, _ in pairs]
            parameterNode.trainingSegmentations = [s for _, s in pairs]

    def addCase(self, parameterNode, volumeNode=None, segmentationNode=None) -> None:
        self.setCases(parameterNode, self.cases(parameterNode) + [(volumeNode, segmentationNode)])

    def removeCase(self, parameterNode, index: int) -> None:
        pairs = self.cases(parameterNode)
        if 0 <= index < len(pairs):
            del pairs[index]
            self.setCases(parameterNode, pairs)

    @staticmethod
    def splitCases(pairs, validationCount: int):
        """(training, validation): the last ``validationCount`` complete pairs validate; one always trains."""
        complete = [(v, s) for v, s in pairs if v is not None and s is not None]
        count = max(0, min(int(validationCount), len(complete) - 1))
        return (complete[:len(complete) - count], complete[len(complete) - count:]) if count else (complete, [])

    # -- labels

    @staticmethod
    def segmentInfo(segmentationNodes):
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

    @staticmethod
    def labelMapping(parameterNode):
        try:
            rows = json.loads(parameterNode.labelMapping or "[]")
        except ValueError:
            return []
        return [r for r in rows if isinstance(r, dict) and "segment" in r]

    @staticmethod
    def setLabelMapping(parameterNode, rows) -> None:
        text = json.dumps(list(rows))
        if text != parameterNode.labelMapping:
            parameterNode.labelMapping = text

    def baseLabels(self, modelName: str):
        entry = self.modelEntry(modelName)
        return list(entry.get("labels") or []) if entry else []

    def refreshLabelMapping(self, parameterNode):
        """Rows for the segment names of the current cases (the case library's or the scene's), keeping the
        user's earlier choices."""
        if parameterNode.useCaseLibrary:
            try:
                names, colors = self.library().segmentInfo()
            except caselibrary.CaseLibraryError:
                names, colors = [], {}
        else:
            names, colors = self.segmentInfo([s for _, s in self.cases(parameterNode)])
        rows = models.mergeLabelMapping(self.labelMapping(parameterNode), names, self.baseLabels(parameterNode.model),
                                        colors)
        self.setLabelMapping(parameterNode, rows)
        return rows

    def mappingSummary(self, parameterNode):
        """(ok, text) describing what the label table trains."""
        rows = self.labelMapping(parameterNode)
        if not rows:
            return False, "Add training cases: their segment names appear here."
        try:
            jobLabels, table, _ = models.labelsFromMapping(rows, self.baseLabels(parameterNode.model))
        except ValueError as exc:
            return False, str(exc)
        text = "Trains: " + models.labelsText(table) + "."
        if jobLabels is None:
            return True, text + " These are base-model labels: the model's own output is fine-tuned."
        return True, text + " New labels: the engine trains a new output head for this label table."

    @staticmethod
    def parsePatchSize(text: str):
        """``""`` -> None; ``"96, 96, 64"`` -> [96, 96, 64]; ValueError otherwise."""
        text = (text or "").strip()
        if not text:
            return None
        parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 3 or min(values) < 1:
            raise ValueError(f"Patch size '{text}' must be three positive whole numbers, e.g. 96,96,96.")
        return values

    # -- running

    def canResume(self) -> bool:
        task = self.runner.task
        return task is not None and not task.isActive and getattr(task, "canResume", False)

    def finetune(self, cases, mapping, modelName: str = "deepbet", method: str = "tcurlora", rank: int = 8,
                 steps: int = protocolDefault("steps"), learningRate: Optional[float] = None, patchSize=None, validationCount: int = 0,
                 seed: int = 0, device: str = "auto", adapterName: str = "tcurlora-adapter", chartNode=None,
                 scene=None, onEnd=None, startFrom: Optional[str] = None):
        """Start training in the background; returns the task (see :meth:`waitForCompletion`). ``onEnd(task)``
        runs when it ends (after ``onFinished``); ``startFrom`` (an adapter file) continues that adapter."""
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
        task = tasks.FinetuneTask(
            training, models.ModelRegistry.jobBase(entry), self.launcher or engine.defaultLauncher(),
            segmentToValue, labelTable, jobLabels, validation=validation, method=method, rank=rank, steps=steps,
            lr=learningRate or None, patchSize=patchSize, seed=seed, device=device,
            adapterStore=self.adapterStore or slicerapp.adapterStoreDir(), adapterName=adapterName, curves=curves,
            startFrom=startFrom, baseSettings=models.ModelRegistry.jobSettings(entry), onLog=self._log,
            onProgress=self._progress,
            onFinished=lambda task: (self._finished(task), onEnd(task) if onEnd else None))
        self.runner.run(task)
        return task

    # -- the case library

    def library(self):
        root = self.libraryRoot or slicerapp.caseLibraryRoot()
        return caselibrary.CaseLibrary(root, slicerapp.caseProject())

    def libraryHasTrainingCases(self) -> bool:
        try:
            return bool(self.library().split()["training"])
        except caselibrary.CaseLibraryError:
            return False

    def finetuneFromParameterNode(self, parameterNode):
        """Train with the parameter node's choices: on the case library (then its validation cases are
        segmented with the new adapter and their Dice recorded, ``onValidated(results)``) or the case table."""
        p = parameterNode
        startFrom = p.lastAdapterPath if p.continueAdapter and p.lastAdapterPath and os.path.isfile(p.lastAdapterPath) \
            else None

        def start(cases, validationCount, onEnd=None):
            return self.finetune(cases, self.labelMapping(p), modelName=p.model, method=p.method, rank=p.rank,
                                 steps=p.steps, learningRate=p.learningRate or None,
                                 patchSize=self.parsePatchSize(p.patchSize), validationCount=validationCount,
                                 seed=p.seed, device=p.device, adapterName=p.adapterName or "tcurlora-adapter",
                                 chartNode=p.trainingChart, onEnd=onEnd, startFrom=startFrom)

        if p.useCaseLibrary:
            loop = logic.LibraryLogic(self.library(), slicer.mrmlScene, self.segmentLogic)
            task = loop.train(start, p.model, p.device, onValidated=lambda results: self.onValidated and
                              self.onValidated(results))
        else:
            task = start(self.cases(p), p.validationCases)
        self._parameterNodeOfTask = p
        with slicer.util.NodeModify(p):
            p.trainingChart = task.curves.chartNode
            p.lastAdapterPath = ""
        return task

    def resume(self):
        if not self.canResume():
            raise RuntimeError("There is no cancelled training to resume.")
        self.runner.resume(self.runner.task)
        return self.runner.task

    def waitForCompletion(self, timeoutSeconds: float = 600.0):
        status = logic.EngineLogic.waitForCompletion(self, timeoutSeconds, idle=slicer.app.processEvents)
        self.segmentLogic.waitForCompletion(timeoutSeconds, idle=slicer.app.processEvents)  # library validation
        return status

    def shutdown(self) -> None:
        """End any run now (module cleanup, scene close): afterwards Start works again."""
        logic.EngineLogic.shutdown(self)
        self.segmentLogic.shutdown()

    @staticmethod
    def resultDescription(task) -> str:
        lines = [f"Adapter: {task.adapterPath}"]
        diceKeys = ("best_validation_dice", "validation_dice")
        dice = next((task.metrics[k] for k in diceKeys if isinstance(task.metrics.get(k), (int, float))), None)
        if dice is not None:
            lines.append(f"Validation Dice: {dice:.3f}")
        others = {k: v for k, v in task.metrics.items() if k not in diceKeys and isinstance(v, (int, float))}
        if others:
            lines.append(", ".join(f"{k}: {v:g}" for k, v in sorted(others.items())))
        return "\n".join(lines)

    @staticmethod
    def saveAdapter(sourcePath: str, targetPath: str) -> str:
        """Copy a trained adapter (its labels and provenance are inside the file) to ``targetPath``."""
        if not sourcePath or not os.path.isfile(sourcePath):
            raise ValueError("There is no trained adapter to save.")
        if not targetPath.lower().endswith(".safetensors"):
            targetPath += ".safetensors"
        if os.path.abspath(sourcePath) != os.path.abspath(targetPath):
            shutil.copyfile(sourcePath, targetPath)
        return targetPath

    @staticmethod
    def applyInSegment(adapterPath: str, modelName: str) -> None:
        """Select the adapter (and its base model) in the TCUR Segment module's parameter node."""
        if not adapterPath or not os.path.isfile(adapterPath):
            raise ValueError("There is no trained adapter to apply.")
        import TCURSegment

        parameterNode = TCURSegment.TCURSegmentLogic().getParameterNode()  # shared with the module's widget
        TCURSegment.TCURSegmentLogic.addAdapter(parameterNode, adapterPath, modelName)

    def _finished(self, task):
        p = self._parameterNodeOfTask
        if task.status == tasks.DONE and p is not None and task.adapterPath:
            p.lastAdapterPath = task.adapterPath
        if self.onFinished:
            self.onFinished(task)


#
# TCURFinetuneTest
#


class TCURFinetuneTest(ScriptedLoadableModuleTest):
    """Self-tests. The stand-in worker (``Testing/standin_worker.py``, test-only) checks the Slicer side without
    torch; the real engine runs too when its packages are installed and the base model is cached (or
    ``TCURLORA_SELFTEST_ENGINE=1``; ``=0`` skips it)."""

    LABELS = [{"value": 1, "name": "Brain", "color": [0.9, 0.7, 0.6]}]

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_FinetuneWithStandInWorker()
        self.setUp()
        self.test_CancelAndResume()
        self.setUp()
        self.test_SceneCloseEndsTraining()
        self.setUp()
        self.test_NewLabelTrainsNewHead()
        self.setUp()
        self.test_FinetuneAndShareWithEngine()

    @staticmethod
    def makeCase(name="Case", offset=0):
        import numpy as np

        shape = (24, 28, 32)
        k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        inside = (k ** 2 + j ** 2 + (i - 0.1 * offset) ** 2) < 0.5
        ijkToRAS = np.array([[0, -1.2, 0, 20.0], [1.1, 0, 0, -15.0], [0, 0, 1.5, 5.0], [0, 0, 0, 1]])
        volume = nodeio.addVolumeFromArray(slicer.mrmlScene, (1000.0 * inside).astype(np.int16), ijkToRAS,
                                           f"{name} volume")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
        nodeio.updateSegmentationFromLabelArray(segmentation, inside.astype(np.uint8), ijkToRAS,
                                                [{"value": 1, "name": "Brain", "color": [1, 0, 0]}])
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        return volume, segmentation

    def standInLogic(self, stepSeconds=0.005):
        import tempfile

        registry = models.ModelRegistry(catalog=[{"name": "toy", "title": "Toy model", "labels": self.LABELS,
                                                   "fingerprint": "toy-fingerprint", "cached": True}])
        standIn = engine.testingFile(__file__, "standin_worker.py")
        launcher = engine.defaultLauncher(script=standIn, pythonpath=[engine.engineRoot()],
                                          extraEnv={"TCURLORA_FAKE_STEP_S": str(stepSeconds)})
        return TCURFinetuneLogic(launcher=launcher, registry=registry, dependencyInstaller=lambda: True,
                                 adapterStore=tempfile.mkdtemp(prefix="tcurlora-test-store-"))

    def test_FinetuneWithStandInWorker(self):
        self.delayDisplay("Fine-tune with the stand-in worker")
        logic = self.standInLogic()
        p = logic.getParameterNode()
        p.model = "toy"
        for index in range(3):
            logic.addCase(p, *self.makeCase(f"Case{index}", index))
        rows = logic.refreshLabelMapping(p)
        self.assertEqual([(r["segment"], r["label"], r["value"]) for r in rows], [("Brain", "Brain", 1)])
        p.steps = 12
        p.validationCases = 1
        task = logic.finetuneFromParameterNode(p)
        self.assertEqual(logic.waitForCompletion(60), tasks.DONE, task.errorMessage)
        self.assertIsNone(task.jobDict["labels"], "base labels must not ask for a new head")
        self.assertEqual(len(task.jobDict["cases"]), 2)
        self.assertEqual(len(task.jobDict["validation"]), 1)
        steps, losses = task.curves.values("loss")
        self.assertEqual(len(losses), 12)
        self.assertEqual(task.curves.values("dice")[0], [5.0, 10.0])
        self.assertTrue(os.path.isfile(p.lastAdapterPath))
        import tempfile

        saved = logic.saveAdapter(p.lastAdapterPath, os.path.join(tempfile.mkdtemp(prefix="tcurlora-test-"), "shared"))
        self.assertTrue(saved.endswith(".safetensors") and os.path.isfile(saved))
        TCURFinetuneLogic.applyInSegment(p.lastAdapterPath, "toy")
        import TCURSegment

        segmentParameters = TCURSegment.TCURSegmentLogic(registry=logic.registry).getParameterNode()
        self.assertEqual(segmentParameters.adapterPath, os.path.abspath(p.lastAdapterPath))
        self.assertEqual(segmentParameters.model, "toy")
        self.assertFalse(os.path.exists(task.workdir), "temporary folder left behind")
        self.delayDisplay("Fine-tune with the stand-in worker: passed")

    def test_CancelAndResume(self):
        self.delayDisplay("Cancel and resume a training")
        import time

        logic = self.standInLogic(stepSeconds=0.02)
        volume, segmentation = self.makeCase()
        mapping = models.defaultLabelMapping(["Brain"], self.LABELS)
        task = logic.finetune([(volume, segmentation)], mapping, modelName="toy", steps=400)
        deadline = time.monotonic() + 30
        while (task.lastProgress or {}).get("phase") != "train" and time.monotonic() < deadline:
            task.processEvents()
            slicer.app.processEvents()
            time.sleep(0.02)
        self.assertIsNotNone(task.lastProgress, "no progress before cancelling")
        logic.cancel()
        self.assertEqual(logic.waitForCompletion(30), tasks.CANCELLED, task.errorMessage)
        self.assertTrue(logic.canResume())
        self.assertLess(len(task.curves.values("loss")[0]), 400)
        logic.resume()
        self.assertEqual(logic.waitForCompletion(60), tasks.DONE, task.errorMessage)
        steps = task.curves.values("loss")[0]
        self.assertEqual(steps, [float(s) for s in range(1, 401)])  # resumed where it stopped, not restarted
        self.assertFalse(os.path.exists(task.workdir))
        self.delayDisplay("Cancel and resume a training: passed")

    def test_SceneCloseEndsTraining(self):
        self.delayDisplay("Closing the scene during training ends it; Start works again")
        logic = self.standInLogic(stepSeconds=0.05)
        volume, segmentation = self.makeCase()
        mapping = models.defaultLabelMapping(["Brain"], self.LABELS)
        task = logic.finetune([(volume, segmentation)], mapping, modelName="toy", steps=400)
        self.assertTrue(logic.isRunning())
        logic.shutdown()  # what the widget's scene-close handler calls
        self.assertFalse(logic.isRunning())
        self.assertEqual(task.status, tasks.CANCELLED)
        slicer.mrmlScene.Clear()
        volume, segmentation = self.makeCase("After")
        task = logic.finetune([(volume, segmentation)], mapping, modelName="toy", steps=3)
        self.assertEqual(logic.waitForCompletion(60), tasks.DONE, task.errorMessage)
        self.delayDisplay("Closing the scene during training: passed")

    def test_NewLabelTrainsNewHead(self):
        self.delayDisplay("A new label asks for a new head")
        logic = self.standInLogic()
        volume, segmentation = self.makeCase()
        segmentation.GetSegmentation().GetNthSegment(0).SetName("Lesion")
        mapping = models.defaultLabelMapping(["Lesion"], self.LABELS)
        self.assertEqual(mapping[0]["value"], 2)
        task = logic.finetune([(volume, segmentation)], mapping, modelName="toy", steps=3)
        self.assertEqual(logic.waitForCompletion(60), tasks.DONE, task.errorMessage)
        self.assertEqual([(e["value"], e["name"]) for e in task.jobDict["labels"]], [(2, "Lesion")])
        self.delayDisplay("A new label asks for a new head: passed")

    def test_FinetuneAndShareWithEngine(self):
        import TCURSegment

        if not TCURSegment.TCURSegmentTest.engineAvailable():
            self.delayDisplay("Real engine not available (packages or cached base model missing): skipped")
            return
        self.delayDisplay("Fine-tune deepbet for a few steps, then apply the adapter as a shared file")
        import tempfile

        logic = TCURFinetuneLogic(dependencyInstaller=lambda: True,
                                  adapterStore=tempfile.mkdtemp(prefix="tcurlora-test-store-"))
        volume, segmentation = self.makeCase()
        mapping = models.defaultLabelMapping(["Brain"], logic.baseLabels("deepbet"))
        task = logic.finetune([(volume, segmentation)], mapping, modelName="deepbet", steps=3, device="cpu")
        self.assertEqual(logic.waitForCompletion(1800), tasks.DONE, task.errorMessage)
        shared = logic.saveAdapter(task.adapterPath, os.path.join(tempfile.mkdtemp(prefix="tcurlora-test-"),
                                                                  "shared.safetensors"))
        segmentLogic = TCURSegment.TCURSegmentLogic(dependencyInstaller=lambda: True)
        info = segmentLogic.describeAdapter(shared, "deepbet")
        self.assertTrue(info["compatible"], info["message"])
        segmentTask = segmentLogic.segment(volume, modelName="deepbet", adapterPath=shared, device="cpu")
        self.assertEqual(segmentLogic.waitForCompletion(900), tasks.DONE, segmentTask.errorMessage)
        self.delayDisplay("Fine-tune and share with the real engine: passed")
