"""The dataset file formats, read and written unchanged: M3D-Cap, M3D-VQA, CT-RATE, generic JSONL.

- M3D-Cap: a JSON object with ``train`` / ``validation`` / ``test`` lists of
  ``{"image": "<id>.npy", "text": "<id>.txt"}``, paths relative to the data root; each ``.npy``
  holds ``(1, 32, 256, 256)`` float in [0, 1] (C, D, H, W); each ``.txt`` the report.
- M3D-VQA: CSVs with the columns ``M3D_VQA_COLUMNS``; ``Question Type`` 1..5 (``QUESTION_TYPES``).
- CT-RATE: NIfTI volumes and a CSV with ``VolumeName``, ``Findings_EN`` and ``Impressions_EN``.
- JSONL: one JSON object per line with ``volume`` (a path relative to the file), ``task``
  (``report`` or ``vqa``), ``prompt``, ``answer``; optional ``id`` and any other keys (kept as meta).

Readers and writers here are pure file handling; ``model_core.data.datasets`` turns records into
``Sample`` objects. ``.npy`` files are always loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model_core.config import TASKS
from model_core.data.errors import DatasetFormatError
from model_core.data.sample import Sample
from model_core.prompts import CHOICE_LETTERS

M3D_CAP_SPLITS: tuple[str, ...] = ("train", "validation", "test")

M3D_VQA_COLUMNS: tuple[str, ...] = (
    "Image Path",
    "Text",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
)

QUESTION_TYPES: dict[int, str] = {1: "Plane", 2: "Phase", 3: "Organ", 4: "Abnormality", 5: "Location"}
"""M3D-VQA's question types, by the number its CSVs store."""

CT_RATE_COLUMNS: dict[str, tuple[str, ...]] = {
    "volume": ("VolumeName", "volume_name", "volume"),
    "findings": ("Findings_EN", "findings"),
    "impression": ("Impressions_EN", "impressions", "impression"),
}
"""Accepted column names (case-insensitive) of a CT-RATE-style report CSV; impressions are optional."""


# --- M3D .npy volumes ---------------------------------------------------------------------------


def load_m3d_npy(path: str | os.PathLike) -> np.ndarray:
    """An M3D volume file as float32 ``(D, H, W)`` in [0, 1]; the leading channel axis is dropped."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError as error:
        raise DatasetFormatError(f"{path}: volume file not found; check the dataset's image root") from error
    except ValueError as error:
        raise DatasetFormatError(
            f"{path}: is not a plain numeric .npy array ({error}); pickled object arrays are never loaded. "
            "Save volumes with np.save of a float array."
        ) from error
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise DatasetFormatError(
            f"{path}: holds shape {array.shape}; an M3D volume is (1, D, H, W) or (D, H, W), e.g. (1, 32, 256, 256)"
        )
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DatasetFormatError(f"{path}: holds dtype {array.dtype}; an M3D volume is float in [0, 1]")
    array = array.astype(np.float32, copy=False)
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < -1e-3 or high > 1 + 1e-3:
        raise DatasetFormatError(
            f"{path}: values span {low:.4g} to {high:.4g}; an M3D volume is preprocessed to [0, 1] "
            "(see model_core.data.preprocess)"
        )
    return np.clip(array, 0.0, 1.0)


def save_m3d_npy(path: str | os.PathLike, volume: np.ndarray) -> Path:
    """Write ``volume`` ``(D, H, W)`` or ``(1, D, H, W)`` in [0, 1] as M3D's ``(1, D, H, W)`` float32."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim == 3:
        volume = volume[None]
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"volume has shape {volume.shape}; pass (D, H, W) or (1, D, H, W)")
    if volume.size == 0 or not np.isfinite(volume).all() or volume.min() < 0 or volume.max() > 1:
        raise ValueError(
            "volume must hold finite values in [0, 1]; preprocess it first (model_core.data.preprocess)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, volume, allow_pickle=False)
    return path


# --- M3D-Cap --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapEntry:
    """One M3D-Cap item as the JSON lists it: paths relative to the data root."""

    image: str
    text: str


def read_m3d_cap(json_path: str | os.PathLike) -> dict[str, list[CapEntry]]:
    """The splits of an M3D-Cap JSON: split name -> entries (``image``/``text`` paths)."""
    data = _load_json(Path(json_path))
    if not isinstance(data, dict) or not data:
        raise DatasetFormatError(
            f"{json_path}: an M3D-Cap JSON is an object of splits {list(M3D_CAP_SPLITS)}"
        )
    splits = {}
    for split, items in data.items():
        if not isinstance(items, list):
            raise DatasetFormatError(
                f"{json_path}: split {split!r} is a {type(items).__name__}; expected a list"
            )
        entries = []
        for index, item in enumerate(items):
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("image"), str)
                or not isinstance(item.get("text"), str)
            ):
                raise DatasetFormatError(
                    f"{json_path}: {split}[{index}] is {item!r}; each entry is "
                    '{"image": "<path>.npy", "text": "<path>.txt"}'
                )
            entries.append(CapEntry(image=item["image"], text=item["text"]))
        splits[split] = entries
    return splits


