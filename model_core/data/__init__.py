"""CT reading, checks, preprocessing and the datasets.

``read_ct`` reads NIfTI/NRRD/MHA files and DICOM series into a ``CTImage`` (HU, oriented LPS,
slice 0 inferior); ``preprocess`` turns it into the model's float32 ``(D, H, W)`` in [0, 1];
the datasets yield ``Sample`` objects from M3D-Cap, M3D-VQA, CT-RATE and a generic JSONL.
See docs/DATA.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from model_core.data.checks import check_ct, ct_intensity_verdict
from model_core.data.decision import PreparedInput, describe_input, input_settings, prepare_input
from model_core.data.dicom import DicomSeries, scan_dicom_folder
from model_core.data.dicom_write import ct_phantom, write_dicom_series
from model_core.data.errors import (
    CTInputError,
    DatasetFormatError,
    DicomSeriesError,
    EmptyVolumeError,
    InvalidValuesError,
    NotCTError,
    TooFewSlicesError,
    UnreadableVolumeError,
)
from model_core.data.formats import (
    QUESTION_TYPES,
    CapEntry,
    CTRateRecord,
    JsonlRecord,
    VQARecord,
    load_m3d_npy,
    read_ct_rate_csv,
    read_jsonl,
    read_m3d_cap,
    read_m3d_vqa,
    save_m3d_npy,
    write_jsonl,
    write_m3d_cap,
    write_m3d_vqa,
)
from model_core.data.io import DEFAULT_MAX_VOXELS, ORIENTATION, CTImage, read_ct, read_dicom_series
from model_core.data.preprocess import (
    DEFAULT_TARGET_SHAPE,
    WINDOW_PRESETS,
    PreprocessConfig,
    load_volume,
    preprocess,
)
from model_core.data.sample import Sample

_DATASETS = ("CTRateDataset", "JsonlDataset", "M3DCapDataset", "M3DVQADataset")
"""Loaded on first use: they need torch, which the Slicer module may not have installed yet."""


def __getattr__(name: str) -> Any:
    if name in _DATASETS:
        return getattr(import_module("model_core.data.datasets"), name)
    raise AttributeError(f"module 'model_core.data' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_VOXELS",
    "DEFAULT_TARGET_SHAPE",
    "ORIENTATION",
    "QUESTION_TYPES",
    "WINDOW_PRESETS",
    "CTImage",
    "CTInputError",
    "CTRateDataset",
    "CTRateRecord",
    "CapEntry",
    "DatasetFormatError",
    "DicomSeries",
    "DicomSeriesError",
    "EmptyVolumeError",
    "InvalidValuesError",
    "JsonlDataset",
    "JsonlRecord",
    "M3DCapDataset",
    "M3DVQADataset",
    "NotCTError",
    "PreparedInput",
    "PreprocessConfig",
    "Sample",
    "TooFewSlicesError",
    "UnreadableVolumeError",
    "VQARecord",
    "check_ct",
    "ct_phantom",
    "describe_input",
    "input_settings",
    "ct_intensity_verdict",
    "load_m3d_npy",
    "load_volume",
    "prepare_input",
    "preprocess",
    "read_ct",
    "read_dicom_series",
    "read_ct_rate_csv",
    "read_jsonl",
    "read_m3d_cap",
    "read_m3d_vqa",
    "save_m3d_npy",
    "scan_dicom_folder",
    "write_dicom_series",
    "write_jsonl",
    "write_m3d_cap",
    "write_m3d_vqa",
]
