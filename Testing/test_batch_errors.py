"""The batch when the run itself goes wrong, and with DICOM as scanners export it.

Run-level problems (an output folder that takes no files, a full disk, a model that does not
load) end the run with exit status 2 and a summary that says what happened; a question that
fails keeps the other answers of its case. Inputs are phantoms written here (no shared data).
"""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CTMLLMSlicerLib import batch_case_run, batch_run
from CTMLLMSlicerLib.batch_cases import discover_cases
from CTMLLMSlicerLib.batch_run import BatchOptions, run_batch
from CTMLLMSlicerLib.batch_summary import FAILED, OK
from model_core.data.dicom_write import LOCALIZER, ct_phantom, write_dicom_series


@pytest.fixture(autouse=True)
def slicer_core_environment(monkeypatch):
    """As in test_batch: the panel tests' stand-ins must not look like the Slicer application here."""
    from CTMLLMSlicerLib import batch_scene

    monkeypatch.setattr(batch_scene, "in_slicer_application", lambda: False)


def phantom_files(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = sitk.GetImageFromArray(ct_phantom((8, 32, 32), seed=index))
        image.SetSpacing((1.0, 1.0, 2.5))
        paths.append(folder / f"p{index}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    return paths


def options(inputs: Path, output: Path, model: Path, **more) -> BatchOptions:
    return BatchOptions(inputs, output, model=str(model), device="cpu", max_new_tokens=2, **more)


def test_an_output_folder_that_takes_no_files_stops_the_run_before_the_model_loads(
    tmp_path, tiny_model_dir, monkeypatch
):
    phantom_files(tmp_path / "in", 1)
    output = tmp_path / "readonly"
    output.mkdir()
    real_write = Path.write_bytes

    def read_only(self, data):  # root writes anywhere: refuse as a read-only folder would
        if self.parent == output:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    loads = []
    monkeypatch.setattr(batch_run, "_load_model", lambda *args: loads.append(args))
    summary = run_batch(options(tmp_path / "in", output, tiny_model_dir), progress_stream=io.StringIO())
    assert summary.exit_code == 2 and not loads
    assert (
        "cannot be written (Permission denied)" in summary.setup_error and str(output) in summary.setup_error
    )
    assert summary.status_line().startswith("run could not start: the output folder")


def test_a_full_disk_stops_the_run_with_a_summary_that_says_so(tmp_path, tiny_model_dir, monkeypatch):
    phantom_files(tmp_path / "in", 3)
    output = tmp_path / "out"
    real_write = batch_case_run.atomic_write_text
    written = []

    def disk_fills_up(path, text):
        if Path(path).suffix == ".md" and Path(path).parent.name == "cases":
            written.append(path)
            if len(written) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, text)

    monkeypatch.setattr(batch_case_run, "atomic_write_text", disk_fills_up)
    summary = run_batch(options(tmp_path / "in", output, tiny_model_dir), progress_stream=io.StringIO())
    assert summary.exit_code == 2 and "is full (No space left on device)" in summary.run_error
    assert [o.status for o in summary.outcomes] == [OK, "not run", "not run"]  # the rest is not tried
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["runs"][-1]["status"] == "stopped" and "full" in manifest["runs"][-1]["error"]
    text = (output / "summary.md").read_text(encoding="utf-8")
    assert "(failed)" in text and "run stopped: the disk of the output folder" in text


def test_a_bad_model_config_leaves_no_stale_summary(tmp_path, tiny_model_dir):
    import shutil

    phantom_files(tmp_path / "in", 1)
    output = tmp_path / "out"
    assert (
        run_batch(options(tmp_path / "in", output, tiny_model_dir), progress_stream=io.StringIO()).exit_code
        == 0
    )
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "ctmllm_config.json").read_text(encoding="utf-8"))
    config["generation"]["max_new_tokens"] = "256"
    (broken / "ctmllm_config.json").write_text(json.dumps(config), encoding="utf-8")
    summary = run_batch(options(tmp_path / "in", output, broken), progress_stream=io.StringIO())
    assert summary.exit_code == 2 and "generation.max_new_tokens='256' is a string" in summary.setup_error
    text = (output / "summary.md").read_text(encoding="utf-8")
    assert "run could not start" in text and "max_new_tokens" in text  # not the earlier run's account


