"""Live training curves: MRML table + plot series + plot chart nodes.

Two tables (training loss per step, validation Dice per validation step) because validation runs less often
than training steps; each feeds one line series of the same chart. The nodes are ordinary scene nodes, so a
saved scene keeps the curves. Showing the chart in the layout is the widget's job
(``slicer.modules.plots.logic().ShowChartInLayout(chartNode)``).
"""

import math
from typing import Optional, Tuple

import vtk

import slicer

LOSS_COLOR = (0.85, 0.33, 0.1)
DICE_COLOR = (0.0, 0.45, 0.74)


def _addColumn(table: "vtk.vtkTable", name: str) -> "vtk.vtkDoubleArray":
    column = vtk.vtkDoubleArray()
    column.SetName(name)
    table.AddColumn(column)
    return column


def _newTable(scene, name: str, yName: str):
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    _addColumn(table, "step")
    _addColumn(table, yName)
    return node


def _newSeries(scene, name: str, tableNode, yName: str, color):
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
    series.SetAndObserveTableNodeID(tableNode.GetID())
    series.SetXColumnName("step")
    series.SetYColumnName(yName)
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
    series.SetColor(*color)
    return series


class TrainingCurves:
    """The loss / validation-Dice chart of one training run.

    ``TrainingCurves(scene)`` creates the nodes; ``TrainingCurves(scene, chartNode=existing)`` reuses those of
    an earlier run (found through the chart's series), so re-running a training in a scene does not pile up
    nodes. :meth:`add` is called for every progress event (main thread only).
    """

    def __init__(self, scene, name: str = "TCURLoRA training", chartNode=None) -> None:
        self.scene = scene
        self.name = name
        self.chartNode = None
        self.lossTable = self.diceTable = None
        self.lossSeries = self.diceSeries = None
        if chartNode is not None and chartNode.GetScene() is scene:
            self._adopt(chartNode)
        if self.chartNode is None:
            self._create()

    # -- nodes

    def _adopt(self, chartNode) -> None:
        found = {}
        for index in range(chartNode.GetNumberOfPlotSeriesNodes()):
            series = chartNode.GetNthPlotSeriesNode(index)
            if series is None or series.GetTableNode() is None:
                continue
            found[series.GetYColumnName()] = series
        if "loss" in found and "dice" in found:
            self.chartNode = chartNode
            self.lossSeries, self.diceSeries = found["loss"], found["dice"]
            self.lossTable, self.diceTable = self.lossSeries.GetTableNode(), self.diceSeries.GetTableNode()

    def _create(self) -> None:
        scene = self.scene
        self.lossTable = _newTable(scene, f"{self.name} loss", "loss")
        self.diceTable = _newTable(scene, f"{self.name} validation Dice", "dice")
        self.lossSeries = _newSeries(scene, "Training loss", self.lossTable, "loss", LOSS_COLOR)
        self.diceSeries = _newSeries(scene, "Validation Dice", self.diceTable, "dice", DICE_COLOR)
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", self.name)
        chart.AddAndObservePlotSeriesNodeID(self.lossSeries.GetID())
        chart.AddAndObservePlotSeriesNodeID(self.diceSeries.GetID())
        chart.SetTitle(self.name)
        chart.SetXAxisTitle("Step")
        chart.SetYAxisTitle("Loss / Dice")
        chart.SetLegendVisibility(True)
        self.chartNode = chart

    def nodes(self):
        return [self.chartNode, self.lossSeries, self.diceSeries, self.lossTable, self.diceTable]

    def removeNodes(self) -> None:
        for node in self.nodes():
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)
        self.chartNode = self.lossSeries = self.diceSeries = self.lossTable = self.diceTable = None

    # -- data

    @staticmethod
    def _append(tableNode, x: float, y: float) -> None:
        table = tableNode.GetTable()
        table.GetColumn(0).InsertNextValue(float(x))
        table.GetColumn(1).InsertNextValue(float(y))
        table.Modified()
        tableNode.Modified()

    @staticmethod
    def _finite(value) -> Optional[float]:
        if value is None:
            return None
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    def add(self, step, loss=None, dice=None) -> None:
        """Append a point to each curve whose value is given (and finite)."""
        loss, dice = self._finite(loss), self._finite(dice)
        if loss is not None:
            self._append(self.lossTable, step, loss)
        if dice is not None:
            self._append(self.diceTable, step, dice)

    def addProgressEvent(self, event: dict) -> None:
        if event.get("event") == "progress" and event.get("phase", "train") == "train":
            self.add(event.get("step", 0), event.get("loss"), event.get("dice"))

    def clear(self) -> None:
        for tableNode in (self.lossTable, self.diceTable):
            table = tableNode.GetTable()
            for index in range(table.GetNumberOfColumns()):
                table.GetColumn(index).SetNumberOfTuples(0)
            table.Modified()
            tableNode.Modified()

    def values(self, which: str = "loss") -> Tuple[list, list]:
        """(steps, values) of the ``"loss"`` or ``"dice"`` curve."""
        tableNode = self.lossTable if which == "loss" else self.diceTable
        table = tableNode.GetTable()
        xs, ys = table.GetColumn(0), table.GetColumn(1)
        return ([xs.GetValue(i) for i in range(xs.GetNumberOfTuples())],
                [ys.GetValue(i) for i in range(ys.GetNumberOfTuples())])
