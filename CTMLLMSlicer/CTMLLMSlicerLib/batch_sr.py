"""``--sr``: each batch case's report and answers as a DICOM Structured Report beside its JSON.

A DICOM case's SR references its series and carries its patient and study identifiers; a volume
file gets one only with the identifiers its case-list row gives (columns ``patient_id``,
``study_instance_uid``, and optionally the others of ``model_core.dicom_sr.IDENTIFIER_KEYWORDS``).
The subject is checked before the model runs, so a case that cannot get an SR fails at once,
naming what is missing. The SR's UIDs derive from the input checksum and the run fingerprint:
the same input with the same model and settings always gives the same SOP Instance UID, which is
how the DICOMweb batch finds an SR it stored before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from CTMLLMSlicerLib.batch_cases import DICOM, Case, resolve_series
from CTMLLMSlicerLib.conversation import Conversation
from CTMLLMSlicerLib.sr_export import conversationTurns
from model_core.dicom_sr import (
    ObserverDevice,
    SRSubject,
    build_report_sr,
    subject_from_dicom,
    subject_from_identifiers,
    write_report_sr,
)

HOW_TO_GIVE_IDENTIFIERS = (
    "give them in a case list (.csv/.jsonl) with columns patient_id and study_instance_uid (optionally "
    "patient_name, patient_birth_date, patient_sex, accession_number, study_id, study_date)"
)


def case_subject(case: Case) -> SRSubject:
    """What the case's SR will be about; raises ``MissingIdentifiersError`` naming what is missing."""
    given = dict(case.identifiers)
    if case.kind != DICOM:
        return subject_from_identifiers(given, description=str(case.path), how=HOW_TO_GIVE_IDENTIFIERS)
    files = list(case.files) if case.files else list(resolve_series(case, allow_non_ct=True)[0].files)
    return subject_from_dicom(
        files, given, description=case.origin or str(case.path), how=HOW_TO_GIVE_IDENTIFIERS
    )


def sr_uids(input_sha256: str, fingerprint: dict[str, Any]) -> tuple[str, str]:
    """(series, SOP instance) UIDs that are the same for the same input, model and settings."""
    from pydicom.uid import generate_uid

    key = json.dumps(fingerprint, sort_keys=True, default=str)
    return (
        generate_uid(entropy_srcs=["ctmllm-sr-series", input_sha256, key]),
        generate_uid(entropy_srcs=["ctmllm-sr-instance", input_sha256, key]),
    )


def write_case_sr(
    path: Path,
    subject: SRSubject,
    conversation: Conversation,
    model_info: dict[str, str],
    input_sha256: str,
    fingerprint: dict[str, Any],
) -> Path:
    """Build the case's SR and write it atomically to ``path``."""
    from model_core import __version__

    series_uid, sop_uid = sr_uids(input_sha256, fingerprint)
    device = ObserverDevice(model_info["id"], model_info.get("sha256", ""), __version__)
    sr = build_report_sr(
        subject,
        conversationTurns(conversation),
        device,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
    )
    return write_report_sr(sr, path)
