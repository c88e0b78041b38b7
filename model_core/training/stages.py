"""What each training stage builds and trains.

Stage 1: the model from its source, with a token-level MoE (the configured task-level MoE is
reduced to its shared token-level part), LoRA adapters (peft) on the language model or full
fine-tuning; trains the token-level MoE, the projector and the language model's adapters.

Stage 2: the stage-1 result with each task expert initialised as a copy of the token-level MoE
(``model_core.moe.set_moe``); trains the task experts and the task router only.

The merged export is a plain CTMLLM folder: the language model's LoRA is folded into its linears
(``W + alpha / r * B A``) while saving, so ``CTMLLM.from_pretrained`` needs no peft and no
adapter config. The training model itself is never modified by an export.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from model_core.config import MoEConfig, VolumeAdapterConfig
from model_core.model import CONFIG_FILE, CTMLLM
from model_core.moe import recompute_with_same_routing, set_moe
from model_core.training.config import LMTuning, ModelSource, StageConfig, TrainingConfig

FINAL_DIR = "final"
"""The sub-folder of a stage's run folder that holds its merged model (what ``--init`` reads)."""


def stage_moe_config(moe: MoEConfig, stage: int) -> MoEConfig:
    """Stage 1 trains the shared token-level MoE of a task-level config; stage 2 the config itself."""
    if stage == 1:
        return dataclasses.replace(moe, mode="token") if moe.task_level else moe
    if not moe.task_level:
        raise ValueError(
            f"stage 2 trains task experts, but moe.mode={moe.mode!r}: set moe.mode to tgh_hard or tgh_soft "
            f"(a '{moe.mode}' model is complete after stage 1)"
        )
    return moe


def build_source_model(config: TrainingConfig) -> CTMLLM:
    """The stage-1 model: tiny random, a converted 2D checkpoint, or a CTMLLM folder, with its MoE
    and the training data's preprocessing recorded."""
    model = load_source_model(config.model, stage_moe_config(config.moe, 1))
    if config.preprocessing:
        model.config.preprocessing = dict(config.preprocessing)
    return model


def load_source_model(source: ModelSource, moe: MoEConfig) -> CTMLLM:
    """``model.source`` -> a CTMLLM with ``moe`` installed (zero delta when new)."""
    if source.source == "tiny":
        from model_core.tiny import build_tiny_ctmllm

        if source.image_size is not None:
            raise ValueError("model.image_size applies to 2D checkpoints; for tiny set model.tiny.image_size")
        return build_tiny_ctmllm(
            source.family,
            num_3d_blocks=source.num_3d_blocks,
            seed=source.seed,
            moe=moe,
            max_visual_tokens=source.max_visual_tokens,
            **source.tiny,
        )
    folder = Path(source.source).expanduser()
    if (folder / CONFIG_FILE).is_file():
        model = CTMLLM.from_pretrained(folder)
        set_moe(model, moe)
        return model
    volume = VolumeAdapterConfig(
        num_3d_blocks=source.num_3d_blocks,
        image_size=source.image_size,
        max_visual_tokens=source.max_visual_tokens,
    )
    return CTMLLM.from_2d_pretrained(source.source, volume=volume, moe=moe)


def resolve_init(path: str | os.PathLike) -> Path:
    """A stage-1 run folder (its ``final/``) or a CTMLLM folder -> the CTMLLM folder."""
    folder = Path(path).expanduser()
    for candidate in (folder / FINAL_DIR, folder):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"--init {folder}: neither it nor {folder / FINAL_DIR} is a CTMLLM folder; run stage 1 first "
        f"(python -m model_core.train --config ... --stage 1) or point --init at its output"
    )


def build_stage_model(config: TrainingConfig, stage: int, init: Path | None) -> CTMLLM:
    if stage == 1:
        model = build_source_model(config)
        if config.lm.mode == "lora":
            add_lm_lora(model, config.lm)
        return model
    if init is None:
        raise ValueError("stage 2 needs --init: the stage-1 run folder or its merged model")
    model = CTMLLM.from_pretrained(init)
    set_moe(model, stage_moe_config(config.moe, 2))
    return model


