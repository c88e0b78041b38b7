"""The batch against a PACS: studies read over DICOMweb, each report stored back as a DICOM SR.

``DicomwebSource`` is the batch's ``CaseSource`` for a DICOMweb server:

- ``discover``: the studies (given UIDs, or a QIDO-RS search such as ``StudyDate=20260101-``),
  each with its CT series of the most instances (QIDO-RS, Modality CT) and their SOP Instance
  UIDs. A case's input checksum is taken over those UIDs (DICOM instances never change under
  their UID), so ``--resume`` decides without downloading anything.
- ``prepare``: WADO-RS retrieves the series, in the transfer syntax the PACS stores (compressed
  or not), into ``dicomweb_cache/<case>/``, one file per instance written atomically; files left
  by a killed run are kept.
- ``deliver`` (after the case's record and SR are committed): QIDO-RS looks for the SR's SOP
  Instance UID in the study; only when absent is it sent with STOW-RS, and the response must list
  it as stored. The SR's UIDs derive from the input and the run's settings (``batch_sr.sr_uids``),
  so a rerun finds what it stored before and never stores a duplicate. The cached images are then
  deleted (``--keep-images`` keeps them).

Every stored or found SR is listed in ``dicomweb_ledger.json`` with the run that stored it;
``undo_run`` deletes the SRs one run stored (DICOMweb DELETE where the server offers it, else
Orthanc's REST API).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from CTMLLMSlicerLib.batch_cases import DICOM, Case, CaseListError, safe_case_id
from CTMLLMSlicerLib.batch_files import atomic_write_bytes, atomic_write_text
from CTMLLMSlicerLib.dicomweb_connection import DicomwebError, DicomwebSettings

CACHE_FOLDER = "dicomweb_cache"
LEDGER_FILE = "dicomweb_ledger.json"
LEDGER_FORMAT = "ctmllm-dicomweb-ledger/1"
STORED = "stored"
FOUND = "found"

_STUDY_UID = "0020000D"
_SERIES_UID = "0020000E"
_SOP_UID = "00080018"
_INSTANCES_IN_SERIES = "00201209"
_ORIGINAL_SYNTAX = (("application/dicom", "*"),)
"""WADO-RS media type asking for the instances as stored: no transcoding load on the PACS."""


def _value(attributes: Mapping[str, Any], tag: str) -> str:
    values = attributes.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class DicomwebCase(Case):
    """A study on the PACS: the series the batch reads and its instances' UIDs."""

    study_uid: str = ""
    sop_uids: tuple[str, ...] = ()

    def input_checksum(self) -> str:
        """sha256 over the study, series and sorted SOP Instance UIDs (no download needed)."""
        text = "\n".join([self.study_uid, self.series_uid or "", *sorted(self.sop_uids)])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


