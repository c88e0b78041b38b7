"""Typed errors for CT input: each says what was found and what to do about it.

All derive from ``CTInputError`` (a ``ValueError``), so callers (the Slicer panel, the batch
script, the datasets) can catch one class and show the message as is.
"""

from __future__ import annotations


class CTInputError(ValueError):
    """A volume or dataset file cannot be used as CT input; the message names the input and the fix."""


class UnreadableVolumeError(CTInputError):
    """The file or folder is missing, truncated, corrupt or in a format SimpleITK cannot read."""


class NotCTError(CTInputError):
    """Intensity statistics say this is not a CT in Hounsfield units (MR, already normalised, ...)."""


class TooFewSlicesError(CTInputError):
    """A 2D image, or a volume with fewer slices than a CT series needs (3)."""


class InvalidValuesError(CTInputError):
    """The voxels hold NaN or infinite values."""


class EmptyVolumeError(CTInputError):
    """The volume has no voxels, or every voxel has the same value."""


class DicomSeriesError(CTInputError):
    """A DICOM folder holds no usable series, a mixed or broken series, or not the requested one."""


class DatasetFormatError(CTInputError):
    """A dataset file (M3D-Cap JSON, M3D-VQA CSV, CT-RATE CSV, JSONL) does not follow its format."""
