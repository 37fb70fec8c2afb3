import os
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

try:
    import TCURLoRALib  # noqa: F401  (installed: next to this script)
except ImportError:  # source tree: TCURLoRALib and tcurlora sit at the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from TCURLoRALib import caselibrary, engine, export, finetune, selftests, slicerapp, tasks  # noqa: E402
from tcurlora import protocol  # noqa: E402  (standard library only)

CASE_COLUMNS = (("vtkMRMLScalarVolumeNode", "Volume of this training case."),
                ("vtkMRMLSegmentationNode", "Segmentation of this volume (the annotation to learn)."))


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


@parameterNodeWrapper
class TCURFinetuneParameterNode:
    """
    trainingVolumes / trainingSegmentations - the case table (row i pairs element i of both lists).
    labelMapping - JSON list of rows {"segment", "include", "label", "value", "color"}.
    learningRate (0 = the method's default), patchSize ("" = the base's, else "x,y,z"), validationCases (the
    last N rows), seed (a whole number; a float so that the spin box holds the job's range) - advanced settings.
    lastAdapterPath - the adapter of the last finished training; useCaseLibrary - train on the case library.
    The numeric ranges and defaults are the job protocol's (tcurlora.protocol).
    """

    trainingVolumes: list[slicer.vtkMRMLScalarVolumeNode]
    trainingSegmentations: list[slicer.vtkMRMLSegmentationNode]
    labelMapping: str = "[]"
    model: str = "deepbet"
    method: Annotated[str, Choice(list(protocol.METHODS))] = protocol.default("method")
    rank: Annotated[int, WithinRange(*protocol.bounds("rank"))] = protocol.default("rank")
    device: Annotated[str, Choice(list(protocol.DEVICES))] = protocol.default("device")
    steps: Annotated[int, WithinRange(*protocol.bounds("steps"))] = protocol.default("steps")
    learningRate: Annotated[float, WithinRange(*protocol.bounds("lr"))] = 0.0
    patchSize: str = ""
    validationCases: Annotated[int, WithinRange(0, finetune.MAX_VALIDATION_CASES)] = 0
    seed: Annotated[float, WithinRange(*protocol.bounds("seed"))] = protocol.default("seed")
    adapterName: str = finetune.DEFAULT_ADAPTER_NAME
    lastAdapterPath: str = ""
    continueAdapter: bool = False
    trainingChart: slicer.vtkMRMLPlotChartNode
    useCaseLibrary: bool = False


