"""The evaluation CLI on a tiny random model and tiny fake M3D-Cap / M3D-VQA / JSONL sets.

The model's text is gibberish: these tests check the three outputs and their structure, that
closed accuracy comes from the outputs by M3D's rule, and that a rerun gives the same numbers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ABDOMEN_CT, needs_shared_ct

from model_core import evaluate, evaluation_outputs, metrics
from model_core.data import Sample
from model_core.generation import GenerationResult

MAX_NEW_TOKENS = "4"
VQA_COLUMNS = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer", "Answer Choice"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from model_core.tiny import build_tiny_ctmllm

    folder = tmp_path_factory.mktemp("model") / "tiny-internvl"
    build_tiny_ctmllm(family="internvl").save_pretrained(folder)
    return folder


def _save_volume(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).random((1, 6, 32, 32), dtype=np.float32))  # M3D: (C, D, H, W)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory) -> Path:
    """M3D-Cap (JSON of splits, .npy + .txt per case) and M3D-VQA (CSV) in their exact layouts."""
    root = tmp_path_factory.mktemp("data")
    reports = {
        "ct_case/000001/Axial": "The liver is normal in size.",
        "ct_case/000002/Axial": "No focal lesion.",
    }
    for seed, (case, report) in enumerate(reports.items()):
        _save_volume(root / f"{case}.npy", seed)
        (root / f"{case}.txt").write_text(report, encoding="utf-8")
    entries = [{"image": f"{case}.npy", "text": f"{case}.txt"} for case in reports]
    (root / "M3D_Cap.json").write_text(
        json.dumps({"train": entries[:1], "validation": [], "test": entries}), encoding="utf-8"
    )
    with open(root / "M3D_VQA_test.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(VQA_COLUMNS)
        writer.writerow(["ct_case/000001/Axial.npy", "The liver is normal.", 1, "In which plane is this image?",
                         "Axial", "Coronal", "Sagittal", "Oblique", "Axial", "A"])  # fmt: skip
        writer.writerow(["ct_case/000002/Axial.npy", "No focal lesion.", 3, "Which organ is shown?",
                         "Liver", "Brain", "Heart", "Lung", "Liver", "A"])  # fmt: skip
    return root


def _run(model_dir: Path, data: str, task: str, out: Path, *extra: str) -> int:
    return evaluate.main(
        ["--model", str(model_dir), "--data", data, "--task", task, "--out", str(out),
         "--max-new-tokens", MAX_NEW_TOKENS, "--no-progress", *extra],
        notice=lambda _text: None,
    )  # fmt: skip


def _read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "samples.csv", newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def test_report_run_writes_three_outputs(tiny_model_dir, fake_data, tmp_path) -> None:
    out = tmp_path / "cap"
    assert _run(tiny_model_dir, f"{fake_data / 'M3D_Cap.json'}:test", "report", out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "samples.csv",
        "summary.json",
        "summary.md",
    ]  # no temp files

    rows = _read_rows(out)
    assert list(rows[0]) == list(evaluation_outputs.CSV_COLUMNS)
    assert [row["sample_id"] for row in rows] == ["ct_case/000001/Axial", "ct_case/000002/Axial"]
    assert [row["reference"] for row in rows] == ["The liver is normal in size.", "No focal lesion."]
    for row in rows:  # each metric of each sample, recomputed from the written texts
        assert float(row["bleu1"]) == pytest.approx(metrics.bleu1(row["reference"], row["prediction"]))
        assert float(row["rouge1"]) == pytest.approx(metrics.rouge1(row["reference"], row["prediction"]))
        assert 0.0 <= float(row["bertscore_f1"]) <= 1.0 and row["correct"] == ""

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["task"] == "report" and summary["model"]["id"] == "tiny-internvl"
    assert summary["counts"] == {"samples": 2, "text_scored": 2, "closed": 0}
    assert summary["decoding"] == {"strategy": "greedy", "do_sample": False, "max_new_tokens": 4, "seed": 42}
    assert summary["data"]["format"] == "m3d-cap" and summary["data"]["split"] == "test"
    assert summary["metrics"]["bleu1"] == pytest.approx(np.mean([float(r["bleu1"]) for r in rows]))
    assert set(metrics.TEXT_METRICS) < set(summary["metrics"]) and summary["closed_accuracy"] is None
    assert summary["bertscore_model"].startswith(metrics.MINILM_NAME)
    assert set(summary["metric_definitions"]) >= set(metrics.TEXT_METRICS)
    table = (out / "summary.md").read_text(encoding="utf-8")
    assert "| BLEU-1 (M3D's BLEU) |" in table and f"BERTScore F1 ({summary['bertscore_model']})" in table


def test_vqa_run_scores_closed_by_letter_and_reruns_identically(tiny_model_dir, fake_data, tmp_path) -> None:
    data = str(fake_data / "M3D_VQA_test.csv")
    first, second = tmp_path / "first", tmp_path / "second"
    assert _run(tiny_model_dir, data, "vqa", first, "--no-bertscore") == 0

    rows = _read_rows(first)
    closed = [row for row in rows if row["closed"] == "True"]
    assert [row["sample_id"] for row in rows] == ["0-closed", "0-open", "1-closed", "1-open"]
    assert [row["question_type"] for row in rows] == ["Plane", "Plane", "Organ", "Organ"]
    assert closed[0]["prompt"].endswith("Choices: A. Axial B. Coronal C. Sagittal D. Oblique")
    for row in closed:  # correct is M3D's rule applied to the written output
        assert row["correct"] == str(f"{row['answer_choice']}." in row["prediction"])
        assert row["bleu1"] == ""  # closed answers get accuracy only, as in M3D
    summary = json.loads((first / "summary.json").read_text(encoding="utf-8"))
    expected = sum(row["correct"] == "True" for row in closed) / len(closed)
    assert summary["closed_accuracy"]["accuracy"] == expected and summary["closed_accuracy"]["n"] == 2
    assert set(summary["closed_accuracy"]["per_type"]) == {"Plane", "Organ"}
    assert summary["by_question_type"]["Plane"]["open_n"] == 1 and "bertscore_f1" not in summary["metrics"]
    assert summary["skipped_metrics"] == {"bertscore_f1": "skipped (--no-bertscore)"}

    assert _run(tiny_model_dir, data, "vqa", second, "--no-bertscore") == 0
    assert (second / "samples.csv").read_text(encoding="utf-8") == (first / "samples.csv").read_text(
        encoding="utf-8"
    )
    rerun = json.loads((second / "summary.json").read_text(encoding="utf-8"))
    for key in ("metrics", "closed_accuracy", "by_question_type", "counts"):
        assert rerun[key] == summary[key]


class _ScriptedModel:
    """Stands in for CTMLLM with known answers, to check accuracy against hand-counted outputs.

    Without ``routes`` it has no task experts; with them, ``routes[prompt]`` is the expert its task
    router picks and ``answers[(prompt, expert)]`` what that expert answers."""

    model_id = "scripted"

    def __init__(self, answers: dict, routes: dict[str, str] | None = None) -> None:
        self.answers, self.routes = answers, routes
        self.calls: list[tuple[str, str | None]] = []

    def forcing_keeps_features(self, routed_expert: str | None, task: str) -> bool:
        return routed_expert is None or routed_expert == task

    def generate(self, volume, prompt, task=None, max_new_tokens=None, do_sample=None) -> GenerationResult:
        assert volume.shape == (6, 8, 8) and do_sample is False  # greedy, volume (D, H, W)
        self.calls.append((prompt, task))
        if self.routes is None:
            return GenerationResult(text=self.answers[prompt], new_tokens=3, cancelled=False, seconds=0.0)
        expert = task or self.routes[prompt]
        text = self.answers[(prompt, expert)]
        return GenerationResult(text=text, new_tokens=3, cancelled=False, seconds=0.0, expert=expert)


def test_closed_accuracy_per_question_type_from_known_outputs(tmp_path) -> None:
    volume = np.zeros((6, 8, 8), dtype=np.float32)

    def closed(prompt: str, letter: str, kind: str) -> Sample:
        meta = {"sample_id": prompt, "question_type_name": kind, "closed": True, "answer_choice": letter}
        return Sample(task="vqa", prompt=prompt, answer=f"{letter}. x", volume=volume, meta=meta)

    samples = [closed("q1", "A", "Plane"), closed("q2", "B", "Plane"), closed("q3", "C", "Organ")]
    # q1 right ("A." present), q2 wrong (letter without '.'), q3 right: Plane 1/2, Organ 1/1, all 2/3.
    model = _ScriptedModel({"q1": "A. Axial", "q2": "B", "q3": "It is C. Liver"})
    settings = evaluate.EvalSettings(task="vqa", bertscore=False, meteor=False)
    summary = evaluate.evaluate(model, samples, settings, tmp_path, progress=False)
    assert summary["closed_accuracy"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["closed_accuracy"]["per_type"] == {
        "Organ": {"accuracy": 1.0, "n": 1},
        "Plane": {"accuracy": 0.5, "n": 2},
    }
    assert "| Plane | 50.00 | 2 |" in (tmp_path / "summary.md").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="pass only 'report' samples"):
        evaluate.evaluate(model, samples, evaluate.EvalSettings(task="report", bertscore=False), tmp_path)


def test_scores_are_routed_with_the_oracle_routed_ones_beside_them(tmp_path) -> None:
    volume = np.zeros((6, 8, 8), dtype=np.float32)
    meta = {"question_type_name": "Plane", "closed": True, "answer_choice": "A"}
    samples = [
        Sample(task="vqa", prompt=p, answer="A. x", volume=volume, meta={**meta, "sample_id": p})
        for p in ("q1", "q2")
    ]
    # the router sends q2 to the report expert, which answers wrongly; the vqa expert is right on both
    model = _ScriptedModel(
        {("q1", "vqa"): "A. Axial", ("q2", "report"): "The liver.", ("q2", "vqa"): "A. Axial"},
        routes={"q1": "vqa", "q2": "report"},
    )
    settings = evaluate.EvalSettings(task="vqa", bertscore=False, meteor=False)
    summary = evaluate.evaluate(model, samples, settings, tmp_path, progress=False)
    assert summary["closed_accuracy"]["accuracy"] == 0.5  # routed: as the model runs in use
    assert summary["oracle"]["closed_accuracy"]["accuracy"] == 1.0
    assert summary["routing"]["router_accuracy"] == 0.5 and summary["routing"]["experts"] == {
        "report": 1,
        "vqa": 1,
    }
    assert summary["routing"]["oracle_generations"] == 1 and model.calls == [
        ("q1", None),
        ("q2", None),
        ("q2", "vqa"),
    ]
    rows = _read_rows(tmp_path)
    assert [(r["expert"], r["prediction"], r["oracle_prediction"]) for r in rows] == [
        ("vqa", "A. Axial", "A. Axial"),
        ("report", "The liver.", "A. Axial"),
    ]
    assert [(r["correct"], r["oracle_correct"]) for r in rows] == [("True", "True"), ("False", "True")]
    assert "| Closed-ended accuracy | 50.00 | 100.00 |" in (tmp_path / "summary.md").read_text(
        encoding="utf-8"
    )


def test_a_routed_model_runs_end_to_end(routed_model_dir, fake_data, tmp_path) -> None:
    out = tmp_path / "out"
    assert (
        _run(
            routed_model_dir, str(fake_data / "M3D_VQA_test.csv"), "vqa", out, "--no-bertscore", "--no-meteor"
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["routing"]["task_router"] and set(summary["oracle"]) == set(evaluate.ORACLE_KEYS)
    rows = _read_rows(out)
    assert {row["expert"] for row in rows} <= {"report", "vqa"} and all(
        row["oracle_prediction"] for row in rows
    )
    routed = [row for row in rows if row["expert"] == "vqa"]  # the router agreed: one text for both
    assert all(row["oracle_prediction"] == row["prediction"] for row in routed)


@needs_shared_ct
def test_ct_files_are_prepared_as_the_model_was_trained(tmp_path, monkeypatch) -> None:
    """A JSONL set of NIfTI files gets the model's recorded preprocessing, not the default grid."""
    from model_core.model import CTMLLM
    from model_core.tiny import build_tiny_ctmllm

    model = build_tiny_ctmllm("internvl", num_3d_blocks=1)
    model.config.preprocessing = {"target_shape": [6, 32, 32], "window": "lung"}
    folder = model.save_pretrained(tmp_path / "model")
    jsonl = tmp_path / "set.jsonl"
    line = {"volume": str(ABDOMEN_CT), "task": "report", "answer": "Normal liver.", "id": "a"}
    jsonl.write_text(json.dumps(line) + "\n", encoding="utf-8")
    shapes: list[tuple[int, ...]] = []
    generate = CTMLLM.generate
    monkeypatch.setattr(
        CTMLLM,
        "generate",
        lambda self, volume, *a, **k: shapes.append(volume.shape) or generate(self, volume, *a, **k),
    )
    assert _run(folder, str(jsonl), "report", tmp_path / "out", "--no-bertscore", "--no-meteor") == 0
    assert shapes == [(6, 32, 32)]  # the default would be (32, 256, 256) in the wide window
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert summary["preprocessing"]["window"] == "lung" and summary["preprocessing"]["target_shape"] == [
        6,
        32,
        32,
    ]


