"""Structured findings, the benchmark's ground truth, and the finding-level score.

A study's truth is a list of ``Finding`` (organ and side, kind, size, level). Reports are written
from it and parsed back into it, so a generated report can be scored finding by finding: two
findings match when organ, side, kind and size bucket agree (optionally the level too), each truth
matched at most once.

Size buckets (by the longest diameter in whole millimetres):
``small`` < 10 mm, ``medium`` 10-20 mm, ``large`` > 20 mm.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

ORGANS: tuple[str, ...] = ("liver", "spleen", "kidney", "lung")
SIDED_ORGANS: frozenset[str] = frozenset({"kidney", "lung"})
SIDES: tuple[str, ...] = ("right", "left")
KINDS: tuple[str, ...] = ("cyst", "solid mass", "calcification", "lung nodule")
# The organ-kind pairs the generator draws; a parsed report may name others (they never match).
ORGAN_KINDS: dict[str, tuple[str, ...]] = {
    "liver": ("cyst", "solid mass", "calcification"),
    "spleen": ("cyst", "solid mass", "calcification"),
    "kidney": ("cyst", "solid mass", "calcification"),
    "lung": ("lung nodule", "calcification"),
}
# Thirds of the organ's craniocaudal extent as imaged, by the lesion centre.
LEVELS: tuple[str, ...] = ("upper", "middle", "lower")
SIZE_BUCKETS: tuple[str, ...] = ("small", "medium", "large")
MIN_SIZE_MM = 4
MAX_SIZE_MM = 40
MIN_REPORTED_SIZE_MM = 10
"""The size from which the demo model's target applies (``score_from_size``): smaller lesions are
one or two voxels at the demo's grid."""


def size_bucket(size_mm: float) -> str:
    """``small`` (< 10 mm), ``medium`` (10-20 mm) or ``large`` (> 20 mm)."""
    if size_mm <= 0:
        raise ValueError(f"size_mm={size_mm}: a lesion size must be positive")
    if size_mm < 10:
        return "small"
    return "medium" if size_mm <= 20 else "large"


@dataclass(frozen=True)
class Finding:
    """One focal lesion.

    ``size_mm`` is the longest diameter (None when a parsed report gave none), ``side`` is set
    for kidney and lung only, ``level`` is the third of the organ holding the lesion centre and
    ``center_voxel`` the centre ``(z, y, x)`` on the study's grid (None for parsed findings).
    """

    organ: str
    kind: str
    size_mm: float | None
    side: str | None = None
    level: str | None = None
    center_voxel: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.organ not in ORGANS:
            raise ValueError(f"organ={self.organ!r}: use one of {ORGANS}")
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: use one of {KINDS}")
        if self.side is not None and self.side not in SIDES:
            raise ValueError(f"side={self.side!r}: use one of {SIDES} or None")
        if self.side is not None and self.organ not in SIDED_ORGANS:
            raise ValueError(f"organ {self.organ!r} has no side; pass side=None")
        if self.level is not None and self.level not in LEVELS:
            raise ValueError(f"level={self.level!r}: use one of {LEVELS} or None")
        if self.size_mm is not None and self.size_mm <= 0:
            raise ValueError(f"size_mm={self.size_mm}: a lesion size must be positive")

    @property
    def site(self) -> str:
        """Organ with its side, as text: ``"left kidney"``, ``"liver"``."""
        return f"{self.side} {self.organ}" if self.side else self.organ

    @property
    def bucket(self) -> str | None:
        return None if self.size_mm is None else size_bucket(self.size_mm)

    def key(self, with_level: bool = False) -> tuple[str | None, ...]:
        """What scoring compares: ``(organ, side, kind, size bucket[, level])``."""
        base = (self.organ, self.side, self.kind, self.bucket)
        return (*base, self.level) if with_level else base

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["center_voxel"] = list(self.center_voxel) if self.center_voxel is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        center = data.get("center_voxel")
        return cls(
            organ=data["organ"],
            kind=data["kind"],
            size_mm=data.get("size_mm"),
            side=data.get("side"),
            level=data.get("level"),
            center_voxel=tuple(int(v) for v in center) if center is not None else None,
        )


def _match_counts(
    predicted_lists: Sequence[Sequence[Finding]],
    true_lists: Sequence[Sequence[Finding]],
    key: Callable[[Finding], Hashable],
) -> tuple[int, int, int]:
    """Micro-summed (true positives, false positives, false negatives) of one-to-one matches.

    Findings match only on equal keys, so the maximum one-to-one matching within a study is the
    multiset intersection of the two key lists.
    """
    tp = fp = fn = 0
    for predicted, true in zip(predicted_lists, true_lists, strict=True):
        matched = sum((Counter(map(key, predicted)) & Counter(map(key, true))).values())
        tp += matched
        fp += len(predicted) - matched
        fn += len(true) - matched
    return tp, fp, fn


