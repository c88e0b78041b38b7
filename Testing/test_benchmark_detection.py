"""Dense per-patch lesion targets and the organ-matched AUC of a per-patch scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_core.benchmark.anatomy import finding_site_label
from model_core.benchmark.build import BenchmarkConfig, make_study
from model_core.benchmark.detection import OrganMatchedAUC, SiteReadout, patch_sites
from model_core.benchmark.findings import Finding
from model_core.benchmark.lesions import lesion_occupancy
from model_core.benchmark.slabs import PATCH_LESION_LABELS, findings_in_slab, patch_lesion_targets

SPACING = (5.0, 2.0, 2.0)
GRID = (12, 32, 32)
PATCH = 8


def _marked(targets: np.ndarray, label: str = "any") -> set[tuple[int, int]]:
    column = targets[:, PATCH_LESION_LABELS.index(label)]
    return {divmod(int(i), GRID[2] // PATCH) for i in np.flatnonzero(column)}


def test_a_lesion_marks_exactly_the_patches_its_sphere_touches_in_each_slab_it_crosses() -> None:
    # centre slice 6, radius 6 mm at 5 mm slices: slices 5, 6 and 7, so slabs 3..5 and 6..8
    cyst = Finding("liver", "cyst", 12.0, None, "upper", center_voxel=(6, 13, 20))
    by_slab = {start: patch_lesion_targets([cyst], SPACING, start, GRID[1:], PATCH) for start in (0, 3, 6, 9)}
    assert _marked(by_slab[0]) == set() and _marked(by_slab[9]) == set()
    # slice 5 (1 slice off): in-plane radius 3.3 mm, rows 12-14, columns 19-21 -> patch (1, 2)
    assert _marked(by_slab[3]) == {(1, 2)}
    # slice 6 reaches rows 10-16 (row 16 is patch row 2) and columns 17-23
    assert _marked(by_slab[6]) == {(1, 2), (2, 2)}
    assert _marked(by_slab[6], "cyst") == _marked(by_slab[6]) and not _marked(by_slab[6], "solid mass")
    # the same patches as the rendered sphere: a voxel counts where its occupancy is at least 0.5
    occupancy = lesion_occupancy(GRID, SPACING, cyst)
    for start, targets in by_slab.items():
        rendered = occupancy[start : start + 3].max(axis=0) >= 0.5
        cells = rendered.reshape(4, PATCH, 4, PATCH).any(axis=(1, 3))
        assert _marked(targets) == {tuple(int(v) for v in rc) for rc in np.argwhere(cells)}
        assert bool(findings_in_slab([cyst], SPACING, start)) == bool(_marked(targets))


def test_patch_targets_follow_the_towers_own_patch_order() -> None:
    """Rows are anterior to posterior and columns right to left, as the tower's patch embedding
    orders its tokens: only the tokens of marked patches change when the lesion is drawn."""
    from model_core.tiny import build_tiny_ctmllm

    model = build_tiny_ctmllm("internvl", num_3d_blocks=0, image_size=32, patch_size=PATCH)
    nodule = Finding("lung", "lung nodule", 9.0, "left", "lower", center_voxel=(1, 5, 26))
    targets = patch_lesion_targets([nodule], SPACING, 0, GRID[1:], PATCH)
    image = torch.zeros(1, 3, 32, 32)
    image[0, 1, 3:8, 24:29] = 1.0  # the lesion's voxels in the slab's middle slice
    family, tower = model.volume_adapter.family, model.vision_tower
    with torch.no_grad():
        changed = (family.embed(tower, image) - family.embed(tower, torch.zeros_like(image))).abs().sum(-1)
    tokens = changed[0, family.num_prefix_tokens :] > 1e-6
    assert set(np.flatnonzero(tokens.numpy()).tolist()) == set(np.flatnonzero(targets[:, 0]).tolist()) == {3}


@pytest.fixture(scope="module")
def studies() -> list:
    config = BenchmarkConfig(grid=(12, 48, 48))
    return [make_study("test", index, config) for index in range(12)]


def _scored(studies: list, scorer, collector):
    """``collector`` (OrganMatchedAUC or SiteReadout) fed every slab's scores, then its result."""
    for study in studies:
        slabs = study.image.shape[0] // 3
        scores = np.stack([scorer(study, start * 3) for start in range(slabs)])
        collector.add_study(scores, study.findings, study.labels, study.spacing_mm, PATCH)
    return collector.result()


