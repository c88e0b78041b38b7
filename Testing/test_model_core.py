"""The adapted model (issue 2): 2D equivalence at K=0, weight reuse, real 3D attention with depth
order, save/load, streaming, cancellation and bad input, on tiny random models of both families."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from model_core.config import ConfigError, VolumeAdapterConfig
from model_core.data import PreprocessConfig
from model_core.families import map_2d_state_dict_name
from model_core.model import CTMLLM, PromptTooLongError
from model_core.projector import pooled_grid
from model_core.tiny import build_tiny_2d_mllm, build_tiny_ctmllm, save_tiny_2d_checkpoint
from model_core.volume_encoder import VolumeInputError, slice_groups

FAMILIES = ["internvl", "llava"]


def random_volume(depth: int = 9, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, depth, size, size, generator=torch.Generator().manual_seed(seed))


def adapted(family: str, k: int, **kwargs) -> tuple[CTMLLM, torch.nn.Module]:
    """The adapted model and an untouched copy of the same 2D model (same seed)."""
    reference, _ = build_tiny_2d_mllm(family, seed=0)
    model = build_tiny_ctmllm(family, num_3d_blocks=k, seed=0, **kwargs)
    return model, reference


def tower_features(model: CTMLLM, volume: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.volume_adapter(model.vision_tower, volume)[0]  # (B, G, h, w, C)


@pytest.mark.parametrize("family", FAMILIES)
def test_k0_groups_match_the_2d_model(family: str) -> None:
    model, reference = adapted(family, k=0)
    volume = random_volume(depth=9)
    groups = slice_groups(volume)[0]  # (G, 3, H, W)
    pixels = model.volume_adapter.to_pixels(groups.unsqueeze(0))
    config = reference.config
    with torch.no_grad():
        expected = reference.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output
        expected = torch.stack(list(expected)) if isinstance(expected, (list, tuple)) else expected
        got = model.encode_volumes(volume)  # (1, G * tokens, hidden), no pooling at this size
    assert got.shape[1] == expected.shape[0] * expected.shape[1]
    torch.testing.assert_close(got[0].reshape(expected.shape), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_2d_tensor_is_kept_unchanged(family: str) -> None:
    reference, _ = build_tiny_2d_mllm(family, seed=0)
    original = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    model = build_tiny_ctmllm(family, num_3d_blocks=2, seed=0)
    adapted_state = model.state_dict()
    assert original, "the 2D model has tensors"
    for name, tensor in original.items():
        new_name = map_2d_state_dict_name(name)
        assert new_name in adapted_state, f"{name} -> {new_name} missing"
        assert torch.equal(adapted_state[new_name], tensor), f"{name} changed"
    # nothing was added beside the 2D tensors: the depth RoPE has no parameters
    assert set(adapted_state) == {map_2d_state_dict_name(name) for name in original}


@pytest.mark.parametrize("family", FAMILIES)
def test_3d_blocks_attend_across_slices_and_know_their_order(family: str) -> None:
    volume = random_volume(depth=9)
    changed = volume.clone()
    changed[0, 0] = torch.rand(32, 32, generator=torch.Generator().manual_seed(5))  # a slice of group 0
    reversed_groups = slice_groups(volume).flip(1).reshape_as(volume)  # same groups, opposite order

    for k, is_3d in ((0, False), (2, True)):
        model, _ = adapted(family, k=k)
        base = tower_features(model, volume)
        other_groups_changed = not torch.allclose(
            tower_features(model, changed)[:, 1:], base[:, 1:], atol=1e-6
        )
        order_matters = not torch.allclose(tower_features(model, reversed_groups).flip(1), base, atol=1e-6)
        assert other_groups_changed == is_3d, (
            f"K={k}: cross-slice attention {'missing' if is_3d else 'leaks'}"
        )
        assert order_matters == is_3d, f"K={k}: depth order {'ignored' if is_3d else 'used'}"


def test_visual_tokens_stay_within_budget() -> None:
    assert pooled_grid(11, 16, 16, 512) == (11, 6, 6)  # InternVL at 448 px, 32 slices: 396 tokens
    assert pooled_grid(11, 9, 9, 2000) == (11, 9, 9)  # under budget: untouched
    assert pooled_grid(600, 4, 4, 512) == (512, 1, 1)  # more groups than budget: pool depth too
    model = build_tiny_ctmllm("llava", num_3d_blocks=1, max_visual_tokens=20)
    with torch.no_grad():
        tokens = model.encode_volumes(random_volume(depth=32))  # 11 groups of 4x4 = 176 > 20
    assert tokens.shape[1] <= 20
    assert tokens.shape[1] == 11  # one token per group: depth resolution is kept first


@pytest.mark.parametrize("family", FAMILIES)
def test_2d_checkpoint_converts_saves_and_reloads_bit_identically(family: str, tmp_path) -> None:
    folder = save_tiny_2d_checkpoint(tmp_path / "2d", family)
    model = CTMLLM.from_2d_pretrained(folder, volume=VolumeAdapterConfig(num_3d_blocks=1)).eval()
    volume = random_volume(depth=8)
    first = model.generate(volume, "Where is the lesion?", task="vqa", max_new_tokens=12)
    saved = model.save_pretrained(tmp_path / "3d")
    assert {"ctmllm_config.json", "model.safetensors"} <= {p.name for p in saved.iterdir()}
    reloaded = CTMLLM.from_pretrained(saved)
    with torch.no_grad():
        assert torch.equal(model.encode_volumes(volume), reloaded.encode_volumes(volume))
    again = reloaded.generate(volume, "Where is the lesion?", task="vqa", max_new_tokens=12)
    assert again.text == first.text and again.new_tokens == first.new_tokens
    assert reloaded.config.to_dict() == model.config.to_dict()


def test_streaming_gives_the_same_text_as_one_call() -> None:
    model = build_tiny_ctmllm("internvl", num_3d_blocks=1)
    volume = random_volume()
    whole = model.generate(volume, "Describe the liver.", max_new_tokens=24)
    chunks = list(model.stream(volume, "Describe the liver.", max_new_tokens=24))
    assert len(chunks) > 1
    assert "".join(chunks) == whole.text
    callback_chunks: list[str] = []
    model.generate(volume, "Describe the liver.", max_new_tokens=24, on_text=callback_chunks.append)
    assert callback_chunks == chunks


def test_cancel_from_another_thread_stops_a_running_generation() -> None:
    model = build_tiny_ctmllm("internvl", num_3d_blocks=1)
    features = model.encode_volume(random_volume(), task="report")
    cancel = threading.Event()
    first_chunk = threading.Event()
    results = []

    def run() -> None:
        results.append(
            model.generate(features, max_new_tokens=2000, on_text=lambda _t: first_chunk.set(), cancel=cancel)
        )

    worker = threading.Thread(target=run)
    worker.start()
    assert first_chunk.wait(30), "generation produced no text"
    cancel.set()
    worker.join(10)
    assert not worker.is_alive(), "generation did not stop after cancel"
    assert results[0].cancelled
    assert results[0].new_tokens < 2000


def test_follow_up_questions_reuse_features_and_history() -> None:
    model = build_tiny_ctmllm("internvl", num_3d_blocks=1)
    features = model.encode_volume(random_volume(), task="vqa")
    first = model.generate(features, "Which organ is abnormal?", max_new_tokens=8)
    before, after = model.chat_segments("And its size?", history=[("Which organ is abnormal?", first.text)])
    assert len(before) + len(after) > len(model.chat_segments("And its size?")[1])
    follow_up = model.generate(
        features, "And its size?", history=[("Which organ is abnormal?", first.text)], max_new_tokens=8
    )
    assert follow_up.new_tokens >= 1


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        (torch.rand(32, 32), "2D image"),
        (torch.rand(1, 2, 32, 32), "2 slice(s); a CT series needs at least 3"),
        (torch.full((1, 6, 32, 32), float("nan")), "NaN"),
        (torch.randint(0, 100, (1, 6, 32, 32), dtype=torch.int16), "dtype is torch.int16"),
    ],
)
def test_bad_volumes_get_a_clear_error(volume: torch.Tensor, message: str) -> None:
    model = build_tiny_ctmllm("internvl", num_3d_blocks=1)
    with pytest.raises(VolumeInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.encode_volumes(volume)


def test_too_deep_volumes_and_too_shallow_grids_are_refused_with_the_limit() -> None:
    model = build_tiny_ctmllm("internvl", num_3d_blocks=1)
    assert model.config.volume.max_slices == 256  # the documented default
    with pytest.raises(
        VolumeInputError, match=r"257 slices; this model reads at most 256 \(volume.max_slices\)"
    ):
        model.encode_volume(np.zeros((257, 8, 8), dtype=np.float32))
    model.encode_volume(np.zeros((256, 8, 8), dtype=np.float32))  # at the limit: read
    with pytest.raises(ConfigError, match="use a depth of at least 3"):
        PreprocessConfig(target_shape=(2, 64, 64))
    with pytest.raises(ConfigError, match="max_slices=2"):
        VolumeAdapterConfig(max_slices=2)


def test_slices_keep_their_aspect_ratio_and_shrink_without_aliasing() -> None:
    model = build_tiny_ctmllm("internvl", num_3d_blocks=1)  # the tower reads 32 x 32
    adapter = model.volume_adapter
    mean, std = adapter.image_mean[0, :, 0, 0], adapter.image_std[0, :, 0, 0]

    def unnormalised(groups: torch.Tensor) -> torch.Tensor:
        return adapter.to_pixels(groups) * std[:, None, None] + mean[:, None, None]  # (n, 3, S, S)

    tall = torch.rand(1, 1, 3, 32, 16, generator=torch.Generator().manual_seed(0))  # H = 2 W
    pixels = unnormalised(tall)[0]
    torch.testing.assert_close(pixels[:, :, 8:24], tall[0, 0])  # centred, not stretched
    assert pixels[:, :, :8].abs().max() < 1e-6 and pixels[:, :, 24:].abs().max() < 1e-6  # padded with 0

    checkerboard = ((torch.arange(96)[:, None] + torch.arange(96)[None, :]) % 2).float()
    shrunk = unnormalised(checkerboard.expand(1, 1, 3, 96, 96))[..., 1:-1, 1:-1]  # 3x smaller
    assert (shrunk - 0.5).abs().max() < 0.02  # averaged; plain bilinear picks single pixels: 0 or 1
    wide = unnormalised(torch.ones(1, 1, 3, 48, 96))[0]  # shrunk to 16 x 32, centred
    assert wide[:, 8:24].min() > 0.99 and wide[:, :8].abs().max() < 1e-6 and wide[:, 24:].abs().max() < 1e-6


def test_numpy_integer_volume_and_long_prompt_are_refused() -> None:
    model = build_tiny_ctmllm("internvl", num_3d_blocks=1)
    with pytest.raises(VolumeInputError, match="preprocess it to float"):
        model.encode_volume(np.zeros((6, 32, 32), dtype=np.int16))
    with pytest.raises(PromptTooLongError, match="shorten the question"):
        model.chat_segments("liver " * 5000)
    with pytest.raises(ValueError, match="prompt is empty"):
        model.chat_segments("   ")
