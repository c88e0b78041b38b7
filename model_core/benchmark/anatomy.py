"""The label table and volume container shared by the phantoms, the real volumes and the lesions.

Every benchmark volume lives in one canonical orientation so that "left", "right", "upper" and
"lower" mean the same thing everywhere: arrays are ``(D, H, W)`` with depth running inferior to
superior (superior slices last, as in ``docs/ARCHITECTURE.md``), rows anterior to posterior and
columns from the patient's right to the patient's left (DICOM "LPS" axes, the radiological
display with the patient's right on the image's left).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_core.benchmark.findings import SIDED_ORGANS, Finding

# One id per tissue class; real label maps are translated into these ids on reading.
LABELS: dict[str, int] = {
    "background": 0,
    "body": 1,  # soft tissue not named below (real volumes) and subcutaneous/visceral fat
    "muscle": 2,
    "bone": 3,
    "aorta": 4,
    "liver": 5,
    "spleen": 6,
    "kidney_right": 7,
    "kidney_left": 8,
    "lung_right": 9,
    "lung_left": 10,
    "bowel": 11,
    "mediastinum": 12,
}

PHASES: tuple[str, ...] = ("non-contrast", "arterial", "portal venous")


def site_label(organ: str, side: str | None) -> str:
    """The label-table name of an organ site: ``("kidney", "left") -> "kidney_left"``."""
    if organ in SIDED_ORGANS:
        if side not in ("left", "right"):
            raise ValueError(f"organ {organ!r} needs side 'left' or 'right', got {side!r}")
        return f"{organ}_{side}"
    return organ


def finding_site_label(finding: Finding) -> str:
    """The label-table name of the organ a finding lies in."""
    return site_label(finding.organ, finding.side)


@dataclass
class LabelledVolume:
    """A CT volume in HU with its tissue labels, in the canonical orientation.

    ``hu`` is float32 ``(D, H, W)`` in Hounsfield units, ``labels`` uint8 ``(D, H, W)`` with ids
    from ``LABELS``, ``spacing_mm`` the voxel size ``(dz, dy, dx)``. ``phase`` is the contrast
    phase when known (one of ``PHASES``) and ``source`` names where the anatomy came from.
    """

    hu: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, float, float]
    phase: str | None
    source: str

    def __post_init__(self) -> None:
        if self.hu.ndim != 3 or self.hu.shape != self.labels.shape:
            raise ValueError(
                f"hu {self.hu.shape} and labels {self.labels.shape} must be the same (D, H, W) shape"
            )
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm={self.spacing_mm}: give three positive sizes (dz, dy, dx) in mm")
        if self.phase is not None and self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r}: use one of {PHASES} or None")

    def mask(self, label_name: str) -> np.ndarray:
        """Boolean ``(D, H, W)`` mask of one label-table class."""
        return self.labels == LABELS[label_name]

    def sites_in_view(self, min_slices: int = 3) -> list[str]:
        """Organ sites (label names) that span at least ``min_slices`` slices, so thirds exist."""
        present = []
        for name in ("liver", "spleen", "kidney_right", "kidney_left", "lung_right", "lung_left"):
            slices = np.flatnonzero(self.mask(name).any(axis=(1, 2)))
            if slices.size and slices[-1] - slices[0] + 1 >= min_slices:
                present.append(name)
        return present
