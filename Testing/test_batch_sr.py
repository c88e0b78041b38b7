"""``--sr`` in the folder batch (issue 16): a valid DICOM SR per case, identifiers from DICOM or the case list."""

from __future__ import annotations

import csv
import json
import os

import pytest
from conftest import ABDOMEN_CT, needs_shared_ct
from dicom_tools import assert_valid_dicom, ct_series, sop_uids

from CTMLLMSlicerLib.batch_run import BatchOptions, run_batch
from CTMLLMSlicerLib.batch_sr import sr_uids
from model_core.dicom_sr import read_report_sr

pytestmark = needs_shared_ct


@pytest.fixture(autouse=True)
def slicer_core_environment(monkeypatch):
    from CTMLLMSlicerLib import batch_scene

    monkeypatch.setattr(batch_scene, "in_slicer_application", lambda: False)


def test_sr_for_dicom_and_identified_nifti_cases_and_a_clear_failure_without_identifiers(
    tmp_path, tiny_model_dir
):
    files = ct_series(tmp_path / "in" / "ct", patient_id="PAT-77", slices=8)
    os.symlink(ABDOMEN_CT, tmp_path / "in" / "scan.nii.gz")
    cases = tmp_path / "cases.csv"
    with open(cases, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "id", "question", "patient_id", "study_instance_uid", "accession_number"])
        writer.writerow(["in/ct", "dicom", "Is there ascites?", "", "", ""])
        writer.writerow(["in/scan.nii.gz", "named", "", "P-1", "1.2.826.0.1.3680043.10.5", "ACC9"])
        writer.writerow(["in/scan.nii.gz", "anonymous", "", "", "", ""])
    options = BatchOptions(
        input=cases,
        output=tmp_path / "out",
        model=str(tiny_model_dir),
        device="cpu",
        max_new_tokens=6,
        sr=True,
    )

    summary = run_batch(options)

    outcomes = {o.case_id: o for o in summary.outcomes}
    assert outcomes["dicom"].status == "ok" and outcomes["named"].status == "ok"
    failed = outcomes["anonymous"]
    assert failed.status == "failed" and failed.error_type == "MissingIdentifiersError"
    assert "patient_id, study_instance_uid" in failed.error and "case list" in failed.error
    cases_folder = tmp_path / "out" / "cases"
    assert not (cases_folder / "anonymous.md").exists()  # refused before the model ran

    dicom = read_report_sr(cases_folder / "dicom.sr.dcm")
    record = json.loads((cases_folder / "dicom.json").read_text(encoding="utf-8"))
    assert dicom.identifiers["patient_id"] == "PAT-77"
    assert sorted(uid for _, _, uid in dicom.references) == sorted(sop_uids(files))
    assert [t.prompt for t in dicom.turns] == ["", "Is there ascites?"]
    assert dicom.turns[1].answer == (record["answers"][0]["answer"].strip() or "(no text)")
    assert dicom.device["Device Observer Serial Number"] == f"sha256:{record['model']['sha256']}"
    assert (dicom.series_instance_uid, dicom.sop_instance_uid) == sr_uids(
        record["input_sha256"], record["fingerprint"]
    )
    assert record["outputs"]["sr"]["file"] == "dicom.sr.dcm"

    named = read_report_sr(cases_folder / "named.sr.dcm")
    assert named.identifiers["accession_number"] == "ACC9" and named.references == []
    assert named.study_instance_uid == "1.2.826.0.1.3680043.10.5"
    named_record = json.loads((cases_folder / "named.json").read_text(encoding="utf-8"))
    assert any("did not come from DICOM" in w for w in named_record["warnings"])
    for name in ("dicom", "named"):
        assert_valid_dicom(cases_folder / f"{name}.sr.dcm")


def test_resume_with_sr_recomputes_cases_that_have_no_sr_yet(tmp_path, tiny_model_dir):
    ct_series(tmp_path / "in" / "ct", slices=8)
    options = BatchOptions(
        input=tmp_path / "in",
        output=tmp_path / "out",
        model=str(tiny_model_dir),
        device="cpu",
        max_new_tokens=4,
    )
    assert run_batch(options).exit_code == 0
    assert not list((tmp_path / "out" / "cases").glob("*.sr.dcm"))
    resumed = run_batch(BatchOptions(**{**options.__dict__, "resume": True, "sr": True}))
    assert resumed.exit_code == 0 and not resumed.outcomes[0].reused
    again = run_batch(BatchOptions(**{**options.__dict__, "resume": True, "sr": True}))
    assert again.outcomes[0].reused
    (sr,) = (tmp_path / "out" / "cases").glob("*.sr.dcm")
    assert_valid_dicom(sr)


def test_logic_exports_the_sr_of_a_volume_loaded_from_dicom(tmp_path, tiny_model_dir):
    """The panel's Logic finds a DICOM volume's files again through its storage node."""
    from CTMLLMSlicerLib.batch_scene import slicer_core_scene
    from CTMLLMSlicerLib.logic import CTMLLMLogicCore, ModelRequest

    files = ct_series(tmp_path / "ct", patient_id="SLICER-4", slices=8)
    scene, _, logics = slicer_core_scene()
    logic = CTMLLMLogicCore(scene, volumesLogic=logics["Volumes"])
    node = logic.loadVolumeFile(files[3])  # one file, as "Add data" is given: Slicer reads the series
    request = ModelRequest(str(tiny_model_dir), device="cpu")
    logic.generateReport(node, request, maxNewTokens=4)
    logic.askQuestion(node, "Is the spleen enlarged?", request, maxNewTokens=4)

    path, notices = logic.exportReportSR(node, tmp_path / "panel.dcm")

    read = read_report_sr(path)
    assert read.identifiers["patient_id"] == "SLICER-4" and notices == []
    assert sorted(uid for _, _, uid in read.references) == sorted(sop_uids(files))
    assert [t.prompt for t in read.turns] == ["", "Is the spleen enlarged?"]
    assert read.device["Device Observer Serial Number"].startswith("sha256:")
    assert_valid_dicom(path)
