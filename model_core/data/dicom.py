"""DICOM folders as scanners and PACS export them: find the series, say how they were grouped, pick the CT.

A folder (scanned recursively; files with or without an extension, DICOMDIR layouts, other files
beside them) may hold several series: a CT with its scout, another phase, an MR.
``scan_dicom_folder`` reads only the headers (pydicom, no pixel data) and groups the image files:

- by SeriesInstanceUID when the files carry one;
- when it is empty or missing (anonymizers often blank it), by what identifies a series in
  practice: study, series number and description, modality, frame of reference, slice
  orientation and image size;
- either way, localizer scouts (ImageType LOCALIZER) and images of another orientation that
  share a series are split off, and so are acquisitions that repeat the same slice positions.

Each ``DicomSeries`` says which rule grouped it (``grouping``), is sorted along the slice normal,
and notes what makes it unusable (mixed image sizes or orientations, duplicate or missing slice
positions, gaps) and whether the gantry was tilted (slices sheared; corrected when read).
``select_series`` then takes the requested series, or the usable CT series with the most slices,
and says which.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.misc import is_dicom
from pydicom.uid import UID

from model_core.data.errors import API_NON_CT_HINT, DicomSeriesError, NotCTError

_HEADER_TAGS = [
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "AcquisitionNumber",
    "FrameOfReferenceUID",
    "ImageType",
    "Rows",
    "Columns",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "NumberOfFrames",
]

BY_UID = "SeriesInstanceUID"
BY_ATTRIBUTES = (
    "SeriesInstanceUID empty or missing: grouped by study, series number and description, modality, "
    "frame of reference, slice orientation and image size"
)
"""The two grouping rules, as ``DicomSeries.grouping`` states them."""

_GAP_TOLERANCE = 1.5
"""A step between neighbouring slices above this multiple of the median step is a gap."""

_TILT_TOLERANCE = 1e-3
"""Sideways shift per mm along the slice normal below which slices count as stacked straight."""

_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class GantryTilt:
    """How a tilted gantry sheared a series: each mm along the slice normal also moves the slice
    ``shear_per_mm`` (a vector perpendicular to ``normal``) sideways, from slice 0 at ``origin``.

    ``step_mm``: the slice spacing along the normal. All vectors in LPS mm.
    """

    angle_deg: float
    origin: tuple[float, float, float]
    normal: tuple[float, float, float]
    step_mm: float
    shear_per_mm: tuple[float, float, float]


@dataclass
class DicomSeries:
    """One series found in a folder: its files sorted along the slice normal, and its problems.

    ``uid``: the series' identifier, its SeriesInstanceUID or, when that is empty or a part was
    split off, a derived id that ``read_ct(series_uid=...)`` accepts. ``grouping``: the rule that
    grouped the files (``BY_UID`` or ``BY_ATTRIBUTES``, plus what was split off). ``notes``: what
    the reader should tell the user even when the series is fine. ``tilt``: the gantry tilt, or
    None. ``transfer_syntaxes``: the pixel encodings of its files.
    """

    uid: str
    modality: str
    description: str
    files: list[Path]
    num_slices: int
    image_size: tuple[int, int]
    problems: list[str] = field(default_factory=list)
    grouping: str = BY_UID
    notes: list[str] = field(default_factory=list)
    localizer: bool = False
    tilt: GantryTilt | None = None
    transfer_syntaxes: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def is_ct(self) -> bool:
        return self.modality.upper() == "CT"

    def summary(self) -> str:
        """One line for messages: id, modality, description, slice count, problems."""
        described = f", '{self.description}'" if self.description else ""
        scout = ", localizer" if self.localizer else ""
        text = f"{self.uid} ({self.modality or 'no modality'}{described}{scout}, {self.num_slices} slice(s))"
        if self.problems:
            text += " [unusable: " + "; ".join(self.problems) + "]"
        return text


@dataclass
class _Header:
    path: Path
    uid: str
    study: str
    number: str
    description: str
    modality: str
    acquisition: str
    frame_of_reference: str
    localizer: bool
    size: tuple[int, int]
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    frames: int
    transfer_syntax: str

    @property
    def orientation_key(self) -> tuple[float, ...] | None:
        return None if self.orientation is None else tuple(np.round(self.orientation, 3))


def looks_like_dicom(path: Path) -> bool:
    """A DICOM part-10 file (``DICM`` preamble), or a raw data set starting with group 0x0002/0x0008."""
    try:
        if is_dicom(path):
            return True
        with open(path, "rb") as stream:
            start = stream.read(4)
    except OSError:
        return False
    return start[:2] in (b"\x02\x00", b"\x08\x00")


def is_dicomdir(path: Path) -> bool:
    """True for a DICOMDIR index file (its images lie in the folders beside it)."""
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # not DICOM at all
        return False
    return str(getattr(meta.file_meta, "MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _read_header(path: Path) -> _Header | None:
    """The header fields of one file; ``None`` for non-DICOM files and DICOM files without an image."""
    if not looks_like_dicom(path):
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
        if "Rows" not in ds or "Columns" not in ds:
            return None
        orientation = ds.get("ImageOrientationPatient")
        position = ds.get("ImagePositionPatient")
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        meta = getattr(ds, "file_meta", None)
        return _Header(
            path=path,
            uid=_text(ds, "SeriesInstanceUID"),
            study=_text(ds, "StudyInstanceUID"),
            number=_text(ds, "SeriesNumber"),
            description=_text(ds, "SeriesDescription"),
            modality=_text(ds, "Modality"),
            acquisition=_text(ds, "AcquisitionNumber"),
            frame_of_reference=_text(ds, "FrameOfReferenceUID"),
            localizer="LOCALIZER" in image_type,
            size=(int(ds.Rows), int(ds.Columns)),
            orientation=tuple(float(v) for v in orientation)
            if orientation and len(orientation) == 6
            else None,
            position=tuple(float(v) for v in position) if position and len(position) == 3 else None,
            frames=int(ds.get("NumberOfFrames", 1) or 1),
            transfer_syntax=str(getattr(meta, "TransferSyntaxUID", "") or ""),
        )
    except Exception:  # pydicom raises many types for damaged or foreign files
        return None


def _dicom_files(folder: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return found


def _normal(orientation: Sequence[float]) -> np.ndarray:
    values = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(values[:3], values[3:])
    return normal / (np.linalg.norm(normal) or 1.0)


def _depth(header: _Header) -> float:
    """Position of a slice along its normal (row direction x column direction), in mm."""
    return float(np.dot(_normal(header.orientation), header.position))


def _series_problems(headers: list[_Header]) -> list[str]:
    """What makes a series unusable as one volume, in words; empty when it is fine."""
    problems = []
    sizes = Counter(h.size for h in headers)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} ({n} file(s))" for (r, c), n in sizes.most_common())
        problems.append(f"mixed image sizes {listed}")
    orientations = {h.orientation_key for h in headers if h.orientation is not None}
    if len(orientations) > 1:
        problems.append(f"mixed slice orientations ({len(orientations)} different ImageOrientationPatient)")
    if len(headers) == 1:
        if headers[0].frames < 3:
            problems.append(f"a single image of {headers[0].frames} frame(s), not a volume")
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


def _gantry_tilt(headers: list[_Header]) -> tuple[GantryTilt | None, list[str]]:
    """The shear of a sorted, usable series (None when slices stack straight), or why it is irregular."""
    normal = _normal(headers[0].orientation)
    positions = np.asarray([h.position for h in headers], dtype=np.float64)
    steps = np.diff(positions, axis=0)
    along = steps @ normal  # (n - 1,) mm along the normal
    sideways = steps - along[:, None] * normal[None, :]  # (n - 1, 3)
    per_mm = sideways / along[:, None]
    mean = per_mm.mean(axis=0)
    if float(np.abs(per_mm).max()) < _TILT_TOLERANCE:
        return None, []
    if float(np.abs(per_mm - mean).max()) > 10 * _TILT_TOLERANCE:
        return None, ["slice positions shift sideways irregularly from slice to slice (not one gantry tilt)"]
    tilt = GantryTilt(
        angle_deg=math.degrees(math.atan(float(np.linalg.norm(mean)))),
        origin=tuple(float(v) for v in positions[0]),
        normal=tuple(float(v) for v in normal),
        step_mm=float(along.mean()),
        shear_per_mm=tuple(float(v) for v in mean),
    )
    return tilt, []


def _split(headers: list[_Header], key) -> list[list[_Header]]:
    groups: dict = {}
    for header in headers:
        groups.setdefault(key(header), []).append(header)
    return list(groups.values())


def _has_duplicate_positions(headers: list[_Header]) -> bool:
    if any(h.position is None or h.orientation is None for h in headers):
        return False
    depths = np.sort([_depth(h) for h in headers])
    return bool((np.diff(depths) < 1e-3).any())


def _derived_id(kind: str, headers: list[_Header]) -> str:
    """A stable id for a group without a usable SeriesInstanceUID: from its files' names."""
    digest = hashlib.sha1("\n".join(sorted(str(h.path) for h in headers)).encode("utf-8")).hexdigest()[:10]
    number = headers[0].number or "x"
    return f"{kind}-{number}-{digest}"


