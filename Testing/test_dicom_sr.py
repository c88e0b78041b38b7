"""Reports as DICOM SR (issue 16): every SR written here passes dciodvfy and reads back whole.

Read back twice: with ``model_core.dicom_sr.read_report_sr`` (our layout) and with pydicom and
highdicom directly (what a PACS or another tool sees), so a writer bug cannot hide behind a
matching reader bug.
"""

from __future__ import annotations

import highdicom as hd
import pydicom
import pytest
import SimpleITK as sitk
from conftest import run_model_core_cli
from dicom_tools import DCIODVFY, assert_valid_dicom, ct_series, dciodvfy_errors, sop_uids

from model_core.dicom_sr import (
    DISCLAIMER,
    IdentifierError,
    MissingIdentifiersError,
    ObserverDevice,
    ReportTurn,
    build_report_sr,
    read_report_sr,
    subject_from_dicom,
    subject_from_identifiers,
    write_report_sr,
)

WEIGHTS = "5d41402abc4b2a76b9719d911017c592" * 2
DEVICE = ObserverDevice("ctmllm-demo-v2", WEIGHTS, "0.1.0")
TURNS = [
    ReportTurn(
        "report", "Write a report.", "Liver: 12 × 9 mm hypodense lesion in segment VII; µ-calcification."
    ),
    ReportTurn("vqa", "Is there ascites?", "No ascites."),
    ReportTurn("vqa", "Which organ has a lesion?", "The liver."),
]


def test_sr_of_a_dicom_series_references_it_and_round_trips(tmp_path):
    files = ct_series(tmp_path / "ct", patient_id="PAT-0042")
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    subject = subject_from_dicom(files)
    path = write_report_sr(build_report_sr(subject, TURNS, DEVICE), tmp_path / "report.dcm")

    read = read_report_sr(path)
    assert [(t.task, t.prompt, t.answer) for t in read.turns] == [
        ("report", "", TURNS[0].answer),
        ("vqa", "Is there ascites?", "No ascites."),
        ("vqa", "Which organ has a lesion?", "The liver."),
    ]
    assert read.identifiers["patient_id"] == "PAT-0042"
    assert read.identifiers["patient_name"] == str(source.PatientName)
    assert read.study_instance_uid == source.StudyInstanceUID
    assert read.series_instance_uid != source.SeriesInstanceUID  # the SR is its own series in the study
    assert sorted(read.references) == sorted(
        (source.StudyInstanceUID, source.SeriesInstanceUID, uid) for uid in sop_uids(files)
    )
    assert read.device["Device Observer Name"] == "ctmllm-demo-v2"
    assert read.device["Device Observer Serial Number"] == f"sha256:{WEIGHTS}"
    assert read.device["Device Observer UID"] == DEVICE.uid == ObserverDevice("other", WEIGHTS).uid
    assert read.comments == [DISCLAIMER]
    assert (read.verification, read.completion) == ("UNVERIFIED", "COMPLETE")

    dataset = pydicom.dcmread(path)  # as another tool reads it
    assert dataset.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    assert dataset.Modality == "SR" and dataset.PreliminaryFlag == "PRELIMINARY"
    assert dataset.DeviceSerialNumber == WEIGHTS
    assert dataset.PatientID == "PAT-0042" and dataset.StudyInstanceUID == source.StudyInstanceUID
    document = hd.sr.ComprehensiveSR.from_dataset(dataset)
    assert sorted(uid for _, _, uid, _ in document.get_evidence()) == sorted(sop_uids(files))
    texts = [
        item.TextValue
        for item in hd.sr.utils.find_content_items(dataset, recursive=True)
        if item.ValueType == "TEXT"
    ]
    assert TURNS[0].answer in texts and "Is there ascites?" in texts and DISCLAIMER in texts
    assert_valid_dicom(path)


def test_volume_not_from_dicom_gets_an_sr_only_with_given_identifiers(tmp_path):
    with pytest.raises(MissingIdentifiersError) as error:
        subject_from_identifiers(
            {"patient_name": "Doe^Jane"}, description="scan.nii.gz", how="pass --patient-id"
        )
    message = str(error.value)
    assert (
        "scan.nii.gz" in message and "patient_id, study_instance_uid" in message and "--patient-id" in message
    )

    given = {"patient_id": "P7", "study_instance_uid": "1.2.826.0.1.3680043.10.1", "patient_sex": "f"}
    subject = subject_from_identifiers(given, description="scan.nii.gz")
    assert "not given: patient_name" in subject.notices[0]
    path = write_report_sr(build_report_sr(subject, TURNS[:1], DEVICE), tmp_path / "report.dcm")
    read = read_report_sr(path)
    assert read.identifiers["patient_id"] == "P7" and read.study_instance_uid == given["study_instance_uid"]
    assert read.references == [] and "CurrentRequestedProcedureEvidenceSequence" not in pydicom.dcmread(path)
    assert read.turns[0].answer == TURNS[0].answer
    assert_valid_dicom(path)


