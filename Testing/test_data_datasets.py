"""Datasets on small fake datasets built here in each format: M3D-Cap, M3D-VQA, CT-RATE, JSONL."""

from __future__ import annotations

import csv
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from model_core.data import (
    CTRateDataset,
    DatasetFormatError,
    JsonlDataset,
    JsonlRecord,
    M3DCapDataset,
    M3DVQADataset,
    PreprocessConfig,
    Sample,
    VQARecord,
    load_m3d_npy,
    read_jsonl,
    read_m3d_vqa,
    save_m3d_npy,
    write_jsonl,
    write_m3d_cap,
    write_m3d_vqa,
)
from model_core.data.formats import M3D_VQA_COLUMNS
from model_core.prompts import DEFAULT_REPORT_PROMPT

VQA_HEADER = list(M3D_VQA_COLUMNS)


def m3d_volume(seed: int, shape: tuple[int, ...] = (1, 4, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def write_ct_nifti(path: Path, seed: int) -> Path:
    """A tiny CT in HU (air and tissue) as NIfTI."""
    array = np.random.default_rng(seed).integers(-100, 900, size=(4, 8, 8)).astype(np.int16)
    array[..., :2] = -1000
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


@pytest.fixture
def m3d_cap(tmp_path: Path) -> Path:
    """An M3D-Cap tree written by hand: JSON of splits, (1, D, H, W) .npy files, .txt reports."""
    for index, name in enumerate(["train/000001/axial", "train/000002/axial", "test/000003/coronal"]):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / f"{name}.npy", m3d_volume(index))
        (tmp_path / f"{name}.txt").write_text(f"  Report {index}: no acute findings.\n", encoding="utf-8")
    listing = {
        "train": [
            {"image": "train/000001/axial.npy", "text": "train/000001/axial.txt"},
            {"image": "train/000002/axial.npy", "text": "train/000002/axial.txt"},
        ],
        "validation": [],
        "test": [{"image": "test/000003/coronal.npy", "text": "test/000003/coronal.txt"}],
    }
    (tmp_path / "M3D_Cap.json").write_text(json.dumps(listing), encoding="utf-8")
    return tmp_path / "M3D_Cap.json"


def test_m3d_cap_split_gives_report_samples(m3d_cap):
    data = M3DCapDataset(m3d_cap, "train")
    assert len(data) == 2
    sample = data[1]
    assert isinstance(sample, Sample) and sample.task == "report" and sample.prompt == DEFAULT_REPORT_PROMPT
    assert sample.answer == "Report 1: no acute findings."
    assert sample.volume is None  # loaded lazily
    np.testing.assert_array_equal(sample.load_volume(), m3d_volume(1)[0])  # channel axis dropped
    assert sample.meta == {
        "sample_id": "train/000002/axial",
        "split": "train",
        "image": "train/000002/axial.npy",
    }
    assert len(M3DCapDataset(m3d_cap, "validation")) == 0
    with pytest.raises(DatasetFormatError, match=r"no split 'val'.*\['test', 'train', 'validation'\]"):
        M3DCapDataset(m3d_cap, "val")


def test_m3d_cap_image_root_and_custom_prompt(m3d_cap, tmp_path):
    moved = tmp_path / "elsewhere" / "cap.json"
    moved.parent.mkdir()
    moved.write_text(m3d_cap.read_text(encoding="utf-8"))
    sample = M3DCapDataset(moved, "test", image_root=m3d_cap.parent, prompt="Describe.")[0]
    assert sample.prompt == "Describe." and sample.load_volume().shape == (4, 8, 8)
    with pytest.raises(DatasetFormatError, match="report text not found"):
        M3DCapDataset(moved, "test")[0]


def test_m3d_cap_writer_round_trips(tmp_path):
    samples = [
        Sample("report", "p", "Liver lesion.", volume=m3d_volume(5)[0], meta={"sample_id": "case_01/axial"}),
        Sample("report", "p", "Normal.", volume=m3d_volume(6)[0], meta={"sample_id": "case_02/axial"}),
    ]
    json_path = write_m3d_cap(tmp_path, {"train": samples[:1], "test": samples[1:]})
    assert json.loads(json_path.read_text(encoding="utf-8")) == {
        "train": [{"image": "case_01/axial.npy", "text": "case_01/axial.txt"}],
        "test": [{"image": "case_02/axial.npy", "text": "case_02/axial.txt"}],
    }
    stored = np.load(tmp_path / "case_01/axial.npy", allow_pickle=False)
    assert stored.shape == (1, 4, 8, 8) and stored.dtype == np.float32
    back = M3DCapDataset(json_path, "test")[0]
    assert back.answer == "Normal." and back.meta["sample_id"] == "case_02/axial"
    np.testing.assert_array_equal(back.load_volume(), samples[1].volume)
    with pytest.raises(ValueError, match="sample_id"):
        write_m3d_cap(tmp_path, {"train": [Sample("report", "p", "x", volume=m3d_volume(1)[0])]})


def test_npy_volumes_are_never_unpickled_and_must_be_in_0_1(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetFormatError, match="pickled object arrays are never loaded"):
        load_m3d_npy(tmp_path / "objects.npy")
    np.save(tmp_path / "hu.npy", np.full((1, 4, 8, 8), -1000.0, np.float32))
    with pytest.raises(DatasetFormatError, match=r"values span -1000 to -1000.*\[0, 1\]"):
        load_m3d_npy(tmp_path / "hu.npy")
    np.save(tmp_path / "flat.npy", np.zeros((8, 8), np.float32))
    with pytest.raises(DatasetFormatError, match=r"shape \(8, 8\)"):
        load_m3d_npy(tmp_path / "flat.npy")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_m3d_npy(tmp_path / "bad.npy", np.full((4, 8, 8), 2.0))


@pytest.fixture
def m3d_vqa(tmp_path: Path) -> Path:
    """An M3D-VQA CSV written by hand, with a multi-line report and a row without choices."""
    for index, image in enumerate(["train/000001/axial.npy", "train/000002/axial.npy"]):
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / image, m3d_volume(index))
    rows = [
        ["train/000001/axial.npy", "Enlarged spleen.\nNo ascites.", "3", "Which organ is enlarged?", "liver"]
        + ["spleen", "kidney", "pancreas", "spleen", "B"],
        ["train/000002/axial.npy", "Axial, portal phase.", "1", "In which plane is the image?", "axial"]
        + ["sagittal", "coronal", "oblique", "axial", "A"],
        [
            "train/000002/axial.npy",
            "Mass, 3 cm, in the left kidney.",
            "5",
            "Where is the mass?",
            "",
            "",
            "",
            "",
        ]
        + ["left kidney", ""],
    ]
    path = tmp_path / "M3D_VQA_train.csv"
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(VQA_HEADER)
        writer.writerows(rows)
    return path


