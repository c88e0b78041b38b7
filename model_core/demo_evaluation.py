"""How the demo pipeline measures a model: the project's evaluation CLIs run as subprocesses on the
held-out split, the 2D checkpoint's slab captions and the task router's choices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_core.demo_budget import DemoBudget

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_module(args: Sequence[str], log: Callable[[str], None]) -> None:
    """Run ``python -m <args>`` in the repository root; a failure raises with the command's tail."""
    command = [sys.executable, "-m", *map(str, args)]
    log("$ " + " ".join(command[2:]))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same threads as here
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, encoding="utf-8", env=env)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"`{' '.join(command[2:])}` failed with exit {done.returncode}:\n{tail}")


def evaluate_model(
    model_dir: Path,
    bench: Path,
    eval_dir: Path,
    budget: DemoBudget,
    log: Callable[[str], None],
    full: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Report and VQA evaluation plus finding-level scores; returns the collected numbers.

    ``full`` False (ablations) runs closed VQA and the report without METEOR/BERTScore.
    """
    text_metrics = [] if full else ["--no-bertscore", "--no-meteor"]
    common = ["--model", model_dir, "--device", device, "--no-progress", *text_metrics]
    runs = {
        "report": ["--data", f"{bench / 'M3D_Cap.json'}:test", "--task", "report"],
        "vqa": [
            "--data",
            bench / "M3D_VQA_test.csv",
            "--task",
            "vqa",
            "--vqa-mode",
            "both" if full else "closed",
        ],
    }
    for name, args in runs.items():
        if not (eval_dir / name / "summary.json").is_file():
            tokens = budget.eval_max_new_tokens if name == "report" else 24
            run_module(
                ["model_core.evaluate", *args, *common, "--max-new-tokens", tokens, "--out", eval_dir / name],
                log,
            )
    scores = eval_dir / "findings.json"
    if not scores.is_file():
        run_module(
            [
                "model_core.benchmark",
                "score",
                "--benchmark",
                bench,
                "--samples",
                eval_dir / "report" / "samples.csv",
                "--out",
                scores,
            ],
            log,
        )
    return collect_scores(eval_dir)


def collect_scores(eval_dir: Path) -> dict[str, Any]:
    """The headline numbers of one evaluation folder (report, vqa, findings.json)."""
    report = json.loads((eval_dir / "report" / "summary.json").read_text(encoding="utf-8"))
    vqa = json.loads((eval_dir / "vqa" / "summary.json").read_text(encoding="utf-8"))
    findings = json.loads((eval_dir / "findings.json").read_text(encoding="utf-8"))
    closed = vqa.get("closed_accuracy") or {}
    return {
        "report_metrics": report["metrics"],
        "bertscore_model": report.get("bertscore_model"),
        "closed_accuracy": closed,
        "by_question_type": vqa["by_question_type"],
        "open_metrics": vqa["metrics"],
        "findings": findings,
        "counts": {"report": report["counts"], "vqa": vqa["counts"]},
    }


def slab_lesion_check(
    checkpoint: Path, bench: Path, per_group: int = 30, caption_style: str = "report"
) -> dict[str, int]:
    """Does the 2D checkpoint see lesions? Captions it writes (in the ``caption_style`` it was
    trained on) for held-out test slabs with and without a lesion: where a 3D failure to report
    lesions starts."""
    from model_core.benchmark.slabs import SlabDataset, caption_names_lesion, slab_items
    from model_core.config import VolumeAdapterConfig
    from model_core.model import CTMLLM

    model = CTMLLM.from_2d_pretrained(checkpoint, volume=VolumeAdapterConfig(num_3d_blocks=0)).eval()
    captions = slab_items(bench, "test", questions_per_slab=0, caption_style=caption_style)
    with_lesion = [item for item in captions if item.meta["findings"]][:per_group]
    without = [item for item in captions if not item.meta["findings"]][:per_group]
    texts = [
        model.generate(sample.load_volume(), sample.prompt, task="report", max_new_tokens=48).text
        for sample in SlabDataset(with_lesion + without)
    ]
    reported = [caption_names_lesion(text, caption_style) for text in texts]
    return {
        "slabs_with_lesion": len(with_lesion),
        "reported_on_lesion_slabs": sum(reported[: len(with_lesion)]),
        "slabs_without": len(without),
        "reported_on_normal_slabs": sum(reported[len(with_lesion) :]),
        "distinct_captions": len(set(texts)),
    }


def router_accuracy(model_dir: Path, bench: Path, limit: int = 200) -> float:
    """How often the task router picks the sample's own task from its prompt alone (test prompts:
    the report prompt and every test question)."""
    from model_core.data.formats import read_m3d_vqa
    from model_core.model import CTMLLM
    from model_core.prompts import DEFAULT_REPORT_PROMPT, format_closed_question

    model = CTMLLM.from_pretrained(model_dir)
    prompts = [(DEFAULT_REPORT_PROMPT, "report")]
    for record in read_m3d_vqa(bench / "M3D_VQA_test.csv")[:limit]:
        prompts += [
            (record.question, "vqa"),
            (format_closed_question(record.question, record.choices), "vqa"),
        ]
    moe = model.volume_adapter.moe
    router, tasks = moe.task_router, moe.set_names
    with torch.no_grad():
        logits = router(model.pooled_prompt_embeddings([p for p, _ in prompts]))
    picked = [tasks[i] for i in logits.argmax(dim=-1).tolist()]
    return float(np.mean([p == t for p, (_, t) in zip(picked, prompts, strict=True)]))
