"""Reports as DICOM Structured Reports: what a PACS stores beside the images it describes.

``build_report_sr`` turns a report and its question-answer turns into a Comprehensive SR
(highdicom) laid out as TID 2000 "Basic Diagnostic Imaging Report":

- root container "Diagnostic Imaging Report" (LOINC 18748-4), language English;
- observer context: a device, the model (name, weights sha256 as its serial number, a device
  UID derived from that checksum);
- "Findings" section with one "Finding" text per report;
- "Questions and answers" section (private scheme ``99CTMLLM``, declared in the dataset) with a
  "Question" and an "Answer" text per turn;
- a "Comment" saying the text is machine-generated and must be reviewed by a radiologist. The
  document is also flagged UNVERIFIED and PRELIMINARY.

``SRSubject`` is what the SR is about: the patient and study identifiers it carries and the
source instances it references (study, series, SOP instance). ``subject_from_dicom`` reads them
from the source series; a volume that did not come from DICOM gets an SR only with identifiers
the user gives (``subject_from_identifiers``), and ``MissingIdentifiersError`` names what is
missing. ``read_report_sr`` reads an SR written here back (text, references, identifiers).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from model_core.data.errors import CTInputError

REPORT = "report"
QUESTION = "vqa"

MANUFACTURER = "CTMLLMSlicer"
SERIES_DESCRIPTION = "CT-MLLM report (machine-generated, unverified)"
SR_SERIES_NUMBER = 9701
"""Series number of the SR series: high, so PACS lists sort it after the acquired series."""
DISCLAIMER = (
    "Machine-generated text (CT-MLLM): not a diagnosis. It must be reviewed by a radiologist before any "
    "clinical use."
)
PRIVATE_SCHEME = "99CTMLLM"

IDENTIFIER_KEYWORDS: dict[str, str] = {
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "study_instance_uid": "StudyInstanceUID",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "referring_physician_name": "ReferringPhysicianName",
}
"""The identifiers a user may give (CLI option ``--patient-id``, case-list column ``patient_id``)
-> the DICOM keyword the SR carries them in."""
REQUIRED_IDENTIFIERS = ("patient_id", "study_instance_uid")
"""Without these a PACS cannot file the SR under the patient's study."""

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


class IdentifierError(CTInputError):
    """An identifier for the SR is malformed, unknown, or contradicts the DICOM source; the message says which."""