def test_m3d_vqa_closed_questions_follow_m3d(m3d_vqa):
    data = M3DVQADataset(m3d_vqa, mode="closed")
    assert len(data) == 2  # the row without choices has no closed form
    sample = data[0]
    assert sample.task == "vqa"
    assert sample.prompt == "Which organ is enlarged? Choices: A. liver B. spleen C. kidney D. pancreas"
    assert sample.answer == "B. spleen"
    assert sample.meta == {
        "sample_id": "0-closed",
        "row": 0,
        "image": "train/000001/axial.npy",
        "question_type": 3,
        "question_type_name": "Organ",
        "choices": {"A": "liver", "B": "spleen", "C": "kidney", "D": "pancreas"},
        "answer_choice": "B",
        "closed": True,
        "report": "Enlarged spleen.\nNo ascites.",
    }
    np.testing.assert_array_equal(sample.load_volume(), m3d_volume(0)[0])
    assert data[1].meta["question_type_name"] == "Plane" and data[1].answer == "A. axial"


def test_m3d_vqa_open_and_both_modes(m3d_vqa):
    open_ended = M3DVQADataset(m3d_vqa, mode="open")
    assert [s.prompt for s in open_ended] == [
        "Which organ is enlarged?",
        "In which plane is the image?",
        "Where is the mass?",
    ]
    assert [s.answer for s in open_ended] == ["spleen", "axial", "left kidney"]
    assert open_ended[2].meta["question_type_name"] == "Location" and open_ended[2].meta["closed"] is False
    both = M3DVQADataset(m3d_vqa, mode="both")
    assert [s.meta["sample_id"] for s in both] == ["0-closed", "0-open", "1-closed", "1-open", "2-open"]
    with pytest.raises(ValueError, match="closed"):
        M3DVQADataset(m3d_vqa, mode="multiple")


