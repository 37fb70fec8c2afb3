"""MRML node <-> file / numpy array, for the worker's inputs and outputs.

Works in the Slicer application and on the ``slicer-core`` wheel (real MRML without the application), so the
tests exercise exactly this code. It therefore never uses ``slicer.mrmlScene``, ``slicer.modules`` or the
``slicer.util`` helpers that go through them: the scene comes from the nodes and the segmentation logic class
is used directly.

Conventions: numpy arrays are in K-J-I order (like ``slicer.util.arrayFromVolume``); a geometry is the 4x4
IJK-to-RAS matrix of the node (its own coordinates, parent transforms are not applied: a result is put under
the same parent transform as its input volume). Files are written in LPS by the MRML storage nodes, which is
what the engine (SimpleITK / slicerio) reads.
"""

import os
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
from tcurlora.atomic import atomic_write

TEMP_NODE_NAME = "__tcurlora_temp__"
SCALAR_VOLUME_CLASSES = ("vtkMRMLScalarVolumeNode",)


# ----------------------------------------------------------------------------------------------------------
# helpers


def registerSegmentationConverterRules() -> None:
    """Register the labelmap <-> closed surface conversion rules if nobody did (the Slicer application does it
    at start-up; ``slicer-core`` does not)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    names = {rule.GetName() for rule in factory.GetConverterRules()}
    rule = slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule()
    if rule.GetName() not in names:
        factory.RegisterConverterRule(rule)
    rule = slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule()
    if rule.GetName() not in names:
        factory.RegisterConverterRule(rule)


def segmentationsLogic(scene):
    """The segmentations module logic (the application's instance when there is one for this scene)."""
    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "segmentations"):
        logic = modules.segmentations.logic()
        if logic is not None and logic.GetMRMLScene() is scene:
            return logic
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    return logic


def _requireScene(node, what: str):
    if node is None:
        raise ValueError(f"no {what} node given")
    scene = node.GetScene()
    if scene is None:
        raise ValueError(f"the {what} node '{node.GetName()}' is not in a scene")
    return scene


def _removeTempNode(scene, node) -> None:
    """Remove a temporary node with the display, storage and colour nodes MRML created for it."""
    if node is None or node.GetScene() is not scene:
        return
    related = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        for index in range(node.GetNumberOfDisplayNodes()):
            displayNode = node.GetNthDisplayNode(index)
            if displayNode is None:
                continue
            colorNode = displayNode.GetColorNode() if hasattr(displayNode, "GetColorNode") else None
            if colorNode is not None and not colorNode.GetSingletonTag() and colorNode.GetScene() is scene:
                related.append(colorNode)  # a colour table made for this export only
            related.append(displayNode)
    if hasattr(node, "GetNumberOfStorageNodes"):
        for index in range(node.GetNumberOfStorageNodes()):
            if node.GetNthStorageNode(index) is not None:
                related.append(node.GetNthStorageNode(index))
    scene.RemoveNode(node)
    for other in related:
        if other.GetScene() is scene:
            scene.RemoveNode(other)


def matrixToArray(matrix: "vtk.vtkMatrix4x4") -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def arrayToMatrix(array) -> "vtk.vtkMatrix4x4":
    array = np.asarray(array, dtype=float)
    if array.shape != (4, 4):
        raise ValueError(f"a 4x4 matrix is needed, got shape {array.shape}")
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijkToRAS(volumeNode) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as a numpy array."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrixToArray(matrix)


def _checkScalarVolume(volumeNode) -> None:
    if volumeNode is None:
        raise ValueError("no volume given")
    if volumeNode.GetClassName() not in SCALAR_VOLUME_CLASSES:
        raise ValueError(f"'{volumeNode.GetName()}' is a {volumeNode.GetClassName()}; a scalar (grey-level) "
                         "volume is needed")
    image = volumeNode.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"the volume '{volumeNode.GetName()}' has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"the volume '{volumeNode.GetName()}' has {image.GetNumberOfScalarComponents()} "
                         "components per voxel; a single-component volume is needed")


# ----------------------------------------------------------------------------------------------------------
# volumes


