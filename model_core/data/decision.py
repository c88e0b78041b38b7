"""One decision for every entry point: is this CT model input, and how is it prepared?

The command line, the batch script, the Slicer panel and the Python API read volumes their own
way (``read_ct``, Slicer's readers), but every ``CTImage`` then goes through ``prepare_input``:
the same checks, the same window choice (the model's own, a preset, or for non-CT input accepted
with ``allow_non_ct`` its own percentiles), the same preprocessing, and the same words for what
was read. Entry points only present the result (and, with ``NotCTError.with_hint``, say how
their user turns ``allow_non_ct`` on).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model_core.data.checks import ct_intensity_verdict
from model_core.data.dicom import BY_UID
from model_core.data.io import CTImage
from model_core.data.preprocess import PERCENTILE_WINDOW, PreprocessConfig, preprocess


@dataclass
class PreparedInput:
    """The model input ``volume`` ``(D, H, W)`` float32 in [0, 1], the settings that made it, whether
    the volume looked like CT, what the reader and the decision want the user to know, and a one-line
    description of what was read (``describe_input``)."""

    volume: np.ndarray
    config: PreprocessConfig
    looks_like_ct: bool
    description: str
    notices: list[str] = field(default_factory=list)


def input_settings(
    model_preprocessing: Mapping[str, Any],
    window: str | None = None,
    allow_non_ct: bool = False,
    looks_like_ct: bool = True,
) -> PreprocessConfig:
    """How a volume is prepared for a model: the preprocessing it was trained with (its config's
    ``preprocessing``), with the user's window preset if one is chosen (None or "" keeps the
    model's). With ``allow_non_ct`` non-CT volumes are accepted, and one that does not look like CT
    takes its own percentile window whatever the preset: an HU window means nothing for it."""
    overrides: dict[str, Any] = {"window": window} if window else {}
    if allow_non_ct:
        overrides["allow_non_ct"] = True
        if not looks_like_ct:
            overrides["window"] = PERCENTILE_WINDOW
    return PreprocessConfig.from_dict({**model_preprocessing, **overrides})


def prepare_input(
    ct: CTImage,
    model_preprocessing: Mapping[str, Any],
    *,
    window: str | None = None,
    allow_non_ct: bool = False,
) -> PreparedInput:
    """Check ``ct`` and turn it into the model's input, as every entry point does.

    Raises the typed ``CTInputError`` of the first failed check (``NotCTError`` for a volume that
    does not look like CT unless ``allow_non_ct``).
    """
    looks_like_ct = ct_intensity_verdict(ct.array).is_ct
    config = input_settings(model_preprocessing, window, allow_non_ct, looks_like_ct)
    volume = preprocess(ct, config)
    notices = list(ct.warnings)
    if not looks_like_ct:
        ignored = f" (the {window} HU window is not used)" if window else ""
        notices.append(
            f"{ct.source or 'volume'}: does not look like a CT: read as non-CT input, scaled by its own "
            f"0.5-99.5th percentiles{ignored}."
        )
    return PreparedInput(
        np.asarray(volume, dtype=np.float32), config, looks_like_ct, describe_input(ct, config), notices
    )


def describe_input(ct: CTImage, config: PreprocessConfig) -> str:
    """What was read and what the model gets, in one line: source, series and how it was grouped,
    the size and voxel spacing read, the grid and window the model reads it at."""
    series = ""
    if ct.series_uid:
        grouped = f", {ct.series_grouping}" if ct.series_grouping not in (None, BY_UID) else ""
        series = f" (DICOM series {ct.series_uid}{grouped})"
    depth, rows, columns = ct.shape
    z, y, x = ct.spacing
    low, high = config.window_range(ct.array)
    name = config.window if isinstance(config.window, str) else "custom"
    grid = "x".join(str(v) for v in config.target_shape)
    return (
        f"{ct.source or 'volume'}{series}: {depth} slices of {rows}x{columns} voxels, {z:.3g}x{y:.3g}x{x:.3g} mm "
        f"(z, y, x); model input {grid} (D, H, W), window {name} {low:.0f} to {high:.0f}"
    )
