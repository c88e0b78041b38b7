"""What the demo pipeline trains before the 3D transfer: the tower's lesion pretraining and the 2D
captioning of slabs (``python -m model_core.demo_pipeline``, step 3).

Why a tower pretraining step: a real 2D MLLM's tower was pretrained on natural images before the
MLLM was trained; the demo's tower starts from random weights and has no such pretraining to
offer. Trained only through captions, a random tower never learned to see the benchmark's lesions
on this CPU, and a tower labelled only in the patch holding a lesion's centre ranked lesion cells
above normal cells of the same organ barely better than chance (``../shared/NOTES.md``, "Lesion
detectability"). So the tower is taught densely first: a linear head on every patch feature learns
"any lesion" and each lesion kind, with every patch that a lesion's sphere touches, in every slab
it crosses, as a positive (``benchmark.slabs.patch_lesion_targets``). The head is dropped after
this step; the 2D checkpoint keeps only what an InternVL model has.

Batches are balanced between three kinds of crops: crops that hold a lesion, crops drawn at
random, and crops centred on liver, spleen, kidney or lung in lesion-free slabs (the tower's hard
negatives are normal organ tissue, not air). A crop is a window of ``CROP_PATCHES`` x
``CROP_PATCHES`` patches of a slab: the tower embeds the whole slab (patch embedding and its own
position embeddings) and runs its blocks on the window's tokens only, so a crop costs a quarter of
a slab and every patch keeps the position embedding it has in the full slab (token dropping, as
MAE and FLIP train ViTs). Within a crop, patches touched by a lesion weigh ``POSITIVE_WEIGHT`` and
lesion-free organ patches ``ORGAN_NEGATIVE_WEIGHT``. The held-out measure reads whole slabs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_core.benchmark.build import FINDINGS_FILE, read_labels
from model_core.benchmark.detection import OrganMatchedAUC, SiteReadout, patch_sites
from model_core.benchmark.findings import Finding
from model_core.benchmark.slabs import PATCH_LESION_LABELS, findings_in_slab, patch_lesion_targets
from model_core.data.formats import load_m3d_npy
from model_core.volume_encoder import SLICES_PER_GROUP

POSITIVE_WEIGHT = 10.0
"""Weight of a patch that a lesion touches: a few patches of 256 in half the slabs."""
ORGAN_NEGATIVE_WEIGHT = 2.0
"""Weight of a lesion-free patch of liver, spleen, kidney or lung (the hard negatives)."""
CROP_PATCHES = 8
"""Side of a training crop in patches (64 pixels at the demo's 8-pixel patches, about 20 cm)."""

Log = Callable[[str], None]


def optimise(
    parameters: list[torch.nn.Parameter],
    batches: Iterator[Any],
    loss_of: Callable[[Any], torch.Tensor],
    steps: int,
    lr: float,
    name: str,
    log: Log,
    bf16: bool = False,
) -> list[dict[str, float]]:
    """AdamW with linear warm-up and cosine decay over ``steps`` batches; returns the logged losses.

    ``bf16``: the forward pass under CPU/GPU bfloat16 autocast (weights stay float32).
    """
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=max(1, steps // 20), num_training_steps=steps
    )
    device_type = parameters[0].device.type
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            value = float(loss.detach())
            history.append({"step": step, "loss": value, "seconds": time.perf_counter() - started})
            log(f"{name} step {step}/{steps}: loss {value:.4f}")
    return history


# ----------------------------------------------------------------------------------------------
# The tower's dense lesion pretraining


@dataclass(frozen=True)
class StudySlabs:
    """One benchmark study as the tower step reads it: its files, truth and slab count."""

    study_id: str
    image: Path
    findings: tuple[Finding, ...]
    spacing_mm: tuple[float, float, float]
    slabs: int

    def slab(self, index: int) -> np.ndarray:
        """Slices ``3 * index .. 3 * index + 2``, ``(3, H, W)`` float32 (read alone, memory-mapped)."""
        start = index * SLICES_PER_GROUP
        volume = np.load(self.image, mmap_mode="r", allow_pickle=False)
        volume = volume[0] if volume.ndim == 4 else volume  # M3D's (1, D, H, W)
        return np.array(volume[start : start + SLICES_PER_GROUP], dtype=np.float32)


def benchmark_studies(benchmark_dir: str | Path, split: str) -> list[StudySlabs]:
    """The studies of one split of a built benchmark (``findings.jsonl``)."""
    root = Path(benchmark_dir)
    studies = []
    for line in (root / FINDINGS_FILE).read_text(encoding="utf-8").splitlines():
        entry = json.loads(line) if line.strip() else None
        if entry is None or entry["split"] != split:
            continue
        image = root / entry["image"]
        depth = int(np.load(image, mmap_mode="r").shape[-3])
        studies.append(
            StudySlabs(
                study_id=entry["id"],
                image=image,
                findings=tuple(Finding.from_dict(f) for f in entry["findings"]),
                spacing_mm=tuple(float(v) for v in entry["spacing_mm"]),
                slabs=depth // SLICES_PER_GROUP,
            )
        )
    if not studies:
        raise ValueError(
            f"{root} holds no {split!r} studies: build the benchmark with a {split} count above 0"
        )
    return studies


@dataclass
class TowerBatch:
    """Crops of slabs: the slabs ``(B, 3, H, W)``, each crop's patch indices ``(B, crop patches)``
    (row-major in the slab's patch grid), targets ``(B, crop patches, len(PATCH_LESION_LABELS))``
    and weights ``(B, crop patches)``."""

    slabs: torch.Tensor
    patches: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor

    def to(self, device: torch.device | str) -> TowerBatch:
        return TowerBatch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


class TowerBatches:
    """Balanced crops (module docstring): lesion, random and organ-centred negative, a third each."""

    def __init__(
        self, benchmark_dir: str | Path, studies: Sequence[StudySlabs], patch: int, seed: int
    ) -> None:
        self.root, self.studies, self.patch = Path(benchmark_dir), list(studies), patch
        self.rng = np.random.default_rng(seed)
        self.all_slabs = [(s, i) for s, study in enumerate(self.studies) for i in range(study.slabs)]
        with_lesion = [
            bool(findings_in_slab(self.studies[s].findings, self.studies[s].spacing_mm, i * SLICES_PER_GROUP))
            for s, i in self.all_slabs
        ]
        self.lesion_slabs = [slab for slab, flag in zip(self.all_slabs, with_lesion, strict=True) if flag]
        self.normal_slabs = [slab for slab, flag in zip(self.all_slabs, with_lesion, strict=True) if not flag]
        if not self.lesion_slabs or not self.normal_slabs:
            raise ValueError("the training split needs slabs with and without lesions: build more studies")
        self._organs: dict[int, np.ndarray] = {}

    def organ_patches(self, study_index: int) -> np.ndarray:
        """``(slabs, rows, cols)`` bool: patches mostly of a lesion-prone organ (cached per study)."""
        if study_index not in self._organs:
            study = self.studies[study_index]
            labels = read_labels(self.root, study.study_id)
            self._organs[study_index] = np.stack(
                [patch_sites(labels[i * 3 : i * 3 + 3], self.patch) != None for i in range(study.slabs)]  # noqa: E711
            )
        return self._organs[study_index]

    def _window(self, rows: int, cols: int, around: tuple[int, int] | None) -> np.ndarray:
        """The patch indices of a crop holding patch ``around`` at a random place (or anywhere)."""
        size = min(CROP_PATCHES, rows, cols)
        if around is None:
            top, left = self.rng.integers(0, rows - size + 1), self.rng.integers(0, cols - size + 1)
        else:
            top = int(np.clip(around[0] - self.rng.integers(0, size), 0, rows - size))
            left = int(np.clip(around[1] - self.rng.integers(0, size), 0, cols - size))
        grid = np.arange(rows * cols).reshape(rows, cols)
        return grid[top : top + size, left : left + size].reshape(-1)

    def draw(self, size: int) -> TowerBatch:
        """``size`` crops: a third around a lesion, a third random, a third around organ tissue of a
        lesion-free slab."""
        kinds = np.arange(size) % 3
        slabs, patches, targets, weights = [], [], [], []
        for kind in kinds:
            pool = self.lesion_slabs if kind == 0 else self.all_slabs if kind == 1 else self.normal_slabs
            study_index, slab = pool[int(self.rng.integers(len(pool)))]
            study = self.studies[study_index]
            image = study.slab(slab)
            rows, cols = image.shape[1] // self.patch, image.shape[2] // self.patch
            target = patch_lesion_targets(
                study.findings, study.spacing_mm, slab * SLICES_PER_GROUP, image.shape[1:], self.patch
            )
            organ = self.organ_patches(study_index)[slab].reshape(-1)
            centres = (
                np.flatnonzero(target[:, 0]) if kind == 0 else np.flatnonzero(organ) if kind == 2 else []
            )
            around = divmod(int(centres[self.rng.integers(len(centres))]), cols) if len(centres) else None
            window = self._window(rows, cols, around)
            weight = np.where(target[:, 0] > 0, POSITIVE_WEIGHT, np.where(organ, ORGAN_NEGATIVE_WEIGHT, 1.0))
            slabs.append(image)
            patches.append(window)
            targets.append(target[window])
            weights.append(weight[window])
        return TowerBatch(
            torch.from_numpy(np.stack(slabs)),
            torch.from_numpy(np.stack(patches)),
            torch.from_numpy(np.stack(targets)),
            torch.from_numpy(np.stack(weights).astype(np.float32)),
        )


def crop_features(model, slabs: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """The tower's final features ``(B, crop patches, C)`` of the patches ``(B, n)`` of slabs
    ``(B, 3, H, W)``: the whole slab is embedded (with its position embeddings), the blocks run on
    the prefix tokens and the chosen patches only."""
    family, tower = model.family, model.vision_tower
    pixels = model.volume_adapter.to_pixels(slabs[:, None]).to(next(tower.parameters()).dtype)
    hidden = family.embed(tower, pixels)  # (B, prefix + patches, C)
    prefix = family.num_prefix_tokens
    chosen = torch.gather(hidden[:, prefix:], 1, patches[..., None].expand(-1, -1, hidden.shape[-1]))
    hidden = torch.cat([hidden[:, :prefix], chosen], dim=1)  # (B, prefix + n, C)
    for block in family.blocks(tower)[: model.volume_adapter.num_blocks]:
        hidden = family.run_block(block, hidden)
    return family.final_norm(tower, hidden)[:, prefix:]


def patch_logits(model, head: torch.nn.Linear, volumes: torch.Tensor) -> torch.Tensor:
    """Whole slabs ``(B, 3, H, W)`` -> per-patch lesion logits ``(B, patches, len(PATCH_LESION_LABELS))``
    from the tower's final patch features (before the pixel shuffle)."""
    features, _ = model.volume_adapter(model.vision_tower, volumes)  # (B, 1, rows, cols, C)
    return head(features.flatten(1, 3).float())


def pretrain_tower(
    model,
    benchmark_dir: str | Path,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Log,
    bf16: bool = False,
    head: torch.nn.Linear | None = None,
) -> tuple[list[dict[str, float]], torch.nn.Linear]:
    """Dense lesion pretraining of ``model.vision_tower`` (a K=0 CTMLLM) on the training split;
    returns the logged losses and the head (for ``held_out_detection``; checkpoints drop it).
    ``head``: the head of an earlier round, to continue from (a new one otherwise)."""
    torch.manual_seed(seed)
    patch = model.family.patch_size
    batches = TowerBatches(benchmark_dir, benchmark_studies(benchmark_dir, "train"), patch, seed)
    model.train()
    if head is None:
        head = torch.nn.Linear(model.family.vision_config.hidden_size, len(PATCH_LESION_LABELS))
    head = head.to(model.device)
    log(
        f"tower pretraining: crops of {len(batches.all_slabs)} slabs, {len(batches.lesion_slabs)} with a lesion"
    )

    def draws() -> Iterator[TowerBatch]:
        while True:
            yield batches.draw(batch_size)

    def loss_of(batch: TowerBatch) -> torch.Tensor:
        batch = batch.to(model.device)
        logits = head(crop_features(model, batch.slabs, batch.patches).float())  # (B, n, labels)
        per_label = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, batch.targets, reduction="none"
        )
        return (per_label.mean(-1) * batch.weights).sum() / batch.weights.sum()

    parameters = [*model.vision_tower.parameters(), *head.parameters()]
    history = optimise(parameters, draws(), loss_of, steps, lr, "tower", log, bf16)
    return history, head


@torch.no_grad()
def held_out_detection(
    model, head: torch.nn.Linear, benchmark_dir: str | Path, split: str = "test", limit: int | None = None
) -> dict[str, dict[str, Any]]:
    """Does the pretrained tower see lesions? The head's "any lesion" probability on every slab of
    the held-out studies, scored two ways (``benchmark.detection``): ``organ_matched_auc`` (per
    lesion, against normal patches of its organ) and ``site_readout`` (per organ and study: the
    most a report could get from these scores)."""
    model.eval()
    tally, readout = OrganMatchedAUC(), SiteReadout()
    patch = model.family.patch_size
    for study in benchmark_studies(benchmark_dir, split)[:limit]:
        volume = load_m3d_npy(study.image)[: study.slabs * SLICES_PER_GROUP]
        slabs = torch.from_numpy(np.ascontiguousarray(volume)).view(study.slabs, 3, *volume.shape[1:])
        logits = patch_logits(model, head, slabs.to(model.device))[..., 0]  # (slabs, patches)
        rows, cols = volume.shape[1] // patch, volume.shape[2] // patch
        scores = torch.sigmoid(logits).view(study.slabs, rows, cols).cpu().numpy()
        labels = read_labels(benchmark_dir, study.study_id)
        tally.add_study(scores, study.findings, labels, study.spacing_mm, patch)
        readout.add_study(scores, study.findings, labels, study.spacing_mm, patch)
    return {"organ_matched_auc": tally.result(), "site_readout": readout.result()}


# ----------------------------------------------------------------------------------------------
# 2D captioning of slabs


def pretrain_2d(
    model,
    dataset,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Log,
    train_tower: bool = True,
    bf16: bool = False,
) -> list[dict[str, float]]:
    """Train the K=0 CTMLLM on slab samples: every part, or (``train_tower`` False, for a tower
    that was pretrained) the projector and language model only, which keeps what the tower learned."""
    from model_core.training.data import make_loader

    torch.manual_seed(seed)
    model.train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(train_tower or not name.startswith("vision_tower."))
    loader = make_loader(dataset, batch_size, seed)

    def batches() -> Iterator[dict[str, Any]]:
        for epoch in itertools.count():
            loader.sampler.set_epoch(epoch)
            yield from loader

    def loss_of(batch: dict[str, Any]) -> torch.Tensor:
        volumes = batch["volumes"].to(model.device)
        return model.compute_loss(volumes, batch["prompts"], batch["answers"], batch["tasks"]).loss

    trained = [p for p in model.parameters() if p.requires_grad]
    return optimise(trained, batches(), loss_of, steps, lr, "2D", log, bf16)