def arrayFromVolume(volumeNode) -> np.ndarray:
    """A copy of the voxels, K-J-I order."""
    image = volumeNode.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"the volume '{volumeNode.GetName()}' has no voxels")
    shape = tuple(reversed(image.GetDimensions()))
    components = image.GetNumberOfScalarComponents()
    if components > 1:
        shape = shape + (components,)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape).copy()


def updateVolumeFromArray(volumeNode, array: np.ndarray, ijkToRASMatrix=None) -> None:
    """Replace the voxels (K-J-I array, deep copy) and optionally the geometry of a volume node."""
    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise ValueError(f"a 3D array is needed, got shape {array.shape}")
    if array.dtype == np.int64 or array.dtype == np.uint64:
        raise ValueError("64-bit integer voxels are not supported; cast to int32 or smaller")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtkArray = numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                          array_type=numpy_support.get_vtk_array_type(array.dtype))
    vtkArray.SetName("ImageScalars")
    image.GetPointData().SetScalars(vtkArray)
    if ijkToRASMatrix is not None:
        volumeNode.SetIJKToRASMatrix(arrayToMatrix(ijkToRASMatrix))
    volumeNode.SetAndObserveImageData(image)


def addVolumeFromArray(scene, array: np.ndarray, ijkToRASMatrix=None, name: str = "Volume",
                       className: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node in ``scene`` holding a copy of ``array`` (K-J-I)."""
    node = scene.AddNewNodeByClass(className, name)
    updateVolumeFromArray(node, array, ijkToRASMatrix if ijkToRASMatrix is not None else np.diag([-1, -1, 1, 1]))
    return node


def writeVolume(volumeNode, path: str, compress: bool = True) -> str:
    """Write a scalar volume (NRRD / NIfTI by extension) without adding a storage node to the scene."""
    _checkScalarVolume(volumeNode)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(os.fspath(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(volumeNode):
        raise IOError(f"could not write the volume '{volumeNode.GetName()}' to {path}")
    return os.fspath(path)


def readVolume(scene, path: str, name: Optional[str] = None, labelmap: bool = False):
    """Load a volume file into a new node of ``scene``."""
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(className, name or os.path.basename(os.fspath(path)).split(".")[0])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(os.fspath(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise IOError(f"could not read a volume from {path}")
    return node


# ----------------------------------------------------------------------------------------------------------
# segmentations


def segments(segmentationNode) -> List[Dict]:
    """``[{"id", "name", "color", "labelValue"}]`` in the segmentation's order."""
    segmentation = segmentationNode.GetSegmentation()
    out = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        out.append({"id": segmentation.GetNthSegmentID(index), "name": segment.GetName(),
                    "color": [float(c) for c in segment.GetColor()],
                    "labelValue": int(segment.GetLabelValue())})
    return out


def segmentNames(segmentationNode) -> List[str]:
    return [s["name"] for s in segments(segmentationNode)]


def labelArrayFromSegmentation(segmentationNode, referenceVolumeNode, segmentIds: Optional[Sequence[str]] = None,
                               values: Optional[Sequence[int]] = None) -> np.ndarray:
    """Segments rendered as one label map on the reference volume's grid (K-J-I).

    ``segmentIds`` default to all segments; segment ``segmentIds[i]`` gets label ``values[i]`` (default i+1;
    several segments may share a value). Overlaps: a later segment wins, as in Slicer's export.
    """
    scene = _requireScene(segmentationNode, "segmentation")
    if referenceVolumeNode is None:
        raise ValueError("a reference volume is needed to define the label map grid")
    segmentation = segmentationNode.GetSegmentation()
    if segmentIds is None:
        segmentIds = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    segmentIds = list(segmentIds)
    values = list(values) if values is not None else list(range(1, len(segmentIds) + 1))
    if len(values) != len(segmentIds):
        raise ValueError("one label value per segment is needed")
    for segmentId in segmentIds:
        if segmentation.GetSegment(segmentId) is None:
            raise ValueError(f"segment '{segmentId}' is not in '{segmentationNode.GetName()}'")
    refImage = referenceVolumeNode.GetImageData()
    if refImage is None:
        raise ValueError(f"the reference volume '{referenceVolumeNode.GetName()}' has no voxels")
    shape = tuple(reversed(refImage.GetDimensions()))
    maxValue = max(values + [0])
    dtype = np.uint8 if maxValue <= 255 else (np.uint16 if maxValue <= 65535 else np.int32)
    if not segmentIds:
        return np.zeros(shape, dtype)

    ids = vtk.vtkStringArray()
    for segmentId in segmentIds:
        ids.InsertNextValue(segmentId)
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", TEMP_NODE_NAME)
    try:
        logic = segmentationsLogic(scene)
        ok = logic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmapNode, referenceVolumeNode,
                                                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        image = labelmapNode.GetImageData()
        if not ok or image is None or image.GetPointData().GetScalars() is None:
            # Slicer refuses to export segments that are all empty: that is an all-background label map.
            if all(_segmentIsEmpty(segmentation, s) for s in segmentIds):
                return np.zeros(shape, dtype)
            raise RuntimeError(f"could not export the segments of '{segmentationNode.GetName()}'")
        indices = arrayFromVolume(labelmapNode)
    finally:
        _removeTempNode(scene, labelmapNode)
    if indices.shape != shape:
        raise RuntimeError(f"exported label map has shape {indices.shape}, expected {shape}")
    lut = np.zeros(len(segmentIds) + 1, dtype)
    lut[1:] = np.asarray(values, dtype)
    return lut[indices.astype(np.int64)]


def _segmentIsEmpty(segmentation, segmentId: str) -> bool:
    segment = segmentation.GetSegment(segmentId)
    if segment is None:
        return True
    try:
        return bool(segment.IsEmpty()) if hasattr(segment, "IsEmpty") else False
    except TypeError:
        return False


def updateSegmentationFromLabelArray(segmentationNode, labelArray: np.ndarray, ijkToRASMatrix,
                                     labels: Sequence[Dict] = (), keepEmptyLabels: bool = True) -> None:
    """Replace every segment of ``segmentationNode`` with one segment per label value of ``labelArray``
    (K-J-I, geometry ``ijkToRASMatrix``).

    ``labels`` (``[{"value", "name", "color"}]``) name and colour the segments; values without an entry become
    ``Label <v>``. With ``keepEmptyLabels`` a label absent from the array still gets an (empty) segment.
    """
    scene = _requireScene(segmentationNode, "segmentation")
    labelArray = np.asarray(labelArray)
    if labelArray.ndim != 3:
        raise ValueError(f"a 3D label array is needed, got shape {labelArray.shape}")
    if np.issubdtype(labelArray.dtype, np.floating) or labelArray.dtype == np.bool_ or labelArray.dtype.itemsize > 4:
        labelArray = labelArray.astype(np.int32)
    if labelArray.size and labelArray.min() < 0:
        raise ValueError("label values must not be negative")
    byValue = {int(e["value"]): e for e in labels}
    segmentation = segmentationNode.GetSegmentation()
    segmentation.RemoveAllSegments()
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", TEMP_NODE_NAME)
    try:
        updateVolumeFromArray(labelmapNode, labelArray, ijkToRASMatrix)
        if labelArray.any():
            logic = segmentationsLogic(scene)
            if not logic.ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode):
                raise RuntimeError(f"could not import the label map into '{segmentationNode.GetName()}'")
    finally:
        _removeTempNode(scene, labelmapNode)
    presentValues = set()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        value = int(segment.GetLabelValue())
        presentValues.add(value)
        _styleSegment(segment, value, byValue.get(value))
    if keepEmptyLabels:
        for value in sorted(set(byValue) - presentValues):
            entry = byValue[value]
            segmentation.AddEmptySegment("", str(entry["name"]), _color(entry, value))
    segmentationNode.Modified()


