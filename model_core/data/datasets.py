"""Datasets of ``Sample`` objects for training and evaluation, one per file format.

Volumes load lazily: a sample carries ``volume_loader`` (a picklable ``functools.partial``, so
samples cross ``DataLoader`` worker processes) and ``Sample.load_volume()`` reads the file when
the batch is built. Every volume comes out as float32 ``(D, H, W)`` in [0, 1]: M3D ``.npy``
files as stored (channel axis dropped), CT files through ``model_core.data.preprocess``.

``meta`` keys: ``sample_id`` (all); ``split`` and ``image`` (M3D-Cap); ``row``, ``image``,
``question_type`` (1..5), ``question_type_name`` (Plane, Phase, Organ, Abnormality, Location),
``choices`` (letter -> text), ``answer_choice`` (letter), ``closed`` (bool) and ``report`` (the
row's Text) (M3D-VQA); ``volume``, ``findings``, ``impression`` (CT-RATE); ``volume`` and the
line's extra keys (JSONL).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from model_core.data.errors import DatasetFormatError
from model_core.data.formats import (
    CTRateRecord,
    VQARecord,
    load_m3d_npy,
    read_ct_rate_csv,
    read_jsonl,
    read_m3d_cap,
    read_m3d_vqa,
)
from model_core.data.preprocess import PreprocessConfig, load_volume
from model_core.data.sample import Sample
from model_core.prompts import DEFAULT_REPORT_PROMPT, closed_target, format_closed_question

VQA_MODES: tuple[str, ...] = ("closed", "open", "both")

CT_VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def load_preprocessed(path: str | os.PathLike, config: PreprocessConfig) -> np.ndarray:
    """Read and preprocess one CT file or DICOM folder: float32 ``(D, H, W)`` in [0, 1]."""
    return load_volume(path, config)[0]


class M3DCapDataset(Dataset):
    """Report samples from an M3D-Cap JSON split; image and text paths are relative to ``image_root``.

    ``image_root`` defaults to the JSON's folder. Each item: task ``report``, ``prompt``, the
    ``.txt`` report as answer, the ``.npy`` volume loaded on demand.
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        split: str = "train",
        image_root: str | os.PathLike | None = None,
        prompt: str = DEFAULT_REPORT_PROMPT,
    ) -> None:
        splits = read_m3d_cap(json_path)
        if split not in splits:
            raise DatasetFormatError(f"{json_path}: has no split {split!r}; its splits are {sorted(splits)}")
        self.entries = splits[split]
        self.split = split
        self.root = Path(image_root) if image_root is not None else Path(json_path).parent
        self.prompt = prompt

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample:
        entry = self.entries[index]
        text_path = self.root / entry.text
        try:
            text = text_path.read_text(encoding="utf-8-sig").strip()
        except FileNotFoundError as error:
            raise DatasetFormatError(
                f"{text_path}: report text not found; check image_root ({self.root})"
            ) from error
        return Sample(
            task="report",
            prompt=self.prompt,
            answer=text,
            volume_loader=functools.partial(load_m3d_npy, self.root / entry.image),
            meta={"sample_id": _strip_suffix(entry.image, ".npy"), "split": self.split, "image": entry.image},
        )


