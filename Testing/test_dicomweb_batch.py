"""The batch against a real PACS (issue 16): Orthanc with DICOMweb on a free loopback port.

Generated CT studies are uploaded to Orthanc (one RLE-compressed; one whose UIDs an anonymiser
blanked, which Orthanc refuses), the batch script reads them over QIDO-RS/WADO-RS and stores
each report back as an SR with STOW-RS. It is killed mid-run and resumed, rerun into a fresh
output folder (it must find its SRs on the server, not store them again), and one run is undone.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from conftest import MODULE_DIR
from dicom_tools import assert_valid_dicom, ct_series, sop_uids
from orthanc_server import PASSWORD, USER, OrthancServer

from CTMLLMSlicerLib.dicomweb_batch import LEDGER_FILE, DicomwebSource
from CTMLLMSlicerLib.dicomweb_connection import DicomwebError, DicomwebSettings, settings_from_options
from model_core.dicom_sr import DISCLAIMER, read_report_sr

BATCH_SCRIPT = MODULE_DIR / "batch.py"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def slicer_core_environment(monkeypatch):
    """As in test_batch: the batch runs on slicer-core even when panel tests' stand-ins are loaded."""
    from CTMLLMSlicerLib import batch_scene

    monkeypatch.setattr(batch_scene, "in_slicer_application", lambda: False)


def upload(orthanc: OrthancServer, files: list[Path]) -> list[int]:
    return [orthanc.upload(f).status_code for f in files]


def batch_command(orthanc: OrthancServer, output: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(BATCH_SCRIPT),
        "--dicomweb",
        orthanc.dicomweb,
        "--user",
        USER,
        "--output",
        str(output),
        "--model",
        str(model),
        "--device",
        "cpu",
        "--max-new-tokens",
        "32",
        *extra,
    ]


def pacs_env() -> dict[str, str]:
    return {**os.environ, "DICOMWEB_PASSWORD": PASSWORD, "PYTHONIOENCODING": "utf-8"}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, env=pacs_env(), capture_output=True, text=True, encoding="utf-8", timeout=400
    )


def ledger(output: Path) -> list[dict]:
    path = output / LEDGER_FILE
    return json.loads(path.read_text(encoding="utf-8"))["entries"] if path.is_file() else []


def test_orthanc_refuses_instances_with_blank_uids(orthanc, tmp_path):
    """What the PACS does with an anonymiser's blank Study/Series UIDs: REST refuses them with 400, and
    STOW-RS answers 200 yet lists nothing as stored, so a client must check the response (the batch does)."""
    files = ct_series(tmp_path / "anon", patient_id="BLANK-1", study_uid="", series_uid="")
    rejected = orthanc.upload(files[0])
    assert rejected.status_code == 400
    assert "missing StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID" in rejected.text
    client = DicomwebSettings(orthanc.dicomweb, USER, PASSWORD).client()
    response = client.store_instances([pydicom.dcmread(files[1])])
    assert len(response.get("ReferencedSOPSequence", [])) == 0
    assert not [
        p for p in orthanc.get("/patients?expand") if p["MainDicomTags"].get("PatientID") == "BLANK-1"
    ]