def test_jsonl_report_with_limit(tiny_model_dir, fake_data, tmp_path) -> None:
    lines = [
        {
            "volume": str(fake_data / "ct_case/000001/Axial.npy"),
            "task": "report",
            "answer": "Normal liver.",
            "id": "a",
        },
        {
            "volume": str(fake_data / "ct_case/000002/Axial.npy"),
            "task": "vqa",
            "prompt": "Organ?",
            "answer": "liver",
        },
        {
            "volume": str(fake_data / "ct_case/000002/Axial.npy"),
            "task": "report",
            "answer": "No lesion.",
            "id": "b",
        },
    ]
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out"
    assert _run(tiny_model_dir, str(jsonl), "report", out, "--no-bertscore", "--limit", "1") == 0
    assert [row["sample_id"] for row in _read_rows(out)] == ["a"]


def test_bad_inputs_fail_early_with_the_fix(tiny_model_dir, fake_data, tmp_path, monkeypatch) -> None:
    messages: list[str] = []
    cap = f"{fake_data / 'M3D_Cap.json'}:test"
    args = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--no-progress"]
    assert evaluate.main([*args, "--data", cap, "--task", "vqa"], notice=messages.append) == 2
    assert "no 'vqa' samples" in messages[-1] and "--task" in messages[-1]
    assert evaluate.main([*args, "--data", f"{fake_data / 'M3D_Cap.json'}:nosuch", "--task", "report"],
                         notice=messages.append) == 2  # fmt: skip
    assert "nosuch" in messages[-1]
    assert (
        evaluate.main([*args, "--data", str(tmp_path / "x.txt"), "--task", "report"], notice=messages.append)
        == 2
    )
    assert ".jsonl" in messages[-1]
    # WordNet missing: refused before any generation, nothing written, the fix named.
    monkeypatch.setattr(
        metrics, "meteor_available", lambda: "METEOR needs WordNet: apt-get install wordnet-base"
    )
    assert evaluate.main([*args, "--data", cap, "--task", "report"], notice=messages.append) == 2
    assert "wordnet-base" in messages[-1] and not (tmp_path / "x").exists()


def test_parse_data_spec(tmp_path) -> None:
    (tmp_path / "cap.json").write_text("{}", encoding="utf-8")
    assert evaluate.parse_data_spec(f"{tmp_path / 'cap.json'}:validation").split == "validation"
    assert evaluate.parse_data_spec(str(tmp_path / "cap.json")).split == "test"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.parse_data_spec(str(tmp_path / "missing.csv"))
