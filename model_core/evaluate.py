"""Evaluation CLI: ``python -m model_core.evaluate --model DIR --data SPEC --task report|vqa --out DIR``.

Runs the model on every sample of an M3D-Cap JSON (``path.json[:split]``), an M3D-VQA CSV or a
JSONL set, greedily and with a fixed seed so a rerun gives the same numbers, and writes into
``--out``: ``samples.csv`` (one row per sample), ``summary.json`` (means, closed accuracy overall
and per question type, counts, settings, metric definitions) and ``summary.md`` (tables). Each
file is written under a temporary name and renamed, so a reader never sees half a file.

Scoring follows M3D (see ``model_core.metrics`` and docs/EVALUATION.md): report samples and
open VQA get the text metrics per sample, then means; closed VQA gets M3D's letter rule.

Routing: the model runs as it does in use, its task router picking the expert from each prompt;
those are the scores (``prediction``, ``metrics``, ``closed_accuracy``, ``by_question_type``).
Beside them, the oracle-routed scores (``oracle_*`` columns, ``summary["oracle"]``) force the
sample's own task's expert, and ``summary["routing"]`` says how often the router agreed. Where
forcing gives the features routing gave (no task experts, or a hard router that agreed) the text
is the same and is not generated twice.

Volumes: CT files (NIfTI, NRRD, MHA, DICOM in JSONL sets) are prepared with the model's own
``preprocess_config()``; ``.npy`` volumes are taken as already preprocessed (M3D's layout).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model_core import metrics
from model_core.config import TASKS
from model_core.data import Sample
from model_core.evaluation_outputs import OUTPUT_FILES, summary_markdown, write_outputs

ORACLE_KEYS: tuple[str, ...] = ("metrics", "closed_accuracy", "by_question_type")
"""The summary's score keys, repeated under ``summary["oracle"]`` for the oracle-routed run."""
DEFAULT_SEED = 42  # M3D's eval scripts seed everything with 42


@dataclass
class DataSpec:
    """Where the samples come from: ``kind`` is ``m3d-cap``, ``m3d-vqa`` or ``jsonl``."""

    path: Path
    kind: str
    split: str | None = None


def parse_data_spec(spec: str) -> DataSpec:
    """``path.json[:split]`` (M3D-Cap, split default ``test``), ``path.csv`` (M3D-VQA) or ``path.jsonl``."""
    path_text, split = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head.lower().endswith(".json") and tail and "/" not in tail and "\\" not in tail:
        path_text, split = head, tail
    path = Path(path_text).expanduser()
    suffix = path.suffix.lower()
    kinds = {".json": "m3d-cap", ".csv": "m3d-vqa", ".jsonl": "jsonl"}
    if suffix not in kinds:
        raise ValueError(
            f"--data {spec!r}: use an M3D-Cap .json (optionally path.json:split), an M3D-VQA .csv or a .jsonl"
        )
    if not path.is_file():
        raise FileNotFoundError(f"--data {spec!r}: {path} does not exist")
    kind = kinds[suffix]
    return DataSpec(path=path, kind=kind, split=(split or "test") if kind == "m3d-cap" else None)


def open_dataset(
    spec: DataSpec,
    image_root: str | Path | None = None,
    vqa_mode: str = "both",
    preprocess_config: Any = None,
) -> Any:
    """The ``model_core.data`` dataset for ``spec`` (a sequence of ``Sample``); CT files are
    prepared with ``preprocess_config`` (the model's own: ``CTMLLM.preprocess_config()``)."""
    from model_core import data

    if spec.kind == "m3d-cap":
        return data.M3DCapDataset(spec.path, spec.split, image_root=image_root)
    if spec.kind == "m3d-vqa":
        return data.M3DVQADataset(spec.path, image_root=image_root, mode=vqa_mode)
    return data.JsonlDataset(spec.path, preprocess_config=preprocess_config)


