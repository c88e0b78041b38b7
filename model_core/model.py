"""CTMLLM: a 2D multimodal LLM that reads a whole CT volume.

Named parts, in the order data flows: ``vision_tower`` (the 2D tower, unchanged) ->
``volume_adapter`` (slice groups, 3D blocks with depth RoPE, MoE experts) -> ``projector`` (the
2D projector behind a token budget) -> ``language_model`` (the 2D model's causal LM). The glue is
``encode``; prompts put the visual tokens where the chat template's first user turn holds the
image (``model_core.chat``), each slice group framed as the 2D model frames an image
(``model_core.framing``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import GenerationConfig as HFGenerationConfig

from model_core.chat import CHATML_TEMPLATE, History, chat_text_around_image
from model_core.config import (
    TASKS,
    CTMLLMConfig,
    GenerationConfig,
    MoEConfig,
    VolumeAdapterConfig,
    check_max_new_tokens,
)
from model_core.families import get_family
from model_core.framing import VisualFraming, default_framing
from model_core.generation import CallbackStreamer, CancelOnEvent, GenerationResult, iterate_in_thread
from model_core.hub import CONFIG_FILE
from model_core.model_files import (
    HUB_FILE_PATTERNS,
    WEIGHTS_FILE,
    ModelLoadError,
    checked_weights_file,
    load_tokenizer,
    mllm_config_from_dict,
    read_image_normalisation,
)
from model_core.prefix_cache import VISUAL_SLOT, PrefixCache
from model_core.projector import VolumeProjector
from model_core.prompts import DEFAULT_REPORT_PROMPT
from model_core.volume_encoder import VolumeAdapter, VolumeInputError

_TEXT_SLOT = "\ue000ctmllm-text-{}\ue000"
_TEXT_SLOT_PATTERN = re.compile("\ue000ctmllm-text-(\\d+)\ue000")
"""Stands in the chat template for a piece of user text (private-use characters nobody types), so
that the template's own markers are tokenized as control tokens and the user's text never is."""


class PromptTooLongError(ValueError):
    """The prompt and history exceed the configured prompt budget."""


@dataclass
class VisualFeatures:
    """Projected visual tokens of one volume, reusable for follow-up questions.

    ``tokens``: ``(visual_tokens, llm_hidden)``, depth-major in ``groups`` equal slice groups
    (each framed alone in the prompt); ``task``: the task expert that encoded them (None for a
    model without task experts).
    """

    tokens: torch.Tensor
    task: str | None = None
    groups: int = 1


@dataclass
class EncodedBatch:
    """What one encoding call gives: ``tokens`` ``(B, visual_tokens, llm_hidden)`` (depth-major,
    ``groups`` slice groups of equal size), the task expert each sample went through (``tasks``;
    None without task experts) and the MoE's auxiliary losses of this call (empty without MoE)."""

    tokens: torch.Tensor
    groups: int
    tasks: list[str] | None
    aux_losses: dict[str, torch.Tensor]


@dataclass
class LossOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux_losses: dict[str, torch.Tensor]


