"""The 2D -> 3D transfer of a vision tower.

A volume ``(D, H, W)`` in [0, 1], ``3 <= D <= max_slices``, is cut into ``ceil(D / 3)`` groups of
3 adjacent slices (the last group padded by repeating the edge slice); each group is a 3-channel
image for the tower's own patch embedding and position embeddings, resized to the tower's side
with its aspect ratio kept (antialiased when shrinking; a non-square slice is centred and padded
with 0, the window's floor). The lower blocks run per group, as in 2D. The top K
blocks run on the concatenated tokens of all groups of a volume, with rotary encoding of the group
index on queries and keys (``model_core.depth_rope``). The tower's modules and tensors are used as
they are; the adapter adds forward hooks, never replaces a module, so state-dict names stay those
of the 2D checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from model_core.config import SLICES_PER_GROUP, CTMLLMConfig
from model_core.depth_rope import DepthRoPE
from model_core.families import Family
from model_core.moe import Routing, TGHMoE, build_moe, routing_active

_KEPT_DEPTHS: ContextVar[torch.Tensor | None] = ContextVar("ctmllm_kept_depths", default=None)
"""The group index of each token a 3D block sees when background tokens skip it (None: all tokens)."""


class VolumeInputError(ValueError):
    """The tensor given to the encoder is not a preprocessed volume; the message says why."""


def check_volume_tensor(volumes: torch.Tensor, max_slices: int | None = None) -> None:
    """Refuse what the encoder cannot read, naming the problem and the fix."""
    if not isinstance(volumes, torch.Tensor):
        raise VolumeInputError(f"expected a torch.Tensor volume, got {type(volumes).__name__}")
    if not volumes.is_floating_point():
        raise VolumeInputError(
            f"volume dtype is {volumes.dtype}; preprocess it to float values in [0, 1] first "
            f"(model_core.data.preprocess)"
        )
    if volumes.dim() == 2:
        raise VolumeInputError(
            f"got a 2D image {tuple(volumes.shape)}; a CT volume (D, H, W) needs at least 3 slices"
        )
    if volumes.dim() != 4:
        raise VolumeInputError(f"expected (batch, D, H, W), got shape {tuple(volumes.shape)}")
    if volumes.shape[1] < SLICES_PER_GROUP:
        raise VolumeInputError(f"volume has {volumes.shape[1]} slice(s); a CT series needs at least 3")
    if max_slices is not None and volumes.shape[1] > max_slices:
        raise VolumeInputError(
            f"volume has {volumes.shape[1]} slices; this model reads at most {max_slices} "
            f"(volume.max_slices): prepare the CT with model_core.data.preprocess and the model's "
            f"preprocess_config(), which resizes it to the grid the model was trained on"
        )
    if not torch.isfinite(volumes).all():
        raise VolumeInputError("volume contains NaN or infinite values; fix or re-export the image")


def slice_groups(volumes: torch.Tensor) -> torch.Tensor:
    """``(B, D, H, W) -> (B, G, 3, H, W)`` with ``G = ceil(D / 3)``, padding by the edge slice."""
    depth = volumes.shape[1]
    pad = -depth % SLICES_PER_GROUP
    if pad:
        volumes = torch.cat([volumes, volumes[:, -1:].expand(-1, pad, -1, -1)], dim=1)
    b, d, h, w = volumes.shape
    return volumes.view(b, d // SLICES_PER_GROUP, SLICES_PER_GROUP, h, w)


class VolumeAdapter(nn.Module):
    """Everything the 3D transfer adds to a 2D tower: depth RoPE (no parameters) and, when
    configured, the TGH-MoE experts (``model_core.moe``), attached to the tower by hooks."""

    def __init__(self, config: CTMLLMConfig, family: Family, vision_tower: nn.Module) -> None:
        super().__init__()
        self.family = family
        self.num_3d_blocks = config.volume.num_3d_blocks
        self.num_blocks = family.num_feature_blocks(vision_tower)
        if self.num_3d_blocks > self.num_blocks:
            raise ValueError(
                f"num_3d_blocks={self.num_3d_blocks} but the tower feeds the projector from "
                f"{self.num_blocks} blocks: use at most {self.num_blocks}"
            )
        self.max_slices = config.volume.max_slices
        self.image_size = config.volume.image_size or family.native_image_size
        if self.image_size % family.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of the patch size {family.patch_size}"
            )
        grid = self.image_size // family.patch_size
        self.grid_size = grid
        self.tokens_per_group = family.num_prefix_tokens + grid * grid
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)
        self.rope = DepthRoPE(family.num_heads, family.head_dim, config.volume.rope_theta)
        self._hooks = []
        for block in self.blocks_3d(vision_tower):
            for site in family.qk_sites(block):
                self._hooks.append(site.register_forward_hook(self._rope_hook))
        self._vision_tower = [vision_tower]  # a list: not registered as a submodule
        self.moe: TGHMoE | None = None
        self.skip_background: float | None = None
        """Inference of one volume only: tokens of patches whose pixels are all at or below this
        value in all 3 slices of their group (air, padding) skip the 3D blocks and keep their 2D
        features; None (the default) runs every token. Changes the output (measured in
        docs/BENCHMARKS.md); it is not part of the saved config."""
        self.set_moe(build_moe(config.moe, family, vision_tower, self.num_blocks, self.num_3d_blocks))

    def set_moe(self, moe: TGHMoE | None) -> None:
        """Replace the MoE (None: none), moving the hooks from the old one to the new one."""
        if self.moe is not None:
            self.moe.detach()
        self.moe = moe
        if moe is not None:
            moe.attach(self._vision_tower[0])

    def blocks_3d(self, vision_tower: nn.Module) -> list[nn.Module]:
        blocks = self.family.blocks(vision_tower)
        return list(blocks[self.num_blocks - self.num_3d_blocks : self.num_blocks])

    def _rope_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        # Runs only inside 3D blocks, whose tokens are whole groups laid end to end: the depth of
        # a token follows from its index, so recomputation (gradient checkpointing) stays exact.
        # Background skipping alone sets the kept depths: without it the ContextVar is not read, so
        # torch.compile traces the hook instead of breaking the graph at every 3D block.
        depth = _KEPT_DEPTHS.get() if self.skip_background is not None else None
        if depth is None:
            depth = torch.arange(output.shape[1], device=output.device) // self.tokens_per_group
        return self.rope.apply(output, depth)

    def to_pixels(self, groups: torch.Tensor) -> torch.Tensor:
        """``(B, G, 3, H, W)`` in [0, 1] -> ``(B * G, 3, S, S)`` normalised as the tower expects.

        The longer side becomes ``S`` and the aspect ratio is kept (antialiased when shrinking, so
        fine structures average instead of aliasing); a non-square slice is centred on a square of
        0, the window's floor (air in a CT window).
        """
        b, g, c, h, w = groups.shape
        images = groups.reshape(b * g, c, h, w)
        side = self.image_size
        if (h, w) != (side, side):
            scale = side / max(h, w)
            size = (max(1, min(side, round(h * scale))), max(1, min(side, round(w * scale))))
            if size != (h, w):
                images = F.interpolate(
                    images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1
                )
            top, left = (side - size[0]) // 2, (side - size[1]) // 2
            images = F.pad(images, (left, side - size[1] - left, top, side - size[0] - top))
        return (images - self.image_mean.to(images.dtype)) / self.image_std.to(images.dtype)

    def _foreground_tokens(self, groups: torch.Tensor) -> torch.Tensor | None:
        """Indices into a volume's ``G * T`` tokens of those the 3D blocks run: prefix tokens and
        patches holding any pixel above ``skip_background``; None where skipping does not apply
        (training, several volumes, nothing to skip)."""
        if self.training or groups.shape[0] != 1:
            return None
        images = self.to_pixels(groups) * self.image_std + self.image_mean  # (G, 3, S, S) in [0, 1]
        patch = self.family.patch_size
        busy = F.max_pool2d(images.float().amax(dim=1, keepdim=True), patch, patch)  # (G, 1, h, w)
        keep = (busy.flatten(1) > self.skip_background).to(torch.bool)  # (G, h * w)
        prefix = keep.new_ones(keep.shape[0], self.family.num_prefix_tokens)
        keep = torch.cat([prefix, keep], dim=1).flatten()  # (G * T,)
        return None if keep.all() else keep.nonzero().squeeze(1)

    def forward(
        self,
        vision_tower: nn.Module,
        volumes: torch.Tensor,
        run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        *,
        tasks: Sequence[str] | None = None,
        prompt_embeddings: torch.Tensor | None = None,
        labels: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, Routing | None]:
        """Encode ``(B, D, H, W)`` volumes into tower features ``(B, G, h, w, C)``, with the MoE
        routing of this call (None without MoE: its ``tasks`` and ``auxiliary_losses()``).

        With a task-level MoE, ``tasks`` force each sample's task expert, else the task router reads
        ``prompt_embeddings`` ``(B, llm_hidden)``; ``labels`` give the router's training loss.
        """
        check_volume_tensor(volumes, self.max_slices)
        routing = None
        if self.moe is not None:
            routing = self.moe.plan(volumes.shape[0], volumes.device, tasks, prompt_embeddings, labels)
        with routing_active(routing):
            features = self._run_tower(vision_tower, volumes, run_block or self.family.run_block)
        return features, routing

    def _run_tower(
        self,
        vision_tower: nn.Module,
        volumes: torch.Tensor,
        run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        groups = slice_groups(volumes)  # (B, G, 3, H, W)
        b, g = groups.shape[:2]
        pixels = self.to_pixels(groups).to(next(vision_tower.parameters()).dtype)
        hidden = self.family.embed(vision_tower, pixels)  # (B * G, T, C), T = tokens_per_group
        blocks = self.family.blocks(vision_tower)
        first_3d = self.num_blocks - self.num_3d_blocks
        for block in blocks[:first_3d]:
            hidden = run_block(block, hidden)  # per group, as in 2D
        if self.num_3d_blocks:
            tokens, dim = hidden.shape[1:]
            hidden = hidden.reshape(b, g * tokens, dim)  # (B, G * T, C): one sequence per volume
            kept = self._foreground_tokens(groups) if self.skip_background is not None else None
            if kept is None:
                for block in blocks[first_3d : self.num_blocks]:
                    hidden = run_block(block, hidden)
            else:
                part = hidden[:, kept]  # (1, kept, C)
                marker = _KEPT_DEPTHS.set(kept // self.tokens_per_group)
                try:
                    for block in blocks[first_3d : self.num_blocks]:
                        part = run_block(block, part)
                finally:
                    _KEPT_DEPTHS.reset(marker)
                hidden = hidden.index_copy(1, kept, part)
            hidden = hidden.reshape(b * g, tokens, dim)
        hidden = self.family.final_norm(vision_tower, hidden)
        patches = hidden[:, self.family.num_prefix_tokens :]  # (B * G, h * w, C)
        side = int(math.isqrt(patches.shape[1]))
        return patches.reshape(b, g, side, side, patches.shape[-1])
