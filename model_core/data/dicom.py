"""DICOM folders: find the series in them, pick the CT one, and write test series.

A folder (scanned recursively) may hold several series: a CT with its scout, another phase, an MR.
``scan_dicom_folder`` reads only the headers (pydicom, no pixel data) and groups the files by
SeriesInstanceUID, sorted along the slice normal; it notes what makes a series unusable (mixed
image sizes or orientations, duplicate or missing slice positions, gaps). ``select_series`` then
takes the requested UID, or the usable CT series with the most slices, and says which.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from model_core.data.errors import DicomSeriesError, NotCTError

_HEADER_TAGS = [
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "Rows",
    "Columns",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "NumberOfFrames",
]

_GAP_TOLERANCE = 1.5
"""A step between neighbouring slices above this multiple of the median step is a gap."""

_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class DicomSeries:
    """One series found in a folder: its files sorted along the slice normal, and its problems."""

    uid: str
    modality: str
    description: str
    files: list[Path]
    num_slices: int
    image_size: tuple[int, int]
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line for messages: UID, modality, description, slice count, problems."""
        described = f", '{self.description}'" if self.description else ""
        text = f"{self.uid} ({self.modality or 'no modality'}{described}, {self.num_slices} slice(s))"
        if self.problems:
            text += " [unusable: " + "; ".join(self.problems) + "]"
        return text


@dataclass
class _Header:
    uid: str
    path: Path
    modality: str
    description: str
    size: tuple[int, int]
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    frames: int


