"""Typed, validated configuration of a CTMLLM.

One dataclass per part (volume adaptation, MoE, generation) and one that holds them with the
2D model's own Hugging Face config. Every value is checked once, in ``__post_init__``, so a bad
config fails when it is built, with a message that names the field and the fix: first its type
(``check_field_types``: a config file written by hand may hold ``"256"`` or a list where a
number or an object belongs), then its range.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS: tuple[str, ...] = ("report", "vqa")
"""The tasks the model serves: medical report generation and visual question answering."""

MOE_MODES: tuple[str, ...] = ("none", "token", "tgh_hard", "tgh_soft")
"""Ablation switches: no MoE; token-level MoE only; TGH-MoE with a hard or a soft task router."""

FAMILIES: tuple[str, ...] = ("internvl", "llava")

SLICES_PER_GROUP = 3
"""Adjacent slices per group, the 3 input channels of the 2D patch embedding: also the fewest
slices a volume may have (fewer is a 2D image or a scout, not a CT series)."""

NO_FRAMING = "none"
INTERNVL_FRAMES = "internvl_frames"
FRAMINGS: tuple[str, ...] = (NO_FRAMING, INTERNVL_FRAMES)
"""How visual tokens are framed in the language model's input (``model_core.framing``): not at
all, or each slice group as InternVL frames a video frame (``Frame1: <img>...</img>``)."""


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the fix."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe_type(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return "null"
    if origin is tuple:
        args = typing.get_args(expected)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} {_describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or expected is dict:
        return "an object"
    if dataclasses.is_dataclass(expected):
        return f"an object with fields {', '.join(f.name for f in dataclasses.fields(expected))}"
    return _TYPE_WORDS.get(expected, getattr(expected, "__name__", str(expected)))


def _coerce(value: Any, expected: Any) -> Any:
    """``value`` as ``expected`` (ints for floats, lists for tuples); raises TypeError if it is not one."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            try:
                return _coerce(value, option)
            except TypeError:
                continue
        raise TypeError
    if expected is type(None):
        if value is None:
            return None
        raise TypeError
    if expected is Any:
        return value
    if origin is tuple:
        args = typing.get_args(expected)
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict or expected is dict:
        if not isinstance(value, dict):
            raise TypeError
        return value
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if expected is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise TypeError
    if expected is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if dataclasses.is_dataclass(expected):
        if isinstance(value, expected):
            return value
        raise TypeError
    if isinstance(value, expected):
        return value
    raise TypeError


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


def check_field_types(config: Any, prefix: str = "") -> None:
    """Check (and normalise: lists to tuples, ints to floats) every field of a config dataclass
    against its annotation, before any range check compares a string with a number."""
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        try:
            setattr(config, item.name, _coerce(value, hints[item.name]))
        except TypeError:
            raise ConfigError(
                f"{prefix}{item.name}={value!r} is {_type_name(value)}; use {_describe_type(hints[item.name])}"
            ) from None


