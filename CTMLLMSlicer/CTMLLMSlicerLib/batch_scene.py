"""The MRML scene of a batch run: Slicer's own inside the application, one built on slicer-core outside.

Inside Slicer (``Slicer --python-script``) the batch uses ``slicer.mrmlScene`` and the Volumes
module's logic, so volumes load exactly as with "Add data". With plain Python on the slicer-core
wheel there is no ``slicer.app`` or ``slicer.mrmlScene``: the scene, the application logic, the
Colors logic (volume loading needs it) and the Volumes logic are built here.

Reading a case into the scene is the Logic's: ``loadVolumeFile`` (on the Volumes logic found
here) for a volume file, ``addVolumeFromCT`` for a DICOM series read by ``model_core.data``;
this module only says which a case needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from CTMLLMSlicerLib.batch_cases import DICOM, Case, resolve_series
from CTMLLMSlicerLib.batch_files import commit_partial, partial_path
from CTMLLMSlicerLib.logic import CTMLLMLogicCore

IN_APPLICATION = "Slicer application"
SLICER_CORE = "slicer-core (no application)"
MODULE_LOGIC_CLASSES = {
    "Colors": "vtkSlicerColorLogic",
    "Volumes": "vtkSlicerVolumesLogic",
    "VolumeRendering": "vtkSlicerVolumeRenderingLogic",
}
"""Slicer's module logics by module name, as slicer-core names their classes."""


@dataclass
class SlicerContext:
    """The scene and the logics a batch run needs; ``environment`` says which Slicer provides them."""

    scene: Any
    volumesLogic: Any
    environment: str
    keep: tuple[Any, ...] = ()
    """Logics built here, kept referenced for as long as the scene is used."""


def in_slicer_application() -> bool:
    """True inside the Slicer application (``slicer.app`` and ``slicer.mrmlScene`` exist)."""
    import slicer

    return hasattr(slicer, "app") and getattr(slicer, "mrmlScene", None) is not None


def slicer_context(log_file: Path | None = None) -> SlicerContext:
    """Slicer's scene and Volumes logic in the application; new ones on slicer-core.

    On slicer-core, VTK's messages (loud for unreadable files) go to ``log_file`` instead of the
    terminal, so the progress line stays readable; the case's error says what failed.
    """
    import slicer

    if in_slicer_application():
        return SlicerContext(slicer.mrmlScene, slicer.modules.volumes.logic(), IN_APPLICATION)
    _route_vtk_messages(log_file)
    scene, appLogic, logics = slicer_core_scene()
    return SlicerContext(scene, logics["Volumes"], SLICER_CORE, keep=(appLogic, *logics.values()))


def slicer_core_scene(modules: Sequence[str] = ("Colors", "Volumes")) -> tuple[Any, Any, dict[str, Any]]:
    """A new scene with Slicer's application logic and the ``modules``' logics set up on it, as
    the application does (``MODULE_LOGIC_CLASSES``; loading volumes needs Colors and Volumes).

    Returns ``(scene, appLogic, {module name: logic})``. Keep the logics referenced while the
    scene is used: the application logic does not hold them.
    """
    import slicer

    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    logics = {}
    for name in modules:
        logic = getattr(slicer, MODULE_LOGIC_CLASSES[name])()
        logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(scene)
        appLogic.SetModuleLogic(name, logic)
        logics[name] = logic
    return scene, appLogic, logics


def _route_vtk_messages(log_file: Path | None) -> None:
    import vtk

    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        vtk.vtkLogger.LogToFile(str(log_file), vtk.vtkLogger.APPEND, vtk.vtkLogger.VERBOSITY_WARNING)


def load_case_volume(
    logic: CTMLLMLogicCore, case: Case, *, allow_non_ct: bool = False
) -> tuple[Any, list[str]]:
    """Load the case's volume into the Logic's scene; returns the scalar volume node and warnings
    (which series was read, how its files were grouped, what was skipped or corrected).

    A volume file goes through the Logic's ``loadVolumeFile`` (Slicer's reader, after the checks
    ``read_ct`` makes). A DICOM series is read by ``model_core.data.read_dicom_series``, as the
    command line reads it: files grouped without relying on SeriesInstanceUID alone, compressed
    pixels decoded, a tilted gantry corrected, the Modality checked. Raises ``model_core.data``'s
    typed errors (``UnreadableVolumeError``, ``DicomSeriesError``, ``NotCTError``...) naming the input.
    """
    from model_core.data import read_dicom_series
    from model_core.data.errors import DicomSeriesError

    if case.kind != DICOM:
        return logic.loadVolumeFile(case.path, case.case_id), list(case.notes)
    if case.problem:
        raise DicomSeriesError(f"{case.origin}: cannot be read as one volume: {case.problem}")
    series, warnings = resolve_series(case, allow_non_ct=allow_non_ct)
    ct = read_dicom_series(
        series, source=str(case.path), allow_non_ct=allow_non_ct, warnings=[*case.notes, *warnings]
    )
    return logic.addVolumeFromCT(ct, case.case_id), list(ct.warnings)


def save_volume(node: Any, path: Path) -> Path:
    """Write a node's voxels (``.nrrd``) atomically: a DICOM case's scene points at this file."""
    storage = node.GetStorageNode() or node.CreateDefaultStorageNode()
    if node.GetStorageNode() is None:
        node.GetScene().AddNode(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
    temporary = partial_path(path, keep_suffix=True)  # the writer picks NRRD by the suffix
    storage.SetFileName(str(temporary))
    try:
        if not storage.WriteData(node) or not temporary.is_file():
            raise OSError(f"Slicer did not write the volume {path}: check that the output folder is writable")
        commit_partial(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    storage.SetFileName(str(path))
    return path


@contextmanager
def nodes_added_during(scene: Any) -> Iterator[None]:
    """Remove every node added to ``scene`` inside the block (the case's volume, text, display nodes).

    Nodes that were there before (a user's scene in the application) are left alone, and memory
    stays flat over hundreds of cases.
    """
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed(added):
            if node is not None and node.GetID() not in before and scene.IsNodePresent(node):
                scene.RemoveNode(node)


def save_scene(scene: Any, path: Path) -> Path:
    """Write the scene's ``.mrml`` atomically; storage nodes keep pointing at the input files.

    The text node's report is stored in the ``.mrml`` itself, referenced from the volume node.
    """
    temporary = partial_path(path)
    previousURL, previousRoot = scene.GetURL(), scene.GetRootDirectory()
    scene.SetRootDirectory(str(path.parent))
    scene.SetURL(str(temporary))
    try:
        scene.Commit()
        if not temporary.is_file() or temporary.stat().st_size == 0:
            raise OSError(f"Slicer did not write the scene {path}: check that the output folder is writable")
        return commit_partial(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        scene.SetURL(previousURL or "")
        scene.SetRootDirectory(previousRoot or os.getcwd())