def write_m3d_cap(
    root: str | os.PathLike,
    splits: Mapping[str, Iterable[Sample]],
    json_name: str = "M3D_Cap.json",
) -> Path:
    """Write report samples as M3D-Cap under ``root``: ``<id>.npy``, ``<id>.txt`` and the JSON.

    Each sample's ``meta["sample_id"]`` (a relative path without extension, e.g. ``case_01/axial``)
    names its files; ``answer`` is the report text; ``load_volume()`` gives ``(D, H, W)`` in [0, 1].
    """
    root = Path(root)
    listing: dict[str, list[dict[str, str]]] = {}
    for split, samples in splits.items():
        listing[split] = []
        for sample in samples:
            sample_id = str(sample.meta.get("sample_id", "")).strip("/")
            if not sample_id or ".." in Path(sample_id).parts:
                raise ValueError(
                    f"sample {sample_id!r}: meta['sample_id'] must be a relative path, e.g. 'case_01/axial'"
                )
            save_m3d_npy(root / f"{sample_id}.npy", sample.load_volume())
            (root / f"{sample_id}.txt").write_text(sample.answer, encoding="utf-8")
            listing[split].append({"image": f"{sample_id}.npy", "text": f"{sample_id}.txt"})
    json_path = root / json_name
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(listing, indent=1), encoding="utf-8")
    return json_path


# --- M3D-VQA --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQARecord:
    """One M3D-VQA row: a question on a volume, with up to four choices and the right one."""

    image_path: str
    question_type: int
    question: str
    answer: str
    choices: dict[str, str] = field(default_factory=dict)
    answer_choice: str = ""
    text: str = ""

    @property
    def question_type_name(self) -> str:
        return QUESTION_TYPES.get(self.question_type, f"type {self.question_type}")

    @property
    def has_choices(self) -> bool:
        """Whether the row can be asked closed-ended (choices and the right letter present)."""
        return bool(self.choices) and self.answer_choice in self.choices


def read_m3d_vqa(csv_path: str | os.PathLike) -> list[VQARecord]:
    """The rows of an M3D-VQA CSV; extra columns are ignored, missing ones are an error."""
    _, rows = _read_csv(Path(csv_path), required=M3D_VQA_COLUMNS)
    records = []
    for line, row in rows:
        try:
            question_type = int(float(row["Question Type"]))
        except ValueError as error:
            raise DatasetFormatError(
                f"{csv_path}: line {line}: Question Type {row['Question Type']!r} is not a number 1..5"
            ) from error
        choices = {
            letter: row[f"Choice {letter}"] for letter in CHOICE_LETTERS if row[f"Choice {letter}"] != ""
        }
        records.append(
            VQARecord(
                image_path=row["Image Path"],
                question_type=question_type,
                question=row["Question"],
                answer=row["Answer"],
                choices=choices,
                answer_choice=row["Answer Choice"].strip(),
                text=row["Text"],
            )
        )
    return records


