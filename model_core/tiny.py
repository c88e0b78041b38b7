"""Tiny random 2D multimodal LLMs of each family, for tests and CI (a few MB, no download).

The tokenizer is a byte-level BPE trained here on a small built-in radiology vocabulary, wrapped
with a ChatML chat template, so tiny models exercise the same prompt path as real checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from model_core.chat import CHATML_TEMPLATE
from model_core.config import GenerationConfig, MoEConfig, VolumeAdapterConfig
from model_core.families import FAMILY_CLASSES
from model_core.framing import INTERNVL_FRAMING_TOKENS
from model_core.model import CTMLLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", *INTERNVL_FRAMING_TOKENS]
"""ChatML's control tokens, the image placeholder and InternVL's image framing (``<img>``,
``</img>``), so models built on this tokenizer frame their slice groups as InternVL does."""

FRAME_TEXT = " ".join(f"Frame{index}:" for index in range(1, 65))
"""The text the framing adds around slice groups, learnt by the tokenizer like the prompts' words."""

CORPUS = """
user assistant system image volume slice axial coronal sagittal plane phase arterial venous delayed
Write a radiology report of the findings in this CT volume. What organ shows an abnormality?
Which plane is this image in? Where is the lesion located? How many lesions are there? Choices:
The liver is normal in size with a 12 mm hypodense cyst in the right lobe. No focal hepatic lesion.
The spleen is unremarkable. A 25 mm solid mass in the left kidney. Both kidneys are normal.
A 6 mm calcified nodule in the right lung. Lungs are clear. No pulmonary nodule. Aorta normal caliber.
Small calcification in the spleen. Upper middle lower third. left right bilateral. cyst mass nodule
calcification lesion lesions finding findings impression unremarkable normal abnormal enlarged.
A B C D yes no one two three none small medium large mm cm hypodense hyperdense enhancing fat muscle
bone spine vertebra pancreas stomach gallbladder bladder colon bowel chest abdomen pelvis contrast
"""


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` and the framing text (deterministic), with
    ChatML's and InternVL's special tokens and ChatML's template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*texts, FRAME_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer, trained on the small built-in radiology corpus."""
    return train_bpe_tokenizer([CORPUS] * 4, vocab_size)


def _tiny_text_config(vocab_size: int, hidden: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


def assemble_internvl(
    vision: InternVLVisionConfig, text: Qwen2Config, tokenizer: PreTrainedTokenizerFast
) -> InternVLForConditionalGeneration:
    """A random InternVL 2D MLLM from its two sub-configs, its image token taken from ``tokenizer``.

    InternViT zero-initialises its CLS token and position embeddings; a pretrained tower has neither
    at zero, so they are drawn small and random (tests can then tell them apart).
    """
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>")
    )
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():
        model.model.vision_tower.embeddings.cls_token.normal_(0, 0.02)
        model.model.vision_tower.embeddings.position_embeddings.normal_(0, 0.02)
    return model


def build_tiny_2d_mllm(
    family: str = "internvl",
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    text_hidden: int = 64,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random 2D MLLM of ``family`` and its tokenizer, as if loaded from a 2D checkpoint."""
    if family not in FAMILY_CLASSES:
        raise ValueError(f"family {family!r}: choose one of {', '.join(FAMILY_CLASSES)}")
    tokenizer = tokenizer or build_tiny_tokenizer()
    torch.manual_seed(seed)
    text_config = _tiny_text_config(len(tokenizer), text_hidden)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision_kwargs = dict(
        hidden_size=vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        intermediate_size=vision_hidden * 2,
        image_size=image_size,
        patch_size=patch_size,
    )
    if family == "internvl":
        vision = InternVLVisionConfig(**vision_kwargs, use_qk_norm=True, layer_scale_init_value=0.1)
        model = assemble_internvl(vision, text_config, tokenizer)
    else:
        vision = SiglipVisionConfig(**vision_kwargs, vision_use_head=False)
        config = LlavaConfig(
            vision_config=vision,
            text_config=text_config,
            image_token_id=image_token_id,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_seq_length=(image_size // patch_size) ** 2,
        )
        model = LlavaForConditionalGeneration(config)
    return model.eval(), tokenizer


def save_tiny_2d_checkpoint(directory: str | Path, family: str = "internvl", seed: int = 0) -> Path:
    """Write a tiny 2D MLLM as a Hugging Face folder (safetensors, tokenizer, image normalisation)."""
    folder = Path(directory)
    model, tokenizer = build_tiny_2d_mllm(family, seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    family_class = FAMILY_CLASSES[family]
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": list(family_class.image_mean), "image_std": list(family_class.image_std)}),
        encoding="utf-8",
    )
    return folder


def build_tiny_ctmllm(
    family: str = "internvl",
    num_3d_blocks: int = 2,
    seed: int = 0,
    moe: MoEConfig | None = None,
    max_visual_tokens: int = 512,
    **mllm_kwargs,
) -> CTMLLM:
    """A tiny CTMLLM converted from a random 2D model, float32 on CPU."""
    model, tokenizer = build_tiny_2d_mllm(family, seed=seed, **mllm_kwargs)
    family_class = FAMILY_CLASSES[family]
    return CTMLLM.from_2d_model(
        model,
        tokenizer,
        volume=VolumeAdapterConfig(num_3d_blocks=num_3d_blocks, max_visual_tokens=max_visual_tokens),
        moe=moe,
        generation=GenerationConfig(max_new_tokens=32),
        image_mean=family_class.image_mean,
        image_std=family_class.image_std,
        source=f"tiny-{family}-random",
    ).eval()