def _group(headers: list[_Header]) -> list[tuple[str, str, list[str], list[_Header]]]:
    """(id, grouping rule, notes, headers) per series: by UID, or by attributes when it is blank."""
    with_uid = _split([h for h in headers if h.uid], key=lambda h: h.uid)
    without_uid = _split(
        [h for h in headers if not h.uid],
        key=lambda h: (
            h.study,
            h.number,
            h.description,
            h.modality,
            h.frame_of_reference,
            h.orientation_key,
            h.size,
            h.localizer,
        ),
    )
    groups = []
    for members in with_uid:
        groups += _split_off_scouts(members[0].uid, members)
    for members in without_uid:
        groups.append((_derived_id("no-uid", members), BY_ATTRIBUTES, [], members))
    result = []
    for uid, rule, notes, members in groups:
        result += _split_acquisitions(uid, rule, notes, members)
    return result


def _split_off_scouts(uid: str, members: list[_Header]) -> list[tuple[str, str, list[str], list[_Header]]]:
    """A series' localizer images and images of a minority orientation, as series of their own."""
    parts = _split(members, key=lambda h: (h.localizer, h.orientation_key))
    if len(parts) == 1:
        return [(uid, BY_UID, [], members)]
    main = max([p for p in parts if not p[0].localizer] or parts, key=len)
    result = [(uid, BY_UID, [], main)]
    counts: Counter = Counter()
    for part in parts:
        if part is main:
            continue
        kind = "localizer" if part[0].localizer else "other-orientation"
        counts[kind] += 1
        part_id = f"{uid}#{kind}" + (f"-{counts[kind]}" if counts[kind] > 1 else "")
        what = "localizer (scout)" if part[0].localizer else "differently oriented"
        note = (
            f"{len(part)} {what} image(s) with the same SeriesInstanceUID {uid} were split off as {part_id}"
        )
        result[0][2].append(note)
        result.append((part_id, f"{BY_UID}, split off by ImageType and orientation", [note], part))
    return result


