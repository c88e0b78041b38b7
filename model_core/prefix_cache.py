"""The key/value cache of a conversation's prefix, reused by its next turn.

Each turn's prompt repeats the previous turn's whole sequence (chat text, the visual tokens, the
earlier questions and answers) and adds the new question. Without a cache the language model
prefills all of it again for every follow-up; with one, it prefills only what differs from the
sequence it already holds. Reuse is decided by comparing token ids, so it is exact whatever the
chat template does: the longest common prefix of the cached sequence and the new prompt is kept,
the rest is cropped and computed again.

A ``PrefixCache`` belongs to one conversation with one model (not thread-safe: one generation at a
time). Visual positions match only when the prompt carries the same features object that filled
the cache (identity, not value), so features of another volume or expert are never mistaken for
the cached ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PretrainedConfig

VISUAL_SLOT = -1
"""Where a visual token sits in a prompt's id sequence (``CTMLLM.prompt_sequence``)."""


class PrefixCache:
    """The language model's cache of the last sequence one conversation fed it, and that sequence.

    ``reused`` and ``prefilled`` count the prompt tokens of the last turn taken from the cache and
    computed anew.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget everything (another model, an interrupted forward, or memory to free)."""
        self.past: DynamicCache | None = None
        self.sequence: list[int] = []
        self.features: torch.Tensor | None = None
        self.reused = 0
        self.prefilled = 0

    def common_length(self, sequence: Sequence[int], features: torch.Tensor) -> int:
        """How many leading positions of ``sequence`` (ids, ``VISUAL_SLOT`` for visual tokens)
        the cache holds as they are, leaving at least one to compute (generation needs a step)."""
        same_features = features is self.features
        length = 0
        for cached, new in zip(self.sequence, sequence[:-1], strict=False):
            if cached != new or (new == VISUAL_SLOT and not same_features):
                break
            length += 1
        return length

    def prepare(
        self, sequence: Sequence[int], features: torch.Tensor, config: PretrainedConfig
    ) -> DynamicCache:
        """The cache cropped to what ``sequence`` shares with the cached sequence, for ``generate``."""
        keep = self.common_length(sequence, features) if self.past is not None else 0
        if self.past is None or keep == 0:
            self.past, self.sequence = DynamicCache(config=config), []
        elif keep < self.past.get_seq_length():
            self.past.crop(keep - self.past.get_seq_length())  # a negative count removes from the end
        self.sequence = list(sequence[:keep])
        self.features = features
        self.reused, self.prefilled = keep, len(sequence) - keep
        return self.past

    def record(self, sequence: Sequence[int], new_tokens: Sequence[int]) -> None:
        """After ``generate``: the cache now holds the prompt and the new tokens it fed back (all but
        the last one generated)."""
        held = self.past.get_seq_length() if self.past is not None else 0
        self.sequence = [*sequence, *new_tokens][:held]