def _color(entry: Optional[Dict], value: int) -> List[float]:
    if entry is not None and entry.get("color") is not None:
        color = [float(c) for c in entry["color"]][:3]
        if max(color) > 1.0:  # 0..255 colours
            color = [c / 255.0 for c in color]
        return color
    from .models import defaultColor

    return defaultColor(value)


def _styleSegment(segment, value: int, entry: Optional[Dict]) -> None:
    segment.SetName(str(entry["name"]) if entry is not None else f"Label {value}")
    segment.SetColor(*_color(entry, value))


def applyLabels(segmentationNode, labels: Sequence[Dict]) -> None:
    """Name and colour segments by their label value (segments without an entry are left as they are)."""
    byValue = {int(e["value"]): e for e in labels}
    segmentation = segmentationNode.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        entry = byValue.get(int(segment.GetLabelValue()))
        if entry is not None:
            _styleSegment(segment, int(segment.GetLabelValue()), entry)


def writeSegmentation(segmentationNode, path: str, referenceVolumeNode=None) -> str:
    """Write a ``.seg.nrrd``; with a reference volume the file covers exactly that volume's grid."""
    if referenceVolumeNode is not None:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(os.fspath(path))
    storage.SetCropToMinimumExtent(False)
    storage.SetUseCompression(1)
    if not storage.WriteData(segmentationNode):
        raise IOError(f"could not write the segmentation '{segmentationNode.GetName()}' to {path}")
    return os.fspath(path)


