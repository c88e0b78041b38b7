"""The panel's "Export DICOM SR...": a volume node's conversation as a DICOM Structured Report.

A volume loaded from DICOM (Slicer's DICOM module, or a series file through "Add data") is
found again in its source files: the DICOM module's ``DICOM.instanceUIDs`` attribute looked up
in Slicer's DICOM database, else the files its storage node read. The SR then references that
series and carries its patient and study identifiers. Any other volume (NIfTI, NRRD, a volume
built in Python) gets an SR only with the identifiers the user gives; ``MissingIdentifiersError``
lists what is missing, so the panel can ask for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from CTMLLMSlicerLib.conversation import Conversation
from CTMLLMSlicerLib.errors import CTMLLMSlicerError, MissingDependenciesError

HIGHDICOM_REQUIREMENT = "highdicom==0.28.2"
HOW_TO_GIVE = "fill them in when the panel asks (Patient ID, Study Instance UID)"


def volumeSourceFiles(volumeNode: Any, dicomDatabase: Any = None) -> list[Path]:
    """The DICOM files ``volumeNode`` was read from; empty for a volume that did not come from DICOM."""
    from pydicom.misc import is_dicom

    uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    if uids and dicomDatabase is not None:
        files = [dicomDatabase.fileForInstance(uid) for uid in uids]
        if files and all(files):
            return [Path(f) for f in files]
    storage = volumeNode.GetStorageNode()
    if storage is None:
        return []
    names = [storage.GetNthFileName(i) for i in range(storage.GetNumberOfFileNames())] or [
        storage.GetFileName()
    ]
    files = [Path(name) for name in names if name and os.path.isfile(name)]
    return files if files and all(is_dicom(f) for f in files) else []


def exportVolumeSR(
    volumeNode: Any,
    conversation: Conversation | None,
    modelInfo: Mapping[str, Any] | None,
    path: str | os.PathLike,
    identifiers: Mapping[str, str] | None = None,
    dicomDatabase: Any = None,
) -> tuple[Path, list[str]]:
    """Write the conversation as an SR to ``path``; returns the file and notices for the user.

    ``modelInfo``: the loaded model as ``session.ModelSession.modelInfo`` describes it (``modelId``,
    ``weightsFile``; loaded in this process or in the model worker). When it wrote the conversation
    its weights checksum goes into the SR's observer device, otherwise the SR names the model only
    (a notice says so).
    """
    try:
        from model_core.dicom_sr import (
            ObserverDevice,
            build_report_sr,
            subject_from_dicom,
            subject_from_identifiers,
            write_report_sr,
        )
    except ImportError as error:
        raise MissingDependenciesError(
            f"DICOM SR export needs {HIGHDICOM_REQUIREMENT} ({error}): run "
            f"slicer.util.pip_install('{HIGHDICOM_REQUIREMENT}') in the Python console"
        ) from error

    if conversation is None or conversation.isEmpty():
        raise CTMLLMSlicerError("nothing to export: generate a report or ask a question first")
    files = volumeSourceFiles(volumeNode, dicomDatabase)
    name = volumeNode.GetName()
    if files:
        subject = subject_from_dicom(files, identifiers, description=name, how=HOW_TO_GIVE)
    else:
        subject = subject_from_identifiers(identifiers, description=name, how=HOW_TO_GIVE)
    notices = list(subject.notices)
    if modelInfo and modelInfo.get("modelId") == conversation.modelId:
        device = ObserverDevice.from_weights(conversation.modelId, modelInfo.get("weightsFile") or None)
    else:
        device = ObserverDevice(conversation.modelId or "unknown model")
        notices.append(
            "the model that wrote this text is no longer loaded: the SR names it without its checksum"
        )
    return write_report_sr(build_report_sr(subject, conversationTurns(conversation), device), path), notices


def conversationTurns(conversation: Conversation) -> list[Any]:
    """The Logic's turns as ``model_core.dicom_sr.ReportTurn`` (what the SR builder takes)."""
    from model_core.dicom_sr import ReportTurn

    return [ReportTurn(t.task, t.prompt, t.answer, t.cancelled) for t in conversation.turns]