class MissingIdentifiersError(IdentifierError):
    """An SR cannot be written: the source lacks identifiers the user did not give; the message lists
    them and ``missing`` holds their names (so a GUI can ask for them)."""

    def __init__(self, message: str, missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing = tuple(missing)


@dataclass(frozen=True)
class ReportTurn:
    """One turn of a conversation: a report (``task="report"``) or a question and its answer."""

    task: str
    prompt: str
    answer: str
    cancelled: bool = False


@dataclass(frozen=True)
class ObserverDevice:
    """The model as the SR's observer: its name and the sha256 of its weights file."""

    model_id: str
    weights_sha256: str = ""
    software_version: str = ""

    @property
    def uid(self) -> str:
        """A device UID that is the same for the same weights (or the same name when unknown)."""
        from pydicom.uid import generate_uid

        return generate_uid(entropy_srcs=["ctmllm-device", self.weights_sha256 or self.model_id])

    @classmethod
    def from_model(cls, model: Any) -> ObserverDevice:
        """The loaded ``CTMLLM``'s name and weights checksum (empty for a model that has no folder)."""
        from model_core.model_files import WEIGHTS_FILE

        folder = getattr(model, "model_dir", None)
        return cls.from_weights(model.model_id, Path(folder) / WEIGHTS_FILE if folder else None)

    @classmethod
    def from_weights(cls, model_id: str, weights: str | os.PathLike | None) -> ObserverDevice:
        """A model by its name and weights file (checksum empty when there is none), for callers that
        do not hold the model itself (the Slicer panel, whose model runs in a worker process)."""
        from model_core import __version__

        checksum = weights_sha256(weights) if weights and Path(weights).is_file() else ""
        return cls(model_id, checksum, __version__)


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, cached by path, size and modification time (hashing GBs takes seconds)."""
    stat = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class SourceInstance:
    """One referenced source image: its series, SOP instance and SOP class UIDs."""

    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class SRSubject:
    """Who and what an SR is about.

    ``header``: the patient and study attributes the SR copies (a source file's header, or a
    dataset built from the user's identifiers); ``instances``: the source images it references
    (empty for a volume that did not come from DICOM); ``notices``: what the user should know
    (optional identifiers missing, blank UIDs not referenced).
    """

    header: Any
    instances: tuple[SourceInstance, ...]
    description: str
    notices: tuple[str, ...] = ()

    @property
    def identifiers(self) -> dict[str, str]:
        """The identifiers the SR carries, by their user-facing names."""
        return {
            name: str(self.header.get(keyword, "") or "") for name, keyword in IDENTIFIER_KEYWORDS.items()
        }


def _validated(given: Mapping[str, str] | None) -> dict[str, str]:
    """The user's identifiers, stripped, with empty ones dropped and formats checked."""
    values = {k: str(v).strip() for k, v in (given or {}).items() if v is not None and str(v).strip()}
    unknown = sorted(set(values) - set(IDENTIFIER_KEYWORDS))
    if unknown:
        raise IdentifierError(f"unknown identifier(s) {unknown}: use {', '.join(IDENTIFIER_KEYWORDS)}")
    uid = values.get("study_instance_uid")
    if uid is not None and not (_UID.match(uid) and len(uid) <= 64):
        raise IdentifierError(
            f"study_instance_uid {uid!r} is not a DICOM UID (digits and dots, at most 64 characters)"
        )
    for name in ("patient_birth_date", "study_date"):
        if name in values and not _DATE.match(values[name]):
            raise IdentifierError(f"{name} {values[name]!r}: write the date as YYYYMMDD")
    if "study_time" in values and not _TIME.match(values["study_time"]):
        raise IdentifierError(f"study_time {values['study_time']!r}: write the time as HHMMSS")
    if "patient_sex" in values:
        if values["patient_sex"].upper() not in ("M", "F", "O"):
            raise IdentifierError(f"patient_sex {values['patient_sex']!r}: use M, F or O")
        values["patient_sex"] = values["patient_sex"].upper()
    return values


def _missing_message(description: str, missing: Sequence[str], how: str) -> str:
    return (
        f"{description}: cannot write a DICOM SR without {', '.join(missing)}: {how}. "
        "A PACS files an SR under the patient's study; without them it cannot."
    )


def subject_from_identifiers(
    given: Mapping[str, str] | None, *, description: str, how: str = "give them"
) -> SRSubject:
    """The subject of a volume that did not come from DICOM: only the identifiers the user gives.

    Raises ``MissingIdentifiersError`` naming each required identifier not given; ``how`` says
    where this caller's user gives them (CLI options, case-list columns, the panel's dialog).
    """
    from pydicom import Dataset

    values = _validated(given)
    missing = [name for name in REQUIRED_IDENTIFIERS if name not in values]
    if missing:
        raise MissingIdentifiersError(_missing_message(description, missing, how), missing)
    header = Dataset()
    for name, keyword in IDENTIFIER_KEYWORDS.items():
        setattr(header, keyword, values.get(name, ""))
    optional = [n for n in IDENTIFIER_KEYWORDS if n not in values and n not in REQUIRED_IDENTIFIERS]
    notices = (
        f"{description} did not come from DICOM: the SR references no source images and carries only the "
        f"identifiers given; not given: {', '.join(optional)}",
    )
    return SRSubject(header, (), description, notices if optional else notices[:0])


def subject_from_dicom(
    files: Iterable[str | os.PathLike],
    given: Mapping[str, str] | None = None,
    *,
    description: str = "",
    how: str = "give them",
) -> SRSubject:
    """The subject of a DICOM series: its patient and study identifiers and every instance.

    ``given`` fills identifiers the files leave blank (anonymised exports); a given value that
    contradicts the files is refused. Instances with blank UIDs are not referenced (a notice says
    so). Raises ``MissingIdentifiersError`` when a required identifier is blank and not given.
    """
    import pydicom

    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError(f"{description or 'the series'}: no DICOM files given")
    description = description or f"the DICOM series in {paths[0].parent}"
    values = _validated(given)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    header = headers[0].copy()
    for name, keyword in IDENTIFIER_KEYWORDS.items():
        found = str(header.get(keyword, "") or "").strip()
        wanted = values.get(name)
        if found and wanted is not None and wanted != found:
            raise IdentifierError(
                f"{description}: {name} is given as {wanted!r} but the DICOM files say {found!r}: remove the "
                "given value or correct it"
            )
        setattr(header, keyword, found or wanted or "")
    missing = [name for name in REQUIRED_IDENTIFIERS if not str(header.get(IDENTIFIER_KEYWORDS[name]))]
    if missing:
        raise MissingIdentifiersError(_missing_message(description, missing, how), missing)
    instances, blank = [], 0
    for ds in headers:
        uids = (
            str(ds.get("StudyInstanceUID", "") or ""),
            str(ds.get("SeriesInstanceUID", "") or ""),
            str(ds.get("SOPInstanceUID", "") or ""),
            str(ds.get("SOPClassUID", "") or ""),
        )
        if all(uids[1:]) and uids[0] in ("", header.StudyInstanceUID):
            instances.append(SourceInstance(*uids[1:]))
        else:
            blank += 1
    notices = []
    if blank:
        notices.append(
            f"{description}: {blank} of {len(headers)} file(s) have blank UIDs (anonymised?) and are not "
            "referenced by the SR"
        )
    return SRSubject(header, tuple(instances), description, tuple(notices))


def subject_for_input(
    path: str | os.PathLike, given: Mapping[str, str] | None = None, *, how: str = "give them"
) -> SRSubject:
    """The subject of a model input path: its DICOM series (the one ``load_volume`` reads: the
    given file's series, or the folder's CT series with the most slices), else only ``given``."""
    from pydicom.misc import is_dicom

    from model_core.data.dicom import scan_dicom_folder, select_series

    path = Path(path)
    if not (path.is_dir() or (path.is_file() and is_dicom(path))):
        return subject_from_identifiers(given, description=str(path), how=how)
    folder = path if path.is_dir() else path.parent
    found = scan_dicom_folder(folder, recursive=path.is_dir())
    uid = None if path.is_dir() else next((s.uid for s in found if path in s.files), None)
    series, _ = select_series(found, source=str(path), series_uid=uid, allow_non_ct=True)
    return subject_from_dicom(series.files, given, description=f"{path} (series {series.uid})", how=how)


def _code(value: str, scheme: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _text(value: str, scheme: str, meaning: str, text: str) -> Any:
    from highdicom.sr import RelationshipTypeValues, TextContentItem

    return TextContentItem(
        name=_code(value, scheme, meaning), value=text, relationship_type=RelationshipTypeValues.CONTAINS
    )


def _section(value: str, scheme: str, meaning: str, items: list[Any]) -> Any:
    from highdicom.sr import ContainerContentItem, ContentSequence, RelationshipTypeValues

    container = ContainerContentItem(
        name=_code(value, scheme, meaning),
        is_content_continuous=False,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = ContentSequence(items)
    return container


def _answer_text(turn: ReportTurn) -> str:
    text = turn.answer.strip() or "(no text)"
    return f"[cancelled: partial answer] {text}" if turn.cancelled else text


def _content(turns: Sequence[ReportTurn], device: ObserverDevice) -> Any:
    """The TID 2000 content tree (see the module docstring)."""
    from highdicom.sr import (
        ContainerContentItem,
        ContentSequence,
        DeviceObserverIdentifyingAttributes,
        LanguageOfContentItemAndDescendants,
        ObservationContext,
        ObserverContext,
    )
    from pydicom.sr.codedict import codes

    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device.uid,
            name=device.model_id,
            manufacturer_name=MANUFACTURER,
            model_name=device.model_id,
            serial_number=f"sha256:{device.weights_sha256}" if device.weights_sha256 else None,
        ),
    )
    items: list[Any] = [
        *LanguageOfContentItemAndDescendants(_code("en-US", "RFC5646", "English (United States)")),
        *ObservationContext(observer_device_context=observer),
    ]
    reports = [t for t in turns if t.task == REPORT]
    if reports:
        findings = [_text("121071", "DCM", "Finding", _answer_text(t)) for t in reports]
        items.append(_section("121070", "DCM", "Findings", findings))
    questions = [t for t in turns if t.task != REPORT]
    if questions:
        pairs = [
            _section(
                "QA",
                PRIVATE_SCHEME,
                "Question and answer",
                [
                    _text("Q", PRIVATE_SCHEME, "Question", t.prompt.strip()),
                    _text("A", PRIVATE_SCHEME, "Answer", _answer_text(t)),
                ],
            )
            for t in questions
        ]
        items.append(_section("QAS", PRIVATE_SCHEME, "Questions and answers", pairs))
    items.append(_text("121106", "DCM", "Comment", DISCLAIMER))
    root = ContainerContentItem(
        name=_code("18748-4", "LN", "Diagnostic Imaging Report"),
        is_content_continuous=False,
        template_id="2000",
    )
    root.ContentSequence = ContentSequence(items)
    return root


def _evidence(subject: SRSubject) -> list[Any]:
    """highdicom's evidence list: the subject's header first (highdicom copies patient and study
    from it), then one small dataset per referenced instance."""
    from pydicom import Dataset
    from pydicom.uid import generate_uid

    first = subject.header.copy()
    for keyword in IDENTIFIER_KEYWORDS.values():
        if keyword not in first:
            setattr(first, keyword, "")
    study = first.StudyInstanceUID
    if subject.instances:
        reference = subject.instances[0]
    else:  # nothing to reference: a stand-in that is dropped after construction
        reference = SourceInstance(generate_uid(), generate_uid(), "1.2.840.10008.5.1.4.1.1.2")
    first.SeriesInstanceUID = reference.series_uid
    first.SOPInstanceUID = reference.sop_instance_uid
    first.SOPClassUID = reference.sop_class_uid
    evidence = [first]
    for instance in subject.instances[1:]:
        item = Dataset()
        item.StudyInstanceUID = study
        item.SeriesInstanceUID = instance.series_uid
        item.SOPInstanceUID = instance.sop_instance_uid
        item.SOPClassUID = instance.sop_class_uid
        evidence.append(item)
    return evidence


def build_report_sr(
    subject: SRSubject,
    turns: Sequence[ReportTurn],
    device: ObserverDevice,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    created: datetime | None = None,
) -> Any:
    """The Comprehensive SR (a ``highdicom.sr.ComprehensiveSR``, a pydicom ``Dataset``) of ``turns``.

    UIDs are new unless given (the DICOMweb batch derives them from its input, so a rerun finds
    the SR it stored before). ``created``: content date and time (default: now).
    """
    import highdicom as hd
    import highdicom.coding_schemes
    from pydicom.uid import generate_uid

    if not turns:
        raise ValueError("nothing to export: generate a report or ask a question first")
    created = created or datetime.now()
    sr = hd.sr.ComprehensiveSR(
        evidence=_evidence(subject),
        content=_content(turns, device),
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=not any(t.cancelled for t in turns),
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=device.model_id[:64],
        software_versions=device.software_version or None,
        device_serial_number=device.weights_sha256[:64] or None,
        content_date=created.date(),
        content_time=created.time().replace(microsecond=0),
        series_date=created.date(),
        series_time=created.time().replace(microsecond=0),
        specific_character_set="ISO_IR 192",
        coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(
                designator=PRIVATE_SCHEME,
                name="CT-MLLM report structure",
                responsible_organization=MANUFACTURER,
            )
        ],
    )
    if not subject.instances:
        for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
            if keyword in sr:
                delattr(sr, keyword)
    return sr


def write_report_sr(sr: Any, path: str | os.PathLike) -> Path:
    """Write the SR as a DICOM file (with its file meta); readers see the whole file or none."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(descriptor)
    try:
        sr.save_as(temporary, enforce_file_format=True)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


@dataclass
class ReadReport:
    """An SR written here, read back: its turns, identifiers, references and observer device."""

    turns: list[ReportTurn]
    identifiers: dict[str, str]
    references: list[tuple[str, str, str]]
    """(study, series, SOP instance) UIDs of the referenced source images."""
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    device: dict[str, str] = field(default_factory=dict)
    """Device observer name, model name, serial number and UID, by concept meaning."""
    comments: list[str] = field(default_factory=list)
    verification: str = ""
    completion: str = ""


def _concept(item: Any) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return code.CodingSchemeDesignator, code.CodeValue


def read_report_sr(source: str | os.PathLike | Any) -> ReadReport:
    """Read an SR written by ``build_report_sr`` (a path or a pydicom ``Dataset``)."""
    import pydicom

    ds = source if isinstance(source, pydicom.Dataset) else pydicom.dcmread(source)
    if ds.get("Modality") != "SR" or "ContentSequence" not in ds:
        raise ValueError(f"{source}: not a DICOM SR document")
    read = ReadReport(
        turns=[],
        identifiers={name: str(ds.get(keyword, "") or "") for name, keyword in IDENTIFIER_KEYWORDS.items()},
        references=[],
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        verification=str(ds.get("VerificationFlag", "")),
        completion=str(ds.get("CompletionFlag", "")),
    )
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            for instance in series.ReferencedSOPSequence:
                read.references.append(
                    (
                        str(study.StudyInstanceUID),
                        str(series.SeriesInstanceUID),
                        str(instance.ReferencedSOPInstanceUID),
                    )
                )
    for item in ds.ContentSequence:
        concept = _concept(item)
        if item.ValueType in ("TEXT", "UIDREF") and item.RelationshipType == "HAS OBS CONTEXT":
            value = item.TextValue if item.ValueType == "TEXT" else item.UID
            read.device[item.ConceptNameCodeSequence[0].CodeMeaning] = str(value)
        elif concept == ("DCM", "121070"):
            read.turns += [ReportTurn(REPORT, "", str(t.TextValue)) for t in item.ContentSequence]
        elif concept == (PRIVATE_SCHEME, "QAS"):
            for pair in item.ContentSequence:
                texts = {_concept(t)[1]: str(t.TextValue) for t in pair.ContentSequence}
                read.turns.append(ReportTurn(QUESTION, texts.get("Q", ""), texts.get("A", "")))
        elif concept == ("DCM", "121106"):
            read.comments.append(str(item.TextValue))
    return read
