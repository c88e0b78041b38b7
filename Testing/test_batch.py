"""Headless batch runs (issue 6): real CT volumes, the tiny random model, the script as users run it.

The end-to-end tests start ``CTMLLMSlicer/batch.py`` with plain Python (slicer-core, no Slicer
application) from a folder outside the repository; the text is gibberish, so they assert on
files, statuses, checksums and resume behaviour. Smaller tests cover discovery, atomic writes,
the lock, reuse decisions and the progress line in-process.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ABDOMEN_CT, MODULE_DIR, NOT_CT_MR, TORSO_CT, needs_shared_ct

from CTMLLMSlicerLib.batch_cases import (
    DICOM,
    FILE,
    CaseListError,
    discover_cases,
    read_questions_file,
)
from CTMLLMSlicerLib.batch_files import (
    OutputFolderBusyError,
    RunLock,
    atomic_write_text,
    remove_partial_files,
)
from CTMLLMSlicerLib.batch_manifest import check_reusable
from CTMLLMSlicerLib.batch_run import BatchOptions, run_batch
from CTMLLMSlicerLib.batch_summary import FAILED, OK, CaseOutcome, ProgressLine

BATCH_SCRIPT = MODULE_DIR / "batch.py"

pytestmark = needs_shared_ct


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def link(source: Path, target: Path) -> Path:
    """A read-only shared volume inside a test folder, without copying it where links work."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.symlink_to(source)
    except OSError:
        shutil.copyfile(source, target)
    return target


def write_dicom_from(volume: Path, folder: Path) -> str:
    """Write ``volume`` as a DICOM CT series (one file per slice); returns its SeriesInstanceUID."""
    from model_core.data import scan_dicom_folder, write_dicom_series

    image = sitk.ReadImage(str(volume))
    write_dicom_series(
        folder,
        sitk.GetArrayFromImage(image),
        image.GetSpacing(),
        image.GetOrigin(),
        np.asarray(image.GetDirection()).reshape(3, 3),
        series_description="abdomen",
    )
    (series,) = scan_dicom_folder(folder)
    return series.uid


def script_command(*args: str | Path) -> list[str]:
    return [sys.executable, str(BATCH_SCRIPT), *map(str, args)]


def run_script(*args: str | Path, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        script_command(*args), cwd=cwd, capture_output=True, text=True, encoding="utf-8", timeout=timeout
    )


def long_run_args(inputs: Path, output: Path, model: Path) -> list[str | Path]:
    """Options for a run whose cases take long enough (32-token answers) for a signal to land mid-run."""
    return [
        "--input",
        inputs,
        "--output",
        output,
        "--model",
        model,
        "--max-new-tokens",
        "32",
        "--device",
        "cpu",
    ]


def wait_for_first_record(process: subprocess.Popen, output: Path, timeout: float = 180) -> None:
    """Return once the running script has committed its first case record; fail (and kill it) if
    it ends or times out first."""
    deadline = time.monotonic() + timeout
    try:
        while not list((output / "cases").glob("*.json")):
            assert process.poll() is None, "the run ended before its first case was recorded"
            assert time.monotonic() < deadline, f"no case finished within {timeout} s"
            time.sleep(0.02)
    except AssertionError:
        process.kill()
        process.wait(timeout=30)
        raise


def read_summary(output: Path) -> dict[str, dict[str, str]]:
    with open(output / "summary.csv", newline="", encoding="utf-8") as stream:
        return {row["case_id"]: row for row in csv.DictReader(stream)}


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial" in p.name]


@pytest.fixture(autouse=True)
def slicer_core_environment(monkeypatch):
    """These tests run the batch on slicer-core. The panel tests' stand-ins (``slicer.app``,
    ``slicer.mrmlScene``) look like the application when both run in one process; their shared
    scene would then hold other tests' volumes."""
    from CTMLLMSlicerLib import batch_scene

    monkeypatch.setattr(batch_scene, "in_slicer_application", lambda: False)


# --- issue test 1 -------------------------------------------------------------------------------


