"""Render the extension's screenshot from a real MRML scene, offscreen, without the Slicer application.

    PYTHONPATH=. python Resources/Screenshots/render_screenshots.py

needs the ``slicer-core`` wheel (real MRML), the engine's packages and the cached deepbet weights and ROBEX
reference head (``tcurlora.fetch``, pinned by sha256). What it shows is real: TCUR Segment's logic
(``TCURLoRALib.logic.SegmentLogic``) segments the ROBEX reference T1 head with the real worker process
(deepbet, CPU); the slices come from the scene's volume and segmentation nodes, the 3D panel from the closed
surface the task built in the background, rendered with VTK offscreen. The module's Qt panel is not in the
picture (that needs the Slicer application).
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)


def render_surface(segmentation_node, size=(520, 520)) -> np.ndarray:
    """RGB image of the segmentation's closed surfaces (VTK, offscreen)."""
    import vtk
    from vtk.util import numpy_support

    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.1, 0.1, 0.15)
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        surface = segment.GetRepresentation("Closed surface")
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(surface)
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*segment.GetColor())
        renderer.AddActor(actor)
    camera = renderer.GetActiveCamera()
    camera.SetPosition(-1, -0.6, 0.35)  # from the left front, as Slicer's 3D view "left" preset
    camera.SetFocalPoint(0, 0, 0)
    camera.SetViewUp(0, 0, 1)
    renderer.ResetCamera()
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    window.AddRenderer(renderer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return pixels[::-1, :, :3]


def anatomical_slice(array: np.ndarray, ijk_to_ras: np.ndarray, normal: int, up: int, index: int) -> np.ndarray:
    """The 2D slice of a K-J-I array through voxel ``index`` along the array axis closest to RAS axis ``normal``,
    turned so that RAS axis ``up`` points up and patient left is on the right (radiological view)."""
    def array_axis(ras):  # K-J-I array axis whose IJK column points most along the RAS axis
        return 2 - int(np.argmax(np.abs(ijk_to_ras[ras, :3])))

    def sign(ras):
        return np.sign(ijk_to_ras[ras, 2 - array_axis(ras)])

    cut, row = array_axis(normal), array_axis(up)
    side = ({0, 1, 2} - {normal, up}).pop()
    column = array_axis(side)
    picture = np.moveaxis(np.take(array, index, axis=cut), [row - (row > cut), column - (column > cut)], [0, 1])
    if sign(up) > 0:
        picture = picture[::-1]
    if sign(side) < 0:
        picture = picture[:, ::-1]
    return picture


def overlay(image2d: np.ndarray, mask2d: np.ndarray, color) -> np.ndarray:
    low, high = np.percentile(image2d, [1, 99.5])
    gray = np.clip((image2d - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    alpha = 0.45 * mask2d[..., None]
    rgb = rgb * (1 - alpha) + np.asarray(color)[None, None, :] * alpha
    return rgb


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import slicer
    from tcurlora.datasets import get_scan  # pinned download into the cache
    from TCURLoRALib import logic, nodeio, tasks

    nodeio.registerSegmentationConverterRules()
    scene = slicer.vtkMRMLScene()
    image_path, _ = get_scan("robex")
    volume = nodeio.readVolume(scene, str(image_path), name="ROBEX reference T1")
    segment_logic = logic.SegmentLogic(dependencyInstaller=lambda: True)
    task = segment_logic.segment(volume, modelName="deepbet", device="cpu", createSurfaces=True)
    status = segment_logic.waitForCompletion(1800)
    if status != tasks.DONE:
        print(f"segmentation failed: {task.errorMessage}", file=sys.stderr)
        return 1
    node = task.outputSegmentation
    segment = node.GetSegmentation().GetNthSegment(0)
    color = segment.GetColor()
    voxels = nodeio.arrayFromVolume(volume).astype(float)
    mask = nodeio.labelArrayFromSegmentation(node, volume) > 0
    geometry = nodeio.ijkToRAS(volume)
    centre = np.linalg.solve(geometry, np.r_[np.mean(np.argwhere(mask)[:, ::-1] @ geometry[:3, :3].T
                                                      + geometry[:3, 3], axis=0), 1.0])[:3]  # mask centre, IJK

    def view(normal, up):
        axis = 2 - int(np.argmax(np.abs(geometry[normal, :3])))
        index = int(round(centre[2 - axis]))
        return overlay(anatomical_slice(voxels, geometry, normal, up, index),
                       anatomical_slice(mask.astype(float), geometry, normal, up, index), color)

    panels = [("axial", view(2, 1)), ("coronal", view(1, 2)),
              ("3D (surface built in the background)", render_surface(node) / 255.0)]
    figure, axes = plt.subplots(1, 3, figsize=(13.5, 4.9), facecolor="#1a1a24")
    for axis, (title, picture) in zip(axes, panels):
        axis.imshow(picture, aspect="auto" if title.startswith("3D") else "equal")
        axis.set_title(title, color="white", fontsize=11)
        axis.axis("off")
    figure.suptitle(f"TCUR Segment: deepbet brain mask of the ROBEX reference T1 head "
                    f"(segment '{segment.GetName()}', worker process on the CPU)",
                    color="white", fontsize=12)
    figure.tight_layout()
    out = os.path.join(HERE, "TCURSegment-deepbet.png")
    figure.savefig(out, dpi=80, facecolor=figure.get_facecolor())
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