def select_samples(dataset: Any, task: str, limit: int | None = None) -> list[Sample]:
    """The first ``limit`` samples of ``task``, in dataset order; raises when none match."""
    chosen: list[Sample] = []
    other_tasks: set[str] = set()
    for index in range(len(dataset)):
        if limit is not None and len(chosen) >= limit:
            break
        sample = dataset[index]
        if sample.task == task:
            chosen.append(sample)
        else:
            other_tasks.add(sample.task)
    if not chosen:
        found = ", ".join(sorted(other_tasks)) or "no samples at all"
        raise ValueError(f"the data holds no {task!r} samples (it holds {found}): pass the matching --task")
    return chosen


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and torch, as M3D's scripts do, so reruns match."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Running the model and scoring


def _sample_id(sample: Sample, index: int) -> str:
    return str(sample.meta.get("sample_id", index))


def _question_type(sample: Sample) -> str:
    """M3D-VQA's type name (Plane, Phase, ...) where the dataset gives one, else its raw value."""
    return str(sample.meta.get("question_type_name") or sample.meta.get("question_type") or "")


def _is_closed(sample: Sample) -> bool:
    return sample.task == "vqa" and bool(sample.meta.get("closed", False))


def generate_predictions(
    model: Any,
    samples: Sequence[Sample],
    max_new_tokens: int,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Greedy answers for every sample, one row dict each: ``prediction`` with the expert the task
    router picks (``expert``), ``oracle_prediction`` with the sample's own task's expert (the same
    text, not generated again, where forcing that expert gives the routed features)."""
    rows = []
    bar = tqdm(samples, desc="evaluating", unit="sample", disable=not progress, file=sys.stderr)
    for index, sample in enumerate(bar):
        try:
            volume = sample.load_volume()
            routed = model.generate(volume, sample.prompt, max_new_tokens=max_new_tokens, do_sample=False)
            oracle = routed
            if not model.forcing_keeps_features(routed.expert, sample.task):
                oracle = model.generate(
                    volume, sample.prompt, task=sample.task, max_new_tokens=max_new_tokens, do_sample=False
                )
        except Exception as err:
            raise RuntimeError(f"sample {_sample_id(sample, index)}: generation failed: {err}") from err
        rows.append(
            {
                "sample_id": _sample_id(sample, index),
                "task": sample.task,
                "question_type": _question_type(sample),
                "closed": _is_closed(sample),
                "prompt": sample.prompt,
                "reference": sample.answer,
                "prediction": routed.text,
                "expert": routed.expert or "",
                "oracle_prediction": oracle.text,
                "oracle_generated": oracle is not routed,
                "answer_choice": str(sample.meta.get("answer_choice", "")) if _is_closed(sample) else "",
                "new_tokens": routed.new_tokens,
                "seconds": routed.seconds + (oracle.seconds if oracle is not routed else 0.0),
            }
        )
    return rows


def score_rows(
    rows: list[dict[str, Any]], bert_scorer: metrics.BertScorer | None, meteor: bool
) -> list[dict[str, Any]]:
    """Add per-sample metrics: text metrics on report/open rows, ``correct`` on closed rows."""
    text_rows = [row for row in rows if not row["closed"]]
    scores = metrics.score_texts(
        [row["reference"] for row in text_rows],
        [row["prediction"] for row in text_rows],
        bertscore=bert_scorer if bert_scorer is not None else False,
        meteor_score=meteor,
    )
    for position, row in enumerate(text_rows):
        for name, values in scores.items():
            row[name] = values[position]
    for row in rows:
        if row["closed"]:
            if not row["answer_choice"]:
                raise ValueError(f"closed sample {row['sample_id']} has no answer_choice in its meta")
            row["correct"] = metrics.closed_vqa_correct(row["prediction"], row["answer_choice"])
    return rows


def oracle_rows(
    rows: Sequence[dict[str, Any]], bert_scorer: metrics.BertScorer | None, meteor: bool
) -> list[dict[str, Any]]:
    """The scored rows of the oracle-routed run (``oracle_prediction``), from scored routed rows:
    only predictions that differ are scored again. Copies each oracle score into its routed row's
    ``oracle_`` columns."""
    oracle = [{**row, "prediction": row["oracle_prediction"]} for row in rows]
    changed = [o for o, row in zip(oracle, rows, strict=True) if o["prediction"] != row["prediction"]]
    if changed:
        score_rows(changed, bert_scorer, meteor)
    for row, scored in zip(rows, oracle, strict=True):
        for name in (*metrics.TEXT_METRICS, "correct"):
            if name in scored:
                row[f"oracle_{name}"] = scored[name]
    return oracle


def routing_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How the task router chose: agreement with each sample's own task, experts used, and how
    many samples needed a second (oracle) generation."""
    routed = [row for row in rows if row["expert"]]
    return {
        "task_router": bool(routed),
        "router_accuracy": sum(row["expert"] == row["task"] for row in routed) / len(routed)
        if routed
        else None,
        "experts": dict(sorted(Counter(row["expert"] for row in routed).items())),
        "oracle_generations": sum(bool(row.get("oracle_generated")) for row in rows),
        "definition": "scores: the expert the task router picked from the prompt (as in use); oracle: the "
        "sample's own task's expert forced",
    }


def _means(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    present = [name for name in metrics.TEXT_METRICS if any(name in row for row in rows)]
    return metrics.summarise({name: [row[name] for row in rows] for name in present})


def summarise_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means of the text metrics, corpus BLEU-4, closed accuracy; overall and per question type."""
    text_rows = [row for row in rows if not row["closed"]]
    closed_rows = [row for row in rows if row["closed"]]
    summary: dict[str, Any] = {
        "counts": {"samples": len(rows), "text_scored": len(text_rows), "closed": len(closed_rows)},
        "metrics": _means(text_rows),
        "closed_accuracy": None,
        "by_question_type": {},
    }
    if text_rows:
        summary["metrics"]["bleu4_corpus"] = metrics.corpus_bleu4(
            [row["reference"] for row in text_rows], [row["prediction"] for row in text_rows]
        )
    if closed_rows:
        summary["closed_accuracy"] = metrics.closed_accuracy(
            [row["correct"] for row in closed_rows], [row["question_type"] for row in closed_rows]
        )
    types = sorted({row["question_type"] for row in rows if row["question_type"]})
    for kind in types:
        open_of_type = [row for row in text_rows if row["question_type"] == kind]
        closed_of_type = [row for row in closed_rows if row["question_type"] == kind]
        entry: dict[str, Any] = {"open_n": len(open_of_type), "closed_n": len(closed_of_type)}
        if open_of_type:
            entry["open"] = _means(open_of_type)
        if closed_of_type:
            entry["closed_accuracy"] = sum(row["correct"] for row in closed_of_type) / len(closed_of_type)
        summary["by_question_type"][kind] = entry
    return summary


@dataclass
class EvalSettings:
    """What a run does besides the model and data (``limit`` applies when samples are selected)."""

    task: str
    max_new_tokens: int = 256
    seed: int = DEFAULT_SEED
    bertscore: bool = True
    bertscore_model: str | None = None
    meteor: bool = True
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: use at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit}: use at least 1, or leave it out for every sample")


def prepare_scorers(settings: EvalSettings) -> metrics.BertScorer | None:
    """Check that the requested metrics can run here and load BERTScore's model (cached).

    Raises ``MetricUnavailableError`` naming the fix, so a missing WordNet or BERTScore model
    fails in seconds rather than after a whole run.
    """
    if settings.meteor and (reason := metrics.meteor_available()) is not None:
        raise metrics.MetricUnavailableError(reason)
    return metrics.BertScorer(settings.bertscore_model) if settings.bertscore else None


def evaluate(
    model: Any,
    samples: Sequence[Sample],
    settings: EvalSettings,
    out_dir: str | Path,
    run_info: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, score and write the three outputs into ``out_dir``; returns the summary.

    Metric availability is checked before generating (``prepare_scorers``).
    """
    if not samples:
        raise ValueError("no samples to evaluate: check --data and --limit")
    other = sorted({sample.task for sample in samples} - {settings.task})
    if other:
        raise ValueError(
            f"samples of task {other} in a {settings.task!r} evaluation: pass only {settings.task!r} samples"
        )
    bert_scorer = prepare_scorers(settings)
    skipped = {} if settings.bertscore else {"bertscore_f1": "skipped (--no-bertscore)"}
    if not settings.meteor:
        skipped["meteor"] = "skipped (--no-meteor)"

    seed_everything(settings.seed)
    start = time.perf_counter()
    rows = score_rows(
        generate_predictions(model, samples, settings.max_new_tokens, progress), bert_scorer, settings.meteor
    )
    oracle = summarise_rows(oracle_rows(rows, bert_scorer, settings.meteor))
    summary = {
        "task": settings.task,
        "model": {"id": getattr(model, "model_id", type(model).__name__)},
        **(run_info or {}),
        "decoding": {
            "strategy": "greedy",
            "do_sample": False,
            "max_new_tokens": settings.max_new_tokens,
            "seed": settings.seed,
        },
        "seed": settings.seed,
        **summarise_rows(rows),
        "oracle": {key: oracle[key] for key in ORACLE_KEYS},
        "routing": routing_summary(rows),
        "bertscore_model": bert_scorer.label if bert_scorer else None,
        "skipped_metrics": skipped,
        "metric_definitions": metrics.metric_definitions(bert_scorer),
        "seconds": {
            "total": time.perf_counter() - start,
            "generation": math.fsum(row["seconds"] for row in rows),
        },
    }
    write_outputs(out_dir, rows, summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from model_core.hub import add_precision_option

    parser = argparse.ArgumentParser(
        prog="python -m model_core.evaluate",
        description="Evaluate a CTMLLM on M3D-Cap / M3D-VQA / JSONL with M3D's metric definitions.",
    )
    parser.add_argument(
        "--model", required=True, help="a CTMLLM folder (save_pretrained), 'demo' or a cached Hub id"
    )
    parser.add_argument(
        "--data", required=True, help="M3D-Cap JSON (path.json or path.json:split), M3D-VQA CSV, or JSONL"
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--out", required=True, help="folder for samples.csv, summary.json, summary.md")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--no-bertscore", action="store_true", help="skip BERTScore")
    parser.add_argument("--bertscore-model", default=None, help="a local model folder for BERTScore")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs WordNet)")
    parser.add_argument("--image-root", default=None, help="folder the dataset's image paths are relative to")
    parser.add_argument("--vqa-mode", choices=("closed", "open", "both"), default="both")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_precision_option(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None, notice: Callable[[str], None] | None = None) -> int:
    """Run the CLI; returns the exit status (2 with a one-line reason on bad input)."""
    args = build_parser().parse_args(argv)
    say = notice or (lambda text: print(text, file=sys.stderr))
    try:
        settings = EvalSettings(
            task=args.task,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            bertscore=not args.no_bertscore,
            bertscore_model=args.bertscore_model,
            meteor=not args.no_meteor,
            limit=args.limit,
        )
        spec = parse_data_spec(args.data)
        select_samples(open_dataset(spec, args.image_root, args.vqa_mode), args.task, settings.limit)
        prepare_scorers(settings)  # before the model: bad data or a missing metric fails fast
        from model_core.hub import load_model

        model = load_model(args.model, device=args.device, dtype=args.precision, notice=say)
        preprocessing = model.preprocess_config()  # how this model was trained to see CT files
        samples = select_samples(
            open_dataset(spec, args.image_root, args.vqa_mode, preprocessing), args.task, settings.limit
        )
        run_info = {
            "model": {
                "id": model.model_id,
                "spec": str(args.model),
                "device": str(model.device),
                "dtype": str(model.dtype),
            },
            "data": {"spec": args.data, "format": spec.kind, "split": spec.split, "limit": args.limit},
            "preprocessing": preprocessing.to_dict(),
        }
        summary = evaluate(model, samples, settings, args.out, run_info, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, metrics.MetricUnavailableError) as err:
        say(f"error: {err}")
        return 2
    say(summary_markdown(summary))
    say(f"wrote {', '.join(OUTPUT_FILES)} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
