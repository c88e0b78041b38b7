"""Volume nodes in and out of the MRML scene: files read into scalar volume nodes, nodes copied for the model.

Reading a file or a DICOM series checks it first (a truncated NIfTI is refused before Slicer's
reader would zero-fill it) and refuses what is not a single-channel scalar volume; a
``model_core.data.CTImage`` becomes a node with its geometry in RAS; ``snapshotVolume`` copies a
node's voxels and geometry on the GUI thread (MRML is read only there). This is MRML node
handling, apart from ``logic``, which decides what to run and keeps the conversations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from CTMLLMSlicerLib.errors import CTMLLMSlicerError, NoVolumeError
from CTMLLMSlicerLib.scene_results import VolumeIds
from CTMLLMSlicerLib.session import VolumeSnapshot
from CTMLLMSlicerLib.worker_client import volumeKey


def loadVolumeFile(
    scene: Any,
    volumesLogic: Any,
    pathOrSeriesFiles: str | os.PathLike | Sequence[str | os.PathLike],
    name: str | None = None,
    onChecked: Callable[[Path], None] = lambda path: None,
) -> Any:
    """Read a volume file, or the files of one DICOM series, into the scene; returns the
    ``vtkMRMLScalarVolumeNode``.

    Slicer's Volumes logic reads it, as "Add data" does. A truncated NIfTI is refused before
    Slicer's reader would zero-fill its missing voxels; a series is read from its explicit
    file list, so other series in the same folder never mix in. ``name`` defaults to the file
    name without its suffixes (the folder name for a series). Raises ``model_core.data``'s
    ``UnreadableVolumeError`` naming the input.
    ``onChecked`` gets a volume file that passed the checks (the session then skips them).
    """
    from model_core.data.errors import UnreadableVolumeError
    from model_core.data.files import check_readable
    from model_core.data.io import check_volume_file, volume_suffix

    if volumesLogic is None:
        raise CTMLLMSlicerError("no volumes logic: create the Logic with one to load volume files")
    single = isinstance(pathOrSeriesFiles, (str, os.PathLike))
    files = [Path(pathOrSeriesFiles)] if single else [Path(f) for f in pathOrSeriesFiles]
    if not files:
        raise UnreadableVolumeError("no files to load: pass a volume file or the files of one DICOM series")
    what = (
        str(files[0]) if len(files) == 1 else f"the DICOM series of {len(files)} files in {files[0].parent}"
    )
    for file in files:
        check_readable(file)
    if len(files) == 1 and volume_suffix(files[0]):
        check_volume_file(files[0])  # the verdict read_ct gives, before Slicer's reader
        onChecked(files[0])
    name = name or (files[0].parent.name if len(files) > 1 else _volumeName(files[0]))
    node = _addArchetypeVolume(volumesLogic, files, name)
    if node is None:
        raise UnreadableVolumeError(
            f"{what}: Slicer could not read it as a volume (corrupt, truncated or not an image); export or "
            "copy it again"
        )
    image = node.GetImageData()
    if (
        not node.IsA("vtkMRMLScalarVolumeNode")
        or node.IsA("vtkMRMLLabelMapVolumeNode")
        or image is None
        or image.GetNumberOfScalarComponents() != 1  # vector and tensor nodes derive from scalar ones
    ):
        _removeWithDisplayAndStorage(scene, node)
        raise UnreadableVolumeError(
            f"{what}: was read as a {node.GetClassName()}, not a scalar CT volume: pass a single-channel CT"
        )
    return node


def addVolumeFromCT(scene: Any, ct: Any, name: str) -> Any:
    """A scalar volume node holding a ``model_core.data.CTImage`` (read by ``read_ct`` or
    ``read_dicom_series``: DICOM as scanners export it), with its geometry in RAS."""
    import vtk
    from slicer.util import updateVolumeFromArray

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    matrix = vtk.vtkMatrix4x4()
    for row, values in enumerate(ct.ijk_to_ras()):
        for column, value in enumerate(values):
            matrix.SetElement(row, column, float(value))
    node.SetIJKToRASMatrix(matrix)
    updateVolumeFromArray(node, np.ascontiguousarray(ct.array))
    node.CreateDefaultDisplayNodes()
    return node


def nodeVolumeKey(volumeNode: Any, uid: str) -> str:
    """Changes when the voxels or the geometry change (not on display or reference edits)."""
    image = volumeNode.GetImageData()
    return volumeKey(uid, image.GetMTime(), image.GetDimensions(), list(ijkToRAS(volumeNode).ravel()))


def snapshotVolume(
    volumeNode: Any, volumeIds: VolumeIds, needsVoxels: Callable[[str], bool]
) -> VolumeSnapshot:
    """Copy what the model needs from ``volumeNode`` (GUI thread); the voxels only when
    ``needsVoxels(volumeKey)`` says the model does not hold this volume's input already."""
    if volumeNode is None:
        raise NoVolumeError("no input volume: select a CT volume in the Input volume selector")
    if volumeNode.GetImageData() is None:
        raise NoVolumeError(f"volume {volumeNode.GetName()!r} holds no image data: load the CT again")
    uid = volumeIds.get(volumeNode)
    key = nodeVolumeKey(volumeNode, uid)
    array = None
    if needsVoxels(key):
        from slicer.util import arrayFromVolume

        array = np.array(arrayFromVolume(volumeNode), copy=True)  # (slices, rows, columns)
    storage = volumeNode.GetStorageNode()
    source = (storage.GetFileName() or "") if storage is not None else ""
    return VolumeSnapshot(
        uid, volumeNode.GetName(), key, ijkToRAS(volumeNode), array, volumeNode.GetID(), source
    )


def _volumeName(path: Path) -> str:
    """``scan.nii.gz`` -> ``scan``: the file name without its compression and format suffixes."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return Path(name).stem or name


def _addArchetypeVolume(volumesLogic: Any, files: list[Path], name: str) -> Any:
    """One file through ``AddArchetypeVolume``; a series through its file-list overload."""
    import vtk

    if len(files) == 1:
        return volumesLogic.AddArchetypeVolume(str(files[0]), name)
    fileList = vtk.vtkStringArray()
    for file in files:
        fileList.InsertNextValue(str(file))
    return volumesLogic.AddArchetypeVolume(str(files[0]), name, 0, fileList)


def _removeWithDisplayAndStorage(scene: Any, node: Any) -> None:
    """Take a refused node out of the scene with the display and storage nodes its reader added."""
    companions = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    companions.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for companion in companions:
        if companion is not None and scene.IsNodePresent(companion):
            scene.RemoveNode(companion)


def ijkToRAS(volumeNode: Any) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as an array."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
