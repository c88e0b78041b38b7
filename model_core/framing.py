"""How visual tokens sit in the language model's input: the 2D model's own image framing.

InternVL was trained with every image's tokens between ``<img>`` and ``</img>``; its Hugging Face
processor lays out a video's frames as ``Frame1: <img>...</img>\\nFrame2: <img>...</img>``. A
CTMLLM of that family frames each slice group of a volume the same way (framing
``internvl_frames``): a volume reads to the language model as a video of its slice groups. LLaVA
puts an image's tokens into the text unframed (framing ``none``).

The framing a model uses is decided when it is converted from its 2D checkpoint
(``default_framing``) and recorded in its config (``CTMLLMConfig.visual_framing``), so a saved
model always gets the format it was trained with. The framing tokens must be special tokens of
the tokenizer: they are inserted by id, never produced by tokenising text. A tokenizer without
them (an older tiny or demo tokenizer) gives framing ``none``: the model is then trained and used
unframed, as it always was.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from model_core.config import FRAMINGS, INTERNVL_FRAMES, NO_FRAMING

INTERNVL_IMAGE_START = "<img>"
INTERNVL_IMAGE_END = "</img>"
INTERNVL_FRAMING_TOKENS: tuple[str, str] = (INTERNVL_IMAGE_START, INTERNVL_IMAGE_END)
"""InternVL's image framing tokens, special tokens of its tokenizer."""


class FramingError(ValueError):
    """A model's recorded framing cannot be built with its tokenizer; the message says why."""


def special_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of ``token`` when the tokenizer holds it as one special token, else None."""
    for index, added in tokenizer.added_tokens_decoder.items():
        if added.content == token and added.special:
            return int(index)
    return None


def default_framing(family: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The framing a 2D model of ``family`` with ``tokenizer`` was trained with."""
    if family == "internvl" and all(
        special_token_id(tokenizer, t) is not None for t in INTERNVL_FRAMING_TOKENS
    ):
        return INTERNVL_FRAMES
    return NO_FRAMING


class VisualFraming:
    """The token ids around each slice group's visual tokens, for one framing and tokenizer."""

    def __init__(self, name: str, tokenizer: PreTrainedTokenizerBase) -> None:
        if name not in FRAMINGS:
            raise FramingError(f"visual_framing={name!r}: choose one of {', '.join(FRAMINGS)}")
        self.name = name
        self.tokenizer = tokenizer
        self.start_id = self.end_id = None
        if name == INTERNVL_FRAMES:
            ids = [special_token_id(tokenizer, token) for token in INTERNVL_FRAMING_TOKENS]
            if None in ids:
                raise FramingError(
                    f"the model frames slice groups with {' and '.join(INTERNVL_FRAMING_TOKENS)} "
                    f"(visual_framing={name!r}), but its tokenizer has no such special tokens: use the "
                    f"tokenizer saved with the model"
                )
            self.start_id, self.end_id = ids

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def separators(self, groups: int) -> list[list[int]]:
        """``groups + 1`` id lists: the ones before group 0, between groups, and after the last.

        ``internvl_frames``: ``Frame1: <img>`` | ``</img>\\nFrame2: <img>`` | ... | ``</img>``,
        InternVL's video prompt with one frame per slice group.
        """
        if self.name == NO_FRAMING:
            return [[] for _ in range(groups + 1)]
        separators = [[*self._text_ids("Frame1: "), self.start_id]]
        for index in range(2, groups + 1):
            separators.append([self.end_id, *self._text_ids(f"\nFrame{index}: "), self.start_id])
        separators.append([self.end_id])
        return separators
