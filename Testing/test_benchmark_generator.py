"""The lesion benchmark generator: determinism, report round trip, lesion placement, files, scoring."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from model_core.benchmark.__main__ import main
from model_core.benchmark.anatomy import LABELS, finding_site_label
from model_core.benchmark.build import BenchmarkConfig, make_study, organs_out_of_view, read_findings
from model_core.benchmark.findings import LEVELS, ORGAN_KINDS, Finding, score_findings, size_bucket
from model_core.benchmark.lesions import (
    MIN_CONTRAST_HU,
    insert_lesions,
    lesion_occupancy,
    level_of,
    plan_findings,
)
from model_core.benchmark.phantom import HELD_OUT_BANDS, phantom_anatomy, sample_anatomy_latents
from model_core.benchmark.real_anatomy import (
    DEFAULT_CT_DIR,
    ct_data_dir,
    load_real_volume,
    real_volume_specs,
    split_lungs,
    threshold_lungs,
)
from model_core.benchmark.text import SITES, make_questions, organs_named, parse_report, write_report
from model_core.data.formats import load_m3d_npy, read_m3d_cap, read_m3d_vqa
from model_core.prompts import CHOICE_LETTERS

GRID = (16, 64, 64)


def _key(finding: Finding) -> tuple:
    return (finding.organ, finding.side, finding.kind, finding.size_mm, finding.level)


def _same_findings(a: list[Finding], b: list[Finding]) -> bool:
    return sorted(map(_key, a), key=repr) == sorted(map(_key, b), key=repr)


def _random_findings(rng: np.random.Generator) -> list[Finding]:
    findings = []
    for _ in range(int(rng.integers(0, 4))):
        organ, side = SITES[int(rng.integers(len(SITES)))]
        kinds = ORGAN_KINDS[organ]
        kind = kinds[int(rng.integers(len(kinds)))]
        size = float(rng.integers(4, 41))
        findings.append(Finding(organ, kind, size, side, LEVELS[int(rng.integers(3))]))
    return findings


def test_same_seed_gives_the_same_study_and_another_seed_another() -> None:
    config = BenchmarkConfig(counts={"train": 2}, grid=GRID, seed=3)
    first, again = make_study("train", 1, config), make_study("train", 1, config)
    np.testing.assert_array_equal(first.image, again.image)
    assert (first.report, first.questions, first.findings) == (again.report, again.questions, again.findings)
    other = make_study("train", 1, BenchmarkConfig(counts={"train": 2}, grid=GRID, seed=4))
    assert not np.array_equal(first.image, other.image)
    assert (first.report, first.findings) != (other.report, other.findings)
    assert first.image.shape == GRID and first.image.dtype == np.float32
    assert 0.0 <= first.image.min() and first.image.max() <= 1.0


def test_parse_recovers_every_written_report_exactly() -> None:
    wordings = set()
    for seed in range(600):
        rng = np.random.default_rng(seed)
        findings = _random_findings(rng)
        report = write_report(findings, rng)
        wordings.add(report)
        assert _same_findings(parse_report(report), findings), (report, findings)
    assert len(wordings) > 550  # the wording varies


def test_normal_reports_state_no_finding_and_name_the_organs() -> None:
    for seed in range(100):
        report = write_report([], np.random.default_rng(seed))
        assert parse_report(report) == []
    phrases = {write_report([], np.random.default_rng(seed)).split(".")[0] for seed in range(100)}
    assert len(phrases) > 5


def test_parser_reads_model_style_wording_and_negations() -> None:
    assert parse_report("No suspicious pulmonary nodules. Kidneys: no mass or cyst.") == []
    [cyst] = parse_report("A 1.2 x 0.8 cm hypodense cyst in the inferior liver.")
    assert (cyst.organ, cyst.kind, cyst.size_mm, cyst.level, cyst.bucket) == (
        "liver",
        "cyst",
        12.0,
        "lower",
        "medium",
    )
    [nodule] = parse_report("There is a 6 mm noncalcified nodule in the left lower lobe.")
    assert (nodule.organ, nodule.side, nodule.kind, nodule.bucket) == ("lung", "left", "lung nodule", "small")
    [stone] = parse_report("Right kidney: 25 mm coarse calcification; no hydronephrosis.")
    assert (stone.site, stone.kind, stone.bucket) == ("right kidney", "calcification", "large")


def test_size_buckets_follow_the_documented_edges() -> None:
    assert [size_bucket(s) for s in (4, 9.9, 10, 20, 20.5, 40)] == [
        "small",
        "small",
        "medium",
        "medium",
        "large",
        "large",
    ]
    with pytest.raises(ValueError, match="positive"):
        size_bucket(0)


def test_score_matches_one_to_one_on_organ_kind_and_size_bucket() -> None:
    truth = [
        Finding("liver", "cyst", 12.0, level="upper"),
        Finding("kidney", "solid mass", 30.0, "left", "lower"),
    ]
    perfect = score_findings([truth], [truth])
    assert (perfect["precision"], perfect["recall"], perfect["f1"]) == (1.0, 1.0, 1.0)
    twice = [Finding("liver", "cyst", 15.0), Finding("liver", "cyst", 18.0)]  # same bucket, one truth
    wrong_size = [Finding("kidney", "solid mass", 8.0, "left")]
    wrong_side = [Finding("kidney", "solid mass", 30.0, "right")]
    scores = score_findings(
        [twice, wrong_size, wrong_side, [Finding("spleen", "cyst", 5.0)]], [truth, truth, truth, []]
    )
    assert (scores["true_positives"], scores["false_positives"], scores["false_negatives"]) == (1, 4, 5)
    assert scores["precision"] == pytest.approx(1 / 5) and scores["recall"] == pytest.approx(1 / 6)
    assert scores["organ_kind_f1"] > scores["f1"]  # the wrong-size mass matches on organ and kind
    assert scores["false_finding_rate_on_normals"] == 1.0 and scores["n_normal_studies"] == 1
    clean = score_findings([[], []], [[], []])
    assert clean["f1"] == 1.0 and clean["false_finding_rate_on_normals"] == 0.0
    with_level = score_findings(
        [[Finding("liver", "cyst", 12.0, level="lower")]], [truth[:1]], with_level=True
    )
    assert with_level["true_positives"] == 0
    with pytest.raises(ValueError, match="one findings list per study"):
        score_findings([[]], [[], []])


def test_scores_from_10_mm_and_recall_per_kind_and_size() -> None:
    small = Finding("lung", "lung nodule", 6.0, "right")
    medium = Finding("liver", "cyst", 12.0)
    large = Finding("kidney", "solid mass", 30.0, "left")
    # the small nodule is missed, a small false calcification and an unsized false cyst are reported
    predicted = [[medium, Finding("spleen", "calcification", 5.0), Finding("spleen", "cyst", None)], [large]]
    scores = score_findings(predicted, [[small, medium], [large]])
    ten = scores["from_10mm"]
    assert ten["n_true"] == 2 and ten["recall"] == 1.0 and ten["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3) and scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall_by_kind"]["lung nodule"] == {"recall": 0.0, "n": 1.0}
    assert scores["recall_by_kind"]["cyst"] == {"recall": 1.0, "n": 1.0}
    assert scores["recall_by_kind"]["calcification"] == {"recall": None, "n": 0.0}
    assert scores["recall_by_size"] == {
        "small": {"recall": 0.0, "n": 1.0},
        "medium": {"recall": 1.0, "n": 1.0},
        "large": {"recall": 1.0, "n": 1.0},
    }


def test_lesions_lie_inside_their_organ_third_and_change_hu_there() -> None:
    for seed in range(4):
        rng = np.random.default_rng(seed)
        anatomy = phantom_anatomy((32, 96, 96), rng, phase="portal venous")
        findings = plan_findings(anatomy, rng, 3)
        painted = insert_lesions(anatomy, findings, rng)
        touched = np.zeros(anatomy.hu.shape, dtype=bool)
        for finding in findings:
            organ = anatomy.mask(finding_site_label(finding))
            weight = lesion_occupancy(anatomy.hu.shape, anatomy.spacing_mm, finding)
            core = weight > 0.5
            assert organ[finding.center_voxel] and organ[core].mean() > 0.95
            slices = np.flatnonzero(organ.any(axis=(1, 2)))
            height = (finding.center_voxel[0] - slices[0]) / max(slices[-1] - slices[0], 1)
            assert level_of(height) == finding.level
            difference = abs(float(painted.hu[finding.center_voxel]) - float(np.median(anatomy.hu[organ])))
            assert difference >= MIN_CONTRAST_HU
            if finding.kind == "calcification":
                assert painted.hu[finding.center_voxel] >= 300
            touched |= weight > 0
        np.testing.assert_array_equal(painted.hu[~touched], anatomy.hu[~touched])
        np.testing.assert_array_equal(painted.labels, anatomy.labels)


def test_test_pool_draws_anatomy_latents_the_train_pool_never_uses() -> None:
    def held_out(value: float) -> bool:
        return any(low <= value < high for low, high in HELD_OUT_BANDS)

    rng = np.random.default_rng(0)
    train = np.array([sample_anatomy_latents(rng, "train") for _ in range(300)])
    test = np.array([sample_anatomy_latents(rng, "test") for _ in range(300)])
    assert not any(held_out(v) for v in train.ravel()) and all(held_out(v) for v in test.ravel())
    assert train.min() < 0.1 and train.max() > 0.9  # train still spans the range around the bands


def test_questions_have_four_choices_and_a_consistent_answer() -> None:
    for seed in range(60):
        rng = np.random.default_rng(seed)
        findings = _random_findings(rng)
        rows = make_questions(findings, rng, phase="arterial", max_questions=50)
        assert {row["Question Type"] for row in rows} <= {2, 3, 4, 5}
        for row in rows:
            choices = [row[f"Choice {letter}"] for letter in CHOICE_LETTERS]
            assert len(set(choices)) == 4
            assert row[f"Choice {row['Answer Choice']}"] == row["Answer"]
        count = next(row for row in rows if row["Question"].startswith("How many"))
        assert count["Answer"] == str(len(findings))
        if not findings:
            abnormal = [row["Answer"] for row in rows if row["Question"].startswith("What abnormality")]
            assert abnormal == ["no focal lesion"] * len(SITES)
        for row in rows:
            if row["Question Type"] == 3:
                assert row["Answer"] in {f.site for f in findings}


def test_build_cli_writes_m3d_files_whose_reports_parse_to_their_findings(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert (
        main(
            [
                "build",
                "--out",
                str(out),
                "--train",
                "5",
                "--val",
                "1",
                "--test",
                "2",
                "--grid",
                *map(str, GRID),
            ]
        )
        == 0
    )
    splits = read_m3d_cap(out / "M3D_Cap.json")
    assert {name: len(entries) for name, entries in splits.items()} == {
        "train": 5,
        "validation": 1,
        "test": 2,
    }
    truth = read_findings(out / "findings.jsonl")
    for name, entries in splits.items():
        assert any(not truth[e.image.removesuffix(".npy")] for e in entries), f"{name} has no normal study"
        for entry in entries:
            assert np.load(out / entry.image).shape == (1, *GRID)
            assert load_m3d_npy(out / entry.image).shape == GRID
            report = (out / entry.text).read_text(encoding="utf-8")
            assert _same_findings(parse_report(report), truth[entry.image.removesuffix(".npy")])
    for csv_name in ("M3D_VQA_train.csv", "M3D_VQA_val.csv", "M3D_VQA_test.csv"):
        records = read_m3d_vqa(out / csv_name)
        assert records and all(r.has_choices and r.choices[r.answer_choice] == r.answer for r in records)
        assert all((out / r.image_path).is_file() and r.text for r in records)
    settings = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    assert settings["config"]["grid"] == list(GRID) and settings["window_hu"] == [-160.0, 240.0]

    # Scoring a model that repeats the reference reports gives F1 1; a model that says nothing, 0.
    samples = tmp_path / "samples.csv"
    with open(samples, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=["sample_id", "task", "prediction"])
        writer.writeheader()
        for entry in splits["test"] + splits["train"]:
            text = (out / entry.text).read_text(encoding="utf-8")
            writer.writerow(
                {"sample_id": entry.image.removesuffix(".npy"), "task": "report", "prediction": text}
            )
    assert (
        main(["score", "--benchmark", str(out), "--samples", str(samples), "--out", str(tmp_path / "s.json")])
        == 0
    )
    written = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert written["f1"] == 1.0 and written["organs_out_of_view"] == {
        "rate": 0.0,
        "n": float(len(splits["test"]) + len(splits["train"])),
    }


def test_reports_naming_organs_outside_the_field_of_view_are_counted() -> None:
    assert organs_named("Both kidneys are unremarkable. No pulmonary nodule. Hepatic cyst (9 mm).") == {
        "kidney",
        "lung",
        "liver",
    }
    views = {"chest": {"lung"}, "abdomen": {"liver", "spleen", "kidney", "lung"}}
    predictions = {
        "chest": "The lungs are clear. The liver is unremarkable.",
        "abdomen": "The liver is normal.",
    }
    assert organs_out_of_view(predictions, views) == {"rate": 0.5, "n": 2.0}


def test_bad_input_is_refused_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FileNotFoundError, match="CTMLLM_CT_DIR"):
        ct_data_dir(tmp_path)
    out = tmp_path / "never"
    assert main(["build", "--out", str(out), "--real-anatomy", "--ct-dir", str(tmp_path)]) == 2
    assert "--ct-dir" in capsys.readouterr().err and not out.exists()
    assert main(["build", "--out", str(out), "--grid", "8", "32", "32"]) == 2
    assert "at least (12, 48, 48)" in capsys.readouterr().err
    assert [spec.name for spec in real_volume_specs("test")] == ["cardiac_cta_1p5mm"]
    assert "cardiac_cta_1p5mm" not in [spec.name for spec in real_volume_specs("train")]


needs_shared_ct = pytest.mark.skipif(
    not (DEFAULT_CT_DIR / "abdomen_ct_3mm_organs.nii.gz").is_file(), reason="../shared/data/ct is absent"
)


@needs_shared_ct
def test_real_abdomen_takes_lesions_inside_its_labelled_organs() -> None:
    volume = load_real_volume("abdomen_ct_3mm")
    assert volume.hu.shape == (30, 101, 122) and volume.phase == "non-contrast"
    # Columns run from the patient's right to left: the liver lies right of the spleen.
    liver_x = np.nonzero(volume.mask("liver"))[2].mean()
    assert liver_x < np.nonzero(volume.mask("spleen"))[2].mean()
    # The threshold lungs (used where no label map exists) agree with the labelled lungs.
    right, left = split_lungs(threshold_lungs(volume.hu, volume.spacing_mm))
    for found, name in ((right, "lung_right"), (left, "lung_left")):
        reference = volume.mask(name)
        assert 2 * (found & reference).sum() / (found.sum() + reference.sum()) > 0.85
    rng = np.random.default_rng(7)
    findings = plan_findings(volume, rng, 3)
    painted = insert_lesions(volume, findings, rng, texture_hu=10.0)
    for finding in findings:
        organ = volume.mask(finding_site_label(finding))
        core = lesion_occupancy(volume.hu.shape, volume.spacing_mm, finding) > 0.5
        assert organ[core].mean() > 0.95
        assert abs(painted.hu[core].mean() - np.median(volume.hu[organ])) >= MIN_CONTRAST_HU - 5
    assert not np.array_equal(painted.hu, volume.hu) and painted.labels is volume.labels
    assert set(np.unique(volume.labels)) <= set(LABELS.values())


@needs_shared_ct
def test_real_anatomy_studies_use_the_held_out_patient_for_test() -> None:
    config = BenchmarkConfig(counts={"train": 1, "test": 1}, grid=GRID, real_anatomy=True, real_fraction=1.0)
    train, test = make_study("train", 1, config), make_study("test", 1, config)
    assert train.source == "real:abdomen_ct_3mm" and test.source == "real:cardiac_cta_1p5mm"
    assert {organ for organ, _ in test.sites} == {"lung"}
    assert _same_findings(parse_report(test.report), test.findings)


def test_shifted_fields_of_view_drop_organs_and_reports_name_only_organs_in_view() -> None:
    """Framed towards the chest or the pelvis, a phantom loses kidneys or lungs; its report and its
    questions (not their distractor choices) then speak only of the organs actually imaged."""
    config = BenchmarkConfig(grid=(24, 64, 64), fov_shift_share=1.0)
    organ_words = {"kidney": ("kidney", "renal"), "lung": ("lung", "pulmonary")}
    missing_seen = set()
    for index in range(40):
        study = make_study("train", index, config)
        in_view = {organ for organ, _ in study.sites}
        for organ, words in organ_words.items():
            if organ in in_view:
                continue
            missing_seen.add(organ)
            assert not any(word in study.report.lower() for word in words), study.report
            assert all(organ not in f"{row['Question']} {row['Answer']}".lower() for row in study.questions)
            sides = [f"{organ}_left", f"{organ}_right"]
            slices = [np.flatnonzero((study.labels == LABELS[s]).any(axis=(1, 2))).size for s in sides]
            assert max(slices) < 3
    assert missing_seen == {"kidney", "lung"}
    unshifted = make_study("train", 0, BenchmarkConfig(grid=(24, 64, 64)))
    assert len(unshifted.sites) == 6
