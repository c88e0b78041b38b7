"""Typed errors for CT input: each says what was found and what to do about it.

All derive from ``CTInputError`` (a ``ValueError``), so callers (the Slicer panel, the batch
script, the datasets) can catch one class and show the message as is.
"""

from __future__ import annotations


class CTInputError(ValueError):
    """A volume or dataset file cannot be used as CT input; the message names the input and the fix."""


class UnreadableVolumeError(CTInputError):
    """The file or folder is missing, truncated, corrupt or in a format SimpleITK cannot read."""


API_NON_CT_HINT = "pass allow_non_ct=True"
"""How a Python caller accepts non-CT input; every ``NotCTError`` message ends with it."""


class NotCTError(CTInputError):
    """Intensity statistics (or the DICOM Modality) say this is not a CT in Hounsfield units."""

    def with_hint(self, hint: str) -> NotCTError:
        """The same refusal telling the user of another entry point how to accept non-CT input
        (``--allow-non-ct``, the panel's checkbox) instead of ``allow_non_ct=True``."""
        return type(self)(str(self).replace(API_NON_CT_HINT, hint))


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
