"""Turn a CT in Hounsfield units into the model's input: float32 ``(D, H, W)`` in [0, 1].

The chain is short and every step is a named function that can be called alone:

1. ``orient``: axes LPS, slice 0 inferior (``read_ct`` already does this; kept for in-memory CTs).
2. ``resample``: to ``PreprocessConfig.spacing`` (z, y, x) mm when set (linear interpolation).
3. ``crop_foreground`` (optional): to the bounding box of the body, found in HU (> -500), where air
   is -1000 whatever the window; hence before the window step.
4. ``window``: clip HU to a preset (soft tissue, lung, bone, wide) or a custom (low, high) range.
5. ``resize_to_grid``: to the model's grid, default ``(32, 256, 256)`` (M3D's layout); axes that
   shrink are block-averaged (no aliasing), axes that grow are interpolated linearly.
6. ``normalise``: map the window to [0, 1] exactly.

Record ``PreprocessConfig.to_dict()`` beside any output so that it can be reproduced.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from model_core.config import SLICES_PER_GROUP, ConfigError
from model_core.data.checks import check_ct
from model_core.data.io import DEFAULT_MAX_VOXELS, ORIENTATION, CTImage, orient_lps, read_ct


def window_from_width_level(width: float, level: float) -> tuple[float, float]:
    """A radiologist's window (width W, level L) as the HU range ``(L - W/2, L + W/2)``."""
    return (level - width / 2.0, level + width / 2.0)


WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "wide": (-1000.0, 1000.0),
    "soft_tissue": window_from_width_level(400, 40),
    "lung": window_from_width_level(1500, -600),
    "bone": window_from_width_level(1800, 400),
    # lung nodules (against -800 HU lung) and soft-tissue lesions (20-45 HU off their organ) in one
    # window: what the lesion benchmark's demo model reads
    "body": window_from_width_level(700, -50),
}
"""HU ranges (low, high) of the window presets; the first, ``wide``, is the default."""

DEFAULT_WINDOW = next(iter(WINDOW_PRESETS))

PERCENTILE_WINDOW = "percentile"
"""Window name that takes the volume's own 0.5th-99.5th percentiles: for non-CT input (MR)."""

DEFAULT_TARGET_SHAPE: tuple[int, int, int] = (32, 256, 256)
"""M3D's grid (D, H, W)."""

FOREGROUND_THRESHOLD_HU = -500.0
"""Voxels above this are body (or table); below, air."""


@dataclass
class PreprocessConfig:
    """The preprocessing settings; validated when built, stored with outputs via ``to_dict``.

    ``window``: a ``WINDOW_PRESETS`` name, ``"percentile"``, or a custom HU range ``(low, high)``.
    ``target_shape``: the grid ``(D, H, W)``. ``spacing``: ``(z, y, x)`` mm to resample to first,
    or None. ``crop_foreground``: crop to the body first. ``allow_non_ct``: accept volumes whose
    intensities do not look like CT.
    """

    window: str | tuple[float, float] = DEFAULT_WINDOW
    target_shape: tuple[int, int, int] = DEFAULT_TARGET_SHAPE
    spacing: tuple[float, float, float] | None = None
    crop_foreground: bool = False
    allow_non_ct: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.window, str):
            if self.window not in WINDOW_PRESETS and self.window != PERCENTILE_WINDOW:
                names = ", ".join([*WINDOW_PRESETS, PERCENTILE_WINDOW])
                raise ConfigError(
                    f"window={self.window!r}: use one of {names}, or a custom (low, high) in HU"
                )
        else:
            low_high = tuple(float(v) for v in self.window)
            if (
                len(low_high) != 2
                or not all(math.isfinite(v) for v in low_high)
                or low_high[0] >= low_high[1]
            ):
                raise ConfigError(
                    f"window={self.window!r}: a custom window is (low, high) HU with low < high"
                )
            self.window = low_high  # type: ignore[assignment]
        shape = tuple(int(v) for v in self.target_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(
                f"target_shape={self.target_shape!r}: use three positive sizes (D, H, W), e.g. (32, 256, 256)"
            )
        if shape[0] < SLICES_PER_GROUP:
            raise ConfigError(
                f"target_shape={self.target_shape!r}: the model reads slices in groups of {SLICES_PER_GROUP}; "
                f"use a depth of at least {SLICES_PER_GROUP}, e.g. (32, 256, 256)"
            )
        self.target_shape = shape  # type: ignore[assignment]
        if self.spacing is not None:
            spacing = tuple(float(v) for v in self.spacing)
            if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
                raise ConfigError(
                    f"spacing={self.spacing!r}: use None or three positive sizes (z, y, x) in mm"
                )
            self.spacing = spacing  # type: ignore[assignment]

    def window_range(self, array: np.ndarray | None = None) -> tuple[float, float]:
        """The HU range (low, high) to clip to; ``"percentile"`` needs the ``array`` it applies to."""
        if not isinstance(self.window, str):
            return self.window
        if self.window != PERCENTILE_WINDOW:
            return WINDOW_PRESETS[self.window]
        if array is None:
            raise ValueError("window='percentile' depends on the volume: pass the array to window_range")
        return percentile_window(array)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings; ``from_dict`` rebuilds the same config."""
        data = dataclasses.asdict(self)
        for key in ("window", "target_shape", "spacing"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"preprocess settings hold unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def percentile_window(array: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> tuple[float, float]:
    """The volume's own intensity range (robust to outliers), for inputs that are not in HU."""
    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // 1_000_000)].astype(np.float64)
    low, high = (float(v) for v in np.percentile(sample, [low_pct, high_pct]))
    return (low, high) if high > low else (low, low + 1.0)


def orient(ct: CTImage) -> CTImage:
    """The CT with axes LPS (slice 0 inferior, row 0 anterior, column 0 the patient's right)."""
    if ct.orientation == ORIENTATION:
        return ct
    return ct.with_image(orient_lps(ct.to_sitk()))


def resample(ct: CTImage, spacing_zyx: tuple[float, float, float]) -> CTImage:
    """The CT on a grid of ``spacing_zyx`` mm covering the same extent; float32, linear interpolation."""
    image = sitk.Cast(ct.to_sitk(), sitk.sitkFloat32)
    new_spacing = tuple(float(v) for v in reversed(spacing_zyx))
    size = [
        max(1, round(n * old / new))
        for n, old, new in zip(image.GetSize(), image.GetSpacing(), new_spacing, strict=True)
    ]
    resampled = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        new_spacing,
        image.GetDirection(),
        float(ct.array.min()),
        sitk.sitkFloat32,
    )
    return ct.with_image(resampled)


