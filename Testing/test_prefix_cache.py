"""The conversation's prefix is cached (issue 14, item 3): a follow-up question prefills only what
is new, and writes the text it writes without the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_core.model import CTMLLM
from model_core.prefix_cache import VISUAL_SLOT, PrefixCache
from model_core.tiny import build_tiny_ctmllm

QUESTIONS = ["Where is the lesion located?", "How many lesions are there?", "Which organ? Choices: A B C D"]
DEMO_DIR = Path(__file__).resolve().parent.parent / "model_core" / "demo_model"


def volume(depth: int = 8, side: int = 32) -> torch.Tensor:
    return torch.rand(depth, side, side, generator=torch.Generator().manual_seed(0))


def converse(model: CTMLLM, features, cache: PrefixCache | None, sample: bool) -> list[tuple[str, int, int]]:
    """Three turns, each with the earlier ones as history: (text, tokens reused, tokens prefilled)."""
    history: list[tuple[str, str]] = []
    turns = []
    for index, question in enumerate(QUESTIONS):
        torch.manual_seed(index)  # the same draws with and without the cache when sampling
        result = model.generate(
            features, question, history=history, max_new_tokens=12, do_sample=sample, prefix_cache=cache
        )
        history.append((question, result.text))
        turns.append((result.text, cache.reused if cache else 0, cache.prefilled if cache else 0))
    return turns


@pytest.mark.parametrize("family", ["internvl", "llava"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_follow_ups_write_the_same_text_with_the_cache(family: str, sample: bool) -> None:
    model = build_tiny_ctmllm(family, seed=1)
    features = model.encode_volume(volume())
    cache = PrefixCache()
    cached = converse(model, features, cache, sample)
    plain = converse(model, features, None, sample)
    assert [text for text, _, _ in cached] == [text for text, _, _ in plain]
    if sample:  # a random model's greedy text repeats one token; sampled text shows it is not trivial
        assert len(set("".join(text for text, _, _ in cached))) > 3
    visual = features.tokens.shape[0]
    assert cached[0][1] == 0
    for _, reused, prefilled in cached[1:]:  # the visual tokens and the earlier turns come from the cache
        assert reused > visual and prefilled < reused


def test_the_cache_holds_what_the_language_model_was_fed() -> None:
    model = build_tiny_ctmllm("internvl")
    features = model.encode_volume(volume())
    cache = PrefixCache()
    result = model.generate(features, QUESTIONS[0], max_new_tokens=5, prefix_cache=cache)
    sequence = model.prompt_sequence(features.tokens.shape[0], QUESTIONS[0], groups=features.groups)
    assert sequence.count(VISUAL_SLOT) == features.tokens.shape[0]
    assert cache.past.get_seq_length() == len(sequence) + result.new_tokens - 1 == len(cache.sequence)
    assert cache.sequence[: len(sequence)] == sequence


def test_other_features_never_reuse_the_cached_visual_tokens() -> None:
    """Another volume's features (or another expert's) at the same positions are not the cached ones."""
    model = build_tiny_ctmllm("internvl")
    first, second = model.encode_volume(volume()), model.encode_volume(volume() * 0.5)
    cache = PrefixCache()
    model.generate(first, QUESTIONS[0], max_new_tokens=4, prefix_cache=cache)
    with_cache = model.generate(second, QUESTIONS[0], max_new_tokens=4, do_sample=False, prefix_cache=cache)
    sequence = model.prompt_sequence(second.tokens.shape[0], QUESTIONS[0], groups=second.groups)
    assert cache.reused == sequence.index(VISUAL_SLOT)  # only the chat text in front of the volume
    assert with_cache.text == model.generate(second, QUESTIONS[0], max_new_tokens=4, do_sample=False).text


def test_a_cancelled_turn_leaves_a_cache_the_next_turn_can_use() -> None:
    import threading

    model = build_tiny_ctmllm("llava", seed=1)
    features = model.encode_volume(volume())
    cache = PrefixCache()
    cancel = threading.Event()
    cancel.set()  # stops after the first token
    partial = model.generate(features, QUESTIONS[0], cancel=cancel, prefix_cache=cache)
    assert partial.cancelled and partial.new_tokens == 1
    follow_up = model.generate(features, QUESTIONS[1], max_new_tokens=8, prefix_cache=cache)
    assert cache.reused > features.tokens.shape[0]
    assert follow_up.text == model.generate(features, QUESTIONS[1], max_new_tokens=8).text


@pytest.mark.skipif(not (DEMO_DIR / "ctmllm_config.json").is_file(), reason="no demo model installed")
def test_demo_model_conversation_is_the_same_with_the_cache() -> None:
    """The trained demo model writes real sentences: a report, then two questions with history."""
    from model_core.hub import load_model

    model = load_model("demo")
    features = model.encode_volume(volume(32, 128), task="vqa")
    history: list[tuple[str, str]] = []
    cache = PrefixCache()
    for question in ["Write a radiology report.", "Which organ has a lesion?", "Is it in the left kidney?"]:
        cached = model.generate(features, question, history=history, prefix_cache=cache)
        assert cached.text == model.generate(features, question, history=history).text
        history.append((question, cached.text))
    assert cache.reused > features.tokens.shape[0]
    assert any(len(text.split()) > 3 for _, text in history)


def test_an_error_during_generation_empties_the_cache() -> None:
    """A forward stopped midway may leave layers of unequal length: the next turn starts afresh."""
    model = build_tiny_ctmllm("internvl", seed=1)
    features = model.encode_volume(volume())
    cache = PrefixCache()
    model.generate(features, QUESTIONS[0], max_new_tokens=3, prefix_cache=cache)

    def fail(_text: str) -> None:
        raise RuntimeError("the reader went away")

    with pytest.raises(RuntimeError, match="went away"):
        model.generate(
            features, QUESTIONS[1], max_new_tokens=12, do_sample=True, on_text=fail, prefix_cache=cache
        )
    assert cache.past is None and cache.sequence == []
    again = model.generate(features, QUESTIONS[1], max_new_tokens=6, prefix_cache=cache)
    assert cache.reused == 0 and again.text == model.generate(features, QUESTIONS[1], max_new_tokens=6).text
