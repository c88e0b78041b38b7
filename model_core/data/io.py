"""Read a CT volume from NIfTI, NRRD, MHA or a DICOM series into one documented orientation.

Every reader returns a ``CTImage`` whose ``array`` is ``(D, H, W)`` in Hounsfield units, oriented
LPS (DICOM's patient coordinates, ITK's convention):

- axis 0 (D, slices) runs from the patient's feet to head: slice 0 is the most inferior, the last
  slice the most superior;
- axis 1 (H, rows) runs from anterior to posterior: row 0 is at the front of the patient;
- axis 2 (W, columns) runs from the patient's right to left: column 0 is the patient's right.

An axial slice ``array[k]`` therefore looks like a radiological display (patient's right on the
image's left, anterior at the top). Oblique acquisitions keep their tilt in ``direction``; their
axes are the nearest of the above. ``spacing`` is given in array order ``(z, y, x)`` mm;
``origin`` is the LPS position (x, y, z) mm of voxel ``array[0, 0, 0]``; ``direction`` is ITK's
3x3 matrix whose columns are the LPS directions of the x, y and z (W, H, D) axes.

Volumes larger than ``max_voxels`` are read in slabs and block-averaged while reading, so that
memory stays bounded; the ``warnings`` say so.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from model_core.data import slabs
from model_core.data.checks import check_ct, check_shape
from model_core.data.dicom import (
    DicomSeries,
    check_modality,
    is_dicomdir,
    looks_like_dicom,
    scan_dicom_folder,
    select_series,
    series_of_file,
    series_warnings,
)
from model_core.data.dicom_read import read_series
from model_core.data.errors import CTInputError, DicomSeriesError, UnreadableVolumeError
from model_core.data.files import SUPPORTED_FORMATS, check_file_integrity, check_readable

ORIENTATION = "LPS"
"""Axes x, y, z of every ``CTImage`` increase toward the patient's Left, Posterior and Superior."""

DEFAULT_MAX_VOXELS = 512 * 512 * 512
"""Above this many voxels (about 0.5 GiB as float32) a volume is downsampled while it is read."""


_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])
"""Flips x and y: converts LPS coordinates to RAS and back (its own inverse)."""


@dataclass(eq=False)
class CTImage:
    """A CT volume in Hounsfield units with its geometry, oriented LPS (see the module docstring).

    ``array``: ``(D, H, W)`` HU, dtype as stored (int16 mostly; float32 after bounded reading).
    ``spacing``: ``(z, y, x)`` mm. ``origin``: LPS ``(x, y, z)`` mm of ``array[0, 0, 0]``.
    ``direction``: 3x3, columns are the LPS directions of the x, y, z axes. ``warnings``: what the
    reader chose or changed (series picked, downsampled, non-CT accepted), for the user to see.
    ``series_uid``: the DICOM series read (its SeriesInstanceUID, or the id ``scan_dicom_folder``
    derived when that is blank); ``series_grouping``: the rule that grouped its files.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    source: str = ""
    series_uid: str | None = None
    warnings: list[str] = field(default_factory=list)
    series_grouping: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def orientation(self) -> str:
        """Three-letter code of the directions the x, y, z axes point to (``"LPS"`` once oriented)."""
        return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            [float(v) for v in np.asarray(self.direction).reshape(-1)]
        )

    def to_sitk(self) -> sitk.Image:
        """The volume as a SimpleITK image with the same voxels and geometry."""
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(self.spacing_xyz)
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetDirection(tuple(float(v) for v in np.asarray(self.direction).reshape(-1)))
        return image

    def ijk_to_ras(self) -> np.ndarray:
        """The 4x4 IJK-to-RAS matrix of ``array`` taken as Slicer's ``(K, J, I)`` array."""
        matrix = np.eye(4)
        matrix[:3, :3] = _RAS_FROM_LPS @ np.asarray(self.direction) @ np.diag(self.spacing_xyz)
        matrix[:3, 3] = _RAS_FROM_LPS @ np.asarray(self.origin, dtype=np.float64)
        return matrix

    @classmethod
    def from_sitk(
        cls,
        image: sitk.Image,
        source: str = "",
        *,
        series_uid: str | None = None,
        warnings: Sequence[str] = (),
        allow_non_ct: bool = False,
        series_grouping: str | None = None,
    ) -> CTImage:
        """Orient a 3D SimpleITK image LPS and check it (see ``model_core.data.checks.check_ct``)."""
        source = source or "volume"
        image = orient_lps(_as_scalar_3d(image, source))
        empty = cls(
            np.zeros((0, 0, 0)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), source, series_uid,
            series_grouping=series_grouping,
        )  # fmt: skip
        ct = empty.with_image(image)
        ct.warnings = [*warnings, *check_ct(ct.array, allow_non_ct=allow_non_ct, source=source)]
        return ct

    def with_image(self, image: sitk.Image) -> CTImage:
        """This CT with the voxels and geometry of ``image`` (a resampled or cropped version of it)."""
        return dataclasses.replace(
            self,
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(float(v) for v in reversed(image.GetSpacing())),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3),
            warnings=list(self.warnings),
        )

    @classmethod
    def from_array(
        cls,
        array_kji: np.ndarray,
        spacing_xyz: Sequence[float],
        origin_xyz: Sequence[float],
        direction_3x3: np.ndarray | Sequence[float],
        source: str = "",
        *,
        allow_non_ct: bool = False,
    ) -> CTImage:
        """A volume already in memory: ``array_kji`` ``(K, J, I)`` HU with ITK (LPS) geometry.

        The result is oriented and checked exactly as ``read_ct`` does for a file.
        """
        array_kji = np.asarray(array_kji)
        if array_kji.ndim != 3:
            check_shape(array_kji.shape, source or "volume")
        if array_kji.dtype == np.bool_:
            array_kji = array_kji.astype(np.uint8)
        image = sitk.GetImageFromArray(array_kji)
        image.SetSpacing(_positive_spacing(spacing_xyz, source))
        image.SetOrigin(tuple(float(v) for v in origin_xyz))
        try:
            image.SetDirection(
                tuple(float(v) for v in np.asarray(direction_3x3, dtype=np.float64).reshape(-1))
            )
        except (RuntimeError, ValueError) as error:
            raise CTInputError(
                f"{source or 'volume'}: direction {np.asarray(direction_3x3).tolist()} is not a 3x3 rotation "
                "(orthonormal columns); pass the volume's direction cosines."
            ) from error
        return cls.from_sitk(image, source, allow_non_ct=allow_non_ct)

    @classmethod
    def from_ijk_to_ras(
        cls,
        array_kji: np.ndarray,
        ijk_to_ras_4x4: np.ndarray | Sequence[Sequence[float]],
        source: str = "",
        *,
        allow_non_ct: bool = False,
    ) -> CTImage:
        """A volume as 3D Slicer holds it: ``arrayFromVolume`` ``(K, J, I)`` and its IJK-to-RAS matrix.

        Slicer works in RAS, ITK files in LPS; flipping x and y gives the same ``CTImage`` as
        ``read_ct`` on the file the volume came from.
        """
        matrix = np.asarray(ijk_to_ras_4x4, dtype=np.float64)
        if matrix.shape != (4, 4):
            raise CTInputError(
                f"{source or 'volume'}: IJK-to-RAS matrix has shape {matrix.shape}; pass a 4x4."
            )
        lps = _RAS_FROM_LPS @ matrix[:3, :]
        spacing_xyz = np.linalg.norm(lps[:, :3], axis=0)
        direction = lps[:, :3] / np.where(spacing_xyz > 0, spacing_xyz, 1.0)
        return cls.from_array(array_kji, spacing_xyz, lps[:, 3], direction, source, allow_non_ct=allow_non_ct)