def test_mixed_folder_gives_three_outputs_and_two_clear_errors(tmp_path, tiny_model_dir):
    """Two NIfTI CTs, a DICOM series, a truncated file and an MR: 3 complete outputs, 2 errors, status 1."""
    inputs = tmp_path / "in"
    link(ABDOMEN_CT, inputs / "abdomen.nii.gz")
    link(TORSO_CT, inputs / "torso.nii.gz")
    link(NOT_CT_MR, inputs / "mr_head.nii.gz")
    series_uid = write_dicom_from(ABDOMEN_CT, inputs / "patient7" / "ct_series")
    (inputs / "broken.nii.gz").write_bytes(ABDOMEN_CT.read_bytes()[: ABDOMEN_CT.stat().st_size // 2])
    questions = tmp_path / "questions.txt"
    questions.write_text(
        "# asked about every case\nIs there ascites?\nIs the liver enlarged?\n", encoding="utf-8"
    )
    output = tmp_path / "out"

    result = run_script(
        "--input", inputs, "--output", output, "--model", tiny_model_dir, "--questions", questions,
        "--max-new-tokens", "6", "--device", "cpu", cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1, result.stderr
    rows = read_summary(output)
    assert set(rows) == {"abdomen", "torso", "mr_head", "broken", "patient7__ct_series"}
    good = {
        "abdomen": inputs / "abdomen.nii.gz",
        "torso": inputs / "torso.nii.gz",
        "patient7__ct_series": None,
    }
    model_sha = sha256(tiny_model_dir / "model.safetensors")
    for case_id, source in good.items():
        assert rows[case_id]["status"] == OK
        record = json.loads((output / "cases" / f"{case_id}.json").read_text(encoding="utf-8"))
        assert record["status"] == OK and record["model"]["sha256"] == model_sha
        assert record["report"] is not None and [a["question"] for a in record["answers"]] == [
            "Is there ascites?",
            "Is the liver enlarged?",
        ]
        assert record["preprocessing"]["target_shape"] and record["timings"]["total_s"] > 0
        assert record["environment"].startswith("slicer-core")
        if source is not None:
            assert record["input_sha256"] == sha256(source)
        markdown = (output / "cases" / f"{case_id}.md").read_text(encoding="utf-8")
        assert "Is the liver enlarged?" in markdown and model_sha in markdown
    assert (
        json.loads((output / "cases" / "patient7__ct_series.json").read_text(encoding="utf-8"))["series_uid"]
        == series_uid
    )
    assert sorted(p.name for p in (output / "cases").glob("*.json")) == [
        "abdomen.json",
        "patient7__ct_series.json",
        "torso.json",
    ]

    assert rows["broken"]["status"] == FAILED and rows["broken"]["error_type"] == "UnreadableVolumeError"
    assert "broken.nii.gz" in rows["broken"]["error"] and "truncated" in rows["broken"]["error"]
    assert (
        rows["mr_head"]["status"] == FAILED and rows["mr_head"]["error_type"] == "NotCTError"
    )  # the verdict
    assert (
        "mr_head.nii.gz" in rows["mr_head"]["error"] and "does not look like a CT" in rows["mr_head"]["error"]
    )
    assert "pass --allow-non-ct" in rows["mr_head"]["error"]  # the refusal names the flag that accepts it
    summary_md = (output / "summary.md").read_text(encoding="utf-8")
    assert "## Failures" in summary_md and "truncated" in summary_md and "3 ok" in summary_md
    assert "2 failed" in result.stdout
    assert not leftovers(output)


# --- issue test 2 -------------------------------------------------------------------------------


def test_sigkill_mid_run_then_resume_completes_each_case_once(tmp_path, tiny_model_dir):
    """kill -9 after the first case's record appears; --resume finishes the rest and recomputes nothing."""
    inputs = tmp_path / "in"
    for index in range(5):
        link(TORSO_CT if index % 2 else ABDOMEN_CT, inputs / f"study{index}.nii.gz")
    output = tmp_path / "out"
    args = long_run_args(inputs, output, tiny_model_dir)
    process = subprocess.Popen(
        script_command(*args), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_first_record(process, output)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    before = {
        p.name: (p.stat().st_mtime_ns, json.loads(p.read_text(encoding="utf-8"))["run_id"])
        for p in (output / "cases").glob("*.json")
    }
    assert 1 <= len(before) < 5, "the kill must land mid-run for this test to mean anything"
    (output / "cases" / ".study4.json.99999.partial").write_text(
        '{"half": ', encoding="utf-8"
    )  # as a kill mid-write leaves

    resumed = run_script(*args, "--resume", cwd=tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    records = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in (output / "cases").glob("*.json")}
    assert sorted(records) == [f"study{i}.json" for i in range(5)]
    assert sorted(p.name for p in (output / "cases").glob("*.md")) == [f"study{i}.md" for i in range(5)]
    for name, (mtime, run_id) in before.items():
        assert (output / "cases" / name).stat().st_mtime_ns == mtime  # not rewritten
        assert records[name]["run_id"] == run_id
    rows = read_summary(output)
    assert all(row["status"] == OK for row in rows.values())
    assert {cid for cid, row in rows.items() if row["reused"] == "yes"} == {Path(n).stem for n in before}
    resumed_run_ids = {r["run_id"] for n, r in records.items() if n not in before}
    assert len(resumed_run_ids) == 1 and resumed_run_ids.isdisjoint({run_id for _, run_id in before.values()})
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    assert [run["status"] for run in manifest["runs"]] == ["running", "finished"]  # the first never ended
    assert {cid: entry["run_id"] for cid, entry in manifest["cases"].items()} == {
        Path(name).stem: record["run_id"] for name, record in records.items()
    }
    assert not leftovers(output)


@pytest.mark.parametrize(
    ("stop", "status", "words"),
    [(signal.SIGINT, 130, "interrupted (Ctrl-C)"), (signal.SIGTERM, 143, "interrupted (SIGTERM)")],
    ids=["ctrl_c", "sigterm"],
)
def test_ctrl_c_or_sigterm_keeps_finished_cases_and_marks_the_run_interrupted(
    tmp_path, tiny_model_dir, stop, status, words
):
    """SIGTERM (timeout, systemd, Slurm) ends the run as Ctrl-C does; its exit status says which.
    Twelve cases, so that on a loaded machine the signal still lands before the last one ends."""
    inputs = tmp_path / "in"
    for index in range(12):
        link(ABDOMEN_CT, inputs / f"s{index}.nii.gz")
    output = tmp_path / "out"
    args = long_run_args(inputs, output, tiny_model_dir)
    # Ctrl-C as from a terminal: the child gets a default SIGINT whatever this test process has. In
    # the full suite (not alone) the child once finished every case with status 0 after SIGINT, as a
    # process does that inherits an ignored SIGINT (which stays ignored across exec)
    process = subprocess.Popen(
        script_command(*args),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_first_record(process, output)
    process.send_signal(stop)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == status, stdout
    assert words in stdout
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["runs"][-1]["status"] == "interrupted"
    rows = read_summary(output)
    done = {p.stem for p in (output / "cases").glob("*.json")}
    assert done and {cid for cid, row in rows.items() if row["status"] == OK} == done
    assert {row["status"] for cid, row in rows.items() if cid not in done} == {"not run"}
    assert "interrupted" in (output / "summary.md").read_text(encoding="utf-8") and not leftovers(output)


# --- resume decisions, options, scene (in-process through run_batch) -----------------------------


def test_resume_recomputes_changed_inputs_and_changed_settings(tmp_path, tiny_model_dir):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copyfile(ABDOMEN_CT, inputs / "a.nii.gz")
    link(ABDOMEN_CT, inputs / "b.nii.gz")
    output = tmp_path / "out"
    options = BatchOptions(
        inputs, output, model=str(tiny_model_dir), device="cpu", max_new_tokens=4, resume=True
    )
    first = run_batch(options, progress_stream=io.StringIO())
    assert first.exit_code == 0 and not any(o.reused for o in first.outcomes)

    shutil.copyfile(TORSO_CT, inputs / "a.nii.gz")  # a changed input
    second = run_batch(options, progress_stream=io.StringIO())
    assert {o.case_id: o.reused for o in second.outcomes} == {"a": False, "b": True}
    record = json.loads((output / "cases" / "a.json").read_text(encoding="utf-8"))
    assert record["input_sha256"] == sha256(TORSO_CT) and record["run_id"] == second.run_id

    (output / "cases" / "b.md").write_text("edited by hand\n", encoding="utf-8")  # a damaged output
    third = run_batch(options, progress_stream=io.StringIO())
    assert {o.case_id: o.reused for o in third.outcomes} == {"a": True, "b": False}

    longer = BatchOptions(
        inputs, output, model=str(tiny_model_dir), device="cpu", max_new_tokens=5, resume=True
    )
    fourth = run_batch(longer, progress_stream=io.StringIO())
    assert not any(o.reused for o in fourth.outcomes)  # other settings: nothing reused
    assert fourth.cases_per_minute > 0

    fifth = run_batch(replace(longer, allow_non_ct=True), progress_stream=io.StringIO())
    assert not any(o.reused for o in fifth.outcomes)  # the non-CT switch is part of the fingerprint
    assert (
        json.loads((output / "cases" / "a.json").read_text(encoding="utf-8"))["fingerprint"]["allow_non_ct"]
        is True
    )


def test_allow_non_ct_flag_runs_an_mr_scaled_by_its_own_percentiles(tmp_path, tiny_model_dir):
    """The script's --allow-non-ct (parsed in-process by its main) accepts the MR the default refuses."""
    spec = importlib.util.spec_from_file_location("ctmllm_batch_script", BATCH_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output = tmp_path / "out"
    common = [
        "--input",
        str(NOT_CT_MR),
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]
    assert script.main([*common, "--output", str(tmp_path / "refused")]) == 1
    assert script.main([*common, "--output", str(output), "--allow-non-ct"]) == 0
    record = json.loads((output / "cases" / "not_ct_mr_3mm.json").read_text(encoding="utf-8"))
    assert record["status"] == OK and record["report"] is not None
    assert record["generation"]["allow_non_ct"] is True and record["fingerprint"]["allow_non_ct"] is True
    assert record["preprocessing"]["window"] == "percentile" and record["preprocessing"]["allow_non_ct"]
    assert any("does not look like a CT" in warning for warning in record["warnings"])


def test_out_of_memory_and_unexpected_errors_fail_their_case_only(tmp_path, tiny_model_dir, monkeypatch):
    from model_core.model import CTMLLM

    original = CTMLLM.generate
    failures = iter([RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), KeyError("boom")])

    def generate_or_fail(*args, **kwargs):
        error = next(failures, None)
        if error is not None:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(CTMLLM, "generate", generate_or_fail)
    for name in ("a", "b", "c"):
        link(ABDOMEN_CT, tmp_path / "in" / f"{name}.nii.gz")
    output = tmp_path / "out"
    options = BatchOptions(tmp_path / "in", output, model=str(tiny_model_dir), device="cpu", max_new_tokens=4)
    summary = run_batch(options, progress_stream=io.StringIO())
    outcomes = {o.case_id: o for o in summary.outcomes}
    assert outcomes["a"].error_type == "ModelOutOfMemoryError" and "out of memory" in outcomes["a"].error
    assert outcomes["b"].error_type == "KeyError" and "traceback in errors.log" in outcomes["b"].error
    assert "boom" in (output / "errors.log").read_text(encoding="utf-8")
    assert outcomes["c"].status == OK and summary.exit_code == 1
    assert sorted(p.name for p in (output / "cases").iterdir()) == ["c.json", "c.md"]


def test_stand_in_model_notice_is_a_warning_of_every_case(tmp_path, monkeypatch):
    from model_core import hub
    from model_core.model import CONFIG_FILE

    if (hub.DEMO_MODEL_DIR / CONFIG_FILE).is_file():
        pytest.skip("a trained demo model is installed: no stand-in notice")
    monkeypatch.setenv("CTMLLM_CACHE", str(tmp_path / "cache"))
    summary = run_batch(BatchOptions(ABDOMEN_CT, tmp_path / "out", device="cpu", max_new_tokens=2))
    (outcome,) = summary.outcomes
    assert outcome.status == OK and any("tiny random test model" in w for w in outcome.warnings)
    record = json.loads((tmp_path / "out" / "cases" / "abdomen_ct_3mm.json").read_text(encoding="utf-8"))
    assert (
        record["warnings"] == outcome.warnings
        and "tiny random" in read_summary(tmp_path / "out")["abdomen_ct_3mm"]["warnings"]
    )


def test_case_list_vqa_run_answers_per_case_questions_and_records_an_empty_series(tmp_path, tiny_model_dir):
    link(ABDOMEN_CT, tmp_path / "a.nii.gz")
    (tmp_path / "empty_series").mkdir()
    rows = [
        {"path": "a.nii.gz", "id": "p1", "questions": ["Is there ascites?"]},
        {"path": "empty_series", "id": "p2", "question": "Any fracture?"},
    ]
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    output = tmp_path / "out"
    options = BatchOptions(
        tmp_path / "cases.jsonl",
        output,
        task="vqa",
        model=str(tiny_model_dir),
        device="cpu",
        max_new_tokens=3,
    )
    summary = run_batch(options, progress_stream=io.StringIO())
    outcomes = {o.case_id: o for o in summary.outcomes}
    record = json.loads((output / "cases" / "p1.json").read_text(encoding="utf-8"))
    assert outcomes["p1"].status == OK and record["report"] is None
    assert [a["question"] for a in record["answers"]] == ["Is there ascites?"]
    assert outcomes["p2"].status == FAILED and outcomes["p2"].error_type == "DicomSeriesError"
    assert "empty_series" in outcomes["p2"].error and "holds no DICOM image files" in outcomes["p2"].error


def test_the_task_router_picks_each_requests_expert_unless_the_task_forces_it(tmp_path, routed_model_dir):
    questions = tmp_path / "questions.txt"
    questions.write_text(
        "Where is the lesion located?\nWrite a radiology report of the findings in this CT volume.\n",
        encoding="utf-8",
    )
    experts = {}
    for routing in ("router", "task"):
        output = tmp_path / routing
        options = BatchOptions(
            ABDOMEN_CT, output, model=str(routed_model_dir), device="cpu", max_new_tokens=2,
            questions_file=questions, **({} if routing == "router" else {"routing": routing}),
        )  # fmt: skip
        assert run_batch(options, progress_stream=io.StringIO()).exit_code == 0
        record = json.loads((output / "cases" / "abdomen_ct_3mm.json").read_text(encoding="utf-8"))
        assert record["routing"] == routing and record["fingerprint"]["routing"] == routing
        experts[routing] = [record["report_expert"], *(answer["expert"] for answer in record["answers"])]
    assert experts == {"router": ["report", "vqa", "report"], "task": ["report", "vqa", "vqa"]}
    with pytest.raises(ValueError, match="--routing 'oracle'"):
        replace(options, routing="oracle").validate()


def test_check_reusable_says_why_not(tmp_path):
    output = tmp_path / "out"
    assert check_reusable(output, "x", "abc", {}).reason == "no earlier result"
    (output / "cases").mkdir(parents=True)
    (output / "cases" / "x.json").write_text(
        '{"format": "ctmllm-batch-case/1", "status": "ok", "inp', encoding="utf-8"
    )
    assert not check_reusable(output, "x", "abc", {}).reusable


def test_vqa_without_questions_fails_each_case_with_a_clear_message(tmp_path, tiny_model_dir):
    output = tmp_path / "out"
    options = BatchOptions(
        ABDOMEN_CT, output, task="vqa", model=str(tiny_model_dir), device="cpu", max_new_tokens=4
    )
    summary = run_batch(options, progress_stream=io.StringIO())
    (outcome,) = summary.outcomes
    assert outcome.status == FAILED and "task vqa needs questions" in outcome.error
    assert summary.exit_code == 1 and not (output / "cases" / "abdomen_ct_3mm.json").exists()


def test_setup_errors_give_exit_status_2(tmp_path, tiny_model_dir):
    missing_input = run_batch(
        BatchOptions(tmp_path / "nowhere", tmp_path / "out", model=str(tiny_model_dir)),
        progress_stream=io.StringIO(),
    )
    assert missing_input.exit_code == 2 and "does not exist" in missing_input.setup_error
    missing_model = run_batch(
        BatchOptions(ABDOMEN_CT, tmp_path / "out2", model=str(tmp_path / "no-model")),
        progress_stream=io.StringIO(),
    )
    assert missing_model.exit_code == 2 and "no-model" in missing_model.setup_error
    assert [o.status for o in missing_model.outcomes] == ["not run"]
    bad_option = run_batch(BatchOptions(ABDOMEN_CT, tmp_path / "out3", window="purple"))
    assert bad_option.exit_code == 2 and "--window" in bad_option.setup_error


def test_save_scene_keeps_the_report_in_a_text_node_of_the_volume(tmp_path, tiny_model_dir):
    import slicer

    output = tmp_path / "out"
    options = BatchOptions(
        ABDOMEN_CT, output, model=str(tiny_model_dir), device="cpu", max_new_tokens=4, save_scene=True
    )
    summary = run_batch(options, progress_stream=io.StringIO())
    assert summary.exit_code == 0
    scene_file = output / "cases" / "abdomen_ct_3mm.mrml"
    record = json.loads((output / "cases" / "abdomen_ct_3mm.json").read_text(encoding="utf-8"))
    assert record["outputs"]["scene"]["sha256"] == sha256(scene_file)

    scene = slicer.vtkMRMLScene()
    scene.SetURL(str(scene_file))
    scene.Import()
    volume = scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
    text = volume.GetNodeReference("CTMLLMResult")
    assert text is not None and text.IsA("vtkMRMLTextNode")
    review, header = text.GetText().splitlines()[:2]
    assert header.startswith("CT-MLLM results for abdomen_ct_3mm") and "reviewed" in review
    assert Path(volume.GetStorageNode().GetFileName()).resolve() == ABDOMEN_CT.resolve()


def test_two_runs_cannot_share_an_output_folder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(OutputFolderBusyError, match="in use by another batch run"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released: usable again
        pass


# --- files, discovery, progress -----------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = atomic_write_text(tmp_path / "r.json", "old\n")

    def fail(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new\n")
    assert target.read_text(encoding="utf-8") == "old\n" and not leftovers(tmp_path)


def test_remove_partial_files_removes_only_leftovers(tmp_path):
    (tmp_path / ".a.json.123.partial").write_text("x", encoding="utf-8")
    (tmp_path / "a.json").write_text("{}", encoding="utf-8")
    (tmp_path / "notes.partial").write_text("not ours: not hidden", encoding="utf-8")
    removed = remove_partial_files([tmp_path, tmp_path / "missing"])
    assert [p.name for p in removed] == [".a.json.123.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "notes.partial"]


def test_folder_discovery_finds_files_and_each_dicom_series(tmp_path):
    link(ABDOMEN_CT, tmp_path / "in" / "x" / "scan.nii.gz")
    link(NOT_CT_MR, tmp_path / "in" / "y" / "scan.nii.gz")
    write_dicom_from(ABDOMEN_CT, tmp_path / "in" / "dcm")
    (tmp_path / "in" / "README.txt").write_text("not a case", encoding="utf-8")
    (tmp_path / "in" / "out" / "cases").mkdir(parents=True)
    link(ABDOMEN_CT, tmp_path / "in" / "out" / "old.nii.gz")  # inside the output folder: ignored
    cases = discover_cases(tmp_path / "in", exclude=[tmp_path / "in" / "out"], questions=["Q?"])
    assert [(c.case_id, c.kind) for c in cases] == [("x__scan", FILE), ("y__scan", FILE), ("dcm", DICOM)]
    assert len(cases[2].files) == 30 and all(c.questions == ("Q?",) for c in cases)
    assert cases[0].input_checksum() != cases[1].input_checksum()


def test_each_series_of_a_shared_folder_loads_alone_with_the_source_geometry(tmp_path):
    """Two series in one folder: each case reads only its own files, as the NIfTI it came from."""
    from slicer.util import arrayFromVolume

    from CTMLLMSlicerLib.batch_scene import load_case_volume, nodes_added_during, slicer_context
    from CTMLLMSlicerLib.logic import CTMLLMLogicCore
    from CTMLLMSlicerLib.volume_nodes import ijkToRAS
    from model_core.data import CTImage, NotCTError, write_dicom_series

    folder = tmp_path / "study"
    write_dicom_from(ABDOMEN_CT, folder)
    mr = np.arange(5 * 8 * 9).reshape(5, 8, 9) % 300 + 100  # no air: an MR
    for path in write_dicom_series(tmp_path / "mr", mr, (1.0, 1.0, 2.0), modality="MR"):
        path.rename(folder / f"mr_{path.name}")
    context = slicer_context(tmp_path / "slicer.log")
    logic = CTMLLMLogicCore(context.scene, volumesLogic=context.volumesLogic)
    cases = {c.case_id.split("__")[1].split("_")[0]: c for c in discover_cases(folder)}
    assert sorted(cases) == ["MR", "abdomen"]  # ids: dicom__<description>_<end of the series UID>
    (reference,) = discover_cases(ABDOMEN_CT)
    with nodes_added_during(context.scene):
        series_node, _ = load_case_volume(logic, cases["abdomen"])
        nifti_node, _ = load_case_volume(logic, reference)
        with pytest.raises(NotCTError, match="Modality MR"):  # as read_ct refuses it
            load_case_volume(logic, cases["MR"])
        mr_node, _ = load_case_volume(logic, cases["MR"], allow_non_ct=True)
        series, nifti = (
            CTImage.from_ijk_to_ras(arrayFromVolume(n), ijkToRAS(n)) for n in (series_node, nifti_node)
        )  # the same voxels at the same places, whatever order each reader stores them in
        assert np.array_equal(series.array, nifti.array)
        assert np.allclose(series.ijk_to_ras(), nifti.ijk_to_ras(), atol=1e-3)
        assert arrayFromVolume(mr_node).shape == (5, 8, 9)
        count = context.scene.GetNumberOfNodes()
    assert context.scene.GetNumberOfNodes() < count  # the case's nodes are gone afterwards
    assert context.scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is None


def test_case_lists_group_questions_and_resolve_relative_paths(tmp_path):
    link(ABDOMEN_CT, tmp_path / "vols" / "a.nii.gz")
    write_dicom_from(ABDOMEN_CT, tmp_path / "vols" / "dcm")
    (tmp_path / "cases.csv").write_text(
        "path,id,question\nvols/a.nii.gz,p1,Is there ascites?\nvols/a.nii.gz,p1,Any fracture?\nvols/dcm,,\n",
        encoding="utf-8",
    )
    cases = discover_cases(tmp_path / "cases.csv", questions=["default?"])
    assert [(c.case_id, c.kind, c.questions) for c in cases] == [
        ("p1", FILE, ("Is there ascites?", "Any fracture?")),
        ("dcm", DICOM, ("default?",)),
    ]
    assert cases[0].path == tmp_path / "vols" / "a.nii.gz"
    assert len(cases[1].input_files()) == 30  # the series is found when the case runs

    (tmp_path / "cases.jsonl").write_text(
        json.dumps({"volume": "vols/a.nii.gz", "questions": ["Q1?", "Q2?"]})
        + "\n\n"
        + json.dumps({"path": "vols/a.nii.gz", "id": "again"})
        + "\n",
        encoding="utf-8",
    )
    jsonl = discover_cases(tmp_path / "cases.jsonl")
    assert [(c.case_id, c.questions) for c in jsonl] == [("a", ("Q1?", "Q2?")), ("again", ())]


def test_case_list_errors_name_the_line_and_the_fix(tmp_path):
    (tmp_path / "bad.csv").write_text("file,question\na.nii.gz,Q\n", encoding="utf-8")
    with pytest.raises(CaseListError, match="no 'path' column"):
        discover_cases(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.nii.gz"}\n{"path": \n', encoding="utf-8")
    with pytest.raises(CaseListError, match=r"bad.jsonl, line 2: not valid JSON"):
        discover_cases(tmp_path / "bad.jsonl")
    (tmp_path / "clash.csv").write_text("path,id\na.nii.gz,p\nb.nii.gz,p\n", encoding="utf-8")
    with pytest.raises(CaseListError, match="give each volume its own id"):
        discover_cases(tmp_path / "clash.csv")
    (tmp_path / "empty_q.txt").write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(CaseListError, match="holds no questions"):
        read_questions_file(tmp_path / "empty_q.txt")


def test_duplicate_names_get_distinct_case_ids(tmp_path):
    link(ABDOMEN_CT, tmp_path / "in" / "a_b.nii.gz")
    link(ABDOMEN_CT, tmp_path / "in" / "a b.nii")  # not a valid NIfTI, but discovery only reads names
    assert [c.case_id for c in discover_cases(tmp_path / "in")] == ["a_b", "a_b_2"]


def test_progress_line_counts_failures_and_estimates_from_computed_cases():
    stream = io.StringIO()
    progress = ProgressLine(5, stream)
    progress.case_finished(CaseOutcome("a", "a", OK, reused=True))
    assert progress.eta_seconds() is None  # reused cases say nothing about speed
    progress.case_finished(CaseOutcome("b", "b", OK, seconds=1.0))
    progress.case_finished(CaseOutcome("c", "c", FAILED, error="c: is truncated", seconds=3.0))
    assert progress.eta_seconds() == pytest.approx(2 * 2.0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "3/5 (60%) failed 1" in lines[-1] and "c failed: c: is truncated" in lines[-1]
