"""``python -m model_core.bench train``: speed and peak memory of one training step.

The ~100M-parameter InternVL-shaped model (``bench_2d_mllm``: ViT-B/16 tower at 256 px, K=2 3D
blocks, a small Qwen2) with the training's MoE (4 experts, top-2, rank 8, on the MLPs of the 3D
blocks) takes optimizer steps on one 32 x 256 x 256 volume with a report prompt and answer:
float32 vs bfloat16 autocast, with and without gradient checkpointing, stage 1 (token-level MoE,
projector, LM LoRA) vs stage 2 (task experts and router). Each case runs in its own process;
time is the median of ``--repeats`` steps after one warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

from model_core.bench.common import (
    BENCH_MODEL,
    bench_ctmllm,
    case_main,
    median_seconds,
    peak_rss_mib,
    run_cases_in_subprocesses,
    write_report,
)

PRECISIONS = ("float32", "bfloat16")
ANSWER = "A 12 mm hypodense cyst in the right lobe of the liver. The spleen is unremarkable."


def build_case_model(stage: int, kind: str = BENCH_MODEL):
    """The ``kind`` model (``BENCH_MODELS``) as the given stage trains it (requires_grad set), and
    its trained names."""
    from model_core.config import MoEConfig
    from model_core.moe import set_moe
    from model_core.training.config import TrainingConfig
    from model_core.training.stages import add_lm_lora, set_trainable, stage_moe_config

    config = TrainingConfig(moe=MoEConfig(mode="tgh_hard", num_experts=4, top_k=2, rank=8))
    model = bench_ctmllm(kind, stage_moe_config(config.moe, 1))
    if stage == 1:
        add_lm_lora(model, config.lm)
    else:
        set_moe(model, stage_moe_config(config.moe, 2))
    trained = set_trainable(model, stage, config, config.stage_settings(stage))
    return model, trained


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    from model_core.prompts import DEFAULT_REPORT_PROMPT
    from model_core.training.stages import enable_gradient_checkpointing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, trained = build_case_model(case["stage"])
    if case["checkpointing"]:
        enable_gradient_checkpointing(model)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    volume = torch.rand(1, 32, 256, 256, generator=torch.Generator().manual_seed(0)).to(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if case["precision"] == "bfloat16"
        else contextlib.nullcontext()
    )
    model_mib = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for index in range(case["repeats"] + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = model.compute_loss(volume, [DEFAULT_REPORT_PROMPT], [ANSWER], ["report"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index:  # the first step warms up (and allocates the optimizer state)
            seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    median = median_seconds(seconds)
    return {
        **case,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "trained_m": round(sum(p.numel() for p in params) / 1e6, 2),
        "trained_tensors": len(trained),
        "median_s": round(median, 3),
        "samples_per_s": round(1.0 / median, 3),
        "peak_mib": round(peak, 1),
        "model_mib": round(model_mib, 1),
        "loss": round(float(loss.detach()), 4),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if case_main(argv, run_case):
        return 0
    parser = argparse.ArgumentParser(prog="python -m model_core.bench train", description=__doc__)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=Path("bench_results/train.json"))
    args = parser.parse_args(argv)
    cases = [
        {"stage": stage, "precision": precision, "checkpointing": flag == "on", "repeats": args.repeats}
        for stage in args.stages
        for precision in args.precisions
        for flag in args.checkpointing
    ]
    rows = run_cases_in_subprocesses("model_core.bench.train", cases, args.timeout)
    columns = ["stage", "precision", "checkpointing", "trained_m", "median_s", "samples_per_s", "peak_mib"]
    write_report(args.out, "train", rows, columns, vars(args) | {"out": str(args.out)})
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