class DicomwebSource:
    """Cases from a DICOMweb server and SRs back to it (see the module docstring)."""

    def __init__(
        self,
        settings: DicomwebSettings,
        output: Path,
        *,
        studies: Sequence[str] = (),
        query: Mapping[str, str] | None = None,
        keep_images: bool = False,
        client: Any = None,
    ) -> None:
        if not studies and not query:
            raise CaseListError(
                "--dicomweb needs the studies to read: --study UID, --studies FILE or --query KEY=VALUE"
            )
        self.settings = settings
        self.output = Path(output)
        self.studies = list(dict.fromkeys(studies))
        self.query = dict(query or {})
        self.keep_images = keep_images
        self.client = client or settings.client()
        self.ledger = Ledger(self.output / LEDGER_FILE)
        self.description = f"DICOMweb {settings.root}"

    # -- finding the studies ------------------------------------------------------------------
    def discover(self) -> list[Case]:
        """One case per study (a study without a CT series becomes a case that fails alone)."""
        uids = self.studies or self._search_studies()
        if not uids:
            raise CaseListError(f"{self.description}: no study matches {self.query}: check the query")
        return [self._study_case(uid) for uid in uids]

    def _search_studies(self) -> list[str]:
        """One QIDO-RS request: servers' paging differs (Orthanc ignores ``offset`` without ``limit``), so a
        query that matches more studies than the server returns at once is split by the user (by date)."""
        found = self._ask(
            "searching studies",
            lambda: self.client.search_for_studies(search_filters=self.query),
        )
        return list(dict.fromkeys(_value(study, _STUDY_UID) for study in found))

    def _study_case(self, study: str) -> Case:
        origin = f"{self.description} study {study}"
        case_id = safe_case_id(study)
        series = self._ask(
            f"listing the CT series of study {study}",
            lambda: self.client.search_for_series(
                study, search_filters={"Modality": "CT"}, fields=["NumberOfSeriesRelatedInstances"]
            ),
        )
        if not series:
            return Case(
                case_id,
                self.output,
                DICOM,
                origin=origin,
                problem="the PACS holds no CT series in this study",
            )
        chosen = max(
            series, key=lambda s: (int(_value(s, _INSTANCES_IN_SERIES) or 0), _value(s, _SERIES_UID))
        )
        series_uid = _value(chosen, _SERIES_UID)
        instances = self._ask(
            f"listing the instances of series {series_uid}",
            lambda: self.client.search_for_instances(study, series_uid, fields=["SOPInstanceUID"]),
        )
        return DicomwebCase(
            case_id,
            self.output / CACHE_FOLDER / case_id,
            DICOM,
            series_uid=series_uid,
            origin=f"{origin} series {series_uid}",
            study_uid=study,
            sop_uids=tuple(sorted(_value(i, _SOP_UID) for i in instances)),
        )

    # -- reading a study ---------------------------------------------------------------------
    def prepare(self, case: Case) -> Case:
        """Download the case's series (WADO-RS) into its cache folder; returns the case with its files."""
        from model_core.data.dicom import scan_dicom_folder

        if not isinstance(case, DicomwebCase):
            raise DicomwebError(f"{case.origin}: {case.problem}")
        folder = case.path
        folder.mkdir(parents=True, exist_ok=True)
        present = {p.stem for p in folder.glob("*.dcm")}
        if not set(case.sop_uids) <= present:
            for dataset in self._ask(
                f"retrieving series {case.series_uid}",
                lambda: list(
                    self.client.iter_series(case.study_uid, case.series_uid, media_types=_ORIGINAL_SYNTAX)
                ),
            ):
                uid = str(dataset.SOPInstanceUID)
                if uid in case.sop_uids and uid not in present:
                    atomic_write_bytes(folder / f"{uid}.dcm", _encode(dataset))
                    present.add(uid)
        missing = set(case.sop_uids) - present
        if missing:
            raise DicomwebError(
                f"{case.origin}: the PACS returned {len(case.sop_uids) - len(missing)} of {len(case.sop_uids)} "
                "instances; run again with --resume later"
            )
        files = {folder / f"{uid}.dcm" for uid in case.sop_uids}
        series = [s for s in scan_dicom_folder(folder, recursive=False) if set(s.files) <= files]
        if len(series) != 1:
            raise DicomwebError(
                f"{case.origin}: the retrieved files do not form one series ({len(series)} found)"
            )
        return replace(
            case, files=tuple(series[0].files), series=series[0], problem="; ".join(series[0].problems)
        )

    # -- storing the SR ----------------------------------------------------------------------
    def deliver(self, case: Case, record: dict[str, Any], paths: dict[str, Path], run_id: str) -> str:
        """Store the case's SR unless the PACS already holds it; record it in the ledger."""
        import pydicom

        sr = pydicom.dcmread(paths["sr"])
        study, series, sop = str(sr.StudyInstanceUID), str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID)
        if self.holds(study, sop):
            action, note = FOUND, f"SR {sop} is already in the PACS (stored before); not stored again"
        else:
            self._store(sr, case)
            action, note = STORED, f"SR {sop} stored in the PACS (study {study})"
        self.ledger.add(
            {
                "case_id": case.case_id,
                "run_id": run_id,
                "action": action,
                "study": study,
                "series": series,
                "sop": sop,
                "server": self.settings.root,
                "time": _now(),
            }
        )
        if not self.keep_images and isinstance(case, DicomwebCase):
            shutil.rmtree(case.path, ignore_errors=True)
        return note

    def holds(self, study: str, sop: str) -> bool:
        """Whether the PACS has instance ``sop`` in ``study`` (QIDO-RS)."""
        found = self._ask(
            f"looking for SR {sop}",
            lambda: self.client.search_for_instances(
                study, search_filters={"SOPInstanceUID": sop}, fields=["SOPInstanceUID"]
            ),
        )
        return any(_value(item, _SOP_UID) == sop for item in found)

    def _store(self, sr: Any, case: Case) -> None:
        response = self._ask(
            f"storing the SR of {case.origin}",
            lambda: self.client.store_instances([sr], study_instance_uid=str(sr.StudyInstanceUID)),
        )
        stored = {str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])}
        failed = response.get("FailedSOPSequence", [])
        if str(sr.SOPInstanceUID) not in stored or failed:
            reasons = (
                ", ".join(f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed)
                or "not listed as stored"
            )
            raise DicomwebError(
                f"{case.origin}: the PACS did not store the SR ({reasons}); see the server's log"
            )

    def _ask(self, what: str, call: Any) -> Any:
        """Run one request; a failure becomes a ``DicomwebError`` naming the server and what was asked."""
        try:
            return call()
        except DicomwebError:
            raise
        except Exception as error:  # requests' HTTP and connection errors, and the client's ValueErrors
            raise DicomwebError(f"{self.description}: {what} failed: {error}") from error