def _positive_spacing(spacing_xyz: Sequence[float], source: str) -> tuple[float, float, float]:
    spacing = tuple(float(v) for v in spacing_xyz)
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise CTInputError(
            f"{source or 'volume'}: spacing {spacing} is invalid; pass three positive voxel sizes (x, y, z) in mm."
        )
    return spacing  # type: ignore[return-value]


def orient_lps(image: sitk.Image) -> sitk.Image:
    """Permute and flip the axes of a 3D image so that x, y, z point Left, Posterior, Superior."""
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    if code == ORIENTATION:
        return image
    return sitk.DICOMOrient(image, ORIENTATION)


def _as_scalar_3d(image: sitk.Image, source: str) -> sitk.Image:
    """Refuse colour/vector images and 2D images; drop a singleton 4th axis (one time point)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTInputError(
            f"{source}: has {image.GetNumberOfComponentsPerPixel()} values per voxel (a colour or vector image); "
            "a CT has one HU value per voxel."
        )
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        return image[:, :, :, 0]
    if image.GetDimension() != 3:
        check_shape(tuple(reversed(size)), source)
    return image


def read_ct(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> CTImage:
    """Read a CT from a NIfTI/NRRD/MHA file or a DICOM series (a folder, a DICOMDIR, or one file of it).

    A DICOM folder with several series gives the CT series with the most slices, or
    ``series_uid``; the choice and the rule that grouped the files are in ``warnings``.
    ``allow_non_ct`` accepts volumes whose intensities (or DICOM Modality) do not say CT. Volumes
    above ``max_voxels`` are downsampled while read. Every problem raises a ``CTInputError``.
    """
    path = Path(path)
    if max_voxels < 27:
        raise ValueError(
            f"max_voxels={max_voxels}: use at least 27 (3x3x3), e.g. the default {DEFAULT_MAX_VOXELS}"
        )
    check_readable(path)
    if path.is_dir() or (volume_suffix(path) is None and looks_like_dicom(path)):
        image, series, warnings = _read_dicom(path, series_uid, allow_non_ct, max_voxels)
        uid, grouping = series.uid, series.grouping
    else:
        if series_uid is not None:
            raise CTInputError(
                f"{path}: series_uid applies to DICOM input only; this is a {path.suffix} file."
            )
        image, warnings = _read_volume_file(path, max_voxels)
        uid, grouping = None, None
    return CTImage.from_sitk(
        image,
        str(path),
        series_uid=uid,
        warnings=warnings,
        allow_non_ct=allow_non_ct,
        series_grouping=grouping,
    )


VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File names ending so are volume files; anything else may be DICOM (with or without an extension)."""