class CTMLLM(nn.Module):
    def __init__(
        self,
        config: CTMLLMConfig,
        vision_tower: nn.Module,
        multi_modal_projector: nn.Module,
        language_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        super().__init__()
        self.config = config
        self.family = get_family(mllm_config_from_dict(config.mllm_config))
        self.vision_tower = vision_tower
        self.volume_adapter = VolumeAdapter(config, self.family, vision_tower)
        self.projector = VolumeProjector(self.family, multi_modal_projector, config.volume.max_visual_tokens)
        self.language_model = language_model
        self.tokenizer = tokenizer
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHATML_TEMPLATE
        self.framing = VisualFraming(config.visual_framing, tokenizer)
        self.model_dir: Path | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_2d_model(
        cls,
        mllm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        volume: VolumeAdapterConfig | None = None,
        moe: MoEConfig | None = None,
        generation: GenerationConfig | None = None,
        image_mean: tuple | None = None,
        image_std: tuple | None = None,
        source: str = "",
        visual_framing: str | None = None,
    ) -> CTMLLM:
        """Adapt an in-memory 2D MLLM; its modules move into the CTMLLM (no weight is copied).

        ``visual_framing`` None: the framing the 2D model was trained with (``default_framing``:
        InternVL's ``<img>...</img>`` when its tokenizer has those special tokens).
        """
        family = get_family(mllm.config)
        config = CTMLLMConfig(
            family=family.name,
            mllm_config=mllm.config.to_dict(),
            image_mean=image_mean or family.image_mean,
            image_std=image_std or family.image_std,
            volume=volume or VolumeAdapterConfig(),
            moe=moe or MoEConfig(),
            generation=generation or GenerationConfig(),
            source=source,
            visual_framing=visual_framing or default_framing(family.name, tokenizer),
        )
        parts = family.split(mllm)
        return cls(config, parts.vision_tower, parts.multi_modal_projector, parts.language_model, tokenizer)

    @classmethod
    def from_2d_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        volume: VolumeAdapterConfig | None = None,
        moe: MoEConfig | None = None,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> CTMLLM:
        """Convert a 2D MLLM checkpoint (a local folder, or a Hub repo id when online).

        Only safetensors weights are read and no remote code runs.
        """
        folder = Path(path_or_repo_id)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            from model_core.hub import looks_like_hub_repo_id

            if not looks_like_hub_repo_id(path_or_repo_id):
                raise ModelLoadError(f"2D checkpoint folder {folder} does not exist: check the path")

            folder = Path(
                snapshot_download(
                    str(path_or_repo_id),
                    revision=revision,
                    cache_dir=cache_dir,
                    allow_patterns=HUB_FILE_PATTERNS,
                )
            )
        mllm_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        family = get_family(mllm_config)
        mllm = AutoModelForImageTextToText.from_pretrained(
            folder, use_safetensors=True, trust_remote_code=False, dtype=dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        mean, std = read_image_normalisation(folder, (family.image_mean, family.image_std))
        return cls.from_2d_model(
            mllm, tokenizer, volume, moe, image_mean=mean, image_std=std, source=str(path_or_repo_id)
        )

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config, safetensors weights and tokenizer; the folder appears complete or not at all."""
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            self.config.save(staging / CONFIG_FILE)
            save_model(self, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "ctmllm": "1"})
            self.tokenizer.save_pretrained(staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> CTMLLM:
        """Load a folder written by ``save_pretrained`` (safetensors only)."""
        folder = Path(directory)
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise ModelLoadError(
                f"{folder} has no {CONFIG_FILE}: it is not a CTMLLM folder (a 2D checkpoint converts "
                f"with CTMLLM.from_2d_pretrained or `python -m model_core convert`)"
            )
        config = CTMLLMConfig.load(config_path)
        mllm_config = mllm_config_from_dict(config.mllm_config)
        get_family(mllm_config)  # an unsupported family fails here, before any weight is read
        tokenizer = load_tokenizer(folder)
        weights = checked_weights_file(folder)
        mllm = AutoModelForImageTextToText.from_config(mllm_config)
        parts = get_family(mllm.config).split(mllm)
        model = cls(config, parts.vision_tower, parts.multi_modal_projector, parts.language_model, tokenizer)
        try:  # strict: a missing or unexpected tensor raises
            load_model(model, str(weights), strict=True, device=str(device))
        except RuntimeError as error:  # torch's state-dict mismatch, and safetensors' own errors
            first = str(error).strip().splitlines()[0][:300]
            raise ModelLoadError(
                f"{weights}: does not match {CONFIG_FILE} or is damaged ({first}); copy the model folder again, "
                "whole, from where it was saved"
            ) from error
        model.to(device=device, dtype=dtype)
        model.model_dir = folder
        return model.eval()

    # -- identity ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.language_model.parameters()).dtype

    @property
    def model_id(self) -> str:
        if self.model_dir is not None:
            return self.model_dir.name
        return self.config.source or f"ctmllm-{self.config.family}"

    def parameter_counts(self) -> dict[str, int]:
        parts = {
            "vision_tower": self.vision_tower,
            "volume_adapter": self.volume_adapter,
            "projector": self.projector,
            "language_model": self.language_model,
        }
        counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    def preprocess_config(self, **overrides: Any):
        """The ``model_core.data.PreprocessConfig`` this model was trained with, plus overrides.

        One home for "how to prepare a volume for this model": CLI, batch, panel and evaluation
        all call it, so a model never sees volumes windowed or sized unlike its training data.
        """
        from model_core.data import PreprocessConfig

        return PreprocessConfig.from_dict({**self.config.preprocessing, **overrides})

    @staticmethod
    def default_prompt(task: str) -> str:
        if task == "report":
            return DEFAULT_REPORT_PROMPT
        raise ValueError(f"task {task!r} has no default prompt: a question is needed")

    # -- vision ------------------------------------------------------------------------------
    def as_volume_batch(self, volume: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Accept ``(D, H, W)`` or ``(B, D, H, W)`` float arrays; refuse anything else clearly."""
        if isinstance(volume, np.ndarray):
            if not np.issubdtype(volume.dtype, np.floating):
                raise VolumeInputError(
                    f"volume dtype is {volume.dtype}; preprocess it to float values in [0, 1] first "
                    f"(model_core.data.preprocess)"
                )
            volume = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
        if isinstance(volume, torch.Tensor) and volume.dim() == 3:
            volume = volume.unsqueeze(0)
        return volume.to(self.device) if isinstance(volume, torch.Tensor) else volume

    def pooled_prompt_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Mean input embedding of each prompt's tokens, ``(B, llm_hidden)``: what the task router
        reads. Detached: the router's loss never reaches the language model."""
        table = self.language_model.get_input_embeddings()
        pooled = []
        with torch.no_grad():
            for prompt in prompts:
                ids = self.text_ids(prompt)
                if not ids:
                    raise ValueError("the prompt is empty: type a question or use the report prompt")
                pooled.append(table(torch.tensor(ids, device=self.device)).float().mean(dim=0))
        return torch.stack(pooled)

    def encode(
        self,
        volumes: torch.Tensor,
        tasks: Sequence[str] | None = None,
        prompts: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
    ) -> EncodedBatch:
        """``(B, D, H, W)`` in [0, 1] -> visual tokens, with this call's routing and MoE losses.

        With a task-level MoE, ``tasks`` force each sample's task expert; otherwise the task router
        picks from ``prompts``. ``labels`` (true tasks) add the router's loss to ``aux_losses``.
        Without one, tasks and prompts do not matter. Each call routes alone: concurrent calls from
        several threads are safe.
        """
        moe = self.volume_adapter.moe
        prompt_embeddings = None
        if moe is not None and moe.config.task_level and prompts is not None:
            prompt_embeddings = self.pooled_prompt_embeddings(prompts)
        features, routing = self.volume_adapter(
            self.vision_tower, volumes, tasks=tasks, prompt_embeddings=prompt_embeddings, labels=labels
        )  # (B, G, h, w, C)
        grouped = self.projector(features)  # (B, G', tokens_per_group, llm_hidden)
        return EncodedBatch(
            tokens=grouped.flatten(1, 2),
            groups=grouped.shape[1],
            tasks=routing.tasks if routing is not None else None,
            aux_losses=routing.auxiliary_losses() if routing is not None else {},
        )

    def encode_volumes(
        self,
        volumes: torch.Tensor,
        tasks: Sequence[str] | None = None,
        prompts: Sequence[str] | None = None,
        labels: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """``(B, D, H, W)`` in [0, 1] -> visual tokens ``(B, tokens, llm_hidden)`` (see ``encode``)."""
        return self.encode(volumes, tasks, prompts, labels).tokens

    @torch.inference_mode()
    def encode_volume(
        self, volume: np.ndarray | torch.Tensor, task: str | None = None, prompt: str | None = None
    ) -> VisualFeatures:
        """Encode one volume ``(D, H, W)`` once, to reuse across questions.

        ``task`` forces the task expert of a task-level MoE; without it the task router picks from
        ``prompt``. ``VisualFeatures.task`` says which was used.
        """
        if task is not None and task not in TASKS:
            raise ValueError(f"task {task!r}: choose one of {', '.join(TASKS)}")
        encoded = self.encode(
            self.as_volume_batch(volume), [task] if task else None, [prompt] if prompt else None
        )
        return VisualFeatures(
            tokens=encoded.tokens[0], task=encoded.tasks[0] if encoded.tasks else None, groups=encoded.groups
        )

    @property
    def has_task_experts(self) -> bool:
        """Whether a task router picks one of several task experts (a TGH-MoE model)."""
        return self.config.moe.task_level

    def feature_key(self, task: str | None, prompt: str) -> tuple:
        """What a volume's visual features depend on besides the volume: equal keys, equal features.

        A forced ``task``; else what the task router makes of ``prompt``: the expert it picks
        (hard mode), the prompt itself (soft mode mixes the experts by it), nothing without task
        experts. Lets callers reuse encoded features across prompts exactly when that is exact.
        """
        if task is not None:
            return ("task", task)
        if not self.has_task_experts:
            return ("routed",)
        if self.config.moe.mode == "tgh_soft":
            return ("routed", "prompt", prompt)
        return ("routed", self.route(prompt))

    def forcing_keeps_features(self, routed_expert: str | None, task: str) -> bool:
        """Whether forcing ``task`` gives the features that routing to ``routed_expert`` gave:
        always without task experts, in hard mode when the router picked ``task``, never in soft
        mode (the router's mix is not one expert). Lets evaluation skip a second generation."""
        if routed_expert is None:
            return True
        return routed_expert == task and self.config.moe.mode == "tgh_hard"

    @torch.inference_mode()
    def route(self, prompt: str) -> str | None:
        """The task expert the task router picks for ``prompt`` (its argmax; in soft mode the expert
        that weighs most), without encoding a volume; None for a model without task experts."""
        moe = self.volume_adapter.moe
        if not self.has_task_experts or moe is None:
            return None
        logits = moe.task_router(self.pooled_prompt_embeddings([prompt]))  # (1, tasks)
        return moe.set_names[int(logits.argmax(dim=-1))]

    # -- language ----------------------------------------------------------------------------
    @property
    def end_of_turn(self) -> str:
        """The text that closes an assistant turn: ChatML's marker when the vocabulary has it."""
        vocab = self.tokenizer.get_vocab()
        return "<|im_end|>" if "<|im_end|>" in vocab else self.tokenizer.eos_token

    @property
    def image_token(self) -> str:
        """The 2D model's image token: what a typed-content chat template writes for an image."""
        return self.tokenizer.convert_ids_to_tokens(self.family.mllm_config.image_token_id)

    def chat_segments(
        self, prompt: str, history: History = (), framing_tokens: int = 0
    ) -> tuple[list[int], list[int]]:
        """Token ids before and after the visual tokens for a user turn (with earlier turns).

        ``framing_tokens`` (the framing's ids around the slice groups) count toward the prompt limit.
        """
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty: type a question or use the report prompt")
        texts: list[str] = []

        def slot(text: str) -> str:
            texts.append(text)
            return _TEXT_SLOT.format(len(texts) - 1)

        slotted = [(slot(question), slot(answer)) for question, answer in history]
        before, after = chat_text_around_image(self.tokenizer, slot(prompt), slotted, self.image_token)
        ids_before, ids_after = self._template_ids(before, texts), self._template_ids(after, texts)
        limit = self.config.generation.max_prompt_tokens
        count = len(ids_before) + len(ids_after) + framing_tokens
        if count > limit:
            raise PromptTooLongError(
                f"the prompt and conversation are {count} tokens; the limit is "
                f"{limit}: shorten the question or start a new conversation"
            )
        return ids_before, ids_after

    def text_ids(self, text: str) -> list[int]:
        """Token ids of user text (questions, reports, answers) as plain text: typed control markers
        such as ``<|im_start|>`` become ordinary characters, never the template's special tokens."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def _template_ids(self, rendered: str, texts: Sequence[str]) -> list[int]:
        """Ids of a rendered chat template whose user text sits in slots: the template's own text is
        tokenized with its control tokens, each slot's text with ``text_ids``."""
        ids: list[int] = []
        for index, piece in enumerate(_TEXT_SLOT_PATTERN.split(rendered)):
            if index % 2:
                ids += self.text_ids(texts[int(piece)])
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False).input_ids
        return ids

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        table = self.language_model.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=self.device))

    def prompt_sequence(
        self, visual_tokens: int, prompt: str, history: History = (), groups: int = 1
    ) -> list[int]:
        """The prompt's token ids with ``VISUAL_SLOT`` where each of ``visual_tokens`` visual tokens
        of ``groups`` slice groups (depth-major) goes, each group framed (``self.framing``)."""
        if visual_tokens % groups:
            raise ValueError(f"{visual_tokens} visual tokens do not split into {groups} equal slice groups")
        separators = self.framing.separators(groups)
        before, after = self.chat_segments(prompt, history, sum(len(ids) for ids in separators))
        sequence = before + separators[0]
        for separator in separators[1:]:
            sequence += [VISUAL_SLOT] * (visual_tokens // groups) + separator
        return sequence + after

    def embed_sequence(self, sequence: list[int], visual: torch.Tensor) -> torch.Tensor:
        """``prompt_sequence`` ids and the ``(tokens, llm_hidden)`` visual tokens -> ``(sequence,
        llm_hidden)`` input embeddings (differentiable in ``visual``)."""
        ids = torch.tensor(sequence, dtype=torch.long, device=self.device)
        embeds = self.language_model.get_input_embeddings()(ids.clamp(min=0))
        slots = (ids == VISUAL_SLOT).unsqueeze(-1)  # (sequence, 1)
        return embeds.masked_scatter(slots, visual.to(embeds.dtype))

    def prompt_embeddings(
        self, visual: torch.Tensor, prompt: str, history: History = (), groups: int = 1
    ) -> torch.Tensor:
        """``(tokens, llm_hidden)`` visual tokens of ``groups`` slice groups (depth-major) ->
        ``(sequence, llm_hidden)`` prompt embeddings, each group framed (``self.framing``)."""
        return self.embed_sequence(self.prompt_sequence(visual.shape[0], prompt, history, groups), visual)

    def compute_loss(
        self,
        volumes: torch.Tensor,
        prompts: Sequence[str],
        answers: Sequence[str],
        tasks: Sequence[str] | None = None,
    ) -> LossOutput:
        """Teacher-forced generation loss on the answers of a batch ``(B, D, H, W)``.

        ``tasks`` are the samples' true tasks: the task router's labels, and in hard TGH-MoE mode
        also the expert each sample trains (teacher forcing; the router learns from its labels).
        In soft mode the router's mix is used, so the generation loss trains the router too.
        """
        forced = tasks if self.config.moe.mode == "tgh_hard" else None
        encoded = self.encode(volumes, forced, prompts, labels=tasks)
        visual = encoded.tokens  # (B, tokens, llm_hidden)
        sequences, labels = [], []
        for index, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            prefix = self.prompt_embeddings(visual[index], prompt, groups=encoded.groups)
            end_of_turn = self.tokenizer(self.end_of_turn, add_special_tokens=False).input_ids
            answer_ids = self.text_ids(answer) + end_of_turn
            sequences.append(torch.cat([prefix, self._embed_ids(answer_ids)], dim=0))
            labels.append([-100] * prefix.shape[0] + answer_ids)
        longest = max(seq.shape[0] for seq in sequences)
        hidden = sequences[0].shape[-1]
        embeds = sequences[0].new_zeros(len(sequences), longest, hidden)
        mask = torch.zeros(len(sequences), longest, dtype=torch.long, device=self.device)
        label_tensor = torch.full((len(sequences), longest), -100, dtype=torch.long, device=self.device)
        for row, (seq, lab) in enumerate(zip(sequences, labels, strict=True)):
            embeds[row, : seq.shape[0]] = seq  # right padding: positions stay those of inference
            mask[row, : seq.shape[0]] = 1
            label_tensor[row, : len(lab)] = torch.tensor(lab, device=self.device)
        lm_loss = self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=label_tensor).loss
        aux = encoded.aux_losses
        return LossOutput(
            loss=lm_loss + sum(aux.values(), torch.zeros((), device=self.device)),
            lm_loss=lm_loss,
            aux_losses=aux,
        )

    # -- generation --------------------------------------------------------------------------
    def _hf_generation_config(self, max_new_tokens: int | None, do_sample: bool | None) -> HFGenerationConfig:
        settings = self.config.generation
        stop_ids = {self.tokenizer.convert_tokens_to_ids(self.end_of_turn), self.tokenizer.eos_token_id}
        stop_ids.discard(None)
        sample = settings.do_sample if do_sample is None else do_sample
        return HFGenerationConfig(
            max_new_tokens=settings.max_new_tokens if max_new_tokens is None else max_new_tokens,
            do_sample=sample,
            temperature=settings.temperature if sample else None,
            top_p=settings.top_p if sample else None,
            eos_token_id=sorted(stop_ids),
            pad_token_id=self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else min(stop_ids),
        )

    @torch.inference_mode()
    def generate(
        self,
        volume_or_features: np.ndarray | torch.Tensor | VisualFeatures,
        prompt: str | None = None,
        task: str | None = None,
        history: History = (),
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> GenerationResult:
        """Answer ``prompt`` about a volume (or its cached features); no prompt: write a report.

        ``task`` forces the task expert that reads the volume; None (the default) lets the task
        router pick it from the prompt (cached features keep the expert that encoded them, and a
        forced task that differs from theirs is refused). ``GenerationResult.expert`` says which
        expert read the volume. Greedy by default. ``on_text`` receives text chunks as they are
        decoded; setting ``cancel`` from another thread stops after the token in progress.
        ``prefix_cache`` (one per conversation, with the same features each turn) keeps the
        language model's key/value cache between turns, so a follow-up prefills only its new text.
        """
        start = time.perf_counter()
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        if isinstance(volume_or_features, VisualFeatures):
            features = volume_or_features
            if task is not None and features.task is not None and task != features.task:
                raise ValueError(
                    f"these features were encoded by the {features.task!r} expert, not {task!r}: encode the "
                    f"volume again with task={task!r} (CTMLLM.encode_volume) or leave task out"
                )
            task = task or features.task
        prompt = prompt or self.default_prompt(task or "report")
        if not isinstance(volume_or_features, VisualFeatures):
            features = self.encode_volume(volume_or_features, task=task, prompt=prompt)
        sequence = self.prompt_sequence(features.tokens.shape[0], prompt, history, features.groups)
        embeds = self.embed_sequence(sequence, features.tokens).unsqueeze(0)  # (1, sequence, llm_hidden)
        past = None
        if prefix_cache is not None:
            past = prefix_cache.prepare(sequence, features.tokens, self.language_model.config)
        cancel = cancel or threading.Event()
        streamer = CallbackStreamer(self.tokenizer, on_text or (lambda _text: None))
        try:
            output = self.language_model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device),
                generation_config=self._hf_generation_config(max_new_tokens, do_sample),
                stopping_criteria=[CancelOnEvent(cancel)],
                streamer=streamer,
                past_key_values=past,
            )
        except BaseException:
            if prefix_cache is not None:  # a forward stopped midway may leave layers of unequal length
                prefix_cache.clear()
            raise
        if prefix_cache is not None:
            prefix_cache.record(sequence, output[0].tolist())
        text = self.tokenizer.decode(output[0], skip_special_tokens=True)
        return GenerationResult(
            text=text,
            new_tokens=int(output.shape[1]),
            cancelled=cancel.is_set(),
            seconds=time.perf_counter() - start,
            expert=features.task,
        )

    def stream(
        self,
        volume_or_features: np.ndarray | torch.Tensor | VisualFeatures,
        prompt: str | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """Yield text chunks of ``generate``; leaving the loop early cancels the generation."""
        return iterate_in_thread(
            lambda on_text, cancel: self.generate(
                volume_or_features, prompt, on_text=on_text, cancel=cancel, **kwargs
            )
        )