def _split_acquisitions(
    uid: str, rule: str, notes: list[str], members: list[_Header]
) -> list[tuple[str, str, list[str], list[_Header]]]:
    """Acquisitions that repeat the same slice positions within one group, as series of their own."""
    if not _has_duplicate_positions(members):
        return [(uid, rule, notes, members)]
    parts = _split(members, key=lambda h: h.acquisition)
    if len(parts) == 1 or any(_has_duplicate_positions(p) for p in parts):
        return [(uid, rule, notes, members)]
    parts.sort(key=lambda p: (-len(p), p[0].acquisition))
    result = []
    for index, part in enumerate(parts):
        part_id = uid if index == 0 else f"{uid}#acquisition-{part[0].acquisition}"
        note = f"split into {len(parts)} acquisitions by AcquisitionNumber (they repeat the same slice positions)"
        result.append((part_id, f"{rule}, then by acquisition number", [*notes, note], part))
    return result


def scan_dicom_folder(folder: str | os.PathLike, *, recursive: bool = True) -> list[DicomSeries]:
    """The DICOM image series under ``folder``, grouped (see the module docstring) and sorted by slice position."""
    headers = [h for h in map(_read_header, _dicom_files(Path(folder), recursive)) if h is not None]
    series = [_series(uid, rule, notes, members) for uid, rule, notes, members in _group(headers)]
    return sorted(series, key=lambda s: s.uid)


def _series(uid: str, rule: str, notes: list[str], headers: list[_Header]) -> DicomSeries:
    problems = _series_problems(headers)
    tilt = None
    if not problems and len(headers) > 1:
        headers = sorted(headers, key=_depth)
        tilt, irregular = _gantry_tilt(headers)
        problems += irregular
    modalities = Counter(h.modality for h in headers)
    return DicomSeries(
        uid=uid,
        modality=modalities.most_common(1)[0][0],
        description=headers[0].description,
        files=[h.path for h in headers],
        num_slices=headers[0].frames if len(headers) == 1 else len(headers),
        image_size=headers[0].size,
        problems=problems,
        grouping=rule,
        notes=list(notes),
        localizer=all(h.localizer for h in headers),
        tilt=tilt,
        transfer_syntaxes=tuple(sorted({h.transfer_syntax for h in headers if h.transfer_syntax})),
    )