def test_blank_source_uids_need_given_ones_and_are_not_referenced(tmp_path):
    files = ct_series(tmp_path / "anon", study_uid="", series_uid="")
    with pytest.raises(MissingIdentifiersError, match="study_instance_uid"):
        subject_from_dicom(files)

    study = "1.2.826.0.1.3680043.10.77"
    subject = subject_from_dicom(files, {"study_instance_uid": study})
    assert subject.instances == () and "6 of 6 file(s) have blank UIDs" in subject.notices[0]
    path = write_report_sr(build_report_sr(subject, TURNS, DEVICE), tmp_path / "report.dcm")
    read = read_report_sr(path)
    assert read.study_instance_uid == study and read.identifiers["patient_id"] == "PAT-1"
    assert read.references == []
    assert_valid_dicom(path)


def test_identifiers_that_contradict_the_source_or_are_malformed_are_refused(tmp_path):
    files = ct_series(tmp_path / "ct", patient_id="PAT-1")
    with pytest.raises(
        IdentifierError, match="patient_id is given as 'PAT-2' but the DICOM files say 'PAT-1'"
    ):
        subject_from_dicom(files, {"patient_id": "PAT-2"})
    for given, expected in [
        ({"study_instance_uid": "1.2.abc"}, "is not a DICOM UID"),
        ({"study_date": "2026-01-31"}, "YYYYMMDD"),
        ({"patient_sex": "X"}, "use M, F or O"),
        ({"patient_age": "40"}, "unknown identifier"),
    ]:
        with pytest.raises(IdentifierError, match=expected):
            subject_from_identifiers(
                {"patient_id": "P", "study_instance_uid": "1.2.3", **given}, description="v"
            )


def test_cancelled_answers_are_marked_and_the_document_partial(tmp_path):
    subject = subject_from_identifiers({"patient_id": "P", "study_instance_uid": "1.2.3"}, description="v")
    turns = [*TURNS[:1], ReportTurn("vqa", "Where?", "In the", cancelled=True)]
    read = read_report_sr(write_report_sr(build_report_sr(subject, turns, DEVICE), tmp_path / "sr.dcm"))
    assert read.completion == "PARTIAL"
    assert read.turns[1].answer == "[cancelled: partial answer] In the"
    with pytest.raises(ValueError, match="nothing to export"):
        build_report_sr(subject, [], DEVICE)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy is not installed (Debian dicom3tools)")
def test_dciodvfy_check_catches_a_broken_sr(tmp_path):
    """The validation the other tests rely on does fail: a missing Type 1 attribute is an error."""
    subject = subject_from_identifiers({"patient_id": "P", "study_instance_uid": "1.2.3"}, description="v")
    sr = build_report_sr(subject, TURNS, DEVICE)
    del sr.CompletionFlag
    sr.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    assert any("CompletionFlag" in line for line in dciodvfy_errors(tmp_path / "broken.dcm"))


def test_cli_generate_writes_an_sr_and_asks_for_identifiers_of_non_dicom_input(tmp_path, tiny_model_dir):
    files = ct_series(tmp_path / "ct", patient_id="CLI-1", slices=8)
    result = run_model_core_cli(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--volume",
        str(tmp_path / "ct"),
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
        "--sr",
        str(tmp_path / "report.dcm"),
        cache=tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr
    read = read_report_sr(tmp_path / "report.dcm")
    assert read.identifiers["patient_id"] == "CLI-1" and len(read.references) == len(files)
    assert read.turns[0].answer == (result.stdout.strip() or "(no text)")
    assert_valid_dicom(tmp_path / "report.dcm")

    volume = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.ReadImage([str(f) for f in files]), str(volume))
    refused = run_model_core_cli(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--volume",
        str(volume),
        "--sr",
        str(tmp_path / "x.dcm"),
        cache=tmp_path / "cache",
    )
    assert refused.returncode == 2 and not (tmp_path / "x.dcm").exists()
    assert "patient_id, study_instance_uid" in refused.stderr and "--patient-id" in refused.stderr
    given = run_model_core_cli(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--volume",
        str(volume),
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
        "--sr",
        str(tmp_path / "given.dcm"),
        "--patient-id",
        "P-5",
        "--study-instance-uid",
        "1.2.826.0.1.3680043.10.9",
        cache=tmp_path / "cache",
    )
    assert given.returncode == 0, given.stderr
    assert read_report_sr(tmp_path / "given.dcm").identifiers["patient_id"] == "P-5"
    assert_valid_dicom(tmp_path / "given.dcm")
