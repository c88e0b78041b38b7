"""Build the lesion benchmark on disk in M3D's formats, and score reports against its findings.

Why: the project needs a task it can train and score end to end without downloads. Every study
is drawn from its own seed ``(seed, split, index)``, so a build is reproducible study by study.
One build writes, under ``out``:

- ``M3D_Cap.json`` with ``train`` / ``validation`` / ``test`` lists of
  ``{"image": "<split>/<id>.npy", "text": "<split>/<id>.txt"}``; each ``.npy`` is
  ``(1, D, H, W)`` float32 in [0, 1] (HU through the project's window step), each ``.txt`` a report;
- ``M3D_VQA_train.csv``, ``M3D_VQA_val.csv``, ``M3D_VQA_test.csv`` (M3D-VQA columns);
- ``<split>/<id>_labels.npz``: the study's tissue labels (``anatomy.LABELS`` ids, ``(D, H, W)``
  uint8 under the key ``labels``), for measures that need to know which organ a voxel shows
  (``model_core.benchmark.detection``);
- ``findings.jsonl``: one line per study, its ground-truth findings and how it was made;
- ``benchmark.json``: the settings, so a build can be repeated and a model preprocessed alike.

Every ``normal_every``-th study of a split is normal. Train and validation draw phantoms from the
train anatomy pool (and the abdomen CT with ``real_anatomy``); test draws from the held-out pool
(and the cardiac CTA, another patient).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model_core.benchmark.anatomy import LABELS, LabelledVolume
from model_core.benchmark.findings import Finding, score_findings
from model_core.benchmark.lesions import insert_lesions, plan_findings
from model_core.benchmark.phantom import HELD_OUT_BANDS, phantom_anatomy, simulate_acquisition
from model_core.benchmark.real_anatomy import ct_data_dir, estimate_noise_hu, real_anatomy, real_volume_specs
from model_core.benchmark.text import make_questions, organs_named, parse_report, write_report
from model_core.data.formats import QUESTION_TYPES, VQARecord, write_m3d_cap, write_m3d_vqa
from model_core.data.preprocess import WINDOW_PRESETS, normalise, window
from model_core.data.sample import Sample
from model_core.prompts import CHOICE_LETTERS, DEFAULT_REPORT_PROMPT

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_POOL: dict[str, str] = {"train": "train", "validation": "train", "test": "test"}
CAP_JSON = "M3D_Cap.json"
VQA_FILES: dict[str, str] = {
    "train": "M3D_VQA_train.csv",
    "validation": "M3D_VQA_val.csv",
    "test": "M3D_VQA_test.csv",
}
FINDINGS_FILE = "findings.jsonl"
LABELS_SUFFIX = "_labels.npz"
SETTINGS_FILE = "benchmark.json"
FORMAT_VERSION = 2  # 2: fov_shift_share and the label files
MIN_GRID = (12, 48, 48)


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to build. ``counts``: studies per split; ``grid``: ``(D, H, W)``; ``real_fraction``:
    share of studies on real CT when ``real_anatomy``; ``window``: a ``WINDOW_PRESETS`` name;
    ``fov_shift_share``: share of phantoms framed towards the chest or the pelvis
    (``phantom.field_of_view_shift``), so that studies differ in the organs they show."""

    counts: dict[str, int] = field(default_factory=lambda: {"train": 200, "validation": 20, "test": 40})
    seed: int = 0
    grid: tuple[int, int, int] = (32, 128, 128)
    real_anatomy: bool = False
    real_fraction: float = 0.25
    normal_every: int = 4
    max_questions: int = 6
    window: str = "soft_tissue"
    ct_dir: str | None = None
    fov_shift_share: float = 0.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.counts) - set(SPLITS))
        if unknown or any(int(n) < 0 for n in self.counts.values()):
            raise ValueError(f"counts={self.counts}: give non-negative study counts for {SPLITS}")
        if len(self.grid) != 3 or self.grid[0] < MIN_GRID[0] or min(self.grid[1:]) < MIN_GRID[1]:
            raise ValueError(
                f"grid={self.grid}: give (D, H, W) of at least {MIN_GRID} (smaller grids leave no room for "
                "lesions in the organ thirds), e.g. (32, 128, 128)"
            )
        if not 0.0 <= self.real_fraction <= 1.0:
            raise ValueError(f"real_fraction={self.real_fraction}: use a share between 0 and 1")
        if self.normal_every < 1:
            raise ValueError(f"normal_every={self.normal_every}: use 1 or more (every k-th study is normal)")
        if self.window not in WINDOW_PRESETS:
            raise ValueError(f"window={self.window!r}: use one of {sorted(WINDOW_PRESETS)}")
        if not 0.0 <= self.fov_shift_share <= 1.0:
            raise ValueError(f"fov_shift_share={self.fov_shift_share}: use a share between 0 and 1")