def _sub_config(cls: type, value: Any, name: str) -> Any:
    """A sub-config from its dict (as a config file holds it), errors prefixed with its section name."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{name}={value!r} is {_type_name(value)}; use {_describe_type(cls)}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(known))
    _require(not unknown, f"{name} has unknown field(s) {unknown}; known fields: {', '.join(known)}")
    try:
        return cls(**value)
    except ConfigError as error:
        text = str(error)
        raise ConfigError(text if text.startswith(f"{name}.") else f"{name}.{text}") from None


def check_max_new_tokens(value: Any, name: str = "max_new_tokens") -> int | None:
    """An answer length limit as every entry point takes it: None (the model's default) or an
    integer of at least 1. 0 is refused, never read as "the default"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(
            f"{name}={value!r}: use an integer of at least 1, or leave it unset for the model's default"
        )
    return int(value)


@dataclass
class VolumeAdapterConfig:
    """How the 2D tower reads a volume.

    ``num_3d_blocks`` (K) of the tower's top blocks attend jointly across all slice groups of a
    volume with rotary encoding along depth; K=0 is the pure 2D baseline. ``image_size`` is the
    side the slice groups are resized to (None: the tower's own size; another size interpolates
    the tower's position embeddings). ``max_visual_tokens`` bounds the projector's output per
    volume (see ``model_core.projector``). ``max_slices`` is the deepest volume the encoder accepts:
    the 3D blocks attend across all slice groups at once, so memory grows with the square of the
    depth; preprocessing resizes a CT to the model's grid (tens of slices), so a deeper volume has
    bypassed it.
    """

    num_3d_blocks: int = 2
    rope_theta: float = 10000.0
    image_size: int | None = None
    max_visual_tokens: int = 512
    max_slices: int = 256

    def __post_init__(self) -> None:
        check_field_types(self)
        _require(self.num_3d_blocks >= 0, f"num_3d_blocks={self.num_3d_blocks}: use 0 (2D) or more")
        _require(self.rope_theta > 1.0, f"rope_theta={self.rope_theta}: use a base above 1, e.g. 10000")
        _require(
            self.image_size is None or self.image_size >= 8,
            f"image_size={self.image_size}: use None (the tower's size) or at least 8 pixels",
        )
        _require(self.max_visual_tokens >= 1, f"max_visual_tokens={self.max_visual_tokens}: use at least 1")
        _require(
            self.max_slices >= SLICES_PER_GROUP,
            f"max_slices={self.max_slices}: use at least {SLICES_PER_GROUP} (one slice group)",
        )


@dataclass
class MoEConfig:
    """Text-Guided Hierarchical MoE in the vision encoder (see ``model_core.moe``).

    ``blocks``: indices of tower blocks that get experts (None: the 3D blocks, or the top two
    blocks when K=0). Each expert is a rank-``rank`` LoRA on the ``targets`` linear layers.
    """

    mode: str = "none"
    num_experts: int = 4
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("mlp",)
    blocks: tuple[int, ...] | None = None
    tasks: tuple[str, ...] = TASKS
    balance_loss_weight: float = 0.01
    router_loss_weight: float = 0.1

    def __post_init__(self) -> None:
        check_field_types(self, "moe.")
        _require(self.mode in MOE_MODES, f"moe.mode={self.mode!r}: choose one of {', '.join(MOE_MODES)}")
        _require(self.num_experts >= 1, f"moe.num_experts={self.num_experts}: use at least 1")
        _require(
            1 <= self.top_k <= self.num_experts,
            f"moe.top_k={self.top_k}: use 1..num_experts ({self.num_experts})",
        )
        _require(self.rank >= 1, f"moe.rank={self.rank}: use at least 1")
        _require(
            set(self.targets) <= {"mlp", "attention"},
            f"moe.targets={self.targets}: use 'mlp' and/or 'attention'",
        )
        _require(
            len(self.tasks) >= 1 and set(self.tasks) <= set(TASKS),
            f"moe.tasks={self.tasks}: use a subset of {TASKS}",
        )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def task_level(self) -> bool:
        return self.mode in ("tgh_hard", "tgh_soft")


@dataclass
class GenerationConfig:
    """Decoding defaults: greedy with a fixed budget, so a rerun gives the same text."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 1024

    def __post_init__(self) -> None:
        check_field_types(self, "generation.")
        _require(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens}: use at least 1")
        _require(self.temperature > 0, f"temperature={self.temperature}: use a value above 0")
        _require(0 < self.top_p <= 1, f"top_p={self.top_p}: use a value in (0, 1]")
        _require(self.max_prompt_tokens >= 8, f"max_prompt_tokens={self.max_prompt_tokens}: use at least 8")


@dataclass
class CTMLLMConfig:
    """Everything needed to rebuild a CTMLLM without its weights.

    ``mllm_config`` is the 2D model's Hugging Face config as a dict (its vision, projector and text
    sub-configs); ``image_mean``/``image_std`` are the tower's input normalisation;
    ``preprocessing`` holds the ``model_core.data.PreprocessConfig`` settings the model was trained
    with (empty: the pipeline's defaults), so every caller feeds it volumes prepared alike;
    ``source`` says which 2D checkpoint the model was converted from; ``visual_framing`` how its
    visual tokens are framed in the language model's input (decided at conversion, see
    ``model_core.framing``; a config saved before framing existed reads as ``none``).
    """

    family: str
    mllm_config: dict[str, Any]
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    volume: VolumeAdapterConfig = field(default_factory=VolumeAdapterConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    visual_framing: str = NO_FRAMING

    def __post_init__(self) -> None:
        self.volume = _sub_config(VolumeAdapterConfig, self.volume, "volume")
        self.moe = _sub_config(MoEConfig, self.moe, "moe")
        self.generation = _sub_config(GenerationConfig, self.generation, "generation")
        check_field_types(self)
        _require(
            isinstance(self.mllm_config.get("model_type"), str),
            "mllm_config has no model_type: it must hold the 2D model's Hugging Face config (convert the "
            "checkpoint again with `python -m model_core convert`)",
        )
        # JSON form from the start (integer keys become strings), so a saved config reloads equal
        self.mllm_config = json.loads(json.dumps(self.mllm_config))
        from model_core.data.preprocess import PreprocessConfig  # here: model_core.data imports this module

        try:
            PreprocessConfig.from_dict(self.preprocessing)
        except (ConfigError, TypeError, ValueError) as error:
            raise ConfigError(f"preprocessing: {error}") from None
        _require(
            self.family in FAMILIES, f"family={self.family!r}: supported families are {', '.join(FAMILIES)}"
        )
        _require(
            len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean/image_std need 3 values (RGB)"
        )
        _require(all(s > 0 for s in self.image_std), f"image_std={self.image_std}: values must be above 0")
        _require(
            self.visual_framing in FRAMINGS,
            f"visual_framing={self.visual_framing!r}: choose one of {', '.join(FRAMINGS)}",
        )
        _require(
            self.visual_framing != INTERNVL_FRAMES or self.family == "internvl",
            f"visual_framing={self.visual_framing!r} is InternVL's; a {self.family} model uses 'none'",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CTMLLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        _require(
            not unknown, f"unknown config fields {sorted(unknown)}: was this file written by a newer version?"
        )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CTMLLMConfig:
        """Read and validate a config file; every problem is a ``ConfigError`` naming the file and field."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(
                f"{path}: cannot be read ({error.strerror or error}); check the model folder"
            ) from error
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{path}: is not valid JSON ({error}); copy the model folder again") from error
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: holds {_type_name(data)}; a model config is a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
