"""Draw lesions inside named organs and paint them into a CT volume.

Why: the benchmark's truth must be something a model can see. Each lesion is a sphere whose
diameter is the finding's size in mm (converted by the voxel spacing), placed with its whole
body inside the organ and its centre in the finding's third of the organ, and painted with a
soft edge at the HU of its kind: cyst 0-15, solid mass 30-45 below or above the organ, calcification
300-800, lung nodule -50..+50.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import SimpleITK as sitk

from model_core.benchmark.anatomy import LabelledVolume, finding_site_label
from model_core.benchmark.findings import LEVELS, ORGAN_KINDS, Finding

# Diameter range (mm) drawn per kind; all inside the benchmark's 4-40 mm.
KIND_SIZE_MM: dict[str, tuple[int, int]] = {
    "cyst": (4, 40),
    "solid mass": (8, 40),
    "calcification": (4, 15),
    "lung nodule": (4, 30),
}
# Relative frequency of each kind among those an organ allows (calcifications are never large).
KIND_WEIGHTS: dict[str, float] = {"cyst": 1.0, "solid mass": 1.0, "calcification": 0.6, "lung nodule": 1.4}
# Whole-millimetre diameters of each size bucket (see ``findings.size_bucket``).
BUCKET_SIZE_MM: dict[str, tuple[int, int]] = {"small": (4, 9), "medium": (10, 20), "large": (21, 40)}
# How often each organ site receives a lesion (renormalised over the sites in view).
SITE_WEIGHTS: dict[str, float] = {
    "liver": 0.3,
    "spleen": 0.15,
    "kidney_right": 0.15,
    "kidney_left": 0.15,
    "lung_right": 0.125,
    "lung_left": 0.125,
}
CYST_HU = (0.0, 15.0)
MIN_CONTRAST_HU = 20.0  # a lesion differs from its organ by at least this much
LEVEL_MARGIN = 0.04  # centres stay this fraction of the organ height away from a third's border
MIN_GAP_MM = 3.0  # free space between two lesions


def level_of(fraction: float) -> str:
    """The third holding a height fraction of the organ (0 = its lowest slice, 1 = its highest)."""
    if fraction >= 2 / 3:
        return "upper"
    return "middle" if fraction >= 1 / 3 else "lower"


def _height_fraction(mask: np.ndarray) -> np.ndarray:
    """Per slice, the height fraction within the organ's craniocaudal extent; ``(D,)``, NaN outside."""
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    fraction = np.full(mask.shape[0], np.nan)
    low, high = slices[0], slices[-1]
    fraction[low : high + 1] = (np.arange(low, high + 1) - low) / max(high - low, 1)
    return fraction