def foreground_box(array: np.ndarray, threshold: float = FOREGROUND_THRESHOLD_HU) -> tuple[slice, ...] | None:
    """Bounding box ``(z, y, x)`` slices of the largest connected region above ``threshold``; None if none."""
    mask = sitk.GetImageFromArray((array > threshold).astype(np.uint8))
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1
    box = sitk.LabelShapeStatisticsImageFilter()
    box.Execute(largest)
    if not box.HasLabel(1):
        return None
    x, y, z, size_x, size_y, size_z = box.GetBoundingBox(1)
    return (slice(z, z + size_z), slice(y, y + size_y), slice(x, x + size_x))


def crop_foreground(ct: CTImage, threshold: float = FOREGROUND_THRESHOLD_HU) -> CTImage:
    """The CT cropped to the body (largest region above ``threshold`` HU); unchanged if none is found."""
    box = foreground_box(ct.array, threshold)
    if box is None:
        return dataclasses.replace(
            ct,
            warnings=[*ct.warnings, f"{ct.source}: no voxel above {threshold} HU; foreground crop skipped"],
        )
    start_xyz = [int(box[axis].start) for axis in (2, 1, 0)]
    image = ct.to_sitk()
    size_xyz = [int(box[axis].stop - box[axis].start) for axis in (2, 1, 0)]
    return ct.with_image(sitk.RegionOfInterest(image, size_xyz, start_xyz))


def window(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip HU values to the window ``[low, high]``; float32, same shape."""
    return np.clip(array.astype(np.float32, copy=False), low, high)


def resize_to_grid(array: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resize ``(D, H, W)`` to ``shape``: block-average axes that shrink, linearly interpolate ones that grow."""
    import torch  # here, so that the presets and config import where torch is not installed yet
    import torch.nn.functional as F

    volume = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]  # (1, 1, D, H, W)
    shrunk = tuple(min(have, want) for have, want in zip(volume.shape[2:], shape, strict=True))
    if shrunk != tuple(volume.shape[2:]):
        volume = F.interpolate(volume, size=shrunk, mode="area")
    if shrunk != tuple(shape):
        volume = F.interpolate(volume, size=tuple(shape), mode="trilinear", align_corners=False)
    return volume[0, 0].numpy()


def normalise(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` to ``[0, 1]`` (values outside clip); float32."""
    scaled = (array.astype(np.float32, copy=False) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def preprocess(ct: CTImage, config: PreprocessConfig | None = None) -> np.ndarray:
    """The model's input from a CT: float32 ``(D, H, W)`` = ``config.target_shape``, values in [0, 1].

    The CT is checked again (``allow_non_ct`` from the config), so in-memory CTs get the same
    checks as files.
    """
    config = config or PreprocessConfig()
    check_ct(ct.array, allow_non_ct=config.allow_non_ct, source=ct.source or "volume")
    ct = orient(ct)
    if config.spacing is not None:
        ct = resample(ct, config.spacing)
    if config.crop_foreground:
        ct = crop_foreground(ct)
    low, high = config.window_range(ct.array)
    volume = resize_to_grid(window(ct.array, low, high), config.target_shape)
    return normalise(volume, low, high)


def load_volume(
    path: str | os.PathLike,
    config: PreprocessConfig | None = None,
    *,
    series_uid: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> tuple[np.ndarray, CTImage]:
    """Read a CT file or DICOM series and preprocess it: ``(volume (D, H, W) in [0, 1], the CT read)``."""
    config = config or PreprocessConfig()
    ct = read_ct(path, series_uid=series_uid, allow_non_ct=config.allow_non_ct, max_voxels=max_voxels)
    return preprocess(ct, config), ct
