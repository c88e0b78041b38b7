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


def share_below(sorted_normals: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each of ``values``, the share of ``sorted_normals`` below it, ties counting half: its
    AUC against them."""
    below = np.searchsorted(sorted_normals, values, side="left")
    ties = np.searchsorted(sorted_normals, values, side="right") - below
    return (below + 0.5 * ties) / sorted_normals.size


def check_tiling(scores: np.ndarray, labels: np.ndarray, patch: int) -> None:
    """Refuse per-patch ``scores`` ``(slabs, rows, cols)`` that do not tile the slabs of ``labels``."""
    slabs, rows, cols = scores.shape
    if (rows * patch, cols * patch) != labels.shape[1:] or slabs > labels.shape[0] // SLICES_PER_GROUP:
        raise ValueError(
            f"scores {scores.shape} with {patch}-pixel patches do not tile labels {labels.shape}"
        )


def touched_patches(
    findings: Sequence[Finding], spacing_mm: Sequence[float], grid: tuple[int, int, int], patch: int
) -> np.ndarray:
    """``(findings, slabs, rows, cols)`` bool: the patches each lesion's sphere touches, per slab."""
    slabs, rows, cols = grid
    touched = np.zeros((len(findings), slabs, rows, cols), dtype=bool)
    for index, finding in enumerate(findings):
        for slab in range(slabs):
            start = slab * SLICES_PER_GROUP
            voxels = lesion_voxels_in_slab(finding, spacing_mm, start, (rows * patch, cols * patch))
            touched[index, slab] = to_patch_grid(voxels.any(axis=0), patch).any(axis=-1)
    return touched


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
        check_tiling(scores, labels, patch)
        slabs = scores.shape[0]
        touched = touched_patches(findings, spacing_mm, scores.shape, patch)
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
            result.append((finding, float(share_below(normal, np.array([best]))[0])))
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


@dataclass
class SiteReadout:
    """The study-level decision a per-patch scorer allows: each organ site of a study is read by
    its highest-scoring patch over all slabs, and sites holding a lesion of ``min_size_mm`` and up
    are told from lesion-free sites (sites with only smaller lesions are left out).

    Why: a report names a lesion per organ and study, not per patch. A lesion's patch can beat
    most normal patches (organ-matched AUC) and still lose to the best of the hundreds of normal
    patches of its organ in one study. ``best_f1`` uses the threshold that suits these studies
    best: an upper bound on the finding F1 of a reader that only has this scorer's evidence.
    """

    min_size_mm: float = 10.0
    sites: list[tuple[bool, float]] = field(default_factory=list)

    def add_study(
        self,
        scores: np.ndarray,
        findings: Sequence[Finding],
        labels: np.ndarray,
        spacing_mm: Sequence[float],
        patch: int,
    ) -> None:
        """``scores`` ``(slabs, rows, cols)`` as ``OrganMatchedAUC.add_study`` takes them. A site's
        patches are those its tissue fills and those its lesions touch (a large lesion's patches
        hold more lesion than organ)."""
        check_tiling(scores, labels, patch)
        sites = np.stack(
            [
                patch_sites(labels[i * SLICES_PER_GROUP : (i + 1) * SLICES_PER_GROUP], patch)
                for i in range(scores.shape[0])
            ]
        )
        touched = touched_patches(findings, spacing_mm, scores.shape, patch)
        for site in LESION_SITES:
            of_site = [i for i, finding in enumerate(findings) if finding_site_label(finding) == site]
            if of_site and max(findings[i].size_mm for i in of_site) < self.min_size_mm:
                continue
            inside = (sites == site) | touched[of_site].any(axis=0)
            if inside.any():
                self.sites.append((bool(of_site), float(scores[inside].max())))

    def result(self) -> dict[str, float | int | None]:
        """``{"auc", "best_f1", "sites", "with_lesion"}`` (AUC and F1 None without both classes)."""
        truth = np.array([lesion for lesion, _ in self.sites], dtype=bool)
        score = np.array([value for _, value in self.sites], dtype=np.float64)
        counts = {"sites": len(self.sites), "with_lesion": int(truth.sum())}
        if not truth.any() or truth.all():
            return {"auc": None, "best_f1": None, **counts}
        auc = float(share_below(np.sort(score[~truth]), score[truth]).mean())
        best_f1 = 0.0
        for threshold in np.unique(score):
            called = score >= threshold
            hits = int((called & truth).sum())
            best_f1 = max(best_f1, 2 * hits / (called.sum() + truth.sum()))
        return {"auc": round(auc, 4), "best_f1": round(float(best_f1), 4), **counts}