def write_m3d_vqa(csv_path: str | os.PathLike, records: Iterable[VQARecord]) -> Path:
    """Write records as an M3D-VQA CSV (the columns ``M3D_VQA_COLUMNS``, in that order)."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(M3D_VQA_COLUMNS)
        for r in records:
            choices = [r.choices.get(letter, "") for letter in CHOICE_LETTERS]
            writer.writerow(
                [r.image_path, r.text, r.question_type, r.question, *choices, r.answer, r.answer_choice]
            )
    return csv_path


# --- CT-RATE --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CTRateRecord:
    """One CT-RATE report row: the volume file name and its findings and impression."""

    volume_name: str
    findings: str
    impression: str = ""


def read_ct_rate_csv(csv_path: str | os.PathLike) -> list[CTRateRecord]:
    """The rows of a CT-RATE-style report CSV (see ``CT_RATE_COLUMNS``)."""
    csv_path = Path(csv_path)
    header, rows = _read_csv(csv_path, required=())
    columns = {key: _find_column(header, names) for key, names in CT_RATE_COLUMNS.items()}
    for key in ("volume", "findings"):
        if columns[key] is None:
            raise DatasetFormatError(
                f"{csv_path}: has no {key} column (one of {list(CT_RATE_COLUMNS[key])}); found {list(header)}"
            )
    return [
        CTRateRecord(
            volume_name=row[columns["volume"]],
            findings=row[columns["findings"]],
            impression=row[columns["impression"]] if columns["impression"] else "",
        )
        for _, row in rows
    ]


def _find_column(header: Iterable[str], names: Sequence[str]) -> str | None:
    lowered = {column.strip().lower(): column for column in header}
    return next((lowered[name.lower()] for name in names if name.lower() in lowered), None)


# --- generic JSONL --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JsonlRecord:
    """One line of the generic JSONL format; ``meta`` holds every other key of the line."""

    volume: str
    task: str
    prompt: str
    answer: str
    sample_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


_JSONL_KEYS = ("volume", "task", "prompt", "answer", "id")


def read_jsonl(path: str | os.PathLike) -> list[JsonlRecord]:
    """The records of a JSONL file; a report line may leave out ``prompt`` (the default is used later)."""
    path = Path(path)
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetFormatError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
        if not isinstance(item, dict):
            raise DatasetFormatError(
                f"{path}: line {number} is a {type(item).__name__}; each line is a JSON object"
            )
        task = item.get("task")
        missing = [key for key in ("volume", "task", "answer") if not isinstance(item.get(key), str)]
        if task == "vqa" and not isinstance(item.get("prompt"), str):
            missing.append("prompt")
        if missing:
            raise DatasetFormatError(
                f"{path}: line {number} lacks string field(s) {missing}; each line holds volume, task, prompt, answer"
            )
        if task not in TASKS:
            raise DatasetFormatError(f"{path}: line {number}: task {task!r}; use one of {list(TASKS)}")
        records.append(
            JsonlRecord(
                volume=item["volume"],
                task=task,
                prompt=item.get("prompt") or "",
                answer=item["answer"],
                sample_id=str(item.get("id", f"{path.stem}:{number}")),
                meta={key: value for key, value in item.items() if key not in _JSONL_KEYS},
            )
        )
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[JsonlRecord]) -> Path:
    """Write records as JSONL, one object per line (``meta`` keys beside the fixed ones)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in records:
        item = {"volume": r.volume, "task": r.task, "prompt": r.prompt, "answer": r.answer}
        if r.sample_id:
            item["id"] = r.sample_id
        item.update(r.meta)
        lines.append(json.dumps(item, ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- shared file helpers --------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as error:
        raise DatasetFormatError(f"{path}: not found; check the dataset path") from error
    except UnicodeDecodeError as error:
        raise DatasetFormatError(f"{path}: is not UTF-8 text ({error.reason})") from error


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{path}: is not valid JSON (line {error.lineno}: {error.msg})") from error


def _read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the rows as (line number, column -> text); raises if a ``required`` column is missing.

    Quoted fields may span lines (reports often do).
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            header = list(reader.fieldnames or [])
            missing = [column for column in required if column not in header]
            if missing:
                raise DatasetFormatError(
                    f"{path}: lacks column(s) {missing}; found {header}; expected {list(required)}"
                )
            rows = [
                (reader.line_num, {k: (v or "") for k, v in row.items() if k is not None}) for row in reader
            ]
    except FileNotFoundError as error:
        raise DatasetFormatError(f"{path}: not found; check the dataset path") from error
    except (UnicodeDecodeError, csv.Error) as error:
        raise DatasetFormatError(f"{path}: is not a readable UTF-8 CSV ({error})") from error
    return header, rows
