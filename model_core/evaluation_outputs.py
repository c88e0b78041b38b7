"""The three outputs of an evaluation run: ``samples.csv``, ``summary.json``, ``summary.md``.

Each file is written under a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model_core import metrics

CSV_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "task",
    "question_type",
    "closed",
    "prompt",
    "reference",
    "prediction",
    "expert",
    "answer_choice",
    "new_tokens",
    *metrics.TEXT_METRICS,
    "correct",
    "oracle_prediction",
    *(f"oracle_{name}" for name in metrics.TEXT_METRICS),
    "oracle_correct",
)
"""``prediction`` and its scores come from the expert the task router picked (``expert``, empty for a
model without task experts); the ``oracle_`` columns from the sample's own task's expert."""
OUTPUT_FILES: tuple[str, ...] = ("samples.csv", "summary.json", "summary.md")


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place.

    The temporary name is opened exclusively with normal permissions (umask applies), unlike
    ``mkstemp``'s private 0600 files.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "x", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _json_ready(value: Any) -> Any:
    """NaN (a mean over no samples) becomes null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    return value


def samples_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: row.get(column, "") for column in CSV_COLUMNS})
    return buffer.getvalue()


_LABELS = {
    "bleu1": "BLEU-1 (M3D's BLEU)",
    "bleu4": "BLEU-4 (sentence mean)",
    "bleu4_corpus": "BLEU-4 (corpus)",
    "rouge1": "ROUGE-1",
    "rouge_l": "ROUGE-L",
    "meteor": "METEOR",
    "bertscore_f1": "BERTScore F1",
}


def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """Markdown tables of a summary: scores x100, as M3D's tables print them."""
    counts = summary["counts"]
    decoding = summary["decoding"]
    lines = [
        f"# Evaluation of {summary['model']['id']} ({summary['task']})",
        "",
        f"Data: {summary.get('data', {}).get('spec', '?')}; {counts['samples']} samples "
        f"({counts['text_scored']} scored as text, {counts['closed']} closed-ended). "
        f"Decoding: {decoding['strategy']}, max {decoding['max_new_tokens']} new tokens, seed {decoding['seed']}. "
        "Scores are means of per-sample scores, x100.",
        "",
    ]
    if counts["text_scored"]:
        lines += ["| Metric | Score |", "| --- | ---: |"]
        for name, value in summary["metrics"].items():
            label = _LABELS.get(name, name)
            if name == "bertscore_f1" and summary["bertscore_model"]:
                label += f" ({summary['bertscore_model']})"
            lines.append(f"| {label} | {_pct(value)} |")
        for name, why in summary["skipped_metrics"].items():
            lines.append(f"| {_LABELS.get(name, name)} | {why} |")
        lines.append("")
    accuracy = summary["closed_accuracy"]
    if accuracy:
        lines += [
            "Closed-ended accuracy (M3D rule: the answer letter followed by '.' appears in the output)",
            "",
            "| Question type | Accuracy | n |",
            "| --- | ---: | ---: |",
        ]
        for kind, entry in accuracy["per_type"].items():
            lines.append(f"| {kind} | {_pct(entry['accuracy'])} | {entry['n']} |")
        lines += [f"| all | {_pct(accuracy['accuracy'])} | {accuracy['n']} |", ""]
    open_types = {kind: entry for kind, entry in summary["by_question_type"].items() if "open" in entry}
    if open_types:
        names = [name for name in metrics.TEXT_METRICS if name in next(iter(open_types.values()))["open"]]
        lines += [
            "Open-ended scores per question type",
            "",
            "| Question type | n | " + " | ".join(_LABELS[name] for name in names) + " |",
            "| --- | ---: |" + " ---: |" * len(names),
        ]
        for kind, entry in open_types.items():
            cells = " | ".join(_pct(entry["open"][name]) for name in names)
            lines.append(f"| {kind} | {entry['open_n']} | {cells} |")
        lines.append("")
    return "\n".join(lines + routing_markdown(summary))


def routing_markdown(summary: dict[str, Any]) -> list[str]:
    """Routed scores beside the oracle-routed ones, and how often the task router agreed."""
    routing = summary.get("routing")
    if not routing:
        return []
    if not routing["task_router"]:
        return ["The model has no task router: the oracle-routed scores equal these.", ""]
    used = ", ".join(f"{name} {count}" for name, count in routing["experts"].items())
    lines = [
        f"Task router: picked the sample's own task for {_pct(routing['router_accuracy'])}% of the samples "
        f"(experts used: {used}). Routed: the expert the router picked, as in use; oracle: the sample's own "
        f"task's expert forced.",
        "",
        "| Score | routed | oracle |",
        "| --- | ---: | ---: |",
    ]
    oracle = summary["oracle"]
    for name, value in summary["metrics"].items():
        lines.append(f"| {_LABELS.get(name, name)} | {_pct(value)} | {_pct(oracle['metrics'].get(name))} |")
    if summary["closed_accuracy"]:
        routed_acc, oracle_acc = summary["closed_accuracy"]["accuracy"], oracle["closed_accuracy"]["accuracy"]
        lines.append(f"| Closed-ended accuracy | {_pct(routed_acc)} | {_pct(oracle_acc)} |")
    return [*lines, ""]


def write_outputs(
    out_dir: str | Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any]
) -> dict[str, Path]:
    """Write samples.csv, summary.json and summary.md atomically; returns their paths."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    texts = {
        "samples.csv": samples_csv(rows),
        "summary.json": json.dumps(_json_ready(summary), indent=2, allow_nan=False) + "\n",
        "summary.md": summary_markdown(summary),
    }
    paths = {}
    for name in OUTPUT_FILES:
        paths[name] = folder / name
        _write_atomic(paths[name], texts[name])
    return paths