@dataclass
class Study:
    """One generated study: the model input, its truth, report and questions.

    ``image`` is float32 ``(D, H, W)`` in [0, 1] (the windowed ``hu``, which the demo writes as a CT
    file); ``labels`` the tissue ids of ``anatomy.LABELS`` on the same grid; ``sites`` the organ
    sites in view as ``(organ, side)``; ``questions`` M3D-VQA rows without the image and text columns.
    """

    study_id: str
    split: str
    image: np.ndarray
    hu: np.ndarray
    labels: np.ndarray
    findings: list[Finding]
    report: str
    questions: list[dict[str, Any]]
    sites: list[tuple[str, str | None]]
    source: str
    phase: str | None
    spacing_mm: tuple[float, float, float]

    def manifest(self) -> dict[str, Any]:
        """The ``findings.jsonl`` line of this study."""
        return {
            "id": self.study_id,
            "split": self.split,
            "image": f"{self.study_id}.npy",
            "text": f"{self.study_id}.txt",
            "source": self.source,
            "phase": self.phase,
            "spacing_mm": [round(s, 4) for s in self.spacing_mm],
            "sites": [f"{side} {organ}" if side else organ for organ, side in self.sites],
            "findings": [f.to_dict() for f in self.findings],
        }


def study_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one study: independent of every other study, so builds can grow or run in parts."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _sites_of(volume: LabelledVolume) -> list[tuple[str, str | None]]:
    sites = []
    for name in volume.sites_in_view():
        organ, _, side = name.partition("_")
        sites.append((organ, side or None))
    return sites


def to_unit_range(hu: np.ndarray, window_name: str) -> np.ndarray:
    """The project's window step: clip HU to the preset and map it to [0, 1]; ``(D, H, W)`` float32."""
    low, high = WINDOW_PRESETS[window_name]
    return normalise(window(hu, low, high), low, high)


