"""2D slab samples from a built lesion benchmark: what the demo's 2D model is pretrained on.

Why: the project's 3D model starts from a 2D multimodal model. No pretrained 2D radiology model
can be downloaded here, so the demo pipeline trains one first, on 3-slice slabs of the benchmark's
training studies: a slab ``(3, H, W)`` is exactly one slice group of the 3D encoder, i.e. the 2D
model's 3-channel image. Slabs start at multiples of 3, as ``model_core.volume_encoder`` cuts
volumes, so the 2D model sees the images the 3D model's groups will hold.

Each slab gets a caption stating the findings whose lesion sphere crosses it and questions from
the benchmark's question maker about those findings (count, phase, organ, location, size). The
caption is either written by the benchmark's own report writer (``"report"``: the 3D reports'
varied wording) or is a plain list of labels (``"findings_list"``: every token says what the image
shows, so the tower learns from every caption token rather than mostly from wording).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from model_core.benchmark.build import FINDINGS_FILE, SPLITS
from model_core.benchmark.findings import KINDS, Finding, size_bucket
from model_core.benchmark.text import make_questions, parse_report, write_report
from model_core.data.formats import load_m3d_npy
from model_core.data.sample import Sample
from model_core.prompts import closed_target, format_closed_question
from model_core.volume_encoder import SLICES_PER_GROUP

SLAB_PROMPT = "Describe the focal lesions in this CT section."
NORMAL_SLAB_TEXT = "No focal lesion in this section."
FINDINGS_LIST_PROMPT = "List the focal lesions in this CT section."
NO_FINDINGS_LIST = "none"
CAPTION_STYLES: tuple[str, ...] = ("report", "findings_list")


def findings_list(findings: Sequence[Finding]) -> str:
    """``"left kidney cyst, small; liver solid mass, large"`` (site, kind, size bucket), or ``"none"``."""
    if not findings:
        return NO_FINDINGS_LIST
    return "; ".join(f"{f.site} {f.kind}, {size_bucket(f.size_mm)}" for f in findings)


PATCH_LESION_LABELS: tuple[str, ...] = ("any", *KINDS)
"""What each patch of a slab is taught in the demo's tower pretraining: whether any lesion, and
which kinds, touch it."""


def lesion_voxels_in_slab(
    finding: Finding,
    spacing_mm: Sequence[float],
    start: int,
    image_hw: Sequence[int],
    depth: int = SLICES_PER_GROUP,
) -> np.ndarray:
    """``(depth, H, W)`` bool: the voxels of slices ``[start, start + depth)`` whose centre lies in
    the finding's sphere (where ``lesions.lesion_occupancy`` is at least 0.5), plus the centre voxel.

    The centre voxel always counts, so a lesion smaller than a voxel still marks where it is.
    """
    if finding.center_voxel is None or finding.size_mm is None:
        raise ValueError(f"finding {finding} has no centre or size: pass ground-truth findings")
    height, width = (int(v) for v in image_hw)
    cz, cy, cx = finding.center_voxel
    sz, sy, sx = (float(v) for v in spacing_mm)
    dz = ((np.arange(start, start + depth) - cz) * sz)[:, None, None]
    dy = ((np.arange(height) - cy) * sy)[None, :, None]
    dx = ((np.arange(width) - cx) * sx)[None, None, :]
    inside = dz**2 + dy**2 + dx**2 <= (finding.size_mm / 2) ** 2
    if start <= cz < start + depth:
        inside[cz - start, cy, cx] = True
    return inside


def to_patch_grid(voxels: np.ndarray, patch: int) -> np.ndarray:
    """``(..., H, W)`` -> ``(..., H / patch, W / patch, patch * patch)``: each patch's voxels, patches in
    the row-major order of the tower's patch embedding."""
    *lead, height, width = voxels.shape
    if height % patch or width % patch:
        raise ValueError(f"a {height}x{width} slab does not split into {patch}-pixel patches")
    grid = voxels.reshape(*lead, height // patch, patch, width // patch, patch)
    grid = np.moveaxis(grid, -3, -2)  # (..., rows, cols, patch, patch)
    return grid.reshape(*lead, height // patch, width // patch, patch * patch)


def patch_lesion_targets(
    findings: Sequence[Finding], spacing_mm: Sequence[float], start: int, image_hw: Sequence[int], patch: int
) -> np.ndarray:
    """``(rows * cols, len(PATCH_LESION_LABELS))`` multi-hot targets of the slab starting at slice
    ``start``: a patch is marked for every finding whose sphere reaches one of its voxels in any of
    the slab's slices (``lesion_voxels_in_slab``); patches in row-major order."""
    height, width = (int(v) for v in image_hw)
    rows, cols = height // patch, width // patch
    targets = np.zeros((rows * cols, len(PATCH_LESION_LABELS)), dtype=np.float32)
    for finding in findings:
        voxels = lesion_voxels_in_slab(finding, spacing_mm, start, (height, width)).any(axis=0)
        touched = to_patch_grid(voxels, patch).any(axis=-1).reshape(-1)
        targets[touched, 0] = 1.0
        targets[touched, PATCH_LESION_LABELS.index(finding.kind)] = 1.0
    return targets


def caption_names_lesion(caption: str, caption_style: str) -> bool:
    """Whether a slab caption written in ``caption_style`` states any finding."""
    if caption_style == "findings_list":
        return caption.strip().lower() != NO_FINDINGS_LIST
    return bool(parse_report(caption))


def findings_in_slab(
    findings: Sequence[Finding], spacing_mm: Sequence[float], start: int, depth: int = SLICES_PER_GROUP
) -> list[Finding]:
    """The findings whose sphere (diameter ``size_mm``) reaches slices ``[start, start + depth)``.

    ``spacing_mm`` is ``(z, y, x)``; a finding needs ``center_voxel`` ``(z, y, x)`` (ground truth
    always has one). Distance is taken from the lesion centre to the nearest slice centre of the slab.
    """
    chosen = []
    for finding in findings:
        if finding.center_voxel is None or finding.size_mm is None:
            raise ValueError(f"finding {finding} has no centre or size: pass ground-truth findings")
        z = finding.center_voxel[0]
        gap_slices = max(start - z, 0, z - (start + depth - 1))
        if gap_slices * float(spacing_mm[0]) <= finding.size_mm / 2:
            chosen.append(finding)
    return chosen


@dataclass(frozen=True)
class SlabItem:
    """One slab sample before its image is read: which study, which slices, what to say."""

    image: Path
    start: int
    task: str
    prompt: str
    answer: str
    sample_id: str
    meta: dict


def _sites_of(findings: Sequence[Finding]) -> list[tuple[str, str | None]]:
    return list(dict.fromkeys((f.organ, f.side) for f in findings))


def slab_items(
    benchmark_dir: str | os.PathLike,
    split: str = "train",
    questions_per_slab: int = 1,
    seed: int = 0,
    limit_studies: int | None = None,
    min_lesion_share: float | None = None,
    caption_style: str = "report",
) -> list[SlabItem]:
    """Every aligned slab of every study of ``split``: one caption (``caption_style``, see the
    module docstring) and ``questions_per_slab`` questions each (closed and open alternate), drawn
    from ``(seed, study, slab)``.

    ``min_lesion_share`` keeps every slab with a lesion and only as many lesion-free slabs (drawn
    from ``seed``) as leave slabs with a lesion at least that share; most slabs hold none.
    """
    if min_lesion_share is not None and not 0.0 < min_lesion_share <= 1.0:
        raise ValueError(
            f"min_lesion_share={min_lesion_share}: use a share in (0, 1], or None for every slab"
        )
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    if caption_style not in CAPTION_STYLES:
        raise ValueError(f"caption_style={caption_style!r}: use one of {CAPTION_STYLES}")
    root = Path(benchmark_dir)
    manifest = root / FINDINGS_FILE
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest} does not exist: build the benchmark first (python -m model_core.benchmark build)"
        )
    studies = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    studies = [s for s in studies if s["split"] == split][:limit_studies]
    if not studies:
        raise ValueError(f"{root} holds no {split!r} studies: build it with a {split} count above 0")
    items: list[SlabItem] = []
    for number, study in enumerate(studies):
        image = root / study["image"]
        depth = int(np.load(image, mmap_mode="r").shape[-3])
        findings = [Finding.from_dict(f) for f in study["findings"]]
        for start in range(0, depth - SLICES_PER_GROUP + 1, SLICES_PER_GROUP):
            rng = np.random.default_rng([seed, number, start])
            inside = findings_in_slab(findings, study["spacing_mm"], start)
            if caption_style == "findings_list":
                prompt, caption = FINDINGS_LIST_PROMPT, findings_list(inside)
            else:
                prompt = SLAB_PROMPT
                caption = write_report(inside, rng, _sites_of(inside)) if inside else NORMAL_SLAB_TEXT
            base = {"study": study["id"], "slab_start": start, "findings": [f.to_dict() for f in inside]}
            slab_id = f"{study['id']}@{start}"
            items.append(SlabItem(image, start, "report", prompt, caption, slab_id, base))
            rows = make_questions(inside, rng, _sites_of(inside), study.get("phase"), questions_per_slab)
            for index, row in enumerate(rows):
                closed = (number + start // SLICES_PER_GROUP + index) % 2 == 0
                choices = {letter: row[f"Choice {letter}"] for letter in "ABCD"}
                prompt = format_closed_question(row["Question"], choices) if closed else row["Question"]
                answer = closed_target(row["Answer Choice"], row["Answer"]) if closed else row["Answer"]
                meta = {**base, "question_type": int(row["Question Type"]), "closed": closed}
                items.append(SlabItem(image, start, "vqa", prompt, answer, f"{slab_id}#q{index}", meta))
    return items if min_lesion_share is None else _keep_lesion_share(items, min_lesion_share, seed)


def _keep_lesion_share(items: list[SlabItem], share: float, seed: int) -> list[SlabItem]:
    """Drop the items of randomly drawn lesion-free slabs until lesion slabs make up ``share``."""
    slabs = list(dict.fromkeys((item.meta["study"], item.start) for item in items))
    with_lesion = {(i.meta["study"], i.start) for i in items if i.meta["findings"]}
    normal = [slab for slab in slabs if slab not in with_lesion]
    keep = min(len(normal), int(len(with_lesion) * (1 - share) / share))
    chosen = np.random.default_rng(seed).permutation(len(normal))[:keep]
    kept = with_lesion | {normal[i] for i in chosen}
    return [item for item in items if (item.meta["study"], item.start) in kept]


class SlabDataset(Dataset):
    """``Sample`` of ``(3, H, W)`` slabs (float32 in [0, 1]) read lazily from the benchmark's volumes."""

    def __init__(self, items: Sequence[SlabItem]) -> None:
        if not items:
            raise ValueError("no slab items: build them with slab_items(benchmark_dir, split)")
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        volume = load_m3d_npy(item.image)[item.start : item.start + SLICES_PER_GROUP]
        return Sample(
            task=item.task,
            prompt=item.prompt,
            answer=item.answer,
            volume=np.ascontiguousarray(volume),
            meta={**item.meta, "sample_id": item.sample_id},
        )
