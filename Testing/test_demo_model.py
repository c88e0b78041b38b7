"""CI regression guard for the bundled demo model (``model_core/demo_model``).

A fixed held-out sample (20 test-split studies of benchmark seed ``SAMPLE_SEED`` at the model's
own grid, not the studies docs/RESULTS.md scores) is read by the model: its reports are parsed
into findings and scored, and two closed questions per study are answered. The floors sit just
below the scores measured when the model was shipped (see ``MEASURED``); a retrained model that
scores lower fails here. Skipped when no demo model is installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_core import metrics
from model_core.benchmark import BenchmarkConfig, make_study, parse_report, score_findings
from model_core.model import CONFIG_FILE, CTMLLM
from model_core.prompts import format_closed_question

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "model_core" / "demo_model"
MODEL_CARD = REPO_ROOT / "docs" / "MODEL_CARD.md"
SAMPLE_SEED = 7
STUDIES = 20
QUESTIONS_PER_STUDY = 2
REPORT_TOKENS = 120

MEASURED = {
    "closed_accuracy": 0.375,
    "finding_f1": 0.0,
    "organ_f1": 0.0,
    "report_rouge1": 0.488,
    "false_findings_on_normals": 0.0,
}
"""What the shipped model scored on this sample when it was committed (CPU, float32, greedy)."""
FLOORS = {"closed_accuracy": 0.30, "report_rouge1": 0.44}
"""Floors just below ``MEASURED``; a metric measured at 0 gets no floor (it could not fail)."""
CEILINGS = {"false_findings_on_normals": 0.2}
"""Share of the sample's 5 normal studies with any reported finding: at most 1 of 5."""

pytestmark = pytest.mark.skipif(
    not (DEMO_DIR / CONFIG_FILE).is_file(), reason="no demo model installed in model_core/demo_model"
)


@pytest.fixture(scope="module")
def model() -> CTMLLM:
    torch.set_num_threads(1)
    return CTMLLM.from_pretrained(DEMO_DIR)


def measure(model: CTMLLM) -> dict[str, float]:
    """The model's scores on the fixed sample, used as a user runs it: the task router picks the
    expert from each prompt."""
    settings = model.preprocess_config()
    config = BenchmarkConfig(seed=SAMPLE_SEED, grid=tuple(settings.target_shape), window=settings.window)
    predicted, truth, correct, reports, references, routed_right = [], [], [], [], [], []
    for index in range(STUDIES):
        study = make_study("test", index, config)
        result = model.generate(study.image, model.default_prompt("report"), max_new_tokens=REPORT_TOKENS)
        routed_right.append(result.expert == "report")
        predicted.append(parse_report(result.text))
        truth.append(study.findings)
        reports.append(result.text)
        references.append(study.report)
        for row in study.questions[:QUESTIONS_PER_STUDY]:
            choices = {letter: row[f"Choice {letter}"] for letter in "ABCD"}
            prompt = format_closed_question(row["Question"], choices)
            answer = model.generate(study.image, prompt, max_new_tokens=8)
            routed_right.append(answer.expert == "vqa")
            correct.append(metrics.closed_vqa_correct(answer.text, row["Answer Choice"]))
    scores = score_findings(predicted, truth)
    rouge1 = metrics.score_texts(references, reports, bertscore=False, meteor_score=False)["rouge1"]
    return {
        "closed_accuracy": sum(correct) / len(correct),
        "finding_f1": scores["f1"],
        "organ_f1": scores["organ_f1"],
        "report_rouge1": sum(rouge1) / len(rouge1),
        "false_findings_on_normals": scores["false_finding_rate_on_normals"],
        "router_accuracy": sum(routed_right) / len(routed_right),
    }


@pytest.fixture(scope="module")
def measured(model: CTMLLM) -> dict[str, float]:
    return measure(model)


def test_demo_model_is_the_one_its_card_describes(model: CTMLLM) -> None:
    """docs/MODEL_CARD.md is written from the shipped model's folder: input grid, window and design
    must be the model's own (the pipeline's current budget may be a newer recipe not yet shipped)."""
    settings = model.preprocess_config()
    card = MODEL_CARD.read_text(encoding="utf-8")
    assert f"`{tuple(settings.target_shape)}` volume, `{settings.window}` window" in card
    assert model.config.volume.num_3d_blocks == 2 and model.config.moe.mode == "tgh_hard"
    assert sum(f.stat().st_size for f in DEMO_DIR.iterdir() if f.is_file()) <= 30 * 1024 * 1024


@pytest.mark.parametrize("metric", sorted(FLOORS))
def test_demo_model_stays_above_its_floor(measured: dict[str, float], metric: str) -> None:
    assert measured[metric] >= FLOORS[metric], (
        f"{metric} {measured[metric]:.3f} fell below its floor {FLOORS[metric]} (measured at ship time: "
        f"{MEASURED[metric]})"
    )


@pytest.mark.parametrize("metric", sorted(CEILINGS))
def test_demo_model_stays_below_its_ceiling(measured: dict[str, float], metric: str) -> None:
    assert measured[metric] <= CEILINGS[metric], (
        f"{metric} {measured[metric]:.3f} rose above its ceiling {CEILINGS[metric]} (measured at ship time: "
        f"{MEASURED[metric]})"
    )


if __name__ == "__main__":  # what to write into MEASURED when a new demo model is shipped
    torch.set_num_threads(1)
    print(measure(CTMLLM.from_pretrained(DEMO_DIR)))