def make_study(split: str, index: int, config: BenchmarkConfig) -> Study:
    """Generate study ``index`` of ``split``: anatomy, lesions, acquisition, report, questions."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    rng = study_rng(config.seed, split, index)
    count = 0 if index % config.normal_every == 0 else int(rng.integers(1, 4))
    pool = SPLIT_POOL[split]
    if config.real_anatomy and rng.random() < config.real_fraction:
        specs = real_volume_specs(pool)
        anatomy = real_anatomy(specs[int(rng.integers(len(specs)))].name, config.grid, rng, config.ct_dir)
        findings = plan_findings(anatomy, rng, count)
        volume = insert_lesions(anatomy, findings, rng, texture_hu=estimate_noise_hu(anatomy))
    else:
        anatomy = phantom_anatomy(config.grid, rng, pool, fov_shift_share=config.fov_shift_share)
        findings = plan_findings(anatomy, rng, count)
        volume = simulate_acquisition(insert_lesions(anatomy, findings, rng), rng)
    sites = _sites_of(anatomy)
    return Study(
        study_id=f"{split}/{split}_{index:05d}",
        split=split,
        image=to_unit_range(volume.hu, config.window),
        hu=volume.hu,
        labels=volume.labels,
        findings=findings,
        report=write_report(findings, rng, sites),
        questions=make_questions(findings, rng, sites, volume.phase, config.max_questions),
        sites=sites,
        source=volume.source,
        phase=volume.phase,
        spacing_mm=volume.spacing_mm,
    )


def _vqa_record(study: Study, row: dict[str, Any]) -> VQARecord:
    return VQARecord(
        image_path=f"{study.study_id}.npy",
        question_type=int(row["Question Type"]),
        question=row["Question"],
        answer=row["Answer"],
        choices={letter: row[f"Choice {letter}"] for letter in CHOICE_LETTERS},
        answer_choice=row["Answer Choice"],
        text=study.report,
    )


def build_benchmark(
    out_dir: str | os.PathLike, config: BenchmarkConfig, on_progress: Callable[[str], None] | None = None
) -> dict[str, int]:
    """Write the benchmark under ``out_dir`` (see the module docstring); returns studies per split.

    Studies are generated one at a time and written at once, so memory stays at one volume.
    """
    if config.real_anatomy:
        ct_data_dir(config.ct_dir)  # fail before writing anything when the CTs are missing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, list[VQARecord]] = {split: [] for split in SPLITS}
    manifests: list[str] = []

    def samples(split: str) -> Iterator[Sample]:
        for index in range(config.counts.get(split, 0)):
            study = make_study(split, index, config)
            records[split].extend(_vqa_record(study, row) for row in study.questions)
            labels_path = out / f"{study.study_id}{LABELS_SUFFIX}"
            labels_path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(labels_path, labels=study.labels)
            manifests.append(json.dumps(study.manifest()))
            if on_progress is not None:
                on_progress(f"{study.study_id}: {study.source}, {len(study.findings)} finding(s)")
            yield Sample(
                task="report",
                prompt=DEFAULT_REPORT_PROMPT,
                answer=study.report,
                volume=study.image,
                meta={"sample_id": study.study_id},
            )

    write_m3d_cap(out, {split: samples(split) for split in SPLITS}, CAP_JSON)
    for split in SPLITS:
        write_m3d_vqa(out / VQA_FILES[split], records[split])
    (out / FINDINGS_FILE).write_text("".join(line + "\n" for line in manifests), encoding="utf-8")
    settings = {
        "format_version": FORMAT_VERSION,
        # The CT folder is machine-specific, so it is not stored.
        "config": {**asdict(config), "grid": list(config.grid), "ct_dir": None},
        "window_hu": list(WINDOW_PRESETS[config.window]),
        "orientation": "LPS: slice 0 inferior, row 0 anterior, column 0 the patient's right",
        "labels": LABELS,
        "held_out_latent_bands": [list(band) for band in HELD_OUT_BANDS],
        "question_types": {str(k): v for k, v in QUESTION_TYPES.items()},
        "size_buckets_mm": {"small": "< 10", "medium": "10-20", "large": "> 20"},
    }
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1), encoding="utf-8")
    return {split: config.counts.get(split, 0) for split in SPLITS}


def read_labels(benchmark_dir: str | os.PathLike, study_id: str) -> np.ndarray:
    """The tissue labels ``(D, H, W)`` uint8 of one study of a built benchmark (no pickle is read)."""
    path = Path(benchmark_dir) / f"{study_id}{LABELS_SUFFIX}"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: rebuild the benchmark with this version (format {FORMAT_VERSION} writes labels)"
        )
    with np.load(path, allow_pickle=False) as stored:
        return stored["labels"]


def read_organs_in_view(path: str | os.PathLike) -> dict[str, set[str]]:
    """Study id -> the organs in its field of view (``findings.jsonl``'s ``sites``, sides dropped)."""
    views = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            views[item["id"]] = {site.split()[-1] for site in item["sites"]}
    return views


def organs_out_of_view(predictions: dict[str, str], views: dict[str, set[str]]) -> dict[str, float]:
    """How often a report speaks of an organ that its study does not image: the share of reports
    naming one (``rate``), over ``n`` reports."""
    flagged = [bool(organs_named(text) - views[study]) for study, text in predictions.items()]
    return {"rate": sum(flagged) / len(flagged) if flagged else 0.0, "n": float(len(flagged))}


def read_findings(path: str | os.PathLike) -> dict[str, list[Finding]]:
    """Ground truth of a built benchmark: study id -> findings, from ``findings.jsonl``."""
    truth = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            truth[item["id"]] = [Finding.from_dict(f) for f in item["findings"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: line {number} is not a benchmark study line ({error})") from error
    return truth


def score_reports(
    predictions: dict[str, str], truth: dict[str, list[Finding]], with_level: bool = False
) -> dict[str, Any]:
    """Parse each predicted report and score it against the truth of its study id (see ``score_findings``)."""
    unknown = sorted(set(predictions) - set(truth))
    if unknown:
        raise ValueError(
            f"{len(unknown)} predicted ids (e.g. {unknown[0]!r}) are not in the benchmark's findings"
        )
    ids = sorted(predictions)
    return score_findings([parse_report(predictions[i]) for i in ids], [truth[i] for i in ids], with_level)


def score_benchmark_reports(
    benchmark_dir: str | os.PathLike, samples_csv: str | os.PathLike, with_level: bool = False
) -> dict[str, Any]:
    """What ``python -m model_core.benchmark score`` writes: the finding-level scores of the reports
    in ``samples_csv`` and ``organs_out_of_view`` (reports naming an organ their study does not image)."""
    manifest = Path(benchmark_dir) / FINDINGS_FILE
    predictions = read_report_predictions(samples_csv)
    scores = score_reports(predictions, read_findings(manifest), with_level)
    scores["organs_out_of_view"] = organs_out_of_view(predictions, read_organs_in_view(manifest))
    return scores


def read_report_predictions(samples_csv: str | os.PathLike) -> dict[str, str]:
    """Report predictions from ``model_core.evaluate``'s ``samples.csv``: sample id -> generated text."""
    with open(samples_csv, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if rows and not {"sample_id", "task", "prediction"} <= set(rows[0]):
        raise ValueError(
            f"{samples_csv}: needs columns sample_id, task, prediction (model_core.evaluate's samples.csv)"
        )
    return {row["sample_id"]: row["prediction"] for row in rows if row["task"] == "report"}