def inside_distance_mm(mask: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Distance (mm) from each voxel inside ``mask`` to its border, 0 outside; ``(D, H, W)`` float32.

    The mask is padded with background first, so the volume's edge counts as a border and no
    lesion is cut by the field of view.
    """
    padded = np.pad(mask.astype(np.uint8), 1)
    image = sitk.GetImageFromArray(padded)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_mm)))
    distance = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=True, squaredDistance=False, useImageSpacing=True
    )
    return np.clip(sitk.GetArrayFromImage(distance)[1:-1, 1:-1, 1:-1], 0.0, None).astype(np.float32)


def visible_kinds(organ: str, organ_hu: float) -> list[str]:
    """The kinds the organ allows that would differ from it by ``MIN_CONTRAST_HU`` or more.

    Why: a cyst (0-15 HU) in an unenhanced kidney of 15 HU is invisible, and a finding no reader
    could see would only add noise to the benchmark.
    """
    return [k for k in ORGAN_KINDS[organ] if k != "cyst" or organ_hu - CYST_HU[0] >= MIN_CONTRAST_HU + 5]


def _draw_one(
    volume: LabelledVolume,
    rng: np.random.Generator,
    site: str,
    placed: list[Finding],
    distance: np.ndarray,
    organ_hu: float,
) -> Finding | None:
    """One lesion at ``site`` that fits, or None when the drawn level has no room.

    ``distance``: the organ's ``inside_distance_mm``; ``organ_hu``: its median HU.
    """
    organ, _, side = site.partition("_")
    kinds = visible_kinds(organ, organ_hu)
    weights = np.array([KIND_WEIGHTS[k] for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    level = LEVELS[int(rng.integers(len(LEVELS)))]
    mask = volume.mask(site)
    fraction = _height_fraction(mask)
    in_level = np.array([level_of(f) == level if np.isfinite(f) else False for f in fraction])
    in_level &= np.all(np.abs(fraction[:, None] - np.array([1 / 3, 2 / 3])) > LEVEL_MARGIN, axis=1)
    room = np.where(in_level[:, None, None], distance, 0.0)
    spacing = np.asarray(volume.spacing_mm)
    if placed:  # keep clear of earlier lesions: shrink the room by their distance
        index = np.indices(mask.shape, dtype=np.float32).reshape(3, -1).T
        for other in placed:
            gap = np.linalg.norm((index - np.asarray(other.center_voxel)) * spacing, axis=1).reshape(
                mask.shape
            )
            room = np.minimum(room, np.clip(gap - other.size_mm / 2 - MIN_GAP_MM, 0.0, None))
    # Draw the size bucket first (uniform over those that fit), so large lesions are not rare.
    low, high = KIND_SIZE_MM[kind]
    high = min(high, int(np.floor(2 * room.max())))
    ranges = [(max(low, b_low), min(high, b_high)) for b_low, b_high in BUCKET_SIZE_MM.values()]
    ranges = [(a, b) for a, b in ranges if a <= b]
    if not ranges:
        return None
    a, b = ranges[int(rng.integers(len(ranges)))]
    size = int(rng.integers(a, b + 1))
    candidates = np.argwhere(room >= size / 2)
    center = candidates[int(rng.integers(len(candidates)))]
    return Finding(
        organ=organ,
        kind=kind,
        size_mm=float(size),
        side=side or None,
        level=level,
        center_voxel=(int(center[0]), int(center[1]), int(center[2])),
    )


def plan_findings(
    volume: LabelledVolume, rng: np.random.Generator, count: int, max_tries: int = 30
) -> list[Finding]:
    """Draw ``count`` non-overlapping lesions in the organs in view (organ, kind, size, level, centre).

    Raises when the volume has no organ site or when ``count`` lesions do not fit.
    """
    sites = [site for site in volume.sites_in_view() if site in SITE_WEIGHTS]
    if count and not sites:
        raise ValueError(
            f"volume from {volume.source!r} shows no liver, spleen, kidney or lung to place lesions in"
        )
    weights = np.array([SITE_WEIGHTS[s] for s in sites])
    placed: list[Finding] = []
    organ_info: dict[str, tuple[np.ndarray, float]] = {}  # site -> (inside distance, median HU)
    for _ in range(count):
        for _ in range(max_tries):
            site = sites[int(rng.choice(len(sites), p=weights / weights.sum()))]
            if site not in organ_info:
                mask = volume.mask(site)
                organ_info[site] = (
                    inside_distance_mm(mask, volume.spacing_mm),
                    float(np.median(volume.hu[mask])),
                )
            finding = _draw_one(volume, rng, site, placed, *organ_info[site])
            if finding is not None:
                placed.append(finding)
                break
        else:
            raise RuntimeError(
                f"could not fit lesion {len(placed) + 1} of {count} in {volume.source!r} after {max_tries} tries; "
                "ask for fewer lesions or a finer grid"
            )
    return placed


def lesion_occupancy(
    shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], finding: Finding
) -> np.ndarray:
    """Soft sphere of the finding: fraction of each voxel it fills, ``(D, H, W)`` float32 in [0, 1].

    The edge ramps over half a voxel on each side of the surface (partial volume).
    """
    if finding.center_voxel is None or finding.size_mm is None:
        raise ValueError(f"finding {finding.site} {finding.kind} needs center_voxel and size_mm to be drawn")
    axes = [
        (np.arange(n, dtype=np.float32) - c) * s
        for n, c, s in zip(shape, finding.center_voxel, spacing_mm, strict=True)
    ]
    z, y, x = np.ix_(*axes)
    distance = np.sqrt(z**2 + y**2 + x**2)
    edge = 0.5 * float(np.prod(spacing_mm)) ** (1 / 3)
    return np.clip((finding.size_mm / 2 - distance) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def lesion_hu(finding: Finding, organ_hu: float, rng: np.random.Generator) -> float:
    """Mean HU of a lesion of this kind in an organ whose mean is ``organ_hu``."""
    if finding.kind == "cyst":  # kept at least MIN_CONTRAST_HU below the organ
        return float(rng.uniform(CYST_HU[0], max(CYST_HU[0], min(CYST_HU[1], organ_hu - MIN_CONTRAST_HU))))
    if finding.kind == "solid mass":
        return float(organ_hu + rng.choice([-1.0, 1.0]) * rng.uniform(30.0, 45.0))
    if finding.kind == "calcification":
        return float(rng.uniform(300.0, 800.0))
    return float(rng.uniform(-50.0, 50.0))  # lung nodule


def insert_lesions(
    volume: LabelledVolume, findings: list[Finding], rng: np.random.Generator, texture_hu: float = 0.0
) -> LabelledVolume:
    """A copy of ``volume`` with each finding painted in; labels stay those of the organs.

    ``texture_hu`` adds Gaussian noise inside lesions, for volumes (real CT) whose noise is
    already there; phantoms get theirs afterwards from ``simulate_acquisition``.
    """
    hu = volume.hu.astype(np.float32, copy=True)
    for finding in findings:
        organ = volume.mask(finding_site_label(finding))
        if finding.center_voxel is None or not organ[finding.center_voxel]:
            raise ValueError(
                f"finding {finding.site} {finding.kind} has its centre outside the {finding.site}"
            )
        organ_hu = float(np.median(volume.hu[organ]))
        weight = lesion_occupancy(hu.shape, volume.spacing_mm, finding)
        inside = weight > 0
        value = lesion_hu(finding, organ_hu, rng) + texture_hu * rng.standard_normal(int(inside.sum()))
        hu[inside] = (1.0 - weight[inside]) * hu[inside] + weight[inside] * value
    return replace(volume, hu=hu)