def volume_suffix(path: Path) -> str | None:
    """The volume suffix ``path`` ends with (``.nii.gz`` before ``.nii``), or None."""
    name = path.name.lower()
    return next((suffix for suffix in VOLUME_SUFFIXES if name.endswith(suffix)), None)


def check_volume_file(path: Path) -> sitk.ImageFileReader:
    """Everything that can be judged about a volume file before its voxels are read; returns the
    reader with the header read.

    The file's bytes (``check_file_integrity``: readable, gzip stream, NIfTI size, NaN/inf in
    float NIfTI), then its header: a grid ITK can represent, 3 dimensions (a 4th of size 1 is
    dropped), one value per voxel, at least 3 voxels along each axis. The Slicer module runs it
    before Slicer's reader, so a file gets the same verdict there as here.
    """
    check_file_integrity(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        reason = slabs.itk_reason(error)
        if "orthonormal" in reason:
            raise UnreadableVolumeError(
                f"{path}: its voxel axes are not perpendicular (a sheared or skewed orientation matrix), which "
                "ITK and Slicer cannot represent. Resample it onto an orthogonal grid and save it again."
            ) from error
        raise UnreadableVolumeError(
            f"{path}: cannot be read as an image ({reason}); pass an uncorrupted {SUPPORTED_FORMATS}."
        ) from error
    size = tuple(reader.GetSize())
    if reader.GetNumberOfComponents() != 1:
        raise CTInputError(
            f"{path}: has {reader.GetNumberOfComponents()} values per voxel (a colour or vector image); "
            "a CT has one HU value per voxel."
        )
    shape = tuple(reversed(size[:3])) if len(size) == 4 and size[3] == 1 else tuple(reversed(size))
    check_shape(shape, str(path))
    return reader


def _read_volume_file(path: Path, max_voxels: int) -> tuple[sitk.Image, list[str]]:
    """One NIfTI/NRRD/MHA file, whole or (above ``max_voxels``) in bounded slabs."""
    reader = check_volume_file(path)
    size = reader.GetSize()
    try:
        if len(size) != 3 or math.prod(size) <= max_voxels:
            return reader.Execute(), []

        def read_slab(k0: int, k1: int) -> sitk.Image:
            reader.SetExtractIndex([0, 0, k0])
            reader.SetExtractSize([size[0], size[1], k1 - k0])
            return reader.Execute()

        return slabs.read_bounded(size, reader.GetSpacing(), read_slab, max_voxels, str(path))
    except RuntimeError as error:
        raise UnreadableVolumeError(
            f"{path}: the voxel data cannot be read ({slabs.itk_reason(error)}); the file may be truncated or "
            "corrupt: copy or export it again."
        ) from error


def _read_dicom(path: Path, series_uid: str | None, allow_non_ct: bool, max_voxels: int):
    """The chosen series of a DICOM folder (or the series of one given file), and what was chosen.

    A file given alone reads its whole series from the files beside it; a DICOMDIR reads the
    folder it indexes.
    """
    if path.is_dir() or is_dicomdir(path):
        series = scan_dicom_folder(path if path.is_dir() else path.parent)
    else:
        series = scan_dicom_folder(path.parent, recursive=False)
        own = series_of_file(series, path)
        if own is None:
            raise UnreadableVolumeError(
                f"{path}: is a DICOM file without an image (or with an unreadable header); pass an image file of "
                "the series, or its folder."
            )
        if series_uid is None:
            series_uid = own.uid
    chosen, warnings = select_series(
        series, source=str(path), series_uid=series_uid, allow_non_ct=allow_non_ct
    )
    image, more = _read_series_image(chosen, max_voxels, str(path))
    return image, chosen, [*warnings, *more]


def _read_series_image(series: DicomSeries, max_voxels: int, source: str) -> tuple[sitk.Image, list[str]]:
    if len(series.files) == 1:  # one multi-frame file
        return _read_volume_file(series.files[0], max_voxels)
    return read_series(series, max_voxels, source)


def read_dicom_series(
    series: DicomSeries,
    *,
    source: str = "",
    allow_non_ct: bool = False,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    warnings: Sequence[str] = (),
) -> CTImage:
    """One series found by ``scan_dicom_folder``, read and checked exactly as ``read_ct`` reads it
    (for callers that list the series themselves, such as the batch script)."""
    source = source or str(series.files[0].parent)
    if not series.usable:
        raise DicomSeriesError(f"{source}: series {series.summary()} cannot be read as one volume.")
    check_modality(series, source, allow_non_ct)
    image, more = _read_series_image(series, max_voxels, source)
    said = [*warnings, *(w for w in series_warnings(series, source) if w not in warnings), *more]
    return CTImage.from_sitk(
        image,
        source,
        series_uid=series.uid,
        warnings=said,
        allow_non_ct=allow_non_ct,
        series_grouping=series.grouping,
    )