def _precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """With nothing predicted and nothing true every score is 1; otherwise 0/0 counts as 0."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _recall_where(
    predicted_lists: Sequence[Sequence[Finding]],
    true_lists: Sequence[Sequence[Finding]],
    keep: Callable[[Finding], bool],
    with_level: bool,
) -> dict[str, float | None]:
    """Strict recall over the true findings that ``keep`` selects: ``{"recall", "n"}``."""
    matched = total = 0
    for predicted, true in zip(predicted_lists, true_lists, strict=True):
        chosen = [f.key(with_level) for f in true if keep(f)]
        matched += sum((Counter(f.key(with_level) for f in predicted) & Counter(chosen)).values())
        total += len(chosen)
    return {"recall": matched / total if total else None, "n": float(total)}


def score_from_size(
    predicted_lists: Sequence[Sequence[Finding]],
    true_lists: Sequence[Sequence[Finding]],
    min_size_mm: float = MIN_REPORTED_SIZE_MM,
    with_level: bool = False,
) -> dict[str, float]:
    """Strict precision, recall and F1 on the lesions of ``min_size_mm`` and up: true findings
    smaller than that are left out, and so are predicted findings whose stated size is smaller
    (a prediction without a size stays in, and can only be a false positive)."""
    true_kept = [[f for f in true if f.size_mm >= min_size_mm] for true in true_lists]
    predicted_kept = [
        [f for f in p if f.size_mm is None or f.size_mm >= min_size_mm] for p in predicted_lists
    ]
    tp, fp, fn = _match_counts(predicted_kept, true_kept, lambda f: f.key(with_level))
    precision, recall, f1 = _precision_recall_f1(tp, fp, fn)
    return {"precision": precision, "recall": recall, "f1": f1, "n_true": float(tp + fn)}


def false_finding_rate_on_normals(
    predicted_lists: Sequence[Sequence[Finding]], true_lists: Sequence[Sequence[Finding]]
) -> float:
    """Fraction of normal studies (no true finding) for which at least one finding was predicted."""
    flags = [bool(p) for p, t in zip(predicted_lists, true_lists, strict=True) if not t]
    return sum(flags) / len(flags) if flags else 0.0


def score_findings(
    predicted_lists: Sequence[Sequence[Finding]],
    true_lists: Sequence[Sequence[Finding]],
    with_level: bool = False,
) -> dict[str, Any]:
    """Finding-level precision, recall and F1 over studies, plus looser and normal-study views.

    ``predicted_lists[i]`` and ``true_lists[i]`` are the findings of study ``i``. The strict
    match is organ+side, kind and size bucket (and level when ``with_level``); ``organ_f1``
    matches organ+side only and ``organ_kind_f1`` organ+side and kind, to tell where a model
    fails. On normal studies ``false_finding_rate_on_normals`` is the fraction with any predicted
    finding and ``false_findings_per_normal`` the mean count. ``from_10mm`` scores lesions of
    10 mm and up (``score_from_size``); ``recall_by_kind`` and ``recall_by_size`` give the strict
    recall of each kind and size bucket (``{"recall", "n"}``; recall None where n is 0).
    """
    if len(predicted_lists) != len(true_lists):
        raise ValueError(
            f"{len(predicted_lists)} predicted studies but {len(true_lists)} true ones; "
            "pass one findings list per study to both"
        )
    tp, fp, fn = _match_counts(predicted_lists, true_lists, lambda f: f.key(with_level))
    precision, recall, f1 = _precision_recall_f1(tp, fp, fn)
    organ_f1 = _precision_recall_f1(*_match_counts(predicted_lists, true_lists, lambda f: (f.organ, f.side)))[
        2
    ]
    organ_kind_f1 = _precision_recall_f1(
        *_match_counts(predicted_lists, true_lists, lambda f: (f.organ, f.side, f.kind))
    )[2]
    normal_predictions = [len(p) for p, t in zip(predicted_lists, true_lists, strict=True) if not t]
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_positives": float(tp),
        "false_positives": float(fp),
        "false_negatives": float(fn),
        "organ_f1": organ_f1,
        "organ_kind_f1": organ_kind_f1,
        "n_studies": float(len(true_lists)),
        "n_normal_studies": float(len(normal_predictions)),
        "false_finding_rate_on_normals": false_finding_rate_on_normals(predicted_lists, true_lists),
        "false_findings_per_normal": (
            sum(normal_predictions) / len(normal_predictions) if normal_predictions else 0.0
        ),
        "from_10mm": score_from_size(predicted_lists, true_lists, MIN_REPORTED_SIZE_MM, with_level),
        "recall_by_kind": {
            kind: _recall_where(predicted_lists, true_lists, lambda f, k=kind: f.kind == k, with_level)
            for kind in KINDS
        },
        "recall_by_size": {
            bucket: _recall_where(predicted_lists, true_lists, lambda f, b=bucket: f.bucket == b, with_level)
            for bucket in SIZE_BUCKETS
        },
    }
