"""Checkpoints that resume exactly, written atomically.

A checkpoint folder ``checkpoints/step-000120/`` holds:

- ``adapters.safetensors``: the trained tensors only (MoE experts, task router, projector, the
  language model's LoRA or weights), under their CTMLLM state-dict names; ``adapters.json`` lists
  them with the stage and the LoRA settings;
- ``model/``: the merged export, a plain CTMLLM folder (``CTMLLM.from_pretrained``);
- what ``accelerate`` saves for the optimizer, scheduler, gradient scaler and the python, numpy
  and torch random states of every process, and ``custom_checkpoint_0.pkl``: the step and the data
  position (``TrainProgress``).

Frozen weights are not saved: a resumed run rebuilds them from the same source. Folders are
written under a hidden temporary name and renamed when complete, so a crash never leaves a
half-written checkpoint that ``--resume`` could pick.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTERS_FILE = "adapters.safetensors"
ADAPTERS_INDEX = "adapters.json"
MERGED_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainProgress:
    """Where training stands: optimizer steps done and micro-batches consumed (the data position)."""

    step: int = 0
    micro_batches: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.micro_batches = int(state["step"]), int(state["micro_batches"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def staging_dir(run_dir: Path, step: int) -> Path:
    """The hidden folder a checkpoint is written into before its rename (same name in every process)."""
    return run_dir / CHECKPOINTS_DIR / f".{checkpoint_name(step)}.partial"


def publish(staging: Path) -> Path:
    """Rename a complete staging folder to its final name, replacing an older one of the same step."""
    target = staging.with_name(staging.name[1:].removesuffix(".partial"))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINTS_DIR
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint to resume from: start without --resume (or set train.save_every)"
        )
    return found[-1][1]


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def save_adapters(
    state: dict[str, torch.Tensor], names: list[str], folder: Path, info: dict[str, Any]
) -> None:
    """Write the trained tensors ``names`` of a full state dict, and an index describing them."""
    missing = [name for name in names if name not in state]
    if missing:
        raise KeyError(f"trained tensors missing from the state dict: {missing[:5]}")
    tensors = {name: state[name].detach().to("cpu").contiguous() for name in names}
    save_file(tensors, str(folder / ADAPTERS_FILE), metadata={"format": "pt", "ctmllm_adapters": "1"})
    (folder / ADAPTERS_INDEX).write_text(json.dumps({**info, "tensors": names}, indent=2), encoding="utf-8")


def load_adapters(model: nn.Module, folder: Path, names: list[str]) -> None:
    """Load ``adapters.safetensors`` into ``model``; the file must hold exactly the trained ``names``."""
    path = folder / ADAPTERS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a complete checkpoint")
    tensors = load_file(str(path))
    if set(tensors) != set(names):
        extra, absent = sorted(set(tensors) - set(names)), sorted(set(names) - set(tensors))
        raise ValueError(
            f"{path} does not match this run's trained tensors (extra {extra[:3]}, missing {absent[:3]}): "
            f"resume with the config the checkpoint was written with"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
