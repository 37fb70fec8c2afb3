import os
import sys
from typing import Annotated

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.util import VTKObservationMixin

try:
    import TCURLoRALib  # noqa: F401  (installed: next to this script)
except ImportError:  # source tree: TCURLoRALib and tcurlora sit at the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from TCURLoRALib import engine, logic, selftests, slicerapp, tasks  # noqa: E402
from tcurlora import protocol  # noqa: E402  (standard library only)

#: what each of tasks.DEFAULT_YES_NO is called in the combo boxes
DEFAULT_YES_NO_CHOICES = (("Model default", "default"), ("Yes", "yes"), ("No", "no"))


class TCURSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "TCUR Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerTCURLoRA developers"]
        self.parent.helpText = """
Segment a volume with a pretrained network, optionally adapted with a tCURLoRA adapter (a small file trained in
the TCUR Finetune module or shared by a colleague). The network runs in a separate process, on the GPU when
there is one; the first run asks to install PyTorch and a few Python packages.
"""
        self.parent.acknowledgementText = """
tCURLoRA: tensor CUR decomposition based low-rank parameter adaptation (arXiv 2501.02227, MICCAI 2025).
Base model deepbet (MIT licence).
"""


@parameterNodeWrapper
class TCURSegmentParameterNode:
    """
    outputSegmentation - receives the result (None: a new node, which then becomes the output).
    model - catalog name, ``bundle:<folder>`` or ``spec:<spec>|<weights>``; adapterPath - "" = none.
    largestComponent - "default" leaves it to the base model (deepbet keeps its largest component).
    testTimeAugmentation - "default" leaves it to the base's own tool (nnU-Net mirrors when its trainer allows).
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    model: str = "deepbet"
    adapterPath: str = ""
    loadedAdapters: list[str]
    device: Annotated[str, Choice(list(protocol.DEVICES))] = protocol.default("device")
    testTimeAugmentation: Annotated[str, Choice(list(tasks.DEFAULT_YES_NO))] = "default"
    largestComponent: Annotated[str, Choice(list(tasks.DEFAULT_YES_NO))] = "default"
    showIn3D: bool = True


class TCURSegmentWidget(slicerapp.ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        slicerapp.ModuleWidgetMixin.__init__(self)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TCURSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.connectLogic(TCURSegmentLogic())
        self.setupModelWidgets()
        self.bindChoiceComboBox(self.ui.largestComponentComboBox, "largestComponent", DEFAULT_YES_NO_CHOICES)
        self.bindChoiceComboBox(self.ui.ttaComboBox, "testTimeAugmentation", DEFAULT_YES_NO_CHOICES)
        self.ui.adapterComboBox.connect("currentIndexChanged(int)", self.onAdapterSelected)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.onShow3DToggled)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.addTrainingCaseButton.connect("clicked(bool)", self.onAddTrainingCase)
        self.initializeParameterNode()

    def onReload(self) -> None:
        engine.reloadLibrary()  # the TCURLoRALib modules too, not only this script
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self) -> None:
        slicerapp.ModuleWidgetMixin.initializeParameterNode(self)
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self._parameterNode
            self.ui.applyButton.enabled = p is not None
            if p is None:
                return
            entry = self.updateModelWidgets(p)
            self.ui.inputWarningLabel.text = "\n".join(self.logic.inputWarnings(p.inputVolume, p.model))
            slicerapp.populateAdapterComboBox(self.ui.adapterComboBox, p.loadedAdapters, p.adapterPath)
            text, fits = self.logic.adapterText(p.adapterPath, p.model)
            self.ui.adapterSummaryLabel.text = text
            self.ui.adapterSummaryLabel.setStyleSheet("" if fits else "color: #c00000;")
            running = self.logic.isRunning()
            canApply = bool(p.inputVolume) and entry is not None and fits
            self.ui.applyButton.text = "Cancel" if running else "Apply"
            self.ui.applyButton.enabled = running or canApply
            self.ui.applyButton.toolTip = "Stop the running segmentation." if running else (
                "Segment the input volume." if canApply
                else "Select an input volume, a base model and a matching adapter.")
            self.ui.addTrainingCaseButton.enabled = not running
        finally:
            self._updatingGUI = False

    def onShow3DToggled(self, show: bool) -> None:
        node = self._parameterNode.outputSegmentation if self._parameterNode else None
        if node is not None and not self.logic.isRunning():
            with slicer.util.tryWithErrorDisplay("Could not show the segmentation in 3D."):
                slicerapp.showIn3D(node, show)

    def onAddTrainingCase(self) -> None:
        """The input volume and the corrected output (else Segment Editor's selection) become a training case."""
        p = self._parameterNode
        volume, segmentation = (p.inputVolume, p.outputSegmentation) if p else (None, None)
        if segmentation is None:
            volume, segmentation = slicerapp.segmentEditorSelection()
        slicerapp.addTrainingCase(slicerapp.openCaseLibrary, volume, segmentation, self.ui.statusLabel,
                                  hint=" Fine-tune in TCUR Finetune.")

    def onAdapterSelected(self, index: int) -> None:
        if not self._parameterNode or index < 0 or self._updatingGUI:
            return
        value = self.ui.adapterComboBox.itemData(index)
        if value != slicerapp.ADAPTER_LOAD:
            self._parameterNode.adapterPath = value or ""
            return
        path = slicerapp.askAdapterFile(slicer.util.mainWindow())
        if path:
            self.logic.addAdapter(self._parameterNode, path)
        else:
            self.updateGUIFromParameterNode()  # back to the previous choice

    def onApplyButton(self) -> None:
        if self.logic.isRunning():
            self.cancelRun("Cancelling...")
        else:
            self.startRun("Exporting the volume...", "Segmentation could not start.",
                          lambda: self.logic.segmentFromParameters(self._parameterNode))

    def onFinished(self, task) -> None:
        status = {tasks.DONE: f"Done: '{task.outputSegmentation.GetName()}'." if task.outputSegmentation else "",
                  tasks.CANCELLED: "Cancelled."}.get(task.status, "Failed: " + task.errorMessage)
        self.showFinished(task, status, "Segmentation failed", "TCUR Segment")


class TCURSegmentLogic(ScriptedLoadableModuleLogic, logic.SegmentLogic):
    """:class:`TCURLoRALib.logic.SegmentLogic` with the application's models and runner, plus the module's
    parameter node; ``launcher`` and ``kwargs`` as there."""

    def __init__(self, launcher=None, **kwargs) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        logic.SegmentLogic.__init__(self, launcher=launcher, **dict(slicerapp.engineLogicArguments(), **kwargs))

    def getParameterNode(self):
        return TCURSegmentParameterNode(super().getParameterNode())

    def waitForCompletion(self, timeoutSeconds: float = 600.0, idle=None):
        return logic.SegmentLogic.waitForCompletion(self, timeoutSeconds, idle=idle or slicer.app.processEvents)


class TCURSegmentTest(ScriptedLoadableModuleTest):
    """The scenarios of :mod:`TCURLoRALib.selftests` for this module (the real engine's too when it can run)."""

    def runTest(self):
        scenarios = selftests.SEGMENT + (selftests.SEGMENT_ENGINE if selftests.engineAvailable() else ())
        selftests.run(scenarios, slicer.mrmlScene, lambda **kwargs: TCURSegmentLogic(
            **dict(selftests.standInArguments(), **kwargs)), lambda logic: logic.getParameterNode(), self.delayDisplay)