def add_lm_lora(model: CTMLLM, lm: LMTuning) -> None:
    """peft LoRA on the language model's ``lm.target_modules`` linears (B starts at zero)."""
    lora = LoraConfig(
        r=lm.rank, lora_alpha=lm.alpha, lora_dropout=lm.dropout, target_modules=list(lm.target_modules)
    )
    inject_adapter_in_model(lora, model.language_model)
    if not has_lora(model.language_model):
        raise ValueError(
            f"lm.target_modules={list(lm.target_modules)} matched no linear of the language model; name "
            f"its projection layers (e.g. q_proj, v_proj)"
        )


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in module.modules())


def set_trainable(model: CTMLLM, stage: int, config: TrainingConfig, settings: StageConfig) -> list[str]:
    """Freeze everything, then unfreeze what the stage trains; returns the trainable names."""
    model.requires_grad_(False)
    moe = model.volume_adapter.moe
    if moe is not None:
        moe.requires_grad_(True)  # stage 1: the token-level MoE; stage 2: task experts and router
    if stage == 1:
        if settings.train_projector:
            model.projector.requires_grad_(True)
        if settings.train_3d_blocks:
            blocks = model.volume_adapter.blocks_3d(model.vision_tower)
            if not blocks:
                raise ValueError(
                    "train_3d_blocks is set but the model has no 3D blocks (num_3d_blocks 0): set "
                    "model.num_3d_blocks above 0 or train_3d_blocks false"
                )
            for block in blocks:
                block.requires_grad_(True)
        if config.lm.mode == "full":
            model.language_model.requires_grad_(True)
        elif config.lm.mode == "lora":
            for name, param in model.language_model.named_parameters():
                param.requires_grad_("lora_" in name)
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    if not names:
        raise ValueError(
            f"stage {stage} has nothing to train: enable the MoE (moe.mode), the projector or the language model"
        )
    return names


def enable_gradient_checkpointing(model: CTMLLM) -> None:
    """Recompute tower and language-model blocks in the backward pass (non-reentrant: frozen
    inputs still pass gradients). A recomputed tower block runs under the MoE routing of the
    forward it repeats (``recompute_with_same_routing``), so recomputation is exact."""
    kwargs = {"use_reentrant": False}
    tower_kwargs = {**kwargs, "context_fn": recompute_with_same_routing}
    model.vision_tower.activation_checkpointing_enable(activation_checkpointing_kwargs=tower_kwargs)
    model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


@contextmanager
def lora_merged(module: nn.Module) -> Iterator[None]:
    """Temporarily put plain Linears with merged weights in place of ``module``'s LoRA layers.

    New tensors hold ``W + delta``; the trained weights and adapters are left untouched and the
    LoRA layers are put back on exit, even on error.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, layer in list(module.named_modules()):
            if not isinstance(layer, LoraLayer):
                continue
            base = layer.get_base_layer()
            if not isinstance(base, nn.Linear):
                raise TypeError(
                    f"{name}: LoRA on {type(base).__name__} cannot be merged here; adapt Linears only"
                )
            merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
            with torch.no_grad():
                delta = sum(layer.get_delta_weight(adapter) for adapter in layer.active_adapters)
                merged.weight = nn.Parameter(base.weight + delta.to(base.weight.dtype), requires_grad=False)
            if base.bias is not None:
                merged.bias = base.bias
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name)
            setattr(parent, child, merged)
            swapped.append((parent, child, layer))
        yield
    finally:
        for parent, child, layer in reversed(swapped):
            setattr(parent, child, layer)


def export_merged(model: CTMLLM, directory: str | os.PathLike) -> Path:
    """Write ``model`` as a CTMLLM folder with the language model's LoRA merged in."""
    with lora_merged(model.language_model):
        return model.save_pretrained(directory)
