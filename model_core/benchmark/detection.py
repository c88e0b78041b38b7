"""Does a per-patch lesion scorer see lesions? The organ-matched AUC.

Why this measure: a slab-level score (the highest patch of a slab against the slab's truth) is
swamped by false-positive patches of lesion-prone organs and scores a seeing tower about as low
as a blind one (docs/MODEL_CARD.md). Here each lesion is compared with the tissue it has to be
told apart from: its best-scoring patch (over every patch its sphere touches, in every slab it
crosses; ``slabs.patch_lesion_targets``) against the patches of the **same organ site** in
lesion-free slabs of all scored studies. A lesion's AUC is the share of those normal patches it
outscores (ties count half); the result averages it over lesions, overall, per kind and per size
bucket. A scorer that ignores the image gets 0.5; one that reads the lesion mask gets 1.0.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model_core.benchmark.anatomy import LABELS, finding_site_label
from model_core.benchmark.findings import KINDS, SIZE_BUCKETS, Finding, size_bucket
from model_core.benchmark.slabs import lesion_voxels_in_slab, to_patch_grid
from model_core.volume_encoder import SLICES_PER_GROUP

LESION_SITES: tuple[str, ...] = ("liver", "spleen", "kidney_right", "kidney_left", "lung_right", "lung_left")
"""The organ sites that take lesions (``lesions.SITE_WEIGHTS``), by label-table name."""


def patch_sites(labels: np.ndarray, patch: int) -> np.ndarray:
    """``(depth, H, W)`` tissue labels of one slab -> ``(H / patch, W / patch)`` object array: the
    lesion site that fills more than half of each patch's voxels, else None."""
    grid = to_patch_grid(labels, patch)  # (depth, rows, cols, patch * patch)
    grid = np.moveaxis(grid, 0, -2).reshape(*grid.shape[1:3], -1)  # (rows, cols, depth * patch * patch)
    sites = np.full(grid.shape[:2], None, dtype=object)
    for site in LESION_SITES:
        sites[(grid == LABELS[site]).mean(axis=-1) > 0.5] = site
    return sites


@dataclass
class OrganMatchedAUC:
    """Collects scored studies one by one (``add_study``), then gives the AUCs (``result``)."""

    lesions: list[tuple[Finding, float]] = field(default_factory=list)
    normals: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))

    def add_study(
        self,
        scores: np.ndarray,
        findings: Sequence[Finding],
        labels: np.ndarray,
        spacing_mm: Sequence[float],
        patch: int,
    ) -> None:
        """``scores`` ``(slabs, rows, cols)``: the scorer's value for each patch of each aligned slab
        (slab ``i`` holds slices ``3i..3i+2``); ``labels`` the study's ``(D, H, W)`` tissue labels."""
        slabs, rows, cols = scores.shape
        height, width = labels.shape[1:]
        if (rows * patch, cols * patch) != (height, width) or slabs > labels.shape[0] // SLICES_PER_GROUP:
            raise ValueError(
                f"scores {scores.shape} with {patch}-pixel patches do not tile labels {labels.shape}"
            )
        touched = np.zeros((len(findings), slabs, rows, cols), dtype=bool)
        for index, finding in enumerate(findings):
            for slab in range(slabs):
                voxels = lesion_voxels_in_slab(finding, spacing_mm, slab * SLICES_PER_GROUP, (height, width))
                touched[index, slab] = to_patch_grid(voxels.any(axis=0), patch).any(axis=-1)
        for index, finding in enumerate(findings):
            if touched[index].any():
                self.lesions.append((finding, float(scores[touched[index]].max())))
        lesion_free = ~touched.any(axis=(0, 2, 3)) if len(findings) else np.ones(slabs, dtype=bool)
        for slab in np.flatnonzero(lesion_free):
            start = slab * SLICES_PER_GROUP
            sites = patch_sites(labels[start : start + SLICES_PER_GROUP], patch)
            for site in LESION_SITES:
                chosen = scores[slab][sites == site]
                if chosen.size:
                    self.normals[site].append(chosen.astype(np.float64))

    def lesion_aucs(self) -> list[tuple[Finding, float]]:
        """Each lesion with its AUC against the normal patches of its organ site (lesions of a site
        without normal patches are left out)."""
        pooled = {site: np.sort(np.concatenate(parts)) for site, parts in self.normals.items() if parts}
        result = []
        for finding, best in self.lesions:
            normal = pooled.get(finding_site_label(finding))
            if normal is None:
                continue
            below = np.searchsorted(normal, best, side="left")
            ties = np.searchsorted(normal, best, side="right") - below
            result.append((finding, float((below + 0.5 * ties) / normal.size)))
        return result

    def result(self) -> dict[str, dict[str, float | int | None]]:
        """``{group: {"auc": mean AUC or None, "lesions": n}}`` for ``all``, ``10 mm and up``, each
        kind and each size bucket."""
        scored = self.lesion_aucs()
        groups: dict[str, list[float]] = {"all": [], "10 mm and up": []}
        groups.update({kind: [] for kind in KINDS})
        groups.update({bucket: [] for bucket in SIZE_BUCKETS})
        for finding, auc in scored:
            groups["all"].append(auc)
            groups[finding.kind].append(auc)
            groups[size_bucket(finding.size_mm)].append(auc)
            if finding.size_mm >= 10:
                groups["10 mm and up"].append(auc)
        return {
            name: {"auc": round(float(np.mean(values)), 4) if values else None, "lesions": len(values)}
            for name, values in groups.items()
        }