def _read_header(path: Path) -> _Header | None:
    """The header fields of one file; ``None`` for non-DICOM files and DICOM files without an image."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception:  # InvalidDicomError for other files; pydicom raises many types for damaged headers
        return None
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not uid or "Rows" not in ds or "Columns" not in ds:
        return None
    orientation = ds.get("ImageOrientationPatient")
    position = ds.get("ImagePositionPatient")
    return _Header(
        uid=uid,
        path=path,
        modality=str(ds.get("Modality", "") or ""),
        description=str(ds.get("SeriesDescription", "") or ""),
        size=(int(ds.Rows), int(ds.Columns)),
        orientation=tuple(float(v) for v in orientation) if orientation and len(orientation) == 6 else None,
        position=tuple(float(v) for v in position) if position and len(position) == 3 else None,
        frames=int(ds.get("NumberOfFrames", 1) or 1),
    )


def _dicom_files(folder: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file())
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(Path(root) / name for name in sorted(files))
    return found


def _series_problems(headers: list[_Header]) -> list[str]:
    """What makes a series unusable as one volume, in words; empty when it is fine."""
    problems = []
    sizes = Counter(h.size for h in headers)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} ({n} file(s))" for (r, c), n in sizes.most_common())
        problems.append(f"mixed image sizes {listed}")
    orientations = {tuple(np.round(h.orientation, 3)) for h in headers if h.orientation is not None}
    if len(orientations) > 1:
        problems.append(f"mixed slice orientations ({len(orientations)} different ImageOrientationPatient)")
    if len(headers) == 1:
        if headers[0].frames < 3:
            problems.append(f"a single image of {headers[0].frames} frame(s)")
        return problems
    if any(h.frames > 1 for h in headers):
        problems.append("several multi-frame files in one series")
    if any(h.position is None or h.orientation is None for h in headers):
        missing = sum(h.position is None or h.orientation is None for h in headers)
        problems.append(f"{missing} file(s) without ImagePositionPatient/ImageOrientationPatient")
        return problems
    if problems:
        return problems
    depths = np.sort([_depth(h) for h in headers])
    steps = np.diff(depths)
    duplicates = int((steps < 1e-3).sum())
    if duplicates:
        problems.append(
            f"{duplicates} file(s) repeat a slice position (duplicates, or several phases or echoes in one series)"
        )
        return problems
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > _GAP_TOLERANCE * median)
    if gaps.size:
        first = int(gaps[0])
        problems.append(
            f"slice spacing varies from {steps.min():.3g} to {steps.max():.3g} mm: {gaps.size} gap(s), the first "
            f"between slice positions {depths[first]:.1f} and {depths[first + 1]:.1f} mm (missing slices?)"
        )
    return problems


def _depth(header: _Header) -> float:
    """Position of a slice along its normal (row direction x column direction), in mm."""
    orientation = np.asarray(header.orientation)
    normal = np.cross(orientation[:3], orientation[3:])
    return float(np.dot(normal, header.position))


def scan_dicom_folder(folder: str | os.PathLike, *, recursive: bool = True) -> list[DicomSeries]:
    """Group the DICOM image files under ``folder`` by series; slices sorted by position along the normal."""
    folder = Path(folder)
    by_uid: dict[str, list[_Header]] = {}
    for path in _dicom_files(folder, recursive):
        header = _read_header(path)
        if header is not None:
            by_uid.setdefault(header.uid, []).append(header)
    series = []
    for uid, headers in sorted(by_uid.items()):
        problems = _series_problems(headers)
        if not problems and len(headers) > 1:
            headers = sorted(headers, key=_depth)
        modalities = Counter(h.modality for h in headers)
        series.append(
            DicomSeries(
                uid=uid,
                modality=modalities.most_common(1)[0][0],
                description=headers[0].description,
                files=[h.path for h in headers],
                num_slices=headers[0].frames if len(headers) == 1 else len(headers),
                image_size=headers[0].size,
                problems=problems,
            )
        )
    return series


def select_series(
    series: Sequence[DicomSeries],
    *,
    source: str,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
) -> tuple[DicomSeries, list[str]]:
    """The series to read and the warnings that say which one it is and what else was there.

    With ``series_uid`` that series (it must be usable); otherwise the usable CT series with the
    most slices, or with ``allow_non_ct`` the usable series of any modality with the most slices.
    """
    listing = "; ".join(s.summary() for s in series)
    if not series:
        raise DicomSeriesError(
            f"{source}: holds no DICOM image files; pass a folder with the .dcm files of a CT series "
            "(or one file of it), or a NIfTI/NRRD/MHA file."
        )
    if series_uid is not None:
        chosen = next((s for s in series if s.uid == series_uid), None)
        if chosen is None:
            raise DicomSeriesError(f"{source}: has no series with UID {series_uid}; found: {listing}.")
        if not chosen.usable:
            raise DicomSeriesError(f"{source}: series {chosen.summary()} cannot be read as one volume.")
        return chosen, _others_warning(source, chosen, series, reason="as requested")
    ct = [s for s in series if s.modality.upper() == "CT"]
    if not ct and not allow_non_ct:
        raise NotCTError(
            f"{source}: holds no CT series (Modality CT); found: {listing}. Pass series_uid to pick one and "
            "allow_non_ct=True to read a non-CT series."
        )
    candidates = [s for s in (ct or series) if s.usable]
    if not candidates:
        raise DicomSeriesError(
            f"{source}: no series can be read as one volume; found: {listing}. Re-export the series, or "
            "pass series_uid of a complete one."
        )
    chosen = max(candidates, key=lambda s: (s.num_slices, s.uid))
    kind = "CT series" if chosen.modality.upper() == "CT" else "series (no CT series found)"
    return chosen, _others_warning(source, chosen, series, reason=f"the {kind} with the most slices")


def _others_warning(
    source: str, chosen: DicomSeries, series: Sequence[DicomSeries], reason: str
) -> list[str]:
    others = [s for s in series if s is not chosen]
    if not others:
        return []
    also = "; ".join(s.summary() for s in others)
    return [
        f"{source}: holds {len(series)} series; read {chosen.summary()}, {reason}. Also found: {also}. "
        "Pass series_uid to read another."
    ]


def write_dicom_series(
    folder: str | os.PathLike,
    array_kji: np.ndarray,
    spacing_xyz: Sequence[float],
    origin_xyz: Sequence[float] = (0.0, 0.0, 0.0),
    direction_3x3: np.ndarray | Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
    *,
    modality: str = "CT",
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_description: str = "",
    patient_id: str | None = None,
) -> list[Path]:
    """Write an int16 volume ``(K, J, I)`` as one DICOM file per slice; returns the files.

    Geometry follows ITK: ``origin_xyz`` is the LPS position (mm) of voxel ``[0, 0, 0]``; the
    columns of ``direction_3x3`` are the LPS directions of the I, J and K axes. For tests, demos
    and exports of synthetic volumes; values are written as stored (rescale slope 1, intercept 0).
    """
    array_kji = np.asarray(array_kji)
    if array_kji.ndim != 3:
        raise ValueError(f"array_kji has shape {array_kji.shape}; pass a 3D volume (K, J, I)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(direction_3x3, dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(spacing_xyz, dtype=np.float64)
    series_uid = series_uid or pydicom.uid.generate_uid()
    study_uid = study_uid or pydicom.uid.generate_uid()
    frame_uid = pydicom.uid.generate_uid()
    patient_id = patient_id or uuid.uuid4().hex[:12]  # one patient for the whole series
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k, plane in enumerate(array_kji.astype(np.int16)):
        image = sitk.GetImageFromArray(plane)
        image.SetSpacing((float(spacing[0]), float(spacing[1])))
        position = np.asarray(origin_xyz, dtype=np.float64) + direction[:, 2] * spacing[2] * k
        tags = {
            "0008|0016": _CT_IMAGE_STORAGE,
            "0008|0018": pydicom.uid.generate_uid(),
            "0008|0060": modality,
            "0008|103e": series_description,
            "0010|0010": "Synthetic^Volume",
            "0010|0020": patient_id,
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0052": frame_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        path = folder / f"slice_{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(image)
        paths.append(path)
    return paths
