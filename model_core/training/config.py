"""The training config: one YAML file -> typed, validated dataclasses.

Layout (every section optional; see configs/tiny.yaml)::

    out_dir: runs/tiny          # stage n writes to {out_dir}/stage{n}
    seed: 0
    device: auto                # auto (accelerate picks; a GPU when present) or cpu
    model: {source: tiny, family: internvl, num_3d_blocks: 2, ...}   -> ModelSource
    moe: {mode: tgh_hard, num_experts: 4, ...}                       -> model_core.config.MoEConfig
    lm: {mode: lora, rank: 16, ...}                                  -> LMTuning (stage 1)
    data: {train: [{kind: synthetic, ...}], eval: null, ...}         -> DataConfig
    preprocessing: {window: soft_tissue, target_shape: [32, 256, 256]}  -> recorded in the model
    train: {max_steps: 100, lr: 1e-4, ...}                           -> StageConfig (both stages)
    stage1: {lr: 2e-4}                                               -> overrides for stage 1
    stage2: {max_steps: 50}                                          -> overrides for stage 2

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model_core.config import ConfigError, MoEConfig

PRECISIONS: tuple[str, ...] = ("no", "bf16", "fp16")
SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant", "constant_with_warmup")
LM_MODES: tuple[str, ...] = ("lora", "full", "frozen")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _build(cls: type, data: Any, section: str) -> Any:
    """A dataclass from a dict, naming unknown keys and the section they were found in."""
    if isinstance(data, cls):
        return data
    data = data or {}
    _require(isinstance(data, dict), f"{section}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    _require(not unknown, f"{section}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    return cls(**data)


@dataclass
class ModelSource:
    """Where the model of stage 1 comes from.

    ``source``: ``tiny`` (a random tiny model, for tests and CI; ``family``, ``seed`` and ``tiny``
    (``model_core.tiny.build_tiny_2d_mllm`` keyword arguments) apply), a 2D checkpoint (folder or
    Hub repo id; converted with the volume settings here), or a CTMLLM folder (its own volume
    settings are kept). Stage 2 always starts from the stage-1 result (``--init``).
    """

    source: str = "tiny"
    family: str = "internvl"
    seed: int = 0
    tiny: dict[str, Any] = field(default_factory=dict)
    num_3d_blocks: int = 2
    image_size: int | None = None
    max_visual_tokens: int = 512

    def __post_init__(self) -> None:
        _require(bool(self.source), "model.source is empty: use 'tiny', a 2D checkpoint or a CTMLLM folder")
        _require(
            isinstance(self.tiny, dict), "model.tiny: expected a mapping of build_tiny_2d_mllm arguments"
        )


@dataclass
class LMTuning:
    """How stage 1 trains the language model: LoRA adapters (peft), full fine-tuning, or not at all.

    Stage 2 keeps the language model frozen whatever this says.
    """

    mode: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        _require(self.mode in LM_MODES, f"lm.mode={self.mode!r}: choose one of {', '.join(LM_MODES)}")
        _require(self.rank >= 1, f"lm.rank={self.rank}: use at least 1")
        _require(0.0 <= self.dropout < 1.0, f"lm.dropout={self.dropout}: use a value in [0, 1)")
        _require(len(self.target_modules) >= 1, "lm.target_modules is empty: name the linears to adapt")


@dataclass
class DataConfig:
    """Dataset specs (``model_core.training.data.build_dataset``); a list is concatenated.

    ``volume_shape`` resamples every volume to ``(D, H, W)`` so batches stack; None requires all
    volumes of a batch to share a shape.
    """

    train: Any = field(default_factory=lambda: [{"kind": "synthetic"}])
    eval: Any = None
    volume_shape: tuple[int, int, int] | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = [self.train]
        if isinstance(self.eval, dict):
            self.eval = [self.eval]
        _require(bool(self.train), "data.train is empty: give at least one dataset spec")
        if self.volume_shape is not None:
            self.volume_shape = tuple(int(v) for v in self.volume_shape)
            _require(
                len(self.volume_shape) == 3 and self.volume_shape[0] >= 3,
                f"data.volume_shape={self.volume_shape}: use (D, H, W) with at least 3 slices",
            )
        _require(self.num_workers >= 0, f"data.num_workers={self.num_workers}: use 0 or more")


@dataclass
class StageConfig:
    """Optimisation settings of one stage (``train`` merged with ``stage1`` / ``stage2``).

    ``batch_size`` is per device; one optimizer step sees ``batch_size * grad_accum_steps *
    processes`` samples. ``train_3d_blocks`` (stage 1): also train the tower's K blocks that attend
    across slice groups (the frozen-vs-optimised encoder ablation); the 2D blocks stay frozen. ``save_every`` 0: checkpoint only at the end. ``keep_last``: how many
    step checkpoints to keep.
    """

    max_steps: int = 100
    batch_size: int = 2
    grad_accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    train_projector: bool = True
    train_3d_blocks: bool = False
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "keep_last"):
            _require(getattr(self, name) >= 1, f"train.{name}={getattr(self, name)}: use at least 1")
        for name in ("warmup_steps", "eval_every", "save_every"):
            _require(getattr(self, name) >= 0, f"train.{name}={getattr(self, name)}: use 0 or more")
        _require(self.lr > 0, f"train.lr={self.lr}: use a learning rate above 0")
        _require(
            self.schedule in SCHEDULES,
            f"train.schedule={self.schedule!r}: choose one of {', '.join(SCHEDULES)}",
        )
        _require(
            self.mixed_precision in PRECISIONS,
            f"train.mixed_precision={self.mixed_precision!r}: choose one of {', '.join(PRECISIONS)}",
        )
        _require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"train.max_grad_norm={self.max_grad_norm}: use a value above 0, or null for no clipping",
        )


@dataclass
class TrainingConfig:
    """A whole training setup. ``preprocessing`` (``model_core.data.PreprocessConfig`` settings)
    says how the training volumes were prepared; stage 1 records it in the model, so CLI, panel
    and evaluation prepare volumes the same way (empty: keep the model's own record)."""

    out_dir: str = "runs/ctmllm"
    seed: int = 0
    device: str = "auto"
    model: ModelSource = field(default_factory=ModelSource)
    moe: MoEConfig = field(default_factory=lambda: MoEConfig(mode="tgh_hard"))
    lm: LMTuning = field(default_factory=LMTuning)
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    train: StageConfig = field(default_factory=StageConfig)
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model = _build(ModelSource, self.model, "model")
        self.moe = _build(MoEConfig, self.moe, "moe")
        self.lm = _build(LMTuning, self.lm, "lm")
        self.data = _build(DataConfig, self.data, "data")
        self.train = _build(StageConfig, self.train, "train")
        _require(self.device in ("auto", "cpu"), f"device={self.device!r}: use 'auto' or 'cpu'")
        if self.preprocessing:
            from model_core.data.preprocess import PreprocessConfig

            self.preprocessing = PreprocessConfig.from_dict(self.preprocessing).to_dict()
        for stage in (1, 2):
            self.stage_settings(stage)  # validate the overrides now, not mid-run

    def stage_settings(self, stage: int) -> StageConfig:
        """``train`` with the stage's overrides applied."""
        _require(stage in (1, 2), f"stage={stage}: use 1 or 2")
        overrides = self.stage1 if stage == 1 else self.stage2
        return _build(StageConfig, {**dataclasses.asdict(self.train), **(overrides or {})}, f"stage{stage}")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        return _build(cls, data, "config")

    @classmethod
    def load(cls, path: str | Path) -> TrainingConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        return cls.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so YAML and JSON round-trips compare equal."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def resolved_config(config: TrainingConfig, stage: int, init: str | None) -> dict[str, Any]:
    """What a run records in its ``config.yaml``: the whole config with the stage's settings resolved."""
    data = config.to_dict()
    data.pop("stage1")
    data.pop("stage2")
    data["train"] = _plain(dataclasses.asdict(config.stage_settings(stage)))
    data["stage"] = stage
    data["init"] = init
    return data