_NEWER_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}
"""Transfer syntaxes newer than the pydicom release the project pins."""


def transfer_syntax_name(uid: str) -> str:
    """``JPEG 2000 Image Compression (Lossless Only) (1.2.840.10008.1.2.4.90)`` for messages."""
    name = _NEWER_SYNTAX_NAMES.get(uid) or (UID(uid).name if uid else "")
    return f"{name} ({uid})" if name and name != uid else uid or "unknown transfer syntax"


def series_of_file(folder_series: Sequence[DicomSeries], path: Path) -> DicomSeries | None:
    """The series among ``folder_series`` that holds ``path``."""
    return next((s for s in folder_series if path in s.files), None)


def select_series(
    series: Sequence[DicomSeries],
    *,
    source: str,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
) -> tuple[DicomSeries, list[str]]:
    """The series to read and the warnings that say which one it is, how it was grouped and what else was there.

    With ``series_uid`` that series (it must be usable); otherwise the usable CT series with the
    most slices (localizers never count), or with ``allow_non_ct`` the usable series of any
    modality with the most slices. A series whose Modality is not CT is refused with
    ``NotCTError`` unless ``allow_non_ct``, whichever way it was chosen.
    """
    listing = "; ".join(s.summary() for s in series)
    if not series:
        raise DicomSeriesError(
            f"{source}: holds no DICOM image files; pass a folder with the DICOM files of a CT series "
            "(or one file of it), or a NIfTI/NRRD/MHA file."
        )
    if series_uid is not None:
        chosen = next((s for s in series if s.uid == series_uid), None)
        if chosen is None:
            raise DicomSeriesError(f"{source}: has no series with UID {series_uid}; found: {listing}.")
        if not chosen.usable:
            raise DicomSeriesError(f"{source}: series {chosen.summary()} cannot be read as one volume.")
        check_modality(chosen, source, allow_non_ct)
        return chosen, _choice_warnings(source, chosen, series, reason="as requested")
    volumes = [s for s in series if not s.localizer] or list(series)
    ct = [s for s in volumes if s.is_ct]
    if not ct and not allow_non_ct:
        raise NotCTError(
            f"{source}: holds no CT series (Modality CT); found: {listing}. To read a non-CT series, "
            f"{API_NON_CT_HINT} (and series_uid to pick one)."
        )
    candidates = [s for s in (ct or volumes) if s.usable]
    if not candidates:
        raise DicomSeriesError(
            f"{source}: no series can be read as one volume; found: {listing}. Re-export the series, or "
            "pass series_uid of a complete one."
        )
    chosen = max(candidates, key=lambda s: (s.num_slices, s.uid))
    kind = "CT series" if chosen.is_ct else "series (no CT series found)"
    return chosen, _choice_warnings(source, chosen, series, reason=f"the {kind} with the most slices")


def check_modality(chosen: DicomSeries, source: str, allow_non_ct: bool) -> None:
    """Refuse a series whose Modality is not CT, unless ``allow_non_ct``."""
    if not chosen.is_ct and not allow_non_ct:
        raise NotCTError(
            f"{source}: series {chosen.summary()} has Modality {chosen.modality or 'empty'}, not CT. If it is a "
            f"CT, or to run on it anyway, {API_NON_CT_HINT}."
        )


def series_warnings(series: DicomSeries, source: str) -> list[str]:
    """How a series' files were grouped (when not by SeriesInstanceUID alone) and what was split off it."""
    warnings = [f"{source}: series {series.uid}: {series.grouping}"] if series.grouping != BY_UID else []
    return warnings + [f"{source}: series {series.uid}: {note}" for note in series.notes]


def _choice_warnings(
    source: str, chosen: DicomSeries, series: Sequence[DicomSeries], reason: str
) -> list[str]:
    """Which series was read and why, how its files were grouped, what was skipped beside it."""
    warnings = series_warnings(chosen, source)
    others = [s for s in series if s is not chosen]
    scouts = [s for s in others if s.localizer]
    rest = [s for s in others if not s.localizer]
    if scouts:
        warnings.append(
            f"{source}: skipped {len(scouts)} localizer (scout) series: "
            + "; ".join(s.summary() for s in scouts)
        )
    if rest:
        also = "; ".join(s.summary() for s in rest)
        warnings.append(
            f"{source}: holds {len(rest) + 1} series; read {chosen.summary()}, {reason}. Also found: {also}. "
            "Pass series_uid to read another."
        )
    return warnings
