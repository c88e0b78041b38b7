"""Background tokens skipping the 3D blocks (issue 14, item 2): an inference-only option, off by
default, that leaves every other path as it was."""

from __future__ import annotations

import torch

from model_core.tiny import build_tiny_ctmllm
from model_core.volume_encoder import slice_groups


def half_air_volume() -> torch.Tensor:
    """``(1, 9, 32, 32)``: body on the right half, air (0, the window's floor) on the left."""
    volume = torch.rand(1, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.3
    volume[..., :16] = 0.0
    return volume


def test_background_patches_skip_the_3d_blocks_and_only_then_the_output_changes() -> None:
    model = build_tiny_ctmllm("internvl", num_3d_blocks=2)
    adapter, volume = model.volume_adapter, half_air_volume()
    with torch.inference_mode():
        full = model.encode_volumes(volume)
        adapter.skip_background = 0.05
        kept = adapter._foreground_tokens(slice_groups(volume))
        skipped = model.encode_volumes(volume)
        body = torch.rand(1, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.3
        assert adapter._foreground_tokens(slice_groups(body)) is None  # nothing to skip: every token runs
    groups, per_group = 3, adapter.tokens_per_group
    patches = adapter.grid_size**2
    assert kept.numel() == groups * (per_group - patches // 2)  # prefix tokens and the body half
    assert skipped.shape == full.shape and torch.isfinite(skipped).all()
    assert not torch.equal(skipped, full)


def test_skipping_never_applies_to_training_or_batches() -> None:
    model = build_tiny_ctmllm("internvl", num_3d_blocks=2)
    model.volume_adapter.skip_background = 0.05
    volume = half_air_volume()
    assert model.volume_adapter._foreground_tokens(slice_groups(volume.expand(2, -1, -1, -1))) is None
    model.train()
    assert model.volume_adapter._foreground_tokens(slice_groups(volume)) is None


def test_the_skipping_path_with_every_token_kept_is_the_full_encoder(monkeypatch) -> None:
    """The kept tokens' depth (for the depth RoPE) comes from their index in the whole volume."""
    model = build_tiny_ctmllm("internvl", num_3d_blocks=2)
    adapter, volume = model.volume_adapter, half_air_volume()
    with torch.inference_mode():
        full = model.encode_volumes(volume)
        every = torch.arange(3 * adapter.tokens_per_group)
        monkeypatch.setattr(adapter, "_foreground_tokens", lambda groups: every)
        adapter.skip_background = 0.05
        assert torch.allclose(model.encode_volumes(volume), full, atol=1e-6)
        monkeypatch.setattr(adapter, "_foreground_tokens", lambda groups: every[adapter.tokens_per_group :])
        assert not torch.allclose(model.encode_volumes(volume), full, atol=1e-6)  # a group left out matters
