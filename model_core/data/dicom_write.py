"""Write CT volumes as DICOM series the way scanners and PACS export them, for tests and demos.

Real exports are rarely tidy: anonymizers blank SeriesInstanceUID and StudyInstanceUID, files
have no extension, pixels are JPEG 2000, JPEG lossless, RLE or JPEG-LS compressed, a localizer
scout lies beside the axial images (sometimes inside the same series), slices are missing or
repeated, and a tilted gantry shears the geometry. ``write_dicom_series`` writes one series with
any of these traits; the tests of ``model_core.data`` and the batch build their exports from it,
and so can other tools (e.g. uploading such series into a PACS)::

    from model_core.data.dicom_write import ct_phantom, write_dicom_series

    write_dicom_series("export/ct", ct_phantom((20, 64, 64)), (0.8, 0.8, 2.5),
                       series_uid="", study_uid="", transfer_syntax="jpeg2000", extension="")

Headers are built with pydicom; JPEG 2000 and JPEG lossless pixels are encoded by SimpleITK's
GDCM, RLE by pydicom itself, JPEG-LS by pydicom with ``pyjpegls`` installed. Every other choice
(rescale slope 1, intercept 0: stored values are HU) is fixed so that files read back exactly.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

TRANSFER_SYNTAXES: dict[str, str] = {
    "uncompressed": ExplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "jpeg-lossless": JPEGLosslessSV1,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
}
"""The transfer syntaxes ``write_dicom_series`` can write, by short name."""

_SITK_COMPRESSORS = {"jpeg2000": "JPEG2000", "jpeg-lossless": "JPEG"}
"""Encoded by SimpleITK (GDCM); the others by pydicom."""

AXIAL = "ORIGINAL\\PRIMARY\\AXIAL"
LOCALIZER = "ORIGINAL\\PRIMARY\\LOCALIZER"


def ct_phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A CT-like int16 volume ``(K, J, I)`` in HU: air around a water ellipse with a bone ring, plus noise.

    It passes every CT check of ``model_core.data`` (air below -500 HU, a range of well over 300 HU)
    and no two neighbouring slices are equal, so a missing or swapped slice shows.
    """
    depth, rows, columns = shape
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, columns), indexing="ij")
    radius = (y / 0.8) ** 2 + (x / 0.9) ** 2
    plane = np.where(radius <= 1.0, 40.0, -1000.0)
    plane = np.where((radius > 0.8) & (radius <= 1.0), 700.0, plane)
    volume = np.repeat(plane[None], depth, axis=0)
    volume += np.arange(depth)[:, None, None] * 3.0 * (radius <= 0.8)
    volume += rng.normal(0.0, 10.0, size=shape)
    return np.rint(volume).astype(np.int16)