def test_pacs_round_trip_kill_resume_rerun_and_undo(orthanc, tmp_path, tiny_model_dir):
    studies = {}
    for index, syntax in enumerate(["uncompressed", "jpeg2000", "rle", "uncompressed"]):
        files = ct_series(
            tmp_path / f"upload{index}",
            patient_id=f"RT-{index}",
            study_description="RTBATCH",
            transfer_syntax=syntax,
            seed=index,
        )
        assert set(upload(orthanc, files)) == {200}
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        studies[header.StudyInstanceUID] = (f"RT-{index}", header.SeriesInstanceUID, sop_uids(files))
    first = sorted((tmp_path / "upload1").iterdir())[0]
    assert pydicom.dcmread(first).file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    output = tmp_path / "out"
    query = ["--query", "StudyDescription=RTBATCH"]  # Orthanc 1.10 ignores an encoded wildcard (%2A)

    process = subprocess.Popen(
        batch_command(orthanc, output, tiny_model_dir, *query),
        cwd=tmp_path,
        env=pacs_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not ledger(output):
        assert process.poll() is None, "the run ended before it stored its first SR"
        assert time.monotonic() < deadline, "no SR stored within 240 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    stored_before = {study for study in studies if orthanc.sr_instances(study)}
    assert 1 <= len(stored_before) < len(studies), "the kill must land mid-run for this test to mean anything"

    resumed = run(batch_command(orthanc, output, tiny_model_dir, *query, "--resume"), tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for study, (patient_id, series_uid, instance_uids) in studies.items():
        (sr_id,) = orthanc.sr_instances(study)  # exactly one SR, in the study it describes
        read = read_report_sr(pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(sr_id))))
        assert read.study_instance_uid == study and read.identifiers["patient_id"] == patient_id
        assert sorted(read.references) == sorted((study, series_uid, uid) for uid in instance_uids)
        assert read.comments == [DISCLAIMER] and read.turns[0].task == "report"
        record = json.loads((output / "cases" / f"{study}.json").read_text(encoding="utf-8"))
        assert read.turns[0].answer == (record["report"].strip() or "(no text)")
        assert_valid_dicom(output / "cases" / f"{study}.sr.dcm")
    assert not (output / "dicomweb_cache").exists() or not any((output / "dicomweb_cache").iterdir())
    runs = json.loads((output / "manifest.json").read_text(encoding="utf-8"))["runs"]
    killed_run, resumed_run = runs[0]["run_id"], runs[1]["run_id"]
    assert {e["run_id"] for e in ledger(output) if e["action"] == "stored"} == {killed_run, resumed_run}

    fresh = tmp_path / "fresh"  # no local records: only the PACS can tell it the SRs are there
    rerun = run(batch_command(orthanc, fresh, tiny_model_dir, *query), tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert all(len(orthanc.sr_instances(study)) == 1 for study in studies)
    assert {e["action"] for e in ledger(fresh)} == {"found"}
    assert rerun.stderr.count("already in the PACS") == len(studies)

    for text in [resumed.stdout, resumed.stderr, rerun.stdout, rerun.stderr]:
        assert PASSWORD not in text
    for folder in (output, fresh):
        for path in folder.rglob("*"):
            assert not path.is_file() or PASSWORD.encode() not in path.read_bytes(), f"password in {path}"

    undo = run(batch_command(orthanc, output, tiny_model_dir, "--undo-run", resumed_run), tmp_path)
    assert undo.returncode == 0, undo.stdout + undo.stderr
    assert {
        study for study in studies if orthanc.sr_instances(study)
    } == stored_before  # the killed run's stay


def test_blank_uid_series_gets_new_uids_as_a_pacs_import_would_and_then_an_sr(
    orthanc, tmp_path, tiny_model_dir
):
    """The refused series, given fresh UIDs by the import step (as PACS gateways do on coercion), is read and
    reported like any other; the SR references the UIDs the PACS holds."""
    files = ct_series(tmp_path / "anon", patient_id="ANON-9", study_uid="", series_uid="")
    assert set(upload(orthanc, files)) == {400}  # refused as they are
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for file in files:  # what a gateway's UID coercion does on import
        dataset = pydicom.dcmread(file)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.save_as(file, enforce_file_format=True)
    assert set(upload(orthanc, files)) == {200}
    result = run(batch_command(orthanc, tmp_path / "out", tiny_model_dir, "--study", study), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (sr_id,) = orthanc.sr_instances(study)
    read = read_report_sr(pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(sr_id))))
    assert sorted(uid for _, _, uid in read.references) == sorted(sop_uids(files))


def test_wrong_password_is_a_setup_error_that_does_not_show_the_password(orthanc, tmp_path, tiny_model_dir):
    command = batch_command(orthanc, tmp_path / "out", tiny_model_dir, "--study", "1.2.3")
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env={**os.environ, "DICOMWEB_PASSWORD": "wrong-secret-123"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "401" in result.stderr and "wrong-secret-123" not in result.stdout + result.stderr


def test_credentials_come_from_files_or_environment_never_from_the_url(tmp_path):
    with pytest.raises(DicomwebError, match="holds credentials"):
        DicomwebSettings("https://alice:pw@pacs.example/dicom-web")
    with pytest.raises(DicomwebError, match="no password"):
        settings_from_options("https://pacs.example/dicom-web", username="alice", environ={})
    (tmp_path / "token").write_text("tok-abc\n", encoding="utf-8")
    settings = settings_from_options(
        "https://pacs.example/dicom-web", token_file=tmp_path / "token", environ={}
    )
    assert settings.token == "tok-abc" and "tok-abc" not in repr(settings)
    basic = settings_from_options(
        "https://pacs.example/dicom-web", username="alice", environ={"DICOMWEB_PASSWORD": "pw-9"}
    )
    assert basic.session().auth == ("alice", "pw-9") and "pw-9" not in repr(basic)


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in DICOMweb server that records each request's Authorization header and finds nothing."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(self.headers.get("Authorization", ""))
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_bearer_token_is_sent_with_every_request(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _RecordingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        settings = settings_from_options(url, environ={"DICOMWEB_TOKEN": "bearer-xyz"})
        source = DicomwebSource(settings, tmp_path, query={"StudyDate": "20260101-"})
        with pytest.raises(ValueError, match="no study matches") as error:
            source.discover()
        assert "bearer-xyz" not in str(error.value)
    finally:
        server.shutdown()
    assert _RecordingHandler.seen == ["Bearer bearer-xyz"]