class TCURFinetuneWidget(slicerapp.ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        slicerapp.ModuleWidgetMixin.__init__(self)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TCURFinetune.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.connectLogic(TCURFinetuneLogic())
        self.logic.onValidated = self.onValidated
        self.setupModelWidgets()
        for table in (self.ui.casesTable, self.ui.labelMappingTable, self.ui.libraryTable):
            table.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        for table in (self.ui.casesTable, self.ui.libraryTable):
            table.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.libraryTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.projectComboBox.connect("currentTextChanged(QString)", self.onProjectChanged)
        self.ui.useLibraryCheckBox.connect("toggled(bool)", self.onLibraryChanged)
        self.ui.labelMappingTable.connect("itemChanged(QTableWidgetItem*)", self.onMappingEdited)
        ui = self.ui
        for button, slot in ((ui.libraryFolderButton, self.onLibraryFolder), (ui.addCaseButton, self.onAddCase),
                             (ui.addLibraryCaseButton, self.onAddLibraryCase), (ui.startButton, self.onStartButton),
                             (ui.previewLibraryCaseButton, self.onPreviewLibraryCase),
                             (ui.toggleValidationButton, self.onToggleValidation),
                             (ui.removeLibraryCaseButton, self.onRemoveLibraryCase),
                             (ui.removeCaseButton, self.onRemoveCase), (ui.refreshLabelsButton, self.onLibraryChanged),
                             (ui.resumeButton, self.onResumeButton), (ui.saveAdapterButton, self.onSaveAdapter),
                             (ui.applyInSegmentButton, self.onApplyInSegment),
                             (ui.exportModelButton, self.onExportModel)):
            button.connect("clicked(bool)", slot)
        self._populateProjects()
        self.initializeParameterNode()

    def onReload(self) -> None:
        engine.reloadLibrary()  # the TCURLoRALib modules too, not only this script
        ScriptedLoadableModuleWidget.onReload(self)

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self._parameterNode
            self.ui.startButton.enabled = p is not None
            if p is None:
                return
            self._updateCasesTable(self.logic.cases(p))
            self._updateLibraryTable()
            slicerapp.fillMappingTable(self.ui.labelMappingTable, self.logic.labelMapping(p))
            entry = self.updateModelWidgets(p)
            ok, summary = self.logic.mappingSummary(p)
            self.ui.labelInfoLabel.text = summary
            self.ui.labelInfoLabel.setStyleSheet("" if ok else "color: #c00000;")
            running = self.logic.isRunning()
            self.ui.startButton.text = "Cancel" if running else "Start"
            self.ui.startButton.enabled = running or (ok and entry is not None and self.logic.hasCases(p))
            self.ui.resumeButton.enabled = not running and self.logic.canResume()
            hasAdapter = bool(p.lastAdapterPath) and os.path.isfile(p.lastAdapterPath)
            for widget in (self.ui.saveAdapterButton, self.ui.applyInSegmentButton, self.ui.exportModelButton,
                           self.ui.continueAdapterCheckBox):
                widget.enabled = hasAdapter and not running
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
                    combo = slicerapp.nodeComboBox(*CASE_COLUMNS[column])
                    combo.connect("currentNodeChanged(vtkMRMLNode*)", self.onCaseNodeChanged)
                    table.setCellWidget(row, column, combo)
                wasBlocked = combo.blockSignals(True)
                combo.setCurrentNode(node)
                combo.blockSignals(wasBlocked)

    def _updateLibraryTable(self) -> None:
        try:
            cases = self.logic.library().cases()
        except caselibrary.CaseLibraryError as exc:
            cases = []
            self.ui.statusLabel.text = str(exc)
        table = self.ui.libraryTable
        table.setRowCount(len(cases))
        for index, (row, case) in enumerate(zip(caselibrary.caseTableRows(cases), cases)):
            for column, text in enumerate(row):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, case["id"])
                item.setToolTip(caselibrary.diceToolTip(case) if column == 3 else "")
                table.setItem(index, column, item)

    def _populateProjects(self) -> None:
        names = sorted(set(caselibrary.projects(slicerapp.caseLibraryRoot())) | {slicerapp.caseProject()})
        slicerapp.populateChoiceComboBox(self.ui.projectComboBox, [(name, name) for name in names])
        slicerapp.selectComboData(self.ui.projectComboBox, slicerapp.caseProject())

    def _selectedLibraryCase(self) -> Optional[str]:
        row = self.ui.libraryTable.currentRow()
        item = self.ui.libraryTable.item(row, 0) if row >= 0 else None
        return item.data(qt.Qt.UserRole) if item is not None else None

    def onProjectChanged(self, name: str) -> None:
        if name.strip():
            slicerapp.setCaseProject(name.strip())
            self.onLibraryChanged()

    def onLibraryChanged(self, *args) -> None:
        """The cases (table or library), or whether to train on the library, changed: new segment names."""
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
        slicerapp.addTrainingCase(self.logic.library, *slicerapp.segmentEditorSelection(), self.ui.statusLabel,
                                  onDone=lambda entry: self.onLibraryChanged())

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

    def onMappingEdited(self, item=None) -> None:
        tableRows = slicerapp.mappingTableRows(self.ui.labelMappingTable)
        if self._parameterNode is not None and not self._updatingGUI and tableRows is not None:
            previous = self.logic.labelMapping(self._parameterNode)
            self.logic.setLabelMapping(self._parameterNode, finetune.mappingFromTable(previous, tableRows))

    def onModelSelected(self, index: int) -> None:
        slicerapp.ModuleWidgetMixin.onModelSelected(self, index)
        self.onLibraryChanged()  # the base's labels are matched by name

    def onStartButton(self) -> None:
        if self.logic.isRunning():
            self.cancelRun("Cancelling (a checkpoint is kept for Resume)...")
            return

        def start():
            self.ui.resultLabel.text = ""
            task = self.logic.finetuneFromParameters(self._parameterNode)
            slicerapp.showChart(task.curves.chartNode if task.curves else None)

        self.startRun("Exporting the training cases...", "Training could not start.", start)

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
                self.ui.statusLabel.text = f"Adapter saved as {finetune.saveAdapter(p.lastAdapterPath, path)}"

    def onExportModel(self) -> None:
        p = self._parameterNode
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Export the adapted model into")
        if not folder:
            return

        def done(task):
            self.ui.resultLabel.text = task.summary

        def start():
            # the module logic's runner, so that one run at a time holds across training and export
            exporter = export.ExportLogic(registry=self.logic.registry, runner=self.logic.runner)
            exporter.onLog, exporter.onProgress = self.onLog, self.onProgress
            exporter.onFinished = lambda task: self.showFinished(task, "Exported.", "Export failed", "TCUR Finetune")
            exporter.exportModel(p.model, p.lastAdapterPath, folder, onDone=done)

        self.startRun("Exporting the model...", "The export could not start.", start)

    def onApplyInSegment(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not open the adapter in TCUR Segment."):
            if not p.lastAdapterPath or not os.path.isfile(p.lastAdapterPath):
                raise ValueError("There is no trained adapter to apply.")
            import TCURSegment

            TCURSegment.TCURSegmentLogic.addAdapter(TCURSegment.TCURSegmentLogic().getParameterNode(),
                                                    p.lastAdapterPath, p.model)
            slicer.util.selectModule("TCURSegment")

    def onValidated(self, results) -> None:
        self.ui.resultLabel.text += "\n" + finetune.validationSummary(results)
        self.updateGUIFromParameterNode()

    def onFinished(self, task) -> None:
        if task.status == tasks.DONE:
            self.ui.resultLabel.text = finetune.resultDescription(task)
        self.showFinished(task, finetune.finishedStatus(task), "Training failed", "TCUR Finetune")


class TCURFinetuneLogic(ScriptedLoadableModuleLogic, finetune.FinetuneLogic):
    """:class:`TCURLoRALib.finetune.FinetuneLogic` with the application's models, runners, adapter store, case
    library and scene, plus the module's parameter node; ``launcher`` and ``kwargs`` as there."""

    def __init__(self, launcher=None, **kwargs) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        arguments = dict(slicerapp.engineLogicArguments(), adapterStore=slicerapp.adapterStoreDir(),
                         openLibrary=slicerapp.openCaseLibrary, scene=slicer.mrmlScene,
                         segmentRunner=slicerapp.timerRunner())
        finetune.FinetuneLogic.__init__(self, launcher=launcher, **dict(arguments, **kwargs))

    def getParameterNode(self):
        return TCURFinetuneParameterNode(super().getParameterNode())

    def waitForCompletion(self, timeoutSeconds: float = 600.0, idle=None):
        return finetune.FinetuneLogic.waitForCompletion(self, timeoutSeconds, idle=idle or slicer.app.processEvents)


class TCURFinetuneTest(ScriptedLoadableModuleTest):
    """The scenarios of :mod:`TCURLoRALib.selftests` for this module (the real engine's too when it can run)."""

    def runTest(self):
        import tempfile

        scenarios = selftests.FINETUNE + (selftests.FINETUNE_ENGINE if selftests.engineAvailable() else ())
        selftests.run(scenarios, slicer.mrmlScene, lambda **kwargs: TCURFinetuneLogic(**dict(
            selftests.standInArguments(), adapterStore=tempfile.mkdtemp(prefix="tcurlora-test-store-"), **kwargs)),
            lambda logic: logic.getParameterNode(), self.delayDisplay)
