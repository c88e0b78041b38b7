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
import gzip
import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.misc import is_dicom

from model_core.data.checks import check_ct, check_shape
from model_core.data.dicom import DicomSeries, scan_dicom_folder, select_series
from model_core.data.errors import CTInputError, UnreadableVolumeError

ORIENTATION = "LPS"
"""Axes x, y, z of every ``CTImage`` increase toward the patient's Left, Posterior and Superior."""

DEFAULT_MAX_VOXELS = 512 * 512 * 512
"""Above this many voxels (about 0.5 GiB as float32) a volume is downsampled while it is read."""

SUPPORTED_FORMATS = ".nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, or a DICOM folder"

_MIN_SLAB_VOXELS = 1 << 22
"""Slabs hold at least this many voxels (16 MiB as float32), so that few reads cover a volume."""

_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])
"""Flips x and y: converts LPS coordinates to RAS and back (its own inverse)."""


@dataclass(eq=False)
class CTImage:
    """A CT volume in Hounsfield units with its geometry, oriented LPS (see the module docstring).

    ``array``: ``(D, H, W)`` HU, dtype as stored (int16 mostly; float32 after bounded reading).
    ``spacing``: ``(z, y, x)`` mm. ``origin``: LPS ``(x, y, z)`` mm of ``array[0, 0, 0]``.
    ``direction``: 3x3, columns are the LPS directions of the x, y, z axes. ``warnings``: what the
    reader chose or changed (series picked, downsampled, non-CT accepted), for the user to see.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    source: str = ""
    series_uid: str | None = None
    warnings: list[str] = field(default_factory=list)

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
    ) -> CTImage:
        """Orient a 3D SimpleITK image LPS and check it (see ``model_core.data.checks.check_ct``)."""
        source = source or "volume"
        image = orient_lps(_as_scalar_3d(image, source))
        empty = cls(np.zeros((0, 0, 0)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), source, series_uid)
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
    """Read a CT from a NIfTI/NRRD/MHA file or a DICOM series (a folder, or one file of it).

    A DICOM folder with several series gives the CT series with the most slices, or
    ``series_uid``; the choice is in ``warnings``. ``allow_non_ct`` accepts volumes whose
    intensities do not look like CT. Volumes above ``max_voxels`` are downsampled while read.
    """
    path = Path(path)
    if max_voxels < 27:
        raise ValueError(
            f"max_voxels={max_voxels}: use at least 27 (3x3x3), e.g. the default {DEFAULT_MAX_VOXELS}"
        )
    if not path.exists():
        raise UnreadableVolumeError(f"{path}: does not exist; pass a {SUPPORTED_FORMATS}.")
    if path.is_dir() or is_dicom(path):
        image, uid, warnings = _read_dicom(path, series_uid, allow_non_ct, max_voxels)
    else:
        if series_uid is not None:
            raise CTInputError(
                f"{path}: series_uid applies to DICOM input only; this is a {path.suffix} file."
            )
        image, warnings = _read_volume_file(path, max_voxels)
        uid = None
    return CTImage.from_sitk(image, str(path), series_uid=uid, warnings=warnings, allow_non_ct=allow_non_ct)


def _itk_reason(error: Exception) -> str:
    """The informative line(s) of an ITK exception, without source paths and object addresses."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    picked = [line for line in lines if "ITK ERROR" in line or line.startswith("[")]
    text = " ".join(picked or lines[-1:])
    text = re.sub(r"ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", text)
    return text[:400]


def _read_volume_file(path: Path, max_voxels: int) -> tuple[sitk.Image, list[str]]:
    """One NIfTI/NRRD/MHA file, whole or (above ``max_voxels``) in bounded slabs."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise UnreadableVolumeError(
            f"{path}: cannot be read as an image ({_itk_reason(error)}); pass an uncorrupted {SUPPORTED_FORMATS}."
        ) from error
    check_file_complete(path)
    size = reader.GetSize()
    try:
        if len(size) != 3 or math.prod(size) <= max_voxels or reader.GetNumberOfComponents() != 1:
            return reader.Execute(), []

        def read_slab(k0: int, k1: int) -> sitk.Image:
            reader.SetExtractIndex([0, 0, k0])
            reader.SetExtractSize([size[0], size[1], k1 - k0])
            return reader.Execute()

        return _read_bounded(size, reader.GetSpacing(), read_slab, max_voxels, str(path))
    except RuntimeError as error:
        raise UnreadableVolumeError(
            f"{path}: the voxel data cannot be read ({_itk_reason(error)}); the file may be truncated or "
            "corrupt: copy or export it again."
        ) from error


def check_file_complete(path: Path) -> None:
    """ITK zero-fills a truncated NIfTI without an error; compare the data size with the header's."""
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    compressed = name.endswith(".gz")
    opener = gzip.open if compressed else open
    with opener(path, "rb") as stream:
        header = stream.read(540)
    expected = _nifti_expected_bytes(header)
    if expected is None:
        return
    if not compressed:
        actual = path.stat().st_size
    else:
        with open(path, "rb") as raw:
            raw.seek(-4, os.SEEK_END)
            trailer_size = struct.unpack("<I", raw.read(4))[0]
        if trailer_size == expected % 2**32:
            return
        actual = _gzip_stream_length(path)
    if actual < expected:
        raise UnreadableVolumeError(
            f"{path}: is truncated: its header describes {expected} bytes, the file holds {actual}; copy or "
            "download it again."
        )


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Header plus voxel bytes a NIfTI-1 or NIfTI-2 header promises; ``None`` if it is neither."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    count = max(1, min(int(dims[0]), 7))
    voxels = math.prod(max(1, int(d)) for d in dims[1 : count + 1])
    return max(offset, 348) + voxels * max(1, bitpix) // 8


def _gzip_stream_length(path: Path) -> int:
    """Decompressed length of a gzip file, counting only what decompresses before any damage."""
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 16):
                total += len(chunk)
    except (EOFError, OSError, gzip.BadGzipFile):
        pass
    return total