def test_a_question_that_fails_keeps_the_other_answers_of_its_case(tmp_path, tiny_model_dir):
    phantom_files(tmp_path / "in", 1)
    questions = tmp_path / "questions.txt"
    questions.write_text("Is there a lesion?\n" + "lesion " * 3000 + "?\nWhich organ?\n", encoding="utf-8")
    output = tmp_path / "out"
    summary = run_batch(
        options(tmp_path / "in", output, tiny_model_dir, questions_file=questions),
        progress_stream=io.StringIO(),
    )
    (outcome,) = summary.outcomes
    assert outcome.status == OK and outcome.answers == 2 and outcome.failed_questions == 1
    assert summary.exit_code == 1 and "1 question(s) got an error" in summary.status_line()
    record = json.loads((output / "cases" / "p0.json").read_text(encoding="utf-8"))
    assert [a.get("error") is None for a in record["answers"]] == [True, False, True]
    assert "limit is 1024" in record["answers"][1]["error"] and record["report"]
    assert any("1 of 3 question(s) got an error" in w for w in record["warnings"])


def test_max_new_tokens_0_is_refused_as_the_cli_refuses_it(tmp_path, tiny_model_dir):
    summary = run_batch(
        BatchOptions(tmp_path, tmp_path / "out", model=str(tiny_model_dir), max_new_tokens=0),
        progress_stream=io.StringIO(),
    )
    assert (
        summary.exit_code == 2 and "--max-new-tokens=0: use an integer of at least 1" in summary.setup_error
    )


def test_one_file_of_an_anonymized_series_runs_the_whole_series(tmp_path, tiny_model_dir):
    """Blank UIDs, no extensions, JPEG 2000: one file given alone is the case of its whole series."""
    array = ct_phantom((8, 32, 32))
    files = write_dicom_series(
        tmp_path / "export", array, (1.0, 1.0, 2.5), series_uid="", study_uid="",
        transfer_syntax="jpeg2000", extension="",
    )  # fmt: skip
    (case,) = discover_cases(files[4])
    assert len(case.files) == 8
    summary = run_batch(options(files[4], tmp_path / "out", tiny_model_dir), progress_stream=io.StringIO())
    (outcome,) = summary.outcomes
    assert summary.exit_code == 0, outcome.error
    record = json.loads((tmp_path / "out" / "cases" / f"{outcome.case_id}.json").read_text(encoding="utf-8"))
    assert record["series_grouping"].startswith("SeriesInstanceUID empty or missing")
    assert any("grouped by study, series number" in w for w in record["warnings"])


def test_a_scout_beside_the_ct_is_a_note_not_a_failed_case(tmp_path, tiny_model_dir):
    study = tmp_path / "study"
    write_dicom_series(study, ct_phantom((8, 32, 32)), (1.0, 1.0, 2.5), series_description="axial")
    coronal = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])
    write_dicom_series(
        study, ct_phantom((1, 40, 32)), (1.0, 1.0, 1.0), (0, 0, 0), coronal,
        image_type=LOCALIZER, series_description="topogram", name_prefix="scout_",
    )  # fmt: skip
    summary = run_batch(options(study, tmp_path / "out", tiny_model_dir), progress_stream=io.StringIO())
    assert summary.exit_code == 0 and [o.status for o in summary.outcomes] == [OK]
    assert any(
        "skipped localizer (scout) series" in w and "topogram" in w for w in summary.outcomes[0].warnings
    )


def test_a_tilted_series_is_corrected_and_says_so_in_the_record(tmp_path, tiny_model_dir):
    write_dicom_series(tmp_path / "tilted", ct_phantom((10, 32, 32)), (1.0, 1.0, 2.5), gantry_tilt_deg=12.0)
    summary = run_batch(
        options(tmp_path / "tilted", tmp_path / "out", tiny_model_dir), progress_stream=io.StringIO()
    )
    (outcome,) = summary.outcomes
    assert outcome.status == OK, outcome.error
    assert any("gantry was tilted 12.0 degrees" in w and "resampled" in w for w in outcome.warnings)


def test_a_dicom_case_saved_with_its_scene_keeps_its_voxels_beside_it(tmp_path, tiny_model_dir):
    import slicer

    write_dicom_series(tmp_path / "series", ct_phantom((8, 32, 32)), (1.0, 1.0, 2.5), extension="")
    output = tmp_path / "out"
    summary = run_batch(
        options(tmp_path / "series", output, tiny_model_dir, save_scene=True), progress_stream=io.StringIO()
    )
    (outcome,) = summary.outcomes
    assert outcome.status == OK, outcome.error
    record = json.loads((output / "cases" / f"{outcome.case_id}.json").read_text(encoding="utf-8"))
    assert set(record["outputs"]) == {"markdown", "volume", "scene"}
    scene = slicer.vtkMRMLScene()
    scene.SetURL(str(output / "cases" / f"{outcome.case_id}.mrml"))
    scene.Import()
    volume = scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
    assert volume.GetImageData().GetDimensions() == (32, 32, 8)
    assert FAILED not in {o.status for o in summary.outcomes}
