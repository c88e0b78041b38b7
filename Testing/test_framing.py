"""The 2D model's input format (issue 12, item 5): InternVL's image framing around each slice
group, recorded at conversion; chat templates with string or typed message content."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from model_core.chat import CHATML_TEMPLATE
from model_core.config import CTMLLMConfig
from model_core.framing import FramingError, special_token_id
from model_core.model import CTMLLM
from model_core.tiny import CORPUS, build_tiny_2d_mllm, build_tiny_ctmllm, build_tiny_tokenizer
from model_core.volume_encoder import slice_groups

QUESTION = "Where is the lesion located?"

LLAVA_HF_STYLE_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""A chat template in the llava-hf manner: message content is a list of typed items only."""


def volume(depth: int = 6) -> torch.Tensor:
    return torch.rand(depth, 32, 32, generator=torch.Generator().manual_seed(0))


def tokenizer_without_framing_tokens() -> PreTrainedTokenizerFast:
    """A tokenizer like the one the shipped demo model was trained with: ChatML, no ``<img>``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def test_internvl_reads_a_volume_as_its_2d_model_reads_a_video_of_slice_groups() -> None:
    """K=0: our prompt gives the language model exactly the logits the 2D InternVL gives for its
    processor's video prompt (``Frame1: <img>...</img>\\nFrame2: ...``) of the same slice groups."""
    reference, tokenizer = build_tiny_2d_mllm("internvl", seed=0)
    model = build_tiny_ctmllm("internvl", num_3d_blocks=0, seed=0)
    assert model.config.visual_framing == "internvl_frames"
    with torch.no_grad():
        features = model.encode_volume(volume(depth=6))
        assert features.groups == 2
        embeds = model.prompt_embeddings(features.tokens, QUESTION, groups=features.groups)
        ours = model.language_model(inputs_embeds=embeds[None]).logits

        per_group = features.tokens.shape[0] // features.groups
        video = "\n".join(f"Frame{i + 1}: <img>{'<image>' * per_group}</img>" for i in range(features.groups))
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{video}\n{QUESTION}"}], tokenize=False, add_generation_prompt=True
        )
        input_ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
        pixels = model.volume_adapter.to_pixels(slice_groups(volume(depth=6)[None]))
        expected = reference(input_ids=input_ids, pixel_values=pixels).logits
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_framing_is_decided_at_conversion_and_saved(tmp_path) -> None:
    internvl = build_tiny_ctmllm("internvl", num_3d_blocks=1)
    assert build_tiny_ctmllm("llava", num_3d_blocks=1).config.visual_framing == "none"
    reloaded = CTMLLM.from_pretrained(internvl.save_pretrained(tmp_path / "model"))
    assert reloaded.config.visual_framing == "internvl_frames"
    first = internvl.generate(volume(9), QUESTION, max_new_tokens=6).text
    assert reloaded.generate(volume(9), QUESTION, max_new_tokens=6).text == first

    # a config written before framing existed reads as unframed (the shipped demo model)
    data = internvl.config.to_dict()
    del data["visual_framing"]
    assert CTMLLMConfig.from_dict(data).visual_framing == "none"


def test_framing_needs_the_special_tokens_of_the_tokenizer() -> None:
    tiny = build_tiny_tokenizer()
    assert special_token_id(tiny, "<img>") is not None and special_token_id(tiny, "</img>") is not None
    plain = tokenizer_without_framing_tokens()
    mllm, _ = build_tiny_2d_mllm("internvl", tokenizer=plain)
    unframed = CTMLLM.from_2d_model(mllm, plain)
    assert unframed.config.visual_framing == "none"  # trained without framing, used without it

    config = CTMLLMConfig.from_dict({**unframed.config.to_dict(), "visual_framing": "internvl_frames"})
    mllm, _ = build_tiny_2d_mllm("internvl", tokenizer=plain)
    with pytest.raises(FramingError, match="no such special tokens"):
        CTMLLM.from_2d_model(mllm, plain, visual_framing=config.visual_framing)
    with pytest.raises(ValueError, match="a llava model uses 'none'"):
        CTMLLMConfig.from_dict(
            {**build_tiny_ctmllm("llava").config.to_dict(), "visual_framing": "internvl_frames"}
        )


def test_unframed_prompt_is_the_visual_tokens_between_the_chat_text() -> None:
    plain = tokenizer_without_framing_tokens()
    mllm, _ = build_tiny_2d_mllm("internvl", tokenizer=plain)
    model = CTMLLM.from_2d_model(mllm, plain).eval()
    features = model.encode_volume(volume(9))
    before, after = model.chat_segments(QUESTION)
    embeds = model.prompt_embeddings(features.tokens, QUESTION, groups=features.groups)
    assert embeds.shape[0] == len(before) + features.tokens.shape[0] + len(after)


def test_typed_content_chat_templates_carry_the_volume_and_the_question() -> None:
    model = build_tiny_ctmllm("llava", num_3d_blocks=1)
    model.tokenizer.chat_template = LLAVA_HF_STYLE_TEMPLATE
    before, after = model.chat_segments(QUESTION, history=[("Which organ?", "The liver.")])
    decode = model.tokenizer.decode
    assert decode(before) == "USER: "
    assert decode(after) == f"\nWhich organ?\nASSISTANT: The liver.\nUSER: {QUESTION}\nASSISTANT:"
    answer = model.generate(volume(9), QUESTION, max_new_tokens=4)
    assert answer.new_tokens >= 1
