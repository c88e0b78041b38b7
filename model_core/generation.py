"""Streaming and cancellation around Hugging Face ``generate``.

Text reaches the caller through a callback as soon as it decodes to whole words (transformers'
``TextStreamer`` logic); a ``threading.Event`` set from any thread stops decoding after the token
in progress, because ``generate`` checks its stopping criteria after every token.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, TextStreamer


@dataclass
class GenerationResult:
    """One answer; ``expert`` is the task expert that read the volume (chosen by the task router
    unless a task was forced; None for a model without task experts)."""

    text: str
    new_tokens: int
    cancelled: bool
    seconds: float
    expert: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def expert_note(expert: str | None, forced_by: str | None = None) -> str:
    """Which task expert read the volume and who chose it: the task router, or ``forced_by``."""
    if expert is None:
        return "no task experts"
    return f"expert {expert} ({f'forced by {forced_by}' if forced_by else 'chosen by the task router'})"


class CancelOnEvent(StoppingCriteria):
    """Stops every sequence once ``event`` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class CallbackStreamer(TextStreamer):
    """Calls ``on_text(chunk)`` with each piece of finalised text and counts new tokens."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.on_text = on_text
        self.new_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if value.numel() == 0:  # generation from embeddings announces an empty prompt first
            return
        self.new_tokens += value.numel() if value.dim() == 1 else value.shape[-1]
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


_DONE = object()


def iterate_in_thread(run: Callable[[Callable[[str], None], threading.Event], object]) -> Iterator[str]:
    """Run ``run(on_text, cancel)`` in a worker thread and yield its text chunks here.

    Closing the iterator early (``break``, garbage collection) cancels the generation.
    """
    chunks: queue.Queue = queue.Queue()
    cancel = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            run(chunks.put, cancel)
        except BaseException as error:  # re-raised in the consumer's thread
            errors.append(error)
        finally:
            chunks.put(_DONE)

    thread = threading.Thread(target=worker, name="ctmllm-generate", daemon=True)
    thread.start()
    try:
        while (chunk := chunks.get()) is not _DONE:
            yield chunk
    finally:
        cancel.set()
        thread.join()
    if errors:
        raise errors[0]