class M3DVQADataset(Dataset):
    """Question samples from an M3D-VQA CSV: closed-ended, open-ended, or both per row.

    Closed: prompt = question + " Choices: A. ... D. ...", answer = "{letter}. {answer}"; open:
    the question alone, answer = Answer. ``mode="both"`` gives the closed sample of a row, then the
    open one. Rows without choices (or without a valid Answer Choice) have no closed sample.
    Image paths are relative to
    ``image_root`` (default: the CSV's folder).
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        mode: str = "closed",
    ) -> None:
        if mode not in VQA_MODES:
            raise ValueError(f"mode={mode!r}: use one of {list(VQA_MODES)}")
        self.records = read_m3d_vqa(csv_path)
        self.root = Path(image_root) if image_root is not None else Path(csv_path).parent
        self.mode = mode
        self.items: list[tuple[int, bool]] = []
        for row, record in enumerate(self.records):
            if mode != "open" and record.has_choices:
                self.items.append((row, True))
            if mode != "closed":
                self.items.append((row, False))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        row, closed = self.items[index]
        record = self.records[row]
        return Sample(
            task="vqa",
            prompt=format_closed_question(record.question, record.choices) if closed else record.question,
            answer=closed_target(record.answer_choice, record.answer) if closed else record.answer,
            volume_loader=functools.partial(load_m3d_npy, self.root / record.image_path),
            meta=_vqa_meta(record, row, closed),
        )


def _vqa_meta(record: VQARecord, row: int, closed: bool) -> dict:
    return {
        "sample_id": f"{row}-{'closed' if closed else 'open'}",
        "row": row,
        "image": record.image_path,
        "question_type": record.question_type,
        "question_type_name": record.question_type_name,
        "choices": dict(record.choices),
        "answer_choice": record.answer_choice,
        "closed": closed,
        "report": record.text,
    }


class CTRateDataset(Dataset):
    """Report samples from CT-RATE-style data: NIfTI volumes under ``volume_root`` and a report CSV.

    Volumes are found by file name anywhere under ``volume_root`` (CT-RATE nests them by case);
    rows whose volume is absent are skipped with a warning (``self.missing`` lists them). The
    answer is the findings text; volumes are read in HU and preprocessed with ``preprocess_config``.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        volume_root: str | os.PathLike,
        preprocess_config: PreprocessConfig | None = None,
        prompt: str = DEFAULT_REPORT_PROMPT,
    ) -> None:
        records = read_ct_rate_csv(csv_path)
        found = _index_volumes(Path(volume_root))
        self.items: list[tuple[CTRateRecord, Path]] = []
        self.missing: list[str] = []
        for record in records:
            path = found.get(record.volume_name) or _find_with_suffix(found, record.volume_name)
            if path is None:
                self.missing.append(record.volume_name)
            else:
                self.items.append((record, path))
        if records and not self.items:
            raise DatasetFormatError(
                f"{csv_path}: none of its {len(records)} volumes (e.g. {records[0].volume_name}) is under "
                f"{volume_root}; pass the folder that holds the NIfTI files"
            )
        if self.missing:
            warnings.warn(
                f"{csv_path}: {len(self.missing)} of {len(records)} volumes are not under {volume_root} and are "
                f"skipped (first: {self.missing[:3]})",
                stacklevel=2,
            )
        self.config = preprocess_config or PreprocessConfig()
        self.prompt = prompt

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        record, path = self.items[index]
        return Sample(
            task="report",
            prompt=self.prompt,
            answer=record.findings,
            volume_loader=functools.partial(load_preprocessed, path, self.config),
            meta={
                "sample_id": _strip_suffix(record.volume_name, *CT_VOLUME_SUFFIXES),
                "volume": str(path),
                "findings": record.findings,
                "impression": record.impression,
            },
        )


def _index_volumes(root: Path) -> dict[str, Path]:
    """File name -> path of every CT volume file under ``root`` (first found wins)."""
    if not root.is_dir():
        raise DatasetFormatError(
            f"{root}: volume folder not found; pass the folder that holds the NIfTI files"
        )
    index: dict[str, Path] = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(CT_VOLUME_SUFFIXES):
                index.setdefault(name, Path(folder) / name)
    return index


def _find_with_suffix(index: dict[str, Path], name: str) -> Path | None:
    return next((index[name + suffix] for suffix in CT_VOLUME_SUFFIXES if name + suffix in index), None)


def _strip_suffix(name: str, *suffixes: str) -> str:
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class JsonlDataset(Dataset):
    """Samples from the generic JSONL format (users' own data); volume paths relative to the file.

    A ``.npy`` volume is taken as already preprocessed (M3D layout); anything else (NIfTI, NRRD,
    MHA, a DICOM folder) is read in HU and preprocessed with ``preprocess_config``. A report line
    without ``prompt`` gets ``DEFAULT_REPORT_PROMPT``.
    """

    def __init__(self, path: str | os.PathLike, preprocess_config: PreprocessConfig | None = None) -> None:
        self.records = read_jsonl(path)
        self.root = Path(path).parent
        missing = [r.volume for r in self.records if not (self.root / r.volume).exists()]
        if missing:
            raise DatasetFormatError(
                f"{path}: {len(missing)} volume path(s) do not exist relative to {self.root} (first: {missing[:3]}); "
                "volume paths are relative to the JSONL file's folder"
            )
        self.config = preprocess_config or PreprocessConfig()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        volume = self.root / record.volume
        if volume.suffix.lower() == ".npy":
            loader = functools.partial(load_m3d_npy, volume)
        else:
            loader = functools.partial(load_preprocessed, volume, self.config)
        prompt = record.prompt or (DEFAULT_REPORT_PROMPT if record.task == "report" else "")
        return Sample(
            task=record.task,
            prompt=prompt,
            answer=record.answer,
            volume_loader=loader,
            meta={**record.meta, "sample_id": record.sample_id, "volume": str(volume)},
        )
