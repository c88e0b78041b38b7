"""From tower features of a whole volume to language-model tokens, within a token budget.

Order: the family's own spatial merge per group (InternVL's pixel shuffle; none for LLaVA), then
parameter-free average pooling when the volume would exceed ``max_visual_tokens``, then the 2D
model's projector MLP, unchanged. Pooling keeps every slice group (depth resolution is what a
3D model adds) and shrinks each group's grid to the largest square ``s x s`` with
``groups * s * s <= budget``; only when even one token per group is too many are groups pooled
too. Pooling before the MLP is cheaper and keeps the MLP's input distribution (averages of the
features it was trained on). Example: InternVL at 448 px gives 16 x 16 tokens per group after
pixel shuffle; a 32-slice volume has 11 groups, so the default budget of 512 gives 6 x 6 per group,
396 tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model_core.families import Family


def pooled_grid(groups: int, height: int, width: int, budget: int) -> tuple[int, int, int]:
    """The (groups, h, w) grid after pooling, within ``budget`` tokens (see the module doc)."""
    if groups * height * width <= budget:
        return groups, height, width
    side = math.isqrt(budget // groups) if budget >= groups else 0
    if side >= 1:
        return groups, min(side, height), min(side, width)
    return budget, 1, 1


class VolumeProjector(nn.Module):
    """``(B, G, h, w, C)`` tower features -> ``(B, G', tokens_per_group, llm_hidden)`` visual tokens,
    ``G'`` the groups left after pooling (``G`` unless even one token per group is too many)."""

    def __init__(self, family: Family, multi_modal_projector: nn.Module, max_visual_tokens: int) -> None:
        super().__init__()
        self.family = family
        self.multi_modal_projector = multi_modal_projector
        self.max_visual_tokens = max_visual_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, g, h, w, c = features.shape
        merged = self.family.spatial_reduce(features.reshape(b * g, h, w, c))  # (B * G, h', w', C')
        _, h2, w2, c2 = merged.shape
        grid = merged.reshape(b, g, h2, w2, c2)
        target = pooled_grid(g, h2, w2, self.max_visual_tokens)
        if target != (g, h2, w2):
            pooled = F.adaptive_avg_pool3d(grid.permute(0, 4, 1, 2, 3), target)  # (B, C', G', h'', w'')
            grid = pooled.permute(0, 2, 3, 4, 1)
        groups = grid.shape[1]
        tokens = grid.reshape(b, -1, c2)  # (B, tokens, C'), depth-major
        return self.multi_modal_projector(tokens).unflatten(1, (groups, -1))  # (B, G', t, llm_hidden)
