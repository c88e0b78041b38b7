"""Input checks that run on every volume before it reaches the model.

A CT in Hounsfield units has air at about -1000 HU (outside the body, in lungs and bowel) and a
range of well over a thousand HU; an MR image has no such negative values, and an image that was
already normalised spans a range of a few units. Other checks refuse 2D images, volumes with
fewer than ``MIN_SLICES`` slices, NaN/inf voxels and empty (constant) volumes. Every check raises
a typed ``CTInputError`` whose message names the input and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_core.data.errors import (
    API_NON_CT_HINT,
    EmptyVolumeError,
    InvalidValuesError,
    NotCTError,
    TooFewSlicesError,
)

MIN_SLICES = 3
"""A CT series needs at least this many voxels along every axis."""

AIR_THRESHOLD_HU = -500.0
"""Voxels below this are air (or lung); a CT has some, an MR or normalised image has none."""

AIR_PERCENTILE = 0.1
"""At least this percentage of voxels must be air for the volume to look like a CT."""

MIN_CT_RANGE_HU = 300.0
"""The 0.5th to 99.5th percentile span of a CT covers at least air to soft tissue."""

_STATS_VOXELS = 1_000_000
"""Intensity statistics use an evenly strided subsample of about this many voxels."""

_AXIS_NAMES = ("slice (z)", "row (y)", "column (x)")


@dataclass(frozen=True)
class CTVerdict:
    """Whether intensity statistics look like CT in HU, why, and the statistics used."""

    is_ct: bool
    reason: str
    low: float
    high: float


def check_shape(shape: tuple[int, ...], source: str = "volume") -> None:
    """Refuse anything but a 3D array ``(D, H, W)`` with at least ``MIN_SLICES`` along every axis."""
    if len(shape) == 2 or (len(shape) == 3 and shape[0] == 1):
        raise TooFewSlicesError(
            f"{source}: is a 2D image of shape {tuple(shape)} (1 slice); a CT series needs at least "
            f"{MIN_SLICES} slices. Load the whole series (a DICOM folder or a 3D NIfTI/NRRD file)."
        )
    if len(shape) != 3:
        raise TooFewSlicesError(
            f"{source}: has {len(shape)} dimensions (shape {tuple(shape)}); a CT volume has 3 (D, H, W). "
            "Pass a single 3D volume (one time point, one channel)."
        )
    if min(shape) == 0:
        raise EmptyVolumeError(f"{source}: has no voxels (shape {tuple(shape)}); pass a non-empty volume.")
    for axis, size in enumerate(shape):
        if size < MIN_SLICES:
            raise TooFewSlicesError(
                f"{source}: volume has {size} voxel(s) along its {_AXIS_NAMES[axis]} axis (shape "
                f"{tuple(shape)}); a CT series needs at least {MIN_SLICES}. Load the whole series, "
                "not a single slice or a thin slab."
            )


def check_finite(array: np.ndarray, source: str = "volume") -> None:
    """Refuse NaN or infinite voxels; integer volumes pass without a scan."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    if np.isfinite(array.sum(dtype=np.float64)):
        return
    raise invalid_values_error(source, int(np.isnan(array).sum()), int(np.isinf(array).sum()), array.size)


def invalid_values_error(source: str, nan: int, inf: int, total: int) -> InvalidValuesError:
    """The one refusal of NaN/inf voxels, whether found in memory or while scanning a file's bytes."""
    return InvalidValuesError(
        f"{source}: holds {nan} NaN and {inf} infinite voxel(s) out of {total}; a CT holds finite "
        "HU values. Re-export the volume, or replace those voxels (e.g. with -1000 HU) before loading."
    )


def check_not_empty(array: np.ndarray, source: str = "volume") -> None:
    """Refuse a volume whose voxels all hold one value (a blank export or an empty label)."""
    low, high = array.min(), array.max()
    if low == high:
        raise EmptyVolumeError(
            f"{source}: every voxel has the value {low}; the volume is empty. Check that the right file "
            "or series was exported."
        )


def _strided_sample(array: np.ndarray) -> np.ndarray:
    """About ``_STATS_VOXELS`` evenly spaced voxels as float64, for cheap percentiles."""
    flat = array.reshape(-1)
    step = max(1, flat.size // _STATS_VOXELS)
    return flat[::step].astype(np.float64)


def ct_intensity_verdict(array: np.ndarray) -> CTVerdict:
    """Judge from intensity statistics whether ``array`` (any shape) is a CT in Hounsfield units."""
    sample = _strided_sample(array)
    air_level, low, high = np.percentile(sample, [AIR_PERCENTILE, 0.5, 99.5])
    span = f"values span {sample.min():.4g} to {sample.max():.4g} (0.5-99.5th percentiles {low:.4g} to {high:.4g})"
    if high - low < MIN_CT_RANGE_HU:
        reason = (
            f"{span}, a range far narrower than CT in HU (air -1000 to bone above +400); it looks like an "
            "already normalised or windowed image, or an MR"
        )
        return CTVerdict(False, reason, float(low), float(high))
    if air_level > AIR_THRESHOLD_HU:
        reason = (
            f"{span}, with no air: fewer than {AIR_PERCENTILE}% of voxels lie below {AIR_THRESHOLD_HU:.0f} HU, "
            "while a CT has air at about -1000 HU around the body and in lungs and bowel; it looks like an MR "
            "(or a CT stored without its rescale intercept: apply it so that air reads -1000)"
        )
        return CTVerdict(False, reason, float(low), float(high))
    return CTVerdict(True, f"{span}, with air below {AIR_THRESHOLD_HU:.0f} HU", float(low), float(high))


def check_ct(array: np.ndarray, *, allow_non_ct: bool = False, source: str = "volume") -> list[str]:
    """Run every check on a ``(D, H, W)`` volume; raise the first failure, return warnings.

    With ``allow_non_ct`` a volume that does not look like CT passes with a warning instead of a
    ``NotCTError``; shape, NaN/inf and empty checks always apply.
    """
    check_shape(array.shape, source)
    check_finite(array, source)
    check_not_empty(array, source)
    verdict = ct_intensity_verdict(array)
    if verdict.is_ct:
        return []
    if not allow_non_ct:
        raise NotCTError(
            f"{source}: does not look like a CT in Hounsfield units: {verdict.reason}. If it is a CT, or to "
            f"run on it anyway, {API_NON_CT_HINT}."
        )
    return [f"{source}: does not look like a CT ({verdict.reason}); accepted because allow_non_ct=True."]
