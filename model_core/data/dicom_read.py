"""The voxels of one DICOM series, as true to the patient's geometry as the headers allow.

SimpleITK's GDCM reads the files (uncompressed, JPEG 2000, JPEG lossless, RLE and JPEG-LS pixels
alike); when it cannot decode a compressed transfer syntax, pydicom tries with whatever decoder
plugins are installed (``pylibjpeg`` and its OpenJPEG, libjpeg and RLE plugins: the project's
``dicom`` extra); when neither can, the error names the transfer syntax and what to install.

A series acquired with a tilted gantry has slices that advance along the table, not along their
own normal: read as a stack, the volume is sheared (each slice shifted sideways a little more).
``correct_gantry_tilt`` resamples it onto an orthogonal grid where every voxel sits where the
headers say it was, and the reader says so in its warnings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from model_core.data.dicom import DicomSeries, GantryTilt, transfer_syntax_name
from model_core.data.errors import UnreadableVolumeError
from model_core.data.slabs import itk_reason, read_bounded

UNCOMPRESSED_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
)
"""Implicit and explicit VR (little and big endian) and deflated: native pixels every reader decodes."""

DECODER_HINT = (
    "install DICOM decoders (pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg pylibjpeg-rle, "
    "or the project's 'dicom' extra), or convert the series to uncompressed first (e.g. gdcmconv --raw)"
)


def read_series(series: DicomSeries, max_voxels: int, source: str) -> tuple[sitk.Image, list[str]]:
    """The voxels of ``series`` (its files sorted along the slice normal) and what reading them changed."""
    try:
        image, warnings = _read_with_itk(series, max_voxels, source)
    except RuntimeError as error:
        compressed = [s for s in series.transfer_syntaxes if s not in UNCOMPRESSED_SYNTAXES]
        if not compressed:
            raise _broken_files_error(series, source, error) from error
        image, warnings = _read_with_pydicom(series, source, itk_reason(error)), []
        warnings.append(
            f"{source}: series {series.uid}: SimpleITK could not decode "
            f"{', '.join(map(transfer_syntax_name, compressed))}; decoded with pydicom instead."
        )
    if series.tilt is not None:
        before = image.GetSize()
        image = correct_gantry_tilt(image, series.tilt)
        warnings.append(
            f"{source}: series {series.uid}: the gantry was tilted {series.tilt.angle_deg:.1f} degrees; the "
            f"sheared slices were resampled onto an orthogonal grid ({'x'.join(map(str, before))} -> "
            f"{'x'.join(map(str, image.GetSize()))} voxels) so that every voxel sits where it was acquired."
        )
    return image, warnings


def _read_with_itk(series: DicomSeries, max_voxels: int, source: str) -> tuple[sitk.Image, list[str]]:
    rows, columns = series.image_size
    size = (columns, rows, len(series.files))

    def read_slab(k0: int, k1: int) -> sitk.Image:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in series.files[k0:k1]])
        slab = reader.Execute()
        if series.tilt is not None:
            _unshear_geometry(slab, series.tilt, k0)
        return slab

    if math.prod(size) <= max_voxels:
        return read_slab(0, len(series.files)), []
    spacing = read_slab(0, 2).GetSpacing()  # z spacing from the first two slice positions
    return read_bounded(size, spacing, read_slab, max_voxels, source)


def _unshear_geometry(slab: sitk.Image, tilt: GantryTilt, first_slice: int) -> None:
    """Give a slab of a tilted series the geometry of its stack: slices ``step_mm`` apart along the
    normal, starting ``first_slice`` steps above slice 0 (``correct_gantry_tilt`` then adds the shear)."""
    spacing = list(slab.GetSpacing())
    spacing[2] = tilt.step_mm
    slab.SetSpacing(spacing)
    slab.SetOrigin(tuple(np.asarray(tilt.origin) + first_slice * tilt.step_mm * np.asarray(tilt.normal)))


def _broken_files_error(series: DicomSeries, source: str, error: RuntimeError) -> UnreadableVolumeError:
    broken = _unreadable_files(series.files)
    named = ", ".join(p.name for p in broken[:5]) + (" ..." if len(broken) > 5 else "")
    return UnreadableVolumeError(
        f"{source}: series {series.uid} cannot be read ({itk_reason(error)}); unreadable file(s): "
        f"{named or 'none alone'}. The series may be truncated or corrupt: export it again."
    )


def _unreadable_files(files: Sequence[Path]) -> list[Path]:
    broken = []
    for file in files:
        try:
            sitk.ReadImage(str(file))
        except RuntimeError:
            broken.append(file)
    return broken


def _read_with_pydicom(series: DicomSeries, source: str, itk_error: str) -> sitk.Image:
    """Decode every file with pydicom's plugins; geometry from the headers (as ITK would set it)."""
    from pydicom.pixels import apply_modality_lut

    planes = []
    for path in series.files:
        ds = pydicom.dcmread(path)
        try:
            pixels = ds.pixel_array
        except Exception as error:  # pydicom raises RuntimeError/NotImplementedError/ValueError per plugin
            syntax = str(ds.file_meta.TransferSyntaxUID)
            raise UnreadableVolumeError(
                f"{source}: series {series.uid}: its pixels are compressed as {transfer_syntax_name(syntax)}, "
                f"which no installed decoder reads (SimpleITK: {itk_error}; pydicom: "
                f"{str(error).splitlines()[0]}). To read it, {_decoder_hint(syntax)}."
            ) from error
        planes.append(np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32))
    first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    orientation = np.asarray([float(v) for v in first.ImageOrientationPatient])
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    positions = [
        np.asarray([float(v) for v in pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient])
        for p in series.files
    ]
    steps = [float(np.dot(b - a, normal)) for a, b in zip(positions, positions[1:], strict=False)]
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    image = sitk.GetImageFromArray(np.stack(planes))  # (K, J, I)
    image.SetSpacing((column_spacing, row_spacing, float(np.median(steps)) if steps else 1.0))
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    image.SetDirection(tuple(float(v) for v in np.stack([row, column, normal], axis=1).reshape(-1)))
    if series.tilt is not None:
        _unshear_geometry(image, series.tilt, 0)
    return image


