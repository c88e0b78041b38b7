"""Per-family glue: where a 2D multimodal LLM keeps its parts, and how to call them.

The 3D transfer (``model_core.volume_encoder``) is written once against the small ``Family``
interface below; adding a family means writing one subclass here, never copying the encoder.

Families:
- ``internvl``: ``InternVLForConditionalGeneration`` (InternViT with a CLS token and learned
  absolute position embeddings, pixel shuffle, MLP projector, Qwen2 language model).
- ``llava``: ``LlavaForConditionalGeneration`` with a SigLIP tower (no CLS token; features from
  ``vision_feature_layer``, never through ``post_layernorm``), MLP projector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.internvl.modeling_internvl import InternVLModel


@dataclass
class Split2DModel:
    """The three named parts of a 2D MLLM, moved (not copied) out of the Hugging Face model."""

    vision_tower: nn.Module
    multi_modal_projector: nn.Module
    language_model: nn.Module  # a *ForCausalLM with ``.model`` and ``.lm_head``


class Family:
    """How one family's tower, projector and language model are reached and called."""

    name: str = ""
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __init__(self, mllm_config: PretrainedConfig) -> None:
        self.mllm_config = mllm_config
        self.vision_config = mllm_config.vision_config
        self.text_config = mllm_config.text_config

    # -- the tower ---------------------------------------------------------------------------
    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(n, 3, S, S)`` images -> ``(n, prefix + h * w, C)`` tokens with position embeddings."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block(hidden)

    def qk_sites(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Modules whose outputs are the block's final flat queries and keys ``(n, T, heads * d)``,
        right before the split into heads: the place where rotary encoding belongs."""
        raise NotImplementedError

    def mlp_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {"fc1": block.mlp.fc1, "fc2": block.mlp.fc2}

    def attention_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        raise NotImplementedError

    def final_norm(self, tower: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch grid (InternVL's CLS), dropped before the projector."""
        return 0

    @property
    def num_heads(self) -> int:
        return self.vision_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.vision_config.hidden_size // self.vision_config.num_attention_heads

    @property
    def patch_size(self) -> int:
        size = self.vision_config.patch_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def native_image_size(self) -> int:
        size = self.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def num_feature_blocks(self, tower: nn.Module) -> int:
        """How many blocks feed the projector (all, or up to ``vision_feature_layer``)."""
        layer = self.mllm_config.vision_feature_layer
        total = len(self.blocks(tower))
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: only a single feature layer is supported")
        return total + 1 + layer if layer < 0 else layer

    # -- the projector -----------------------------------------------------------------------
    def spatial_reduce(self, grid: torch.Tensor) -> torch.Tensor:
        """The family's own spatial merge before the projector MLP: ``(n, h, w, C) -> (n, h', w', C')``."""
        return grid

    # -- splitting the Hugging Face model ----------------------------------------------------
    def split(self, mllm: PreTrainedModel) -> Split2DModel:
        """Move the parts out of ``mllm`` into a causal LM of the text config (no copy of weights)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            language_model = AutoModelForCausalLM.from_config(self.text_config)
        language_model.model = mllm.model.language_model
        language_model.lm_head = mllm.lm_head
        language_model.to(mllm.lm_head.weight.dtype)
        return Split2DModel(mllm.model.vision_tower, mllm.model.multi_modal_projector, language_model)


class InternVLFamily(Family):
    name = "internvl"
    image_mean = (0.485, 0.456, 0.406)
    image_std = (0.229, 0.224, 0.225)

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        return tower.encoder.layer

    def embed(self, tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        # interpolates the learned position embeddings itself when the size differs
        return tower.embeddings(pixel_values)

    def qk_sites(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        # q_norm / k_norm are Identity without QK-norm; either way their output is final
        return block.attention.q_norm, block.attention.k_norm

    def attention_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        att = block.attention
        return {
            "q_proj": att.q_proj,
            "k_proj": att.k_proj,
            "v_proj": att.v_proj,
            "out_proj": att.projection_layer,
        }

    def final_norm(self, tower: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # InternVL applies the tower's last norm only when features come from the last layer
        return tower.layernorm(hidden) if self.mllm_config.vision_feature_layer == -1 else hidden

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.mllm_config.vision_feature_select_strategy == "default" else 0

    def spatial_reduce(self, grid: torch.Tensor) -> torch.Tensor:
        ratio = self.mllm_config.downsample_ratio
        if grid.shape[1] % round(1 / ratio) or grid.shape[2] % round(1 / ratio):
            raise ValueError(
                f"InternVL's pixel shuffle needs a patch grid divisible by {round(1 / ratio)}, got "
                f"{tuple(grid.shape[1:3])}: choose an image_size that is a multiple of "
                f"{self.patch_size * round(1 / ratio)} pixels"
            )
        return InternVLModel.pixel_shuffle(None, grid, scale_factor=ratio)


class LlavaSiglipFamily(Family):
    name = "llava"

    def blocks(self, tower: nn.Module) -> nn.ModuleList:
        return tower.encoder.layers

    def embed(self, tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        size = pixel_values.shape[-1]
        return tower.embeddings(pixel_values, interpolate_pos_encoding=size != self.native_image_size)

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return block(hidden, attention_mask=None)

    def qk_sites(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        return block.self_attn.q_proj, block.self_attn.k_proj

    def attention_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        att = block.self_attn
        return {"q_proj": att.q_proj, "k_proj": att.k_proj, "v_proj": att.v_proj, "out_proj": att.out_proj}

    @property
    def num_prefix_tokens(self) -> int:
        return 0  # SigLIP has no CLS token


FAMILY_CLASSES: dict[str, type[Family]] = {"internvl": InternVLFamily, "llava": LlavaSiglipFamily}


def family_of_config(mllm_config: PretrainedConfig) -> str:
    """The family name of a 2D MLLM config, or an error naming what is supported."""
    model_type = mllm_config.model_type
    if model_type == "internvl":
        return "internvl"
    if model_type == "llava" and mllm_config.vision_config.model_type == "siglip_vision_model":
        return "llava"
    raise ValueError(
        f"2D model type {model_type!r} (vision {getattr(mllm_config.vision_config, 'model_type', '?')!r}) "
        f"is not supported: use an InternVL (transformers 'internvl') or a LLaVA model with a SigLIP tower"
    )


def get_family(mllm_config: PretrainedConfig) -> Family:
    return FAMILY_CLASSES[family_of_config(mllm_config)](mllm_config)


STATE_DICT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "projector.multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def map_2d_state_dict_name(name: str) -> str:
    """The CTMLLM state-dict name of a 2D MLLM tensor (see docs/ARCHITECTURE.md)."""
    for old, new in STATE_DICT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    raise KeyError(f"2D tensor {name!r} is outside the vision tower, projector and language model")


def map_ctmllm_state_dict_name(name: str) -> str:
    """The 2D MLLM state-dict name of a CTMLLM tensor: the inverse of ``map_2d_state_dict_name``.

    Used to export a CTMLLM with K=0 and no MoE (a 2D model) as a Hugging Face 2D checkpoint.
    """
    for old, new in STATE_DICT_PREFIXES:
        if name.startswith(new):
            return old + name[len(new) :]
    raise KeyError(
        f"CTMLLM tensor {name!r} has no 2D counterpart (volume adapter tensors such as MoE experts are "
        f"3D-only): export a model with moe.mode 'none'"
    )