def _read_dicom(
    path: Path, series_uid: str | None, allow_non_ct: bool, max_voxels: int
) -> tuple[sitk.Image, str, list[str]]:
    """The chosen series of a DICOM folder (or the series of one given file), and what was chosen."""
    if path.is_dir():
        series = scan_dicom_folder(path)
    else:
        series = scan_dicom_folder(path.parent, recursive=False)
        own = next((s for s in series if path in s.files), None)
        if series_uid is None and own is not None:
            series_uid = own.uid
    chosen, warnings = select_series(
        series, source=str(path), series_uid=series_uid, allow_non_ct=allow_non_ct
    )
    if len(chosen.files) == 1:
        image, more = _read_volume_file(chosen.files[0], max_voxels)
        return image, chosen.uid, [*warnings, *more]
    image, more = _read_series_files(chosen, max_voxels, str(path))
    return image, chosen.uid, [*warnings, *more]


def _read_series_files(series: DicomSeries, max_voxels: int, source: str) -> tuple[sitk.Image, list[str]]:
    rows, columns = series.image_size
    size = (columns, rows, len(series.files))

    def read_slab(k0: int, k1: int) -> sitk.Image:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in series.files[k0:k1]])
        return reader.Execute()

    try:
        if math.prod(size) <= max_voxels:
            return read_slab(0, len(series.files)), []
        spacing = read_slab(0, 2).GetSpacing()  # z spacing from the first two slice positions
        return _read_bounded(size, spacing, read_slab, max_voxels, source)
    except RuntimeError as error:
        broken = _unreadable_files(series.files)
        named = ", ".join(p.name for p in broken[:5]) + (" ..." if len(broken) > 5 else "")
        raise UnreadableVolumeError(
            f"{source}: series {series.uid} cannot be read ({_itk_reason(error)}); unreadable file(s): "
            f"{named or 'none alone'}. The series may be truncated or corrupt: export it again."
        ) from error


def _unreadable_files(files: Sequence[Path]) -> list[Path]:
    broken = []
    for file in files:
        try:
            sitk.ReadImage(str(file))
        except RuntimeError:
            broken.append(file)
    return broken


def shrink_factors(
    size_xyz: Sequence[int], spacing_xyz: Sequence[float], max_voxels: int
) -> tuple[int, int, int]:
    """Integer block sizes (x, y, z) that bring ``size_xyz`` within ``max_voxels``.

    The finest axis (smallest spacing times factor) grows first, so the result tends to isotropic
    voxels; no axis drops below 3 voxels.
    """
    factors = [1, 1, 1]

    def voxels() -> int:
        return math.prod(n // f for n, f in zip(size_xyz, factors, strict=True))

    while voxels() > max_voxels:
        growable = [a for a in range(3) if size_xyz[a] // (factors[a] + 1) >= 3]
        if not growable:
            break
        axis = min(growable, key=lambda a: (spacing_xyz[a] * factors[a], a))
        factors[axis] += 1
    return tuple(factors)  # type: ignore[return-value]


def _read_bounded(
    size_xyz: Sequence[int],
    spacing_xyz: Sequence[float],
    read_slab: Callable[[int, int], sitk.Image],
    max_voxels: int,
    source: str,
) -> tuple[sitk.Image, list[str]]:
    """Read slabs of slices and average blocks of voxels in each, holding about one slab at a time.

    The result equals ``sitk.BinShrink`` of the whole volume (as float32) with ``shrink_factors``.
    """
    factors = shrink_factors(size_xyz, spacing_xyz, max_voxels)
    fx, fy, fz = factors
    used_slices = (size_xyz[2] // fz) * fz
    slab_voxels = max(max_voxels // 4, _MIN_SLAB_VOXELS, size_xyz[0] * size_xyz[1] * fz)
    slab = max(2, fz * max(1, slab_voxels // (size_xyz[0] * size_xyz[1] * fz)))
    slab = slab + (-slab) % fz
    pieces, first = [], None
    for k0 in range(0, used_slices, slab):
        shrunk = sitk.BinShrink(
            sitk.Cast(read_slab(k0, min(k0 + slab, used_slices)), sitk.sitkFloat32), factors
        )
        first = shrunk if first is None else first
        pieces.append(sitk.GetArrayFromImage(shrunk))
    image = sitk.GetImageFromArray(np.concatenate(pieces, axis=0))
    image.SetOrigin(first.GetOrigin())
    image.SetDirection(first.GetDirection())
    image.SetSpacing(first.GetSpacing())
    warning = (
        f"{source}: has {'x'.join(map(str, size_xyz))} = {math.prod(size_xyz):,} voxels, more than max_voxels="
        f"{max_voxels:,}; read in slabs and averaged over blocks of {fx}x{fy}x{fz} voxels (x, y, z), "
        f"giving {'x'.join(map(str, image.GetSize()))} voxels of {image.GetSpacing()[0]:.3g}x"
        f"{image.GetSpacing()[1]:.3g}x{image.GetSpacing()[2]:.3g} mm."
    )
    return image, [warning]