def _decoder_hint(syntax: str) -> str:
    """Install decoders when pydicom knows some for ``syntax``; otherwise convert the series."""
    from pydicom.pixels import get_decoder

    try:
        known = not get_decoder(syntax).is_available
    except NotImplementedError:
        known = False
    if known:
        return DECODER_HINT
    return (
        "convert the series to an uncompressed transfer syntax first (e.g. gdcmconv --raw or dcmdjpeg): "
        "no decoder that pydicom or SimpleITK knows reads it"
    )


def correct_gantry_tilt(image: sitk.Image, tilt: GantryTilt) -> sitk.Image:
    """Resample a stack read from a tilted series so that each voxel sits at its acquired position.

    ``image`` has the stack's geometry (slices ``tilt.step_mm`` apart along ``tilt.normal`` from
    ``tilt.origin``); a point ``u`` of it was acquired at ``x = u + ((u - origin) . normal) shear``.
    The result keeps the image's axes and spacing on a grid widened to hold the whole sheared
    volume; voxels outside the acquired slab take the volume's minimum (air). float32, linear.
    """
    origin = np.asarray(tilt.origin)
    normal = np.asarray(tilt.normal)
    shear = np.asarray(tilt.shear_per_mm)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing())
    size = np.asarray(image.GetSize())
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in size], indexing="ij")).reshape(3, -1).T  # (8, 3)
    stacked = np.asarray(image.GetOrigin()) + (corners * spacing) @ direction.T  # (8, 3) LPS
    acquired = stacked + ((stacked - origin) @ normal)[:, None] * shear[None, :]
    index = ((acquired - np.asarray(image.GetOrigin())) @ direction) / spacing  # (8, 3) continuous
    low = np.floor(index.min(axis=0) + 1e-6)
    high = np.ceil(index.max(axis=0) - 1e-6)
    new_origin = np.asarray(image.GetOrigin()) + direction @ (low * spacing)
    new_size = [int(v) for v in (high - low + 1)]
    to_stack = sitk.AffineTransform(3)  # output (acquired) point -> stack point
    to_stack.SetMatrix(tuple((np.eye(3) - np.outer(shear, normal)).reshape(-1)))
    to_stack.SetTranslation(tuple(shear * float(normal @ origin)))
    air = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(
        sitk.Cast(image, sitk.sitkFloat32),
        new_size,
        to_stack,
        sitk.sitkLinear,
        tuple(float(v) for v in new_origin),
        tuple(float(v) for v in spacing),
        tuple(float(v) for v in direction.reshape(-1)),
        air,
        sitk.sitkFloat32,
    )
