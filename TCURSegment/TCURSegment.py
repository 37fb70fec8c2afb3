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
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
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

from TCURLoRALib import engine, logic, models, nodeio, slicerapp, tasks  # noqa: E402

ADAPTER_NONE = ""
ADAPTER_LOAD = "__load__"
LARGEST_COMPONENT_CHOICES = (("Model default", "default"), ("Yes", "yes"), ("No", "no"))


#
# TCURSegment
#


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


#
# Parameter node
#


@parameterNodeWrapper
class TCURSegmentParameterNode:
    """
    inputVolume - volume to segment.
    outputSegmentation - receives the result (None: a new segmentation node is created).
    model - base model name (catalog name, ``bundle:<folder>`` or ``spec:<spec>|<weights>``).
    adapterPath - adapter file applied on top of the base model ("" = none).
    loadedAdapters - adapter files offered in the adapter list.
    device - "auto", "cpu" or "cuda".
    largestComponent - "default" (the base model decides: deepbet keeps its largest component), "yes", "no".
    showIn3D - build 3D surfaces of the result (in the background).
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    model: str = "deepbet"
    adapterPath: str = ""
    loadedAdapters: list[str]
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    testTimeAugmentation: bool = False
    largestComponent: Annotated[str, Choice(["default", "yes", "no"])] = "default"
    showIn3D: bool = True


#
# TCURSegmentWidget
#


class TCURSegmentWidget(slicerapp.ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGUI = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TCURSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = TCURSegmentLogic()
        self.logic.onLog = self.onLog
        self.logic.onProgress = self.onProgress
        self.logic.onFinished = self.onFinished

        self.setupModelWidgets()
        slicerapp.populateChoiceComboBox(self.ui.largestComponentComboBox, LARGEST_COMPONENT_CHOICES)
        self.ui.adapterComboBox.connect("currentIndexChanged(int)", self.onAdapterSelected)
        self.ui.largestComponentComboBox.connect("currentIndexChanged(int)", self.onLargestComponentSelected)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.onShow3DToggled)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.addTrainingCaseButton.connect("clicked(bool)", self.onAddTrainingCase)

        self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        slicerapp.ModuleWidgetMixin.initializeParameterNode(self)
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            p = self._parameterNode
            if p is None:
                self.ui.applyButton.enabled = False
                return
            entry = self.updateModelWidgets(p)
            self.ui.inputWarningLabel.text = "\n".join(self.logic.inputWarnings(p.inputVolume, p.model))
            self._populateAdapterComboBox(p)
            slicerapp.selectComboData(self.ui.largestComponentComboBox, p.largestComponent)
            info = self.logic.describeAdapter(p.adapterPath, p.model) if p.adapterPath else None
            if info is None:
                self.ui.adapterSummaryLabel.text = "No adapter: the base model as it is."
                self.ui.adapterSummaryLabel.setStyleSheet("")
            else:
                self.ui.adapterSummaryLabel.text = (info["summary"] + "\n" if info["summary"] else "") + info["message"]
                self.ui.adapterSummaryLabel.setStyleSheet("" if info["compatible"] else "color: #c00000;")
            running = self.logic.isRunning()
            self.ui.applyButton.text = "Cancel" if running else "Apply"
            canApply = bool(p.inputVolume) and entry is not None and (info is None or info["compatible"])
            self.ui.applyButton.enabled = running or canApply
            self.ui.applyButton.toolTip = "Stop the running segmentation." if running else (
                "Segment the input volume." if canApply
                else "Select an input volume, a base model and a matching adapter.")
            self.ui.addTrainingCaseButton.enabled = not running
        finally:
            self._updatingGUI = False

    def _populateAdapterComboBox(self, p) -> None:
        combo = self.ui.adapterComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            combo.addItem("None", ADAPTER_NONE)
            for path in p.loadedAdapters:
                combo.addItem(os.path.basename(path), path)
                combo.setItemData(combo.count - 1, path, qt.Qt.ToolTipRole)
            combo.addItem("Load adapter file...", ADAPTER_LOAD)
            index = combo.findData(p.adapterPath)
            combo.setCurrentIndex(index if index >= 0 else 0)
        finally:
            combo.blockSignals(wasBlocked)

    # -- GUI -> parameter node / logic

    def onLargestComponentSelected(self, index: int) -> None:
        if self._parameterNode and index >= 0 and not self._updatingGUI:
            self._parameterNode.largestComponent = self.ui.largestComponentComboBox.itemData(index)

    def onShow3DToggled(self, show: bool) -> None:
        node = self._parameterNode.outputSegmentation if self._parameterNode else None
        if node is not None and not self.logic.isRunning():
            with slicer.util.tryWithErrorDisplay("Could not show the segmentation in 3D."):
                slicerapp.showIn3D(node, show)

    def onAddTrainingCase(self) -> None:
        """One click: the input volume and the corrected output segmentation (else Segment Editor's current
        selection) become a training case of the case library."""
        p = self._parameterNode
        volume, segmentation = (p.inputVolume, p.outputSegmentation) if p else (None, None)
        if segmentation is None:
            volume, segmentation = slicerapp.segmentEditorSelection()
        with slicer.util.tryWithErrorDisplay("Could not add the training case."):
            library = slicerapp.openCaseLibrary()

            def added(entry):
                self.ui.statusLabel.text = (f"Added '{entry['name']}' to the case library '{library.project}' "
                                            f"({len(library.cases())} cases). Fine-tune in TCUR Finetune.")

            slicerapp.addTrainingCase(library, volume, segmentation, added)
            self.ui.statusLabel.text = "Storing the training case..."

    def onAdapterSelected(self, index: int) -> None:
        if not self._parameterNode or index < 0 or self._updatingGUI:
            return
        value = self.ui.adapterComboBox.itemData(index)
        if value == ADAPTER_LOAD:
            path = slicerapp.askAdapterFile(slicer.util.mainWindow())
            if path:
                self.logic.addAdapter(self._parameterNode, path)
            else:
                self.updateGUIFromParameterNode()  # back to the previous choice
            return
        self._parameterNode.adapterPath = value or ""

    def onApplyButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("The Python packages TCURLoRA needs could not be installed."):
            if not slicerapp.ensureDependencies(self.logic, self.ui.progressBar, self.ui.statusLabel):
                return
        with slicer.util.tryWithErrorDisplay("Segmentation could not start.", waitCursor=True):
            self.ui.progressBar.maximum = 100
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Exporting the volume..."
            self.ui.logTextEdit.clear()
            self.logic.segmentFromParameters(p)
        self.updateGUIFromParameterNode()

    # -- logic callbacks (main thread)

    def onLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        slicer.util.showStatusMessage(text, 3000)

    def onProgress(self, event: dict) -> None:
        percent, text = tasks.progressText(event)
        self.ui.progressBar.value = percent
        self.ui.progressBar.format = tasks.progressBarFormat(event)
        self.ui.statusLabel.text = text

    def onFinished(self, task) -> None:
        self.ui.progressBar.format = "%p%"
        if task.status == tasks.DONE:
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = f"Done: '{task.outputSegmentation.GetName()}'."
        elif task.status == tasks.CANCELLED:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Cancelled."
        else:
            self.ui.statusLabel.text = "Failed: " + task.errorMessage
            slicer.util.errorDisplay("Segmentation failed:\n\n" + task.errorMessage, windowTitle="TCUR Segment")
        self.updateGUIFromParameterNode()


#
# TCURSegmentLogic
#


class TCURSegmentLogic(ScriptedLoadableModuleLogic, logic.SegmentLogic):
    """Segmentation without the GUI: :class:`TCURLoRALib.logic.SegmentLogic` (launcher, models, adapters, runs)
    plus the module's parameter node.

    :param launcher: ``launcher(job, workdir) -> WorkerJob`` (default: ``PythonSlicer -m tcurlora.worker``).
    :param kwargs: see :class:`TCURLoRALib.logic.SegmentLogic` (registry, manifestReader, dependencyInstaller,
        discoverModels, runner); the defaults are the application's.
    """

    def __init__(self, launcher=None, **kwargs) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        logic.SegmentLogic.__init__(self, launcher=launcher, **dict(slicerapp.engineLogicArguments(), **kwargs))

    def getParameterNode(self):
        return TCURSegmentParameterNode(super().getParameterNode())

    @staticmethod
    def addAdapter(parameterNode, path: str, modelName: Optional[str] = None) -> None:
        """Offer ``path`` in the adapter list and select it (and its base model when given)."""
        path = os.path.abspath(path)
        with slicer.util.NodeModify(parameterNode):
            if path not in list(parameterNode.loadedAdapters):
                parameterNode.loadedAdapters.append(path)
            if modelName:
                parameterNode.model = modelName
            parameterNode.adapterPath = path

    def waitForCompletion(self, timeoutSeconds: float = 600.0, idle=None):
        return logic.SegmentLogic.waitForCompletion(self, timeoutSeconds, idle=idle or slicer.app.processEvents)


#
# TCURSegmentTest
#


class TCURSegmentTest(ScriptedLoadableModuleTest):
    """Self-tests. The stand-in worker (``Testing/standin_worker.py``, test-only) checks the Slicer side without
    torch; the real engine runs too when its packages are installed and the base model is cached (or
    ``TCURLORA_SELFTEST_ENGINE=1``; ``=0`` skips it)."""

    LABELS = [{"value": 1, "name": "Brain", "color": [0.9, 0.7, 0.6]}]

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentWithStandInWorker()
        self.setUp()
        self.test_ApplyTwiceReplacesTheNewSegmentation()
        self.setUp()
        self.test_RefuseAdapterForOtherBase()
        self.setUp()
        self.test_SegmentWithEngine()

    @staticmethod
    def makeVolume(name="TCURTestVolume"):
        import numpy as np

        shape = (24, 28, 32)  # K, J, I
        k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        voxels = (1000.0 * (k ** 2 + j ** 2 + i ** 2 < 0.5)).astype(np.int16)
        ijkToRAS = np.array([[0, -1.2, 0, 20.0], [1.1, 0, 0, -15.0], [0, 0, 1.5, 5.0], [0, 0, 0, 1]])
        return nodeio.addVolumeFromArray(slicer.mrmlScene, voxels, ijkToRAS, name)

    def standInLogic(self, fingerprint="toy-fingerprint", manifestReader=None):
        registry = models.ModelRegistry(catalog=[{"name": "toy", "title": "Toy model", "labels": self.LABELS,
                                                   "fingerprint": fingerprint, "cached": True}])
        standIn = engine.testingFile(__file__, "standin_worker.py")
        launcher = engine.defaultLauncher(script=standIn, pythonpath=[engine.engineRoot()])
        return TCURSegmentLogic(launcher=launcher, registry=registry, manifestReader=manifestReader,
                                dependencyInstaller=lambda: True)

    def test_SegmentWithStandInWorker(self):
        self.delayDisplay("Segment with the stand-in worker")
        volume = self.makeVolume()
        logic = self.standInLogic()
        progress = []
        logic.onProgress = progress.append
        task = logic.segment(volume, modelName="toy", device="cpu")
        self.assertEqual(logic.waitForCompletion(60), tasks.DONE, task.errorMessage)
        segmentation = task.outputSegmentation
        self.assertIsNotNone(segmentation)
        self.assertEqual(nodeio.segmentNames(segmentation), ["Brain"])
        self.assertTrue(progress, "no progress event")
        labelArray = nodeio.labelArrayFromSegmentation(segmentation, volume)
        self.assertEqual(labelArray.shape, (24, 28, 32))
        self.assertGreater(int(labelArray.sum()), 0)
        self.assertTrue(segmentation.GetSegmentation().ContainsRepresentation("Closed surface"))
        self.assertFalse(os.path.exists(task.workdir), "temporary folder left behind")
        self.delayDisplay("Segment with the stand-in worker: passed")

    def test_ApplyTwiceReplacesTheNewSegmentation(self):
        self.delayDisplay("Apply twice with 'Create new segmentation': one new node, replaced")
        volume = self.makeVolume()
        logic = self.standInLogic()
        p = logic.getParameterNode()
        p.inputVolume, p.outputSegmentation, p.model, p.device = volume, None, "toy", "cpu"
        self.assertEqual(p.largestComponent, "default")  # the base model decides (deepbet: keep largest)
        for _ in range(2):
            logic.segmentFromParameters(p)
            self.assertEqual(logic.waitForCompletion(60), tasks.DONE, logic.task.errorMessage)
            self.assertIsNone(logic.task.jobDict["largest_component"])
        self.assertIs(p.outputSegmentation, logic.task.outputSegmentation)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 1)
        self.delayDisplay("Apply twice: passed")

    def test_RefuseAdapterForOtherBase(self):
        self.delayDisplay("Refuse an adapter trained on another base model")
        import tempfile

        adapter = os.path.join(tempfile.mkdtemp(prefix="tcurlora-test-"), "other.safetensors")
        with open(adapter, "wb") as f:
            f.write(b"not read: the manifest reader is a stand-in")
        manifest = {"format_version": "1.0", "method": {"name": "tcurlora", "rank": 8},
                    "base": {"name": "other", "fingerprint": "sha256:0123456789abcdef"},
                    "labels": self.LABELS, "provenance": {"cases": 3, "steps": 10, "validation_dice": 0.8}}
        logic = self.standInLogic(manifestReader=lambda path: manifest)
        info = logic.describeAdapter(adapter, "toy")
        self.assertFalse(info["compatible"])
        self.assertIn("other", info["message"])
        with self.assertRaises(ValueError):
            logic.segment(self.makeVolume(), modelName="toy", adapterPath=adapter)
        self.assertFalse(logic.isRunning())
        self.delayDisplay("Refuse an adapter trained on another base model: passed")

    @staticmethod
    def engineAvailable(modelName="deepbet") -> bool:
        flag = os.environ.get("TCURLORA_SELFTEST_ENGINE", "")
        if flag == "0":
            return False
        from TCURLoRALib import dependencies

        if dependencies.missingPackages(dependencies.readRequirements()):
            return False
        entry = models.ModelRegistry().entry(modelName)
        return entry is not None and (bool(entry.get("cached")) or flag == "1")

    def test_SegmentWithEngine(self):
        if not self.engineAvailable():
            self.delayDisplay("Real engine not available (packages or cached base model missing): skipped")
            return
        self.delayDisplay("Segment with the real engine (deepbet, CPU)")
        volume = self.makeVolume()
        logic = TCURSegmentLogic(dependencyInstaller=lambda: True)
        task = logic.segment(volume, modelName="deepbet", device="cpu")
        self.assertEqual(logic.waitForCompletion(900), tasks.DONE, task.errorMessage)
        self.assertGreaterEqual(len(nodeio.segmentNames(task.outputSegmentation)), 1)
        self.delayDisplay("Segment with the real engine: passed")
