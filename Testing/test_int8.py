"""The int8 precision (issue 14, item 3): the language model's linears dynamically quantised on the
CPU, offered by every entry point through ``load_model(dtype="int8")``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_core.hub import load_model
from model_core.int8 import quantize_language_model
from model_core.prefix_cache import PrefixCache
from model_core.tiny import build_tiny_ctmllm


def has_int8(module: nn.Module) -> bool:
    return any("quantized" in type(child).__module__ for child in module.modules())


def test_int8_quantises_the_language_model_only_and_still_answers(tiny_model_dir) -> None:
    model = load_model(tiny_model_dir, dtype="int8", notice=lambda _text: None)
    assert model.device.type == "cpu"
    assert has_int8(model.language_model)
    assert not any(isinstance(m, nn.Linear) for m in model.language_model.modules())  # every linear
    assert not has_int8(model.vision_tower)  # the tower keeps float32
    features = model.encode_volume(torch.rand(6, 32, 32, generator=torch.Generator().manual_seed(0)))
    cache = PrefixCache()
    first = model.generate(features, "Where is the lesion?", max_new_tokens=4, prefix_cache=cache)
    follow_up = model.generate(
        features,
        "How large?",
        history=[("Where is the lesion?", first.text)],
        max_new_tokens=4,
        prefix_cache=cache,
    )
    assert first.new_tokens == 4 and follow_up.new_tokens == 4 and cache.reused > features.tokens.shape[0]


def test_int8_needs_float32_weights_on_the_cpu() -> None:
    model = build_tiny_ctmllm("llava").to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        quantize_language_model(model)


def test_the_panel_batch_and_worker_accept_int8(tiny_model_dir) -> None:
    from CTMLLMSlicerLib.session import ModelRequest, defaultModelLoader

    request = ModelRequest(str(tiny_model_dir), device="cpu", precision="int8")
    model = defaultModelLoader(request, lambda _text: None)
    assert has_int8(model.language_model)