def writeTrainingLabel(segmentationNode, referenceVolumeNode, path: str, segmentLabels: Dict[str, int],
                       labels: Sequence[Dict]) -> List[int]:
    """Write the training label of one case as a ``.seg.nrrd`` on the image's grid.

    ``segmentLabels`` maps segment IDs of ``segmentationNode`` to label values (several segments may map to one
    label; unmapped segments are left out = background); ``labels`` names and colours the values, so the file's
    segment names are the target label names the engine maps by name. Only labels present in this case are
    written. Returns the label values present.
    """
    _checkScalarVolume(referenceVolumeNode)
    ids = list(segmentLabels)
    array = labelArrayFromSegmentation(segmentationNode, referenceVolumeNode, ids, [segmentLabels[i] for i in ids])
    return writeLabelArray(path, array, ijkToRAS(referenceVolumeNode), labels)


def readSegmentation(path: str, segmentationNode=None, scene=None, name: Optional[str] = None,
                     labels: Sequence[Dict] = (), referenceVolumeNode=None):
    """Load a ``.seg.nrrd`` (or a plain label map file) into ``segmentationNode`` (replacing its segments) or
    into a new node of ``scene``; segments are named and coloured from ``labels`` by label value, and the
    segmentation gets the reference volume's geometry and parent transform. Returns the node."""
    if segmentationNode is None:
        if scene is None:
            raise ValueError("give a segmentation node or a scene")
        segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or "Segmentation")
    scene = _requireScene(segmentationNode, "segmentation")
    temp = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", TEMP_NODE_NAME)
    try:
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(os.fspath(path))
        if not storage.ReadData(temp):
            raise IOError(f"could not read a segmentation from {path}")
        segmentationNode.GetSegmentation().DeepCopy(temp.GetSegmentation())
    finally:
        _removeTempNode(scene, temp)
    applyLabels(segmentationNode, labels)
    if referenceVolumeNode is not None:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        segmentationNode.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
    segmentationNode.Modified()
    return segmentationNode


def showSegmentation(segmentationNode, surfaces: bool = True) -> None:
    """Display nodes for slice views, and closed surfaces for the 3D view."""
    registerSegmentationConverterRules()
    segmentationNode.CreateDefaultDisplayNodes()
    displayNode = segmentationNode.GetDisplayNode()
    if displayNode is not None:
        displayNode.SetVisibility(True)
        displayNode.SetVisibility2D(True)
        displayNode.SetVisibility3D(True)
    if surfaces and segmentationNode.GetSegmentation().GetNumberOfSegments() > 0:
        segmentationNode.CreateClosedSurfaceRepresentation()


def removeNode(node) -> None:
    """Remove a node with its display and storage nodes (the MRML scene leaves those behind)."""
    scene = node.GetScene() if node is not None else None
    if scene is None:
        return
    extra = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        extra += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetStorageNode"):
        extra.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for other in extra:
        if other is not None and other.GetScene() is scene:
            scene.RemoveNode(other)


def iterSegmentationNodes(scene) -> Iterable:
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    for index in range(nodes.GetNumberOfItems()):
        yield nodes.GetItemAsObject(index)


