"""Model loaders that misbehave on purpose, for the worker tests (loaded in the worker process).

``test_slicer_worker.py`` starts real worker processes with ``--model-loader worker_fakes:NAME``.
``FakeModel`` has the part of ``CTMLLM``'s interface the worker calls (preprocessing settings,
``feature_key``, ``encode_volume``, ``generate`` with streaming, cancel and the expert) and writes
numbered words; each loader
below breaks one thing: it hangs ignoring Cancel, crashes, is killed as by the system's
out-of-memory killer, or runs out of memory while encoding, or encodes slowly without looking at Cancel (alive, but busy).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from types import SimpleNamespace
from typing import Any

WORD_SECONDS = 0.01
SLOW_ENCODE_SECONDS = 3.0
_sleepHoldingGIL = ctypes.PyDLL(None).sleep
"""libc's sleep(seconds) through PyDLL: a native call that keeps Python's lock all along, so the
worker's main thread cannot answer a ping while it runs (a hung worker)."""


class FakeModel:
    model_id = "fake-model"

    def __init__(
        self, hangInGenerate: bool = False, memoryErrorInEncode: bool = False, slowEncode: bool = False
    ) -> None:
        self.hangInGenerate = hangInGenerate
        self.memoryErrorInEncode = memoryErrorInEncode
        self.slowEncode = slowEncode
        self.config = SimpleNamespace(
            preprocessing={"window": "soft_tissue", "target_shape": [8, 16, 16]},
            generation=SimpleNamespace(max_new_tokens=32),
        )

    def preprocess_config(self, **overrides: Any) -> Any:
        from model_core.data import PreprocessConfig

        return PreprocessConfig.from_dict({**self.config.preprocessing, **overrides})

    @staticmethod
    def tokenizer(text: str, add_special_tokens: bool = False) -> Any:
        return SimpleNamespace(input_ids=text.split())

    @staticmethod
    def route(prompt: str) -> str:
        """A stand-in for the task router: questions go to the question expert."""
        return "vqa" if (prompt or "").rstrip().endswith("?") else "report"

    def feature_key(self, task: str | None, prompt: str) -> tuple:
        return ("task", task) if task is not None else ("routed", self.route(prompt))

    def encode_volume(self, volume: Any, task: str | None = None, prompt: str | None = None) -> Any:
        if self.memoryErrorInEncode:
            raise MemoryError("simulated: cannot allocate the visual tokens")
        if self.slowEncode:
            time.sleep(SLOW_ENCODE_SECONDS)  # a long encoding that does not look at Cancel
        return SimpleNamespace(task=task or self.route(prompt or ""), shape=volume.shape)

    def generate(
        self,
        features,
        prompt,
        task=None,
        history=(),
        max_new_tokens=None,
        on_text=None,
        cancel=None,
        prefix_cache=None,
    ):
        start = time.perf_counter()
        if self.hangInGenerate:
            print("fake model: stuck in a native call, ignoring cancel", file=sys.stderr, flush=True)
            while True:
                _sleepHoldingGIL(3600)
        words = []
        for index in range(max_new_tokens or 32):
            if cancel is not None and cancel.is_set():
                break
            words.append(f"word{index}")
            on_text(f"word{index} ")
            time.sleep(WORD_SECONDS)
        return SimpleNamespace(
            text=" ".join(words),
            new_tokens=len(words),
            seconds=time.perf_counter() - start,
            cancelled=bool(cancel is not None and cancel.is_set()),
            expert=features.task,
        )


def working(request: Any, notice: Any) -> FakeModel:
    notice("a fake model: its words mean nothing")
    return FakeModel()


def hangs(request: Any, notice: Any) -> FakeModel:
    return FakeModel(hangInGenerate=True)


def encodesSlowly(request: Any, notice: Any) -> FakeModel:
    return FakeModel(slowEncode=True)


def runsOutOfMemory(request: Any, notice: Any) -> FakeModel:
    return FakeModel(memoryErrorInEncode=True)


def crashes(request: Any, notice: Any) -> FakeModel:
    print("fake model: a native library aborts", file=sys.stderr, flush=True)
    os.abort()


def killedBySystem(request: Any, notice: Any) -> FakeModel:
    print("fake model: allocating 80 GB", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)
    raise AssertionError("SIGKILL did not end the process")
