"""``python -m model_core.bench encoder``: forward time and peak memory of the adapted encoder.

The ~100M-parameter InternVL-shaped tower (ViT-B/16 at 256 px) reads D x 256 x 256 volumes for
D in {32, 64, 128} with K in {0, 2, 4} 3D blocks, in float32 and bfloat16. Each case runs in its
own process; time is the median of ``--repeats`` forwards after one warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from model_core.bench.common import (
    bench_2d_mllm,
    case_main,
    current_rss_mib,
    median_seconds,
    peak_rss_mib,
    run_cases_in_subprocesses,
    write_report,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    from model_core.config import VolumeAdapterConfig
    from model_core.model import CTMLLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_default_dtype(DTYPES[case["dtype"]])  # build in the measured precision: no float32 peak
    mllm, tokenizer = bench_2d_mllm()
    torch.set_default_dtype(torch.float32)
    model = CTMLLM.from_2d_model(mllm, tokenizer, volume=VolumeAdapterConfig(num_3d_blocks=case["k"]))
    model.to(device=device, dtype=DTYPES[case["dtype"]]).eval()
    volume = torch.rand(1, case["depth"], 256, 256, generator=torch.Generator().manual_seed(0)).to(device)
    model_mib = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else current_rss_mib()
    seconds = []
    with torch.inference_mode():
        for index in range(case["repeats"] + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = model.encode_volumes(volume)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index:  # the first run warms up
                seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    return {
        **case,
        "encoder_params_m": round(sum(p.numel() for p in model.vision_tower.parameters()) / 1e6, 1),
        "visual_tokens": int(tokens.shape[1]),
        "median_s": round(median_seconds(seconds), 3),
        "min_s": round(min(seconds), 3),
        "peak_mib": round(peak, 1),
        "model_mib": round(model_mib, 1),
        "growth_mib": round(peak - model_mib, 1),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if case_main(argv, run_case):
        return 0
    parser = argparse.ArgumentParser(prog="python -m model_core.bench encoder", description=__doc__)
    parser.add_argument("--depths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=Path("bench_results/encoder.json"))
    args = parser.parse_args(argv)
    cases = [
        {"depth": depth, "k": k, "dtype": dtype, "repeats": args.repeats}
        for dtype in args.dtypes
        for depth in args.depths
        for k in args.ks
    ]
    rows = run_cases_in_subprocesses("model_core.bench.encoder", cases, args.timeout)
    columns = ["dtype", "depth", "k", "visual_tokens", "median_s", "min_s", "peak_mib", "growth_mib"]
    write_report(args.out, "encoder", rows, columns, vars(args) | {"out": str(args.out)})
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
