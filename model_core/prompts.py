"""The prompt and target text formats shared by datasets, training, evaluation and the panel.

Closed-ended VQA follows M3D-VQA: the question, then " Choices: A. ... B. ... C. ... D. ...";
the target is "{letter}. {answer}". Open-ended VQA is the question alone with the answer as
target. Keeping these here means the evaluator scores exactly what the datasets produce.
"""

from __future__ import annotations

from collections.abc import Mapping

DEFAULT_REPORT_PROMPT = "Write a radiology report of the findings in this CT volume."
CHOICE_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")


def format_closed_question(question: str, choices: Mapping[str, str]) -> str:
    """M3D-VQA's closed-ended prompt: ``"{question} Choices: A. a B. b C. c D. d"``."""
    listed = " ".join(f"{letter}. {choices[letter]}" for letter in CHOICE_LETTERS if letter in choices)
    return f"{question} Choices: {listed}"


def closed_target(letter: str, answer: str) -> str:
    """M3D-VQA's closed-ended target text: ``"{letter}. {answer}"``."""
    return f"{letter}. {answer}"
