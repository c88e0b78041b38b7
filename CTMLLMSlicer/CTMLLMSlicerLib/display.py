"""How the selected volume is shown: the HU window the model reads, a CT volume rendering, a layout
with a 3D view. MRML only (no Qt): the Logic calls these; the widget resets the 3D camera.
"""

from __future__ import annotations

from typing import Any

from CTMLLMSlicerLib.errors import CTMLLMSlicerError
from model_core.data.checks import ct_intensity_verdict
from model_core.data.preprocess import WINDOW_PRESETS, percentile_window

CT_RENDERING_PRESET = "CT-Chest-Contrast-Enhanced"
"""Slicer's volume rendering preset for contrast CT; built here when the presets are not loaded."""
LAYOUT_WITH_3D = 3
"""``vtkMRMLLayoutNode.SlicerLayoutFourUpView``: three slice views and the 3D view."""
LAYOUTS_WITHOUT_3D = frozenset({0, 6, 7, 8, 10, 12, 14, 23, 29, 30, 31, 32, 33, 39, 40, 41})
"""Slicer's built-in layouts that have no 3D view (one-up slice, compare, grids, plots, DICOM
browser, none). Other layouts (and custom ones, whose views we cannot know) are left as they are."""


def windowRange(windowPreset: str = "", modelWindow: Any = None) -> tuple[float, float]:
    """The HU range (low, high) the model reads: the preset's, or for "" the model's own window
    (``modelWindow``: a preset name or ``[low, high]``; the default preset while it is unknown)."""
    if windowPreset:
        if windowPreset not in WINDOW_PRESETS:
            raise CTMLLMSlicerError(f"window {windowPreset!r}: choose one of {', '.join(WINDOW_PRESETS)}")
        return WINDOW_PRESETS[windowPreset]
    if isinstance(modelWindow, (list, tuple)) and len(modelWindow) == 2:
        return (float(modelWindow[0]), float(modelWindow[1]))
    return WINDOW_PRESETS.get(modelWindow, next(iter(WINDOW_PRESETS.values())))


def applyWindowPreset(
    volumeNode: Any, windowPreset: str = "", allowNonCT: bool = False, modelWindow: Any = None
) -> None:
    """Show the volume in the slice views with the window the model reads: the HU window, or
    with ``allowNonCT`` for a volume that does not look like CT its own percentile window."""
    from slicer.util import arrayFromVolume

    array = arrayFromVolume(volumeNode) if allowNonCT else None  # (slices, rows, columns)
    if array is not None and not ct_intensity_verdict(array).is_ct:
        low, high = percentile_window(array)
    else:
        low, high = windowRange(windowPreset, modelWindow)
    displayNode = volumeNode.GetDisplayNode()
    if displayNode is not None:
        displayNode.SetAutoWindowLevel(False)
        displayNode.SetWindowLevel(high - low, (low + high) / 2.0)


def showVolumeRendering(vrLogic: Any, volumeNode: Any, presetName: str = CT_RENDERING_PRESET) -> Any:
    """Render ``volumeNode`` in 3D with a CT preset and hide every other volume rendering, so the
    3D view shows the selected volume only; returns its display node."""
    if vrLogic is None:
        raise CTMLLMSlicerError("no volume rendering logic: create the Logic with one to show the 3D view")
    scene = volumeNode.GetScene()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLVolumeRenderingDisplayNode")):
        other = scene.GetNthNodeByClass(index, "vtkMRMLVolumeRenderingDisplayNode")
        if other.GetVolumeNode() is not volumeNode:
            other.SetVisibility(False)
    displayNode = vrLogic.GetFirstVolumeRenderingDisplayNode(volumeNode)
    if displayNode is None:
        displayNode = vrLogic.CreateDefaultVolumeRenderingNodes(volumeNode)
    preset = vrLogic.GetPresetByName(presetName)
    if preset is None:
        preset = buildCTPreset(presetName)
        vrLogic.AddPreset(preset)
    displayNode.GetVolumePropertyNode().Copy(preset)
    displayNode.SetVisibility(True)
    return displayNode


def useLayoutWith3DView(scene: Any) -> bool:
    """Switch to the four-up layout when the current one has no 3D view; True if it switched.

    Through the scene's layout node, which Slicer's layout manager follows."""
    layoutNode = scene.GetFirstNodeByClass("vtkMRMLLayoutNode") if scene else None
    if layoutNode is None or layoutNode.GetViewArrangement() not in LAYOUTS_WITHOUT_3D:
        return False
    layoutNode.SetViewArrangement(LAYOUT_WITH_3D)
    return True


def buildCTPreset(name: str) -> Any:
    """A contrast-CT transfer function (fat and air clear, vessels and bone opaque)."""
    import slicer
    import vtk

    preset = slicer.vtkMRMLVolumePropertyNode()
    preset.SetName(name)
    opacity = vtk.vtkPiecewiseFunction()
    for hu, alpha in ((-1024, 0.0), (-100, 0.0), (120, 0.0), (250, 0.25), (600, 0.6), (3071, 0.8)):
        opacity.AddPoint(hu, alpha)
    colors = vtk.vtkColorTransferFunction()
    for hu, rgb in (
        (-1024, (0, 0, 0)),
        (120, (0.55, 0.25, 0.15)),
        (250, (0.9, 0.45, 0.3)),
        (600, (1.0, 0.9, 0.8)),
        (3071, (1, 1, 1)),
    ):
        colors.AddRGBPoint(hu, *rgb)
    volumeProperty = preset.GetVolumeProperty()
    volumeProperty.SetScalarOpacity(opacity)
    volumeProperty.SetColor(colors)
    volumeProperty.ShadeOn()
    volumeProperty.SetInterpolationTypeToLinear()
    return preset
