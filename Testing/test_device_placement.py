"""Every tensor the model uses follows ``model.to(device)`` (issue 12, item 1).

No second device is lent to CI, so ``meta`` plays the other device: the model is built under
``torch.device("meta")`` and its registered tensors are then materialised on the CPU. Any tensor
the model keeps outside its parameters and buffers stays on ``meta``, exactly as such a tensor
stays on the CPU when a model moves to a GPU, and the first operation mixing it with CPU data
raises, as it would on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_experts

from model_core.config import MoEConfig
from model_core.depth_rope import DepthRoPE, angle_dtype
from model_core.model import CTMLLM
from model_core.tiny import build_tiny_ctmllm

QUESTION = "Where is the lesion located?"


def materialised_from_meta(reference: CTMLLM, family: str, **kwargs) -> CTMLLM:
    """The same model built on ``meta``, with its parameters and buffers copied onto the CPU."""
    with torch.device("meta"):
        model = build_tiny_ctmllm(family, **kwargs)
    model.to_empty(device="cpu")
    source = dict(reference.named_parameters(remove_duplicate=False))
    source.update(reference.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            tensor.copy_(source[name])
    return model.eval()


@pytest.mark.parametrize("family", ["internvl", "llava"])
def test_every_tensor_moves_with_the_model(family: str) -> None:
    kwargs = {"num_3d_blocks": 2, "moe": MoEConfig(mode="tgh_hard")}
    reference = build_tiny_ctmllm(family, **kwargs)
    randomise_experts(reference, seed=1)
    model = materialised_from_meta(reference, family, **kwargs)
    volume = torch.rand(9, 32, 32, generator=torch.Generator().manual_seed(0))

    features = model.encode_volume(volume, prompt=QUESTION)  # task router, MoE, 3D blocks
    expected = reference.encode_volume(volume, prompt=QUESTION)
    assert features.task == expected.task
    torch.testing.assert_close(features.tokens, expected.tokens, rtol=0, atol=1e-6)

    answer = model.generate(volume, QUESTION, max_new_tokens=6)
    assert answer.text == reference.generate(volume, QUESTION, max_new_tokens=6).text
    again = model.generate(features, QUESTION, max_new_tokens=6)  # from cached features
    assert again.text == answer.text


def test_rope_angles_live_on_the_input_device_without_float64_where_it_is_missing() -> None:
    rope = DepthRoPE(num_heads=2, head_dim=8)
    cos, sin = rope.angles(torch.arange(5, device="meta"))
    assert cos.device.type == "meta" and sin.shape == (5, 8)
    assert angle_dtype(torch.device("mps")) == torch.float32
    assert angle_dtype(torch.device("cuda")) == torch.float64
    # the rotation itself is exact at depth 0 and a rotation (norm-preserving) elsewhere
    flat = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0))
    rotated = rope.apply(flat, torch.arange(5))
    torch.testing.assert_close(rotated[:, 0], flat[:, 0])
    torch.testing.assert_close(rotated.view(5, 2, 8).norm(dim=-1), flat.view(5, 2, 8).norm(dim=-1))
