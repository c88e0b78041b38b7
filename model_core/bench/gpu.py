"""``python -m model_core.bench gpu``: the whole model on a GPU, in a few minutes.

For the tiny random model and the ~100M benchmark model (``BENCH_MODELS``, K=2, TGH-MoE), in
float32 and bfloat16: encode one volume, generate with streaming (time to the first chunk,
tokens/s), and one stage-1 and one stage-2 training step through accelerate (the training
script's ``LossStep``, mixed precision ``bf16`` for bfloat16), each with its peak memory
(``torch.cuda.max_memory_allocated``, reset before each phase). Prints a table and writes JSON.

It is the check that the model runs on CUDA at all (every tensor on the device, the MoE routing,
streaming, accelerate), not a speed study: one volume, one step. ``--device cpu`` runs the same
cases on the CPU (peak memory is then the process's peak resident set so far), which is how the
script itself is tested where no GPU is lent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from model_core.bench.common import (
    BENCH_MODEL,
    BENCH_MODELS,
    TINY_MODEL,
    bench_ctmllm,
    case_main,
    peak_rss_mib,
    run_cases_in_subprocesses,
    write_report,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VOLUME_SHAPES = {TINY_MODEL: (32, 32, 32), BENCH_MODEL: (32, 256, 256)}
"""One volume per model, at the grid it reads: (D, H, W)."""
QUESTION = "Where is the lesion located?"
COLUMNS = [
    "model",
    "dtype",
    "visual_tokens",
    "encode_s",
    "encode_peak_mib",
    "first_chunk_s",
    "new_tokens",
    "tokens_per_s",
    "generate_peak_mib",
    "stage1_step_s",
    "stage1_peak_mib",
    "stage2_step_s",
    "stage2_peak_mib",
]
NO_CUDA = (
    "CUDA is not available here (torch {version}, {build}): run this on a machine with an NVIDIA GPU, "
    "or pass --device cpu to check the script itself on the CPU"
)


class _Meter:
    """Wall time and peak memory of one phase on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> _Meter:
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start
        self.peak_mib = (
            torch.cuda.max_memory_allocated(self.device) / 2**20
            if self.device.type == "cuda"
            else peak_rss_mib()
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _inference(case: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Encode once (after a warm-up), then generate with a streaming callback."""
    from model_core.config import MoEConfig

    model = bench_ctmllm(case["model"], MoEConfig(mode="tgh_hard")).to(
        device=device, dtype=DTYPES[case["dtype"]]
    )
    model.eval()
    volume = torch.rand(*VOLUME_SHAPES[case["model"]], generator=torch.Generator().manual_seed(0))
    model.encode_volume(volume, prompt=QUESTION)  # warm-up: kernels, allocator
    with _Meter(device) as encode:
        features = model.encode_volume(volume, prompt=QUESTION)
    first_chunk: list[float] = []
    with _Meter(device) as generate:
        result = model.generate(
            features,
            QUESTION,
            max_new_tokens=case["max_new_tokens"],
            on_text=lambda _chunk: first_chunk or first_chunk.append(time.perf_counter() - generate.start),
        )
    return {
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "visual_tokens": int(features.tokens.shape[0]),
        "expert": result.expert,
        "encode_s": round(encode.seconds, 4),
        "encode_peak_mib": round(encode.peak_mib, 1),
        "first_chunk_s": round(first_chunk[0], 4) if first_chunk else None,
        "new_tokens": result.new_tokens,
        "tokens_per_s": round(result.new_tokens / generate.seconds, 2),
        "generate_peak_mib": round(generate.peak_mib, 1),
    }


def _training_steps(case: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One optimizer step of stage 1 and of stage 2, each prepared by one accelerate Accelerator."""
    from accelerate import Accelerator

    from model_core.bench.train import ANSWER, build_case_model
    from model_core.prompts import DEFAULT_REPORT_PROMPT
    from model_core.train import LossStep

    accelerator = Accelerator(
        cpu=device.type == "cpu", mixed_precision="bf16" if case["dtype"] == "bfloat16" else "no"
    )
    volumes = torch.rand(1, *VOLUME_SHAPES[case["model"]], generator=torch.Generator().manual_seed(0))
    row: dict[str, Any] = {}
    for stage in (1, 2):
        model, _trained = build_case_model(stage, case["model"])
        params = [p for p in model.parameters() if p.requires_grad]
        step, optimizer = accelerator.prepare(LossStep(model.train()), torch.optim.AdamW(params, lr=1e-5))
        batch = {
            "volumes": volumes.to(accelerator.device),
            "prompts": [DEFAULT_REPORT_PROMPT],
            "answers": [ANSWER],
            "tasks": ["report"],
        }
        with _Meter(device) as meter:
            losses = step(**batch)
            accelerator.backward(losses["loss"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        row[f"stage{stage}_step_s"] = round(meter.seconds, 4)
        row[f"stage{stage}_peak_mib"] = round(meter.peak_mib, 1)
        row[f"stage{stage}_loss"] = round(float(losses["loss"].detach()), 4)
        accelerator.free_memory()
        del model, step, optimizer
    return row


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One model in one precision: inference, then the two training steps."""
    device = torch.device(case["device"])
    torch.manual_seed(0)
    return {**case, **_inference(case, device), **_training_steps(case, device)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_core.bench gpu", description=__doc__.split("\n\n")[0].strip("`")
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the script")
    parser.add_argument("--models", nargs="+", default=list(BENCH_MODELS), choices=list(BENCH_MODELS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per case")
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run every case in this process (quicker to start; CPU peak memory then accumulates)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results/gpu.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if case_main(argv, run_case):
        return 0
    args = build_parser().parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(NO_CUDA.format(version=torch.__version__, build=build), file=sys.stderr)
        return 2
    cases = [
        {"model": model, "dtype": dtype, "device": args.device, "max_new_tokens": args.max_new_tokens}
        for model in args.models
        for dtype in args.dtypes
    ]
    if args.same_process:
        rows = [run_case(case) for case in cases]
    else:
        rows = run_cases_in_subprocesses("model_core.bench.gpu", cases, args.timeout)
    write_report(args.out, "gpu", rows, COLUMNS, vars(args) | {"out": str(args.out)})
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