def _encode(dataset: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Ledger:
    """``dicomweb_ledger.json``: each SR a run stored (or found stored), for audits and undo."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != LEDGER_FORMAT:
                raise CaseListError(f"{path}: not a DICOMweb ledger ({data.get('format')!r}); move it away")
            self.entries = data["entries"]

    def add(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        self.save()

    def save(self) -> None:
        data = {"format": LEDGER_FORMAT, "entries": self.entries}
        atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")

    def stored_by(self, run_id: str) -> list[dict[str, Any]]:
        """The SRs ``run_id`` stored (not those it found already there) and that are not deleted yet."""
        return [
            e
            for e in self.entries
            if e["run_id"] == run_id and e["action"] == STORED and not e.get("deleted")
        ]


def undo_run(settings: DicomwebSettings, output: Path, run_id: str, client: Any = None) -> list[str]:
    """Delete from the PACS every SR that run ``run_id`` stored; returns their SOP Instance UIDs.

    DICOMweb has no delete every server offers: try its DELETE, and on Orthanc (which answers
    405) use Orthanc's REST API at the server root. The ledger marks each deleted SR.
    """
    ledger = Ledger(Path(output) / LEDGER_FILE)
    entries = ledger.stored_by(run_id)
    if not entries and not any(e["run_id"] == run_id for e in ledger.entries):
        raise CaseListError(
            f"{output / LEDGER_FILE} lists no SR of run {run_id}: check the run id in manifest.json"
        )
    client = client or settings.client()
    deleted = []
    for entry in entries:
        try:
            client.delete_instance(entry["study"], entry["series"], entry["sop"])
        except Exception as error:
            if getattr(getattr(error, "response", None), "status_code", None) not in (404, 405, 501):
                raise DicomwebError(f"{settings.root}: deleting SR {entry['sop']} failed: {error}") from error
            _delete_on_orthanc(settings, entry["sop"])
        entry["deleted"] = _now()
        ledger.save()
        deleted.append(entry["sop"])
    return deleted


def _delete_on_orthanc(settings: DicomwebSettings, sop: str) -> None:
    """Orthanc's REST API: find the instance by its UID (``/tools/lookup``), then DELETE it."""
    root = settings.root.rsplit("/", 1)[0] if settings.root.endswith("/dicom-web") else settings.root
    session = settings.session()
    try:
        found = session.post(f"{root}/tools/lookup", data=sop)
        found.raise_for_status()
        ids = [item["ID"] for item in found.json() if item.get("Type") == "Instance"]
        for orthanc_id in ids:
            session.delete(f"{root}/instances/{orthanc_id}").raise_for_status()
    except Exception as error:
        raise DicomwebError(
            f"{settings.root}: the server offers no DICOMweb DELETE and its Orthanc REST API at {root} did not "
            f"delete SR {sop} ({error}); delete it with your PACS's own tools"
        ) from error
    if not ids:
        raise DicomwebError(f"{settings.root}: SR {sop} is not on the server (deleted already?)")
