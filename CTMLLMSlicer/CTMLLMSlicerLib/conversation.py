"""What the model said about one volume: the report and the question turns, with their settings.

One ``Conversation`` per volume node. It gives the history the model needs for a follow-up
question, the plain text stored in the scene's text node, and the Markdown and JSON exports
(which carry the model id and the settings, so a result can be traced to what produced it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

REPORT = "report"
QUESTION = "vqa"
FORMAT = "ctmllm-conversation/1"
REVIEW_NOTICE = "Machine-generated text, not a diagnosis: it must be reviewed by a radiologist."
"""The first line of every text the module writes (text node, clipboard, exports)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Turn:
    """One request and its answer; ``cancelled`` answers are partial and kept out of the history.

    ``task``: the kind of request (a report or a question); ``expert``: the model's task expert
    that read the volume (None for a model without task experts), chosen by the task router from
    the prompt when ``routed``, else forced by the request's kind.
    """

    task: str
    prompt: str
    answer: str
    cancelled: bool = False
    newTokens: int = 0
    seconds: float = 0.0
    time: str = field(default_factory=_now)
    expert: str | None = None
    routed: bool = False

    @property
    def tokensPerSecond(self) -> float:
        return self.newTokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def expertNote(self) -> str:
        """Which expert read the volume and who chose it, for the panel and the exports."""
        if self.expert is None:
            return "no task experts"
        return (
            f"expert {self.expert} ({'chosen by the task router' if self.routed else 'forced by the mode'})"
        )


@dataclass
class Conversation:
    """All turns on one volume, oldest first, with the model and settings that produced them."""

    volumeName: str
    modelId: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    turns: list[Turn] = field(default_factory=list)

    def add(self, turn: Turn) -> Turn:
        self.turns.append(turn)
        return turn

    def history(self) -> list[tuple[str, str]]:
        """Earlier complete (question, answer) pairs, the context for the next question."""
        return [(t.prompt, t.answer) for t in self.turns if t.task == QUESTION and not t.cancelled]

    def isEmpty(self) -> bool:
        return not self.turns

    def toText(self) -> str:
        """Plain text for the scene's text node and the clipboard."""
        lines = [
            REVIEW_NOTICE,
            f"CT-MLLM results for {self.volumeName} (model: {self.modelId or 'unknown'})",
            "",
        ]
        for turn in self.turns:
            note = " [cancelled: partial answer]" if turn.cancelled else ""
            if turn.task == REPORT:
                lines += [f"Report{note}:", turn.answer.strip(), ""]
            else:
                lines += [f"Q: {turn.prompt.strip()}", f"A{note}: {turn.answer.strip()}", ""]
        return "\n".join(lines).rstrip() + "\n"

    def toMarkdown(self) -> str:
        """A readable export: header with model and settings, then each turn."""
        lines = [f"# CT-MLLM results: {self.volumeName}", "", f"- Model: `{self.modelId or 'unknown'}`"]
        lines += [f"- {key}: `{value}`" for key, value in sorted(self.settings.items())]
        lines += ["", f"> {REVIEW_NOTICE}", ""]
        for index, turn in enumerate(self.turns, start=1):
            title = "Report" if turn.task == REPORT else f"Question {index}"
            suffix = " (cancelled, partial)" if turn.cancelled else ""
            lines += [f"## {title}{suffix}", ""]
            if turn.task != REPORT:
                lines += [f"**Q:** {turn.prompt.strip()}", "", f"**A:** {turn.answer.strip()}", ""]
            else:
                lines += [turn.answer.strip(), ""]
            lines += [
                f"_{turn.newTokens} tokens in {turn.seconds:.1f} s, {turn.expertNote}, {turn.time}_",
                "",
            ]
        return "\n".join(lines).rstrip() + "\n"

    def toDict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = FORMAT
        return data

    @classmethod
    def fromDict(cls, data: dict[str, Any]) -> Conversation:
        """The inverse of ``toDict`` (a conversation stored in a saved scene or a JSON export)."""
        if data.get("format") != FORMAT:
            raise ValueError(
                f"not a CT-MLLM conversation (format {data.get('format')!r}, expected {FORMAT!r})"
            )
        turnFields = set(Turn.__dataclass_fields__)
        turns = [Turn(**{k: v for k, v in turn.items() if k in turnFields}) for turn in data.get("turns", [])]
        return cls(
            str(data.get("volumeName", "")),
            str(data.get("modelId", "")),
            dict(data.get("settings", {})),
            turns,
        )

    @classmethod
    def fromJSON(cls, text: str) -> Conversation:
        return cls.fromDict(json.loads(text))

    def toJSON(self) -> str:
        """The machine-readable export: model id, settings and every turn with its timing."""
        return json.dumps(self.toDict(), indent=2, ensure_ascii=False) + "\n"
