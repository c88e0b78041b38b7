"""``python -m model_core.bench latency``: what a user waits for, end to end on one CT.

For the demo model (``model_core/demo_model``) and a random model of InternVL3-1B's shapes
(InternViT-300M at 448 px with 2 3D blocks, a Qwen2-0.5B-like language model with InternVL's
151,674-token vocabulary; the tiny tokenizer padded to that size), in float32, bfloat16 and int8
(float32 with the language model's linears dynamically quantised, ``model_core.int8``), each case
in its own process, on one real CT prepared as the model's preprocessing says:

- ``encode_s``: the volume to visual tokens (once for the 1B shape, median otherwise);
- ``report_ttft_s``: the report's first token from the encoded volume (prefill of the whole prompt);
- ``tok_s``: decoding speed of an N-token report after its first token (each language-model
  forward is timed by a hook);
- ``follow_up_ttft_s`` / ``follow_up_nocache_s``: the first token of a follow-up question (with
  the first question and its answer as history) with the conversation's prefix cache and without;
- ``peak_mib``: the process's peak resident memory.

Times are medians of ``--repeats``. ``--quick`` uses narrow stand-ins of the 1B shape.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from model_core.bench.common import (
    case_main,
    internvl3_1b_2d_mllm,
    median_seconds,
    peak_rss_mib,
    run_cases_in_subprocesses,
    write_report,
)
from model_core.bench.compare import DEFAULT_VOLUME
from model_core.int8 import INT8, quantize_language_model

PRECISIONS = ("float32", "bfloat16", INT8)
MODELS = ("demo", "internvl3-1b")
QUESTIONS = ("Where is the lesion located?", "How large is it?")


def build_model(case: dict[str, Any]):
    """The case's CTMLLM on the CPU in its precision (int8: float32 with a quantised language model)."""
    dtype = torch.bfloat16 if case["precision"] == "bfloat16" else torch.float32
    if case["model"] == "demo":
        from model_core.hub import load_model

        model = load_model("demo", device="cpu", dtype=dtype, notice=lambda _text: None)
    else:
        from model_core.config import GenerationConfig, VolumeAdapterConfig
        from model_core.model import CTMLLM

        torch.set_default_dtype(dtype)  # build in the measured precision: no float32 peak
        try:
            mllm, tokenizer = internvl3_1b_2d_mllm(448, quick=case["quick"], pad_tokenizer=True)
        finally:
            torch.set_default_dtype(torch.float32)
        model = CTMLLM.from_2d_model(
            mllm,
            tokenizer,
            volume=VolumeAdapterConfig(num_3d_blocks=2),
            generation=GenerationConfig(max_new_tokens=case["new_tokens"], max_prompt_tokens=4096),
        )
        model = model.to(dtype).eval()
    if case["precision"] == INT8:
        quantize_language_model(model)
    return model


def timed(run) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


class ForwardClock:
    """When each language-model forward ends: the first ends the prefill (the first token), each
    later one decodes a token. Times one generation's first token and decoding rate at once."""

    def __init__(self, language_model: torch.nn.Module) -> None:
        self.ends: list[float] = []
        language_model.register_forward_hook(lambda *_args: self.ends.append(time.perf_counter()))

    def run(self, generate, *args: Any) -> tuple[float, float | None]:
        """``(seconds to the first token, decoded tokens per second or None)`` of ``generate(*args)``."""
        self.ends.clear()
        start = time.perf_counter()
        generate(*args)
        ends = self.ends
        rate = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else None
        return ends[0] - start, rate


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    from model_core.data import preprocess, read_ct
    from model_core.prefix_cache import PrefixCache

    model = build_model(case)
    volume = preprocess(read_ct(case["volume"]), model.preprocess_config())
    if case["quick"] or case["model"] == "demo":
        model.encode_volume(volume, task="vqa")  # warm-up
    encodes = [timed(lambda: model.encode_volume(volume, task="vqa")) for _ in range(case["encode_repeats"])]
    features = encodes[0][1]
    report = model.default_prompt("report")
    n = case["new_tokens"]
    clock = ForwardClock(model.language_model)

    def generate(prompt, tokens, history=(), cache=None):
        return model.generate(
            features, prompt, history=history, max_new_tokens=tokens, do_sample=False, prefix_cache=cache
        )

    reports, with_cache, without_cache = [], [], []
    for _ in range(case["repeats"]):
        reports.append(clock.run(generate, report, n))
        cache = PrefixCache()
        answer = generate(QUESTIONS[0], n, cache=cache).text  # the first question fills the cache
        history = [(QUESTIONS[0], answer)]
        with_cache.append(clock.run(generate, QUESTIONS[1], 1, history, cache)[0])
        reused = cache.reused
        without_cache.append(clock.run(generate, QUESTIONS[1], 1, history)[0])
    rates = [rate for _, rate in reports if rate is not None]
    return {
        **{key: value for key, value in case.items() if key != "volume"},
        "visual_tokens": int(features.tokens.shape[0]),
        "encode_s": round(median_seconds([seconds for seconds, _ in encodes]), 3),
        "report_ttft_s": round(median_seconds([first for first, _ in reports]), 3),
        "tok_s": round(median_seconds(rates), 2) if rates else None,
        "follow_up_ttft_s": round(median_seconds(with_cache), 3),
        "follow_up_nocache_s": round(median_seconds(without_cache), 3),
        "reused_tokens": reused,
        "peak_mib": round(peak_rss_mib(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if case_main(argv, run_case):
        return 0
    parser = argparse.ArgumentParser(prog="python -m model_core.bench latency", description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument(
        "--volume", type=Path, default=DEFAULT_VOLUME, help="a CT file (default: shared torso CT)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--encode-repeats", type=int, default=None, help="default: 1 for the 1B shape, else 3"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="narrow stand-ins of the 1B shape")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=Path("bench_results/latency.json"))
    args = parser.parse_args(argv)
    cases = [
        {
            "model": model,
            "precision": precision,
            "quick": args.quick,
            "repeats": args.repeats,
            "encode_repeats": args.encode_repeats or (1 if model == "internvl3-1b" and not args.quick else 3),
            "new_tokens": args.new_tokens,
            "volume": str(args.volume),
        }
        for model in args.models
        for precision in args.precisions
    ]
    rows = run_cases_in_subprocesses("model_core.bench.latency", cases, args.timeout)
    columns = [
        "model",
        "precision",
        "visual_tokens",
        "encode_s",
        "report_ttft_s",
        "tok_s",
        "follow_up_ttft_s",
        "follow_up_nocache_s",
        "reused_tokens",
        "peak_mib",
    ]
    write_report(
        args.out, "latency", rows, columns, vars(args) | {"out": str(args.out), "volume": str(args.volume)}
    )
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