def tilted_directions(direction_3x3: np.ndarray, tilt_deg: float) -> np.ndarray:
    """The image plane tilted by ``tilt_deg`` about its row axis (columns: row, column, table axis)."""
    direction = np.asarray(direction_3x3, dtype=np.float64).reshape(3, 3)
    angle = math.radians(tilt_deg)
    row, column, table = direction[:, 0], direction[:, 1], direction[:, 2]
    tilted_column = math.cos(angle) * column + math.sin(angle) * table
    return np.stack([row, tilted_column, table], axis=1)


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
    frame_of_reference_uid: str | None = None,
    series_description: str = "",
    series_number: int | None = 1,
    acquisition_number: int | None = 1,
    image_type: str = AXIAL,
    transfer_syntax: str = "uncompressed",
    extension: str = ".dcm",
    name_prefix: str = "slice_",
    first_instance: int = 1,
    gantry_tilt_deg: float = 0.0,
    omit_tags: Sequence[str] = (),
) -> list[Path]:
    """Write an int16 volume ``(K, J, I)`` in HU as one DICOM file per slice; returns the files.

    Geometry follows ITK: ``origin_xyz`` is the LPS position (mm) of voxel ``[0, 0, 0]``; the
    columns of ``direction_3x3`` are the LPS directions of the I, J and K axes. UIDs left None are
    generated; ``""`` writes the tag empty, as anonymizers do, and ``omit_tags`` (keywords) leaves
    tags out altogether. ``transfer_syntax`` is a ``TRANSFER_SYNTAXES`` name; ``extension=""``
    writes files without one. ``gantry_tilt_deg`` tilts the image plane about its row axis while
    slices still advance along the K axis (the table), as a tilted CT gantry does: the volume is
    then sheared, and ``GantryDetectorTilt`` says so.
    """
    array_kji = np.asarray(array_kji)
    if array_kji.ndim != 3:
        raise ValueError(f"array_kji has shape {array_kji.shape}; pass a 3D volume (K, J, I)")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax={transfer_syntax!r}: use one of {', '.join(TRANSFER_SYNTAXES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    direction = tilted_directions(np.asarray(direction_3x3), gantry_tilt_deg)
    spacing = np.asarray(spacing_xyz, dtype=np.float64)
    shared = {
        "series": generate_uid() if series_uid is None else series_uid,
        "study": generate_uid() if study_uid is None else study_uid,
        "frame": generate_uid() if frame_of_reference_uid is None else frame_of_reference_uid,
        "patient": uuid.uuid4().hex[:12],
    }
    paths = []
    for k, plane in enumerate(array_kji.astype(np.int16)):
        position = np.asarray(origin_xyz, dtype=np.float64) + direction[:, 2] * spacing[2] * k
        ds = _slice_dataset(
            plane,
            position,
            direction,
            spacing,
            shared,
            modality=modality,
            description=series_description,
            series_number=series_number,
            acquisition_number=acquisition_number,
            instance=first_instance + k,
            image_type=image_type,
            tilt=gantry_tilt_deg,
        )
        for keyword in omit_tags:
            if keyword in ds:
                delattr(ds, keyword)
        _encode(ds, transfer_syntax)
        path = folder / f"{name_prefix}{first_instance + k - 1:04d}{extension}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(
    plane: np.ndarray,
    position: np.ndarray,
    direction: np.ndarray,
    spacing: np.ndarray,
    shared: dict[str, str],
    *,
    modality: str,
    description: str,
    series_number: int | None,
    acquisition_number: int | None,
    instance: int,
    image_type: str,
    tilt: float,
) -> Dataset:
    """One uncompressed slice with the header fields a scanner writes."""
    sop_class = MR_IMAGE_STORAGE if modality.upper() == "MR" else CT_IMAGE_STORAGE
    sop_instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.ImageType = image_type.split("\\")
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.PatientName = "Synthetic^Volume"
    ds.PatientID = shared["patient"]
    ds.StudyInstanceUID = shared["study"]
    ds.SeriesInstanceUID = shared["series"]
    ds.FrameOfReferenceUID = shared["frame"]
    if series_number is not None:
        ds.SeriesNumber = series_number
    if acquisition_number is not None:
        ds.AcquisitionNumber = acquisition_number
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing (y), column spacing (x)
    ds.SliceThickness = f"{spacing[2]:.6f}"
    if tilt:
        ds.GantryDetectorTilt = f"{tilt:.3f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = plane.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    ds.PixelData = np.ascontiguousarray(plane, dtype="<i2").tobytes()
    return ds


def _encode(ds: Dataset, transfer_syntax: str) -> None:
    """Compress the slice's pixels in place (a no-op for ``uncompressed``)."""
    if transfer_syntax == "uncompressed":
        return
    if transfer_syntax in _SITK_COMPRESSORS:
        ds.PixelData, ds.file_meta.TransferSyntaxUID = _sitk_encoded(ds, _SITK_COMPRESSORS[transfer_syntax])
        ds["PixelData"].is_undefined_length = True
        ds["PixelData"].VR = "OB"
        return
    try:
        ds.compress(TRANSFER_SYNTAXES[transfer_syntax])
    except (RuntimeError, NotImplementedError) as error:
        raise RuntimeError(
            f"cannot write {transfer_syntax} pixels here ({error}); JPEG-LS needs the pyjpegls package"
        ) from error


def _sitk_encoded(ds: Dataset, compressor: str) -> tuple[bytes, str]:
    """Encapsulated pixel data and transfer syntax as GDCM encodes this slice with ``compressor``."""
    image = sitk.GetImageFromArray(ds.pixel_array[None])
    with tempfile.TemporaryDirectory() as scratch:
        target = str(Path(scratch) / "slice.dcm")
        writer = sitk.ImageFileWriter()
        writer.SetFileName(target)
        writer.SetUseCompression(True)
        writer.SetCompressor(compressor)
        writer.Execute(image)
        encoded = pydicom.dcmread(target)
    return encoded.PixelData, encoded.file_meta.TransferSyntaxUID
