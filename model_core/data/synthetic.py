"""A synthetic dataset of small CT-like volumes with report and question samples.

Enough to exercise training end to end without any file: each volume is a soft-tissue ellipse in
air with at most one lesion (a hypodense cyst or a bright calcification) in one quadrant, and its
report and answers are written from those facts, so a model can actually learn them. Everything
is drawn from ``numpy.random.default_rng((seed, index))``: item ``i`` is the same on every call,
in every process and every run. Sides follow the radiological convention of LPS volumes: the
patient's right is the low column index.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

from model_core.data.sample import Sample
from model_core.prompts import CHOICE_LETTERS, DEFAULT_REPORT_PROMPT, closed_target, format_closed_question

REPORT_PROMPTS: tuple[str, ...] = (
    DEFAULT_REPORT_PROMPT,
    "Describe the findings of this CT scan.",
    "Write the report for this CT.",
)
LESION_KINDS: dict[str, tuple[str, float]] = {
    "cyst": ("hypodense cyst", 0.1),
    "calcification": ("calcification", 0.95),
}
BODY_VALUE = 0.45


@dataclass(frozen=True)
class SyntheticFinding:
    """The facts one synthetic volume is built from (``kind`` None: no lesion)."""

    kind: str | None
    side: str  # "right" | "left"
    level: str  # "upper" | "lower"
    size_mm: int


class SyntheticCTDataset(Dataset):
    """``num_samples`` samples of shape ``shape`` ``(D, H, W)``, float32 in [0, 1].

    A fraction ``vqa_fraction`` of the items are questions (task ``vqa``; half closed-ended in
    M3D-VQA's format), the rest reports. ``meta`` has ``sample_id``, ``findings`` (a ``SyntheticFinding`` as a dict) and, for questions,
    ``question_type_name``, ``closed`` and, when closed, ``choices`` and ``answer_choice``.
    """

    def __init__(
        self,
        num_samples: int = 64,
        shape: tuple[int, int, int] = (9, 32, 32),
        seed: int = 0,
        vqa_fraction: float = 0.5,
    ) -> None:
        shape = tuple(int(s) for s in shape)
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: use at least 1")
        if len(shape) != 3 or shape[0] < 3 or min(shape[1:]) < 8:
            raise ValueError(f"shape={shape}: use (D, H, W) with D >= 3 slices and H, W >= 8 pixels")
        if not 0.0 <= vqa_fraction <= 1.0:
            raise ValueError(f"vqa_fraction={vqa_fraction}: use a value in [0, 1]")
        self.num_samples, self.shape, self.seed, self.vqa_fraction = num_samples, shape, seed, vqa_fraction

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} outside 0..{self.num_samples - 1}")
        rng = np.random.default_rng((self.seed, index))
        finding = SyntheticFinding(
            kind=rng.choice([None, "cyst", "calcification"], p=[0.2, 0.4, 0.4]),
            side=str(rng.choice(["right", "left"])),
            level=str(rng.choice(["upper", "lower"])),
            size_mm=int(rng.integers(5, 30)),
        )
        volume = render_volume(finding, self.shape, rng)
        meta = {"sample_id": f"synthetic-{self.seed}-{index:05d}", "findings": dataclasses.asdict(finding)}
        if rng.random() < self.vqa_fraction:
            prompt, answer, question_meta = ask_question(finding, rng)
            return Sample("vqa", prompt, answer, volume=volume, meta={**meta, **question_meta})
        prompt = REPORT_PROMPTS[int(rng.integers(len(REPORT_PROMPTS)))]
        return Sample("report", prompt, write_report(finding), volume=volume, meta=meta)


def render_volume(
    finding: SyntheticFinding, shape: tuple[int, int, int], rng: np.random.Generator
) -> np.ndarray:
    """An air background, a body ellipse and the lesion (a ball in its quadrant), plus noise."""
    depth, height, width = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, depth), np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij"
    )
    volume = np.where((y / 0.85) ** 2 + (x / 0.9) ** 2 <= 1.0, BODY_VALUE, 0.02)
    if finding.kind is not None:
        centre_x = -0.45 if finding.side == "right" else 0.45
        centre_y = -0.4 if finding.level == "upper" else 0.4
        radius = 0.15 + 0.2 * (finding.size_mm - 5) / 25
        ball = (x - centre_x) ** 2 + (y - centre_y) ** 2 + (z * 0.6) ** 2 <= radius**2
        volume = np.where(ball, LESION_KINDS[finding.kind][1], volume)
    volume = volume + rng.normal(0.0, 0.02, size=shape)
    return np.clip(volume, 0.0, 1.0).astype(np.float32)


def write_report(finding: SyntheticFinding) -> str:
    if finding.kind is None:
        return "No focal lesion. The findings are unremarkable."
    name = LESION_KINDS[finding.kind][0]
    return f"A {finding.size_mm} mm {name} in the {finding.level} {finding.side} abdomen."


def ask_question(finding: SyntheticFinding, rng: np.random.Generator) -> tuple[str, str, dict]:
    """One question about ``finding``: (prompt, answer, meta); closed-ended half of the time."""
    if finding.kind is None:
        question, answer, options, kind = "Is there a lesion?", "no", ["yes", "no"], "Abnormality"
    elif rng.random() < 0.5:
        question, answer, kind = "Where is the lesion located?", f"{finding.level} {finding.side}", "Location"
        options = ["upper right", "upper left", "lower right", "lower left"]
    else:
        question, answer, kind = "What kind of lesion is there?", finding.kind, "Abnormality"
        options = list(LESION_KINDS)
    meta: dict = {"question_type_name": kind, "closed": bool(rng.random() < 0.5)}
    if not meta["closed"]:
        return question, answer, meta
    order = rng.permutation(len(options))
    choices = {CHOICE_LETTERS[i]: options[j] for i, j in enumerate(order)}
    letter = next(letter for letter, text in choices.items() if text == answer)
    meta.update(choices=choices, answer_choice=letter)
    return format_closed_question(question, choices), closed_target(letter, answer), meta