def _auc(studies: list, scorer) -> dict:
    return _scored(studies, scorer, OrganMatchedAUC())


def test_organ_matched_auc_is_chance_for_a_blind_scorer_and_one_for_the_lesion_mask(studies: list) -> None:
    blind = _auc(studies, lambda study, start: np.zeros((6, 6)))
    seeing = _auc(
        studies,
        lambda study, start: patch_lesion_targets(study.findings, study.spacing_mm, start, (48, 48), PATCH)[
            :, 0
        ].reshape(6, 6),
    )
    assert blind["all"]["lesions"] == seeing["all"]["lesions"] > 5
    assert blind["all"]["auc"] == 0.5 and seeing["all"]["auc"] == 1.0
    for group in ("cyst", "small", "10 mm and up"):
        if seeing[group]["lesions"]:
            assert blind[group]["auc"] == 0.5 and seeing[group]["auc"] == 1.0
    # a scorer that marks the whole organ of a lesion-prone site ranks lesions no better than chance
    organ = _auc(
        studies,
        lambda study, start: (patch_sites(study.labels[start : start + 3], PATCH) != None).astype(float),  # noqa: E711
    )
    assert organ["all"]["auc"] <= 0.5 + 1e-9


@pytest.mark.parametrize("collector", [OrganMatchedAUC, SiteReadout])
def test_both_scorings_refuse_scores_that_do_not_tile_the_slab(studies: list, collector) -> None:
    study = studies[1]
    with pytest.raises(ValueError, match="do not tile"):
        collector().add_study(np.zeros((4, 5, 5)), study.findings, study.labels, study.spacing_mm, PATCH)


def _readout(studies: list, scorer) -> dict:
    return _scored(studies, scorer, SiteReadout(min_size_mm=0.1))  # the phantoms' lesions are of every size


def test_site_readout_is_chance_for_a_blind_scorer_and_perfect_for_the_lesion_mask(studies: list) -> None:
    def mask(study, start):
        return patch_lesion_targets(study.findings, study.spacing_mm, start, (48, 48), PATCH)[:, 0].reshape(
            6, 6
        )

    blind = _readout(studies, lambda study, start: np.zeros((6, 6)))
    seeing = _readout(studies, mask)
    assert blind["sites"] == seeing["sites"] and 0 < seeing["with_lesion"] < seeing["sites"]
    assert blind["auc"] == 0.5 and seeing["auc"] == 1.0 and seeing["best_f1"] == 1.0
    # the blind scorer's best is to call every site: F1 = 2p / (1 + p) for p sites with a lesion
    share = seeing["with_lesion"] / seeing["sites"]
    assert blind["best_f1"] == pytest.approx(2 * share / (1 + share), abs=1e-4)

    # one normal patch scoring like a lesion (a vessel in the lung, say) in each slab caps the
    # readout, though almost every normal patch still ranks below every lesion
    def with_false_alarm(study, start):
        scores = mask(study, start).copy()
        sites = patch_sites(study.labels[start : start + 3], PATCH)
        lesion_sites = {finding_site_label(f) for f in study.findings}
        normal = np.argwhere([[s is not None and s not in lesion_sites for s in row] for row in sites])
        if len(normal):
            scores[tuple(normal[0])] = 1.0
        return scores

    assert _readout(studies, with_false_alarm)["best_f1"] < 1.0


def test_site_readout_leaves_out_sites_with_only_smaller_lesions(studies: list) -> None:
    every_size = _readout(studies, lambda study, start: np.zeros((6, 6)))
    sizes = [f.size_mm for study in studies for f in study.findings]
    large_only = _scored(studies, lambda study, start: np.zeros((6, 6)), SiteReadout(min_size_mm=max(sizes)))
    assert large_only["with_lesion"] < every_size["with_lesion"] and large_only["sites"] < every_size["sites"]