# ----------------------------------------------------------------------------------------------------------
# Files from / to plain arrays. These touch no MRML object, so a task runs them on a background thread (the
# GUI stays responsive while large volumes are compressed or decompressed); only taking the arrays from the
# nodes (:func:`arrayFromVolume`, :func:`labelArrayFromSegmentation`) and putting them back
# (:func:`updateSegmentationFromLabelArray`) happen on the main thread.

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def writeVolumeArray(path: str, array: np.ndarray, ijkToRASMatrix) -> str:
    """Write a K-J-I array with its IJK-to-RAS geometry as an LPS NRRD (gzip), as the volume storage node does."""
    import nrrd

    lps = _RAS_TO_LPS @ np.asarray(ijkToRASMatrix, float)
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T,
              "space origin": lps[:3, 3], "kinds": ["domain"] * 3, "encoding": "gzip"}
    atomic_write(path, lambda tmp: nrrd.write(tmp, np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)),
                                              header, compression_level=1))
    return os.fspath(path)


def writeLabelArray(path: str, labelArray: np.ndarray, ijkToRASMatrix, labels: Sequence[Dict]) -> List[int]:
    """Write a K-J-I label map as a ``.seg.nrrd`` (one segment per value present, named and coloured from
    ``labels``); returns the values present. ValueError when a present value has no entry in ``labels``."""
    import slicerio

    labelArray = np.asarray(labelArray)
    present = sorted(int(v) for v in np.unique(labelArray) if v != 0)
    byValue = {int(e["value"]): e for e in labels}
    missing = [v for v in present if v not in byValue]
    if missing:
        raise ValueError(f"label values {missing} have no entry in the label table")
    dtype = np.uint8 if not present or present[-1] <= 255 else np.uint16
    segmentation = {
        "voxels": np.ascontiguousarray(labelArray.transpose(2, 1, 0).astype(dtype)),
        "ijkToLPS": _RAS_TO_LPS @ np.asarray(ijkToRASMatrix, float),
        "encoding": "gzip",
        "masterRepresentation": "Binary labelmap",
        "containedRepresentationNames": ["Binary labelmap"],
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [{"id": f"Segment_{v}", "name": str(byValue[v]["name"]), "labelValue": v, "layer": 0,
                      "color": _color(byValue[v], v), "nameAutoGenerated": False, "colorAutoGenerated": False}
                     for v in present],
    }
    atomic_write(path, lambda tmp: slicerio.write_segmentation(tmp, segmentation, compression_level=1))
    return present


def readLabelFile(path: str):
    """A ``.seg.nrrd`` (one layer) as ``(labelArray K-J-I, ijkToRAS, {labelValue: segment name})``."""
    import slicerio

    seg = slicerio.read_segmentation(os.fspath(path))
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim != 3:
        raise ValueError(f"{os.path.basename(path)}: overlapping segments (several layers) are not supported here")
    names = {int(s["labelValue"]): str(s.get("name", "")) for s in seg.get("segments", [])}
    return voxels.transpose(2, 1, 0), _RAS_TO_LPS @ np.asarray(seg["ijkToLPS"], float), names


def surfaceCopy(segmentationNode):
    """A detached copy of the node's segmentation, for building closed surfaces off the main thread
    (:func:`buildSurfaces`), then :func:`adoptSurfaces` on the main thread."""
    copy = slicer.vtkSegmentation()
    copy.DeepCopy(segmentationNode.GetSegmentation())
    return copy


def buildSurfaces(segmentation) -> None:
    """Closed surfaces of a detached ``vtkSegmentation`` (any thread: it belongs to no scene)."""
    registerSegmentationConverterRules()
    segmentation.CreateRepresentation("Closed surface")


def adoptSurfaces(segmentationNode, segmentation) -> bool:
    """Take the surfaces built on a copy (main thread); False when the node's segments changed meanwhile."""
    target = segmentationNode.GetSegmentation()
    ids = [target.GetNthSegmentID(i) for i in range(target.GetNumberOfSegments())]
    if ids != [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]:
        return False
    for segmentId in ids:
        surface = segmentation.GetSegment(segmentId).GetRepresentation("Closed surface")
        if surface is not None:
            target.GetSegment(segmentId).AddRepresentation("Closed surface", surface)
    segmentationNode.Modified()
    return True