def test_m3d_vqa_missing_column_is_named(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("Image Path,Question,Answer\nx.npy,Why?,Because\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"lacks column\(s\) \['Text', 'Question Type'"):
        M3DVQADataset(path)


def test_m3d_vqa_writer_round_trips(m3d_vqa, tmp_path):
    records = read_m3d_vqa(m3d_vqa)
    assert records[0] == VQARecord(
        image_path="train/000001/axial.npy",
        question_type=3,
        question="Which organ is enlarged?",
        answer="spleen",
        choices={"A": "liver", "B": "spleen", "C": "kidney", "D": "pancreas"},
        answer_choice="B",
        text="Enlarged spleen.\nNo ascites.",
    )
    copy = write_m3d_vqa(tmp_path / "copy" / "vqa.csv", records)
    assert read_m3d_vqa(copy) == records
    with open(copy, newline="", encoding="utf-8") as stream:
        assert next(csv.reader(stream)) == VQA_HEADER


def test_ct_rate_reads_nifti_with_findings(tmp_path):
    write_ct_nifti(tmp_path / "vol" / "train_1" / "train_1_a" / "train_1_a_1.nii.gz", 1)
    write_ct_nifti(tmp_path / "vol" / "train_2" / "train_2_a" / "train_2_a_1.nii.gz", 2)
    with open(tmp_path / "reports.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(
            ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
        )
        writer.writerow(
            ["train_1_a_1.nii.gz", "Cough.", "Non-contrast.", "Nodule in the right lung.", "Nodule."]
        )
        writer.writerow(["train_2_a_1.nii.gz", "", "", "No findings.", "Normal."])
        writer.writerow(["train_3_a_1.nii.gz", "", "", "Not downloaded.", ""])
    config = PreprocessConfig(target_shape=(4, 16, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = CTRateDataset(tmp_path / "reports.csv", tmp_path / "vol", config)
    assert len(data) == 2 and data.missing == ["train_3_a_1.nii.gz"]
    assert any("1 of 3 volumes" in str(w.message) for w in caught)
    sample = data[0]
    assert sample.task == "report" and sample.answer == "Nodule in the right lung."
    assert sample.meta["sample_id"] == "train_1_a_1" and sample.meta["impression"] == "Nodule."
    volume = sample.load_volume()
    assert (
        volume.shape == (4, 16, 16) and volume.dtype == np.float32 and volume.min() >= 0 and volume.max() <= 1
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="none of its 3 volumes"):
        CTRateDataset(tmp_path / "reports.csv", tmp_path / "empty", config)


def test_ct_rate_without_findings_column_is_refused(tmp_path):
    (tmp_path / "r.csv").write_text("VolumeName,Report\na.nii.gz,text\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"no findings column.*\['VolumeName', 'Report'\]"):
        CTRateDataset(tmp_path / "r.csv", tmp_path)


def test_jsonl_mixes_ct_files_and_npy(tmp_path):
    write_ct_nifti(tmp_path / "ct" / "a.nii.gz", 3)
    np.save(tmp_path / "b.npy", m3d_volume(4))
    lines = [
        {"volume": "ct/a.nii.gz", "task": "report", "answer": "Normal chest.", "id": "a"},
        {"volume": "b.npy", "task": "vqa", "prompt": "Is there a mass?", "answer": "No", "question_type": 4},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    data = JsonlDataset(path, PreprocessConfig(target_shape=(4, 8, 8)))
    assert len(data) == 2
    report, question = data[0], data[1]
    assert report.prompt == DEFAULT_REPORT_PROMPT and report.meta["sample_id"] == "a"
    assert report.load_volume().shape == (4, 8, 8)
    assert question.task == "vqa" and question.prompt == "Is there a mass?" and question.answer == "No"
    assert question.meta["question_type"] == 4 and question.meta["sample_id"] == "data:2"
    np.testing.assert_array_equal(question.load_volume(), m3d_volume(4)[0])


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"volume": "x.npy", "task": "report", "answer": "a"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="line 2 is not valid JSON"):
        JsonlDataset(path)
    path.write_text('{"volume": "x.npy", "task": "caption", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"task 'caption'; use one of \['report', 'vqa'\]"):
        JsonlDataset(path)
    path.write_text('{"volume": "x.npy", "task": "vqa", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"line 1 lacks string field\(s\) \['prompt'\]"):
        JsonlDataset(path)
    path.write_text('{"volume": "x.npy", "task": "report", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"do not exist.*\['x.npy'\]"):
        JsonlDataset(path)


def test_jsonl_writer_round_trips(tmp_path):
    records = [
        JsonlRecord("a.nii.gz", "report", "Describe.", "Normal.", "case-a"),
        JsonlRecord("b.npy", "vqa", "Which organ?", "Liver", "case-b", {"choices": {"A": "Liver"}}),
    ]
    assert read_jsonl(write_jsonl(tmp_path / "out.jsonl", records)) == records


def test_samples_pickle_for_dataloader_workers(m3d_cap):
    sample = M3DCapDataset(m3d_cap, "train")[0]
    copy = pickle.loads(pickle.dumps(sample))
    np.testing.assert_array_equal(copy.load_volume(), sample.load_volume())
