"""How big the demo pipeline's steps are: the budgets (``small`` ships the demo model) and the
ablation variants, apart from the steps that use them so that tests and the results page can read
a recipe without importing the pipeline."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class DemoBudget:
    """How big every step is. ``grid`` is the benchmark's ``(D, H, W)`` and the model's input; the
    tower reads ``H x W`` slabs in ``patch``-pixel patches (``H / patch`` must be even for InternVL's
    pixel shuffle)."""

    grid: tuple[int, int, int] = (24, 96, 96)
    train: int = 300
    val: int = 8
    test: int = 40
    vocab_size: int = 1024
    vision_hidden: int = 128
    vision_layers: int = 6
    patch: int = 16
    text_hidden: int = 256
    text_layers: int = 4
    slab_steps: int = 600
    slab_batch: int = 16
    slab_lr: float = 1e-3
    lesion_slab_share: float | None = None  # None: every slab (most hold no lesion)
    slab_caption_style: str = "report"  # or "findings_list" (model_core.benchmark.slabs)
    tower_steps: int = 0  # lesion-label pretraining of the tower before the captions (0: none), per round
    tower_rounds: int = 1  # rounds of tower_steps, each a warm restart of the last (resumable)
    tower_batch: int = 32
    tower_lr: float = 1e-3
    bf16: bool = False  # bfloat16 autocast in the tower and 2D steps (and the 3D stages' mixed precision)
    train_3d_blocks: bool = False  # stage 1 also trains the tower's K cross-group blocks
    window: str = "soft_tissue"  # the benchmark's HU window, a WINDOW_PRESETS name
    real_fraction: float = 0.0  # share of studies on the shared real CTs (0: phantoms only)
    fov_shift_share: float = 0.0  # share of phantoms framed towards the chest or the pelvis
    stage1_steps: int = 1200
    stage2_steps: int = 200
    batch_size: int = 8
    report_repeats: int = 6
    eval_max_new_tokens: int = 160

    def __post_init__(self) -> None:
        grid_side = self.grid[1] // self.patch
        if self.grid[1] != self.grid[2] or self.grid[1] % self.patch or grid_side % 2:
            raise ValueError(
                f"grid={self.grid}, patch={self.patch}: use square slices whose side is an even multiple "
                f"of the patch size (InternVL's pixel shuffle halves the patch grid)"
            )

    @property
    def visual_tokens(self) -> int:
        groups = math.ceil(self.grid[0] / 3)
        side = self.grid[1] // self.patch // 2
        return groups * side * side


# The shipped demo model: about an hour on a 2-core CPU. 36 slices (about 8 mm) rather than 24
# (12 mm), the body window and the tower's lesion pretraining: see docs/MODEL_CARD.md for what each
# changed.
SMALL = DemoBudget(
    grid=(36, 128, 128),
    train=3000,
    val=8,
    test=60,
    patch=8,
    window="body",
    real_fraction=0.25,
    fov_shift_share=0.3,
    tower_steps=2000,
    tower_rounds=4,
    tower_batch=48,
    bf16=True,
    train_3d_blocks=True,
    slab_steps=600,
    stage1_steps=1000,
    stage2_steps=200,
    slab_caption_style="findings_list",
    lesion_slab_share=0.5,
)
BUDGETS: dict[str, DemoBudget] = {
    "small": SMALL,
    # Ablations: the demo's benchmark and 2D checkpoints, a fifth of the 3D steps, per seed.
    "ablation": replace(SMALL, stage1_steps=400, stage2_steps=60, test=24),
    # Tests: every step runs in seconds; the numbers mean nothing.
    "toy": replace(
        SMALL,
        grid=(12, 48, 48),
        train=4,
        val=1,
        test=4,
        vocab_size=400,
        vision_hidden=32,
        vision_layers=3,
        patch=8,
        text_hidden=64,
        text_layers=2,
        tower_steps=3,
        tower_rounds=2,
        tower_batch=4,
        bf16=False,
        real_fraction=0.0,
        slab_steps=3,
        slab_batch=4,
        stage1_steps=3,
        stage2_steps=2,
        batch_size=2,
        report_repeats=1,
        eval_max_new_tokens=12,
    ),
}

ABLATIONS: dict[str, dict[str, Any]] = {
    # name -> (K, MoE mode, 2D source): one factor changed from the demo's recipe each time; the
    # 3D blocks are trained or frozen as the recipe has them (``ablation_variants`` adds the flip)
    "K=2, TGH-MoE hard (demo recipe)": {"k": 2, "moe": "tgh_hard", "source": "2d_checkpoint"},
    "K=0 (2D only), TGH-MoE hard": {"k": 0, "moe": "tgh_hard", "source": "2d_checkpoint"},
    "K=2, no MoE": {"k": 2, "moe": "none", "source": "2d_checkpoint"},
    "K=2, token-level MoE": {"k": 2, "moe": "token", "source": "2d_checkpoint"},
    "K=2, TGH-MoE soft": {"k": 2, "moe": "tgh_soft", "source": "2d_checkpoint"},
    "K=2, TGH-MoE hard, from scratch": {"k": 2, "moe": "tgh_hard", "source": "2d_random"},
}


def ablation_variants(budget: DemoBudget) -> dict[str, dict[str, Any]]:
    """``ABLATIONS`` with each variant's 3D-block setting (the recipe's, none for K=0), plus the
    recipe with its 3D blocks the other way (the frozen-vs-optimised encoder ablation)."""
    variants = {
        name: {**v, "train_3d_blocks": budget.train_3d_blocks and v["k"] > 0} for name, v in ABLATIONS.items()
    }
    flipped = "frozen" if budget.train_3d_blocks else "trained"
    variants[f"K=2, TGH-MoE hard, 3D blocks {flipped}"] = {
        **ABLATIONS["K=2, TGH-MoE hard (demo recipe)"],
        "train_3d_blocks": not budget.train_3d_blocks,
    }
    return variants
