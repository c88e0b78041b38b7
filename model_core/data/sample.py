"""One training or evaluation example, whatever dataset format it came from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Sample:
    """A CT volume with a prompt and its reference answer.

    ``volume`` is the preprocessed array ``(D, H, W)``, float32 in [0, 1]; datasets that read files
    lazily set ``volume_loader`` instead and ``load_volume`` calls it. ``meta`` carries
    dataset-specific fields: ``sample_id``, ``question_type``, ``choices`` (letter -> text),
    ``answer_choice`` (letter), ``closed`` (bool), ``findings``.
    """

    task: str
    prompt: str
    answer: str
    volume: np.ndarray | None = None
    volume_loader: Callable[[], np.ndarray] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load_volume(self) -> np.ndarray:
        if self.volume is not None:
            return self.volume
        if self.volume_loader is None:
            raise ValueError(f"sample {self.meta.get('sample_id', '?')} has neither a volume nor a loader")
        return self.volume_loader()
