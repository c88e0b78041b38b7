"""The chat text around a volume's visual tokens, from any tokenizer's chat template.

Chat templates take message content in one of two styles: a plain string (ChatML, Qwen, the tiny
models) or a list of typed items, ``[{"type": "image"}, {"type": "text", "text": ...}]`` (the
llava-hf and InternVL-hf templates). Which one a template reads is probed once per call by
rendering a marker text both ways. String style: the first user turn is ``"<image>\\n" +
question`` and the visual tokens replace ``IMAGE_PLACEHOLDER``. Typed style: the first user turn
starts with an image item and the visual tokens replace what the template writes for it, the 2D
model's own image token (as its processor replaces that token by the image's tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

IMAGE_PLACEHOLDER = "<image>"
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Used only when a tokenizer has no chat template of its own."""

History = Sequence[tuple[str, str]]
"""Earlier (question, answer) turns on the same volume, oldest first."""

STRING_CONTENT = "string"
TYPED_CONTENT = "typed"
_PROBE = "ctmllm probe 7f3a"


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot carry a volume and a question; the message says why."""


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def content_style(tokenizer: PreTrainedTokenizerBase) -> str:
    """``"string"`` when the template writes string content, else ``"typed"`` when it writes typed
    text items; raises when it writes neither."""
    try:
        if _PROBE in _render(tokenizer, [{"role": "user", "content": _PROBE}]):
            return STRING_CONTENT
    except Exception:  # a typed-only template may fail on a string (its own raise_exception)
        pass
    typed = [{"role": "user", "content": [{"type": "text", "text": _PROBE}]}]
    if _PROBE in _render(tokenizer, typed):
        return TYPED_CONTENT
    raise ChatTemplateError(
        "the tokenizer's chat template writes neither string message content nor typed "
        "[{'type': 'text', 'text': ...}] content: give the tokenizer a chat template that does"
    )


def conversation(prompt: str, history: History, style: str) -> list[dict[str, Any]]:
    """The messages of a conversation whose first user turn holds the volume."""
    turns = [*history, (prompt, None)]
    messages: list[dict[str, Any]] = []
    for index, (question, answer) in enumerate(turns):
        if style == STRING_CONTENT:
            content: Any = f"{IMAGE_PLACEHOLDER}\n{question}" if index == 0 else question
        else:
            content = [{"type": "image"}] if index == 0 else []
            content.append({"type": "text", "text": question})
        messages.append({"role": "user", "content": content})
        if answer is not None:
            reply = answer if style == STRING_CONTENT else [{"type": "text", "text": answer}]
            messages.append({"role": "assistant", "content": reply})
    return messages


def chat_text_around_image(
    tokenizer: PreTrainedTokenizerBase, prompt: str, history: History, image_token: str
) -> tuple[str, str]:
    """The chat text before and after the visual tokens, ready for generation.

    ``image_token`` is what a typed-content template writes for an image item (the 2D model's
    image token).
    """
    style = content_style(tokenizer)
    text = _render(tokenizer, conversation(prompt, history, style))
    marker = IMAGE_PLACEHOLDER if style == STRING_CONTENT else image_token
    if marker not in text:
        raise ChatTemplateError(
            f"the tokenizer's chat template drops the image of the user turn (no {marker!r} in its "
            f"output): give the tokenizer a chat template that writes the image"
        )
    before, after = text.split(marker, 1)
    return before, after
