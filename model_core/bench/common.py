"""What every benchmark shares: the ~100M-parameter InternVL-shaped model, one process per case
(so peak memory belongs to that case), medians, the machine description and the JSON/table."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def bench_2d_mllm(image_size: int = 256):
    """A random InternVL-shaped 2D MLLM: ViT-B/16 tower (~86M) and a small Qwen2 text model."""
    from transformers import InternVLVisionConfig, Qwen2Config

    from model_core.tiny import assemble_internvl, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    vision = InternVLVisionConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=image_size,
        patch_size=16,
        use_qk_norm=False,
        layer_scale_init_value=0.1,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return assemble_internvl(vision, text, tokenizer).eval(), tokenizer


INTERNVIT_300M = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
}
"""InternVL3-1B's tower (InternViT-300M-448px-V2.5): patch 14, layer scale, no q/k norm."""
QWEN2_0_5B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151674,
}
"""InternVL3-1B's language model (Qwen2.5-0.5B shapes, InternVL's vocabulary)."""
QUICK_VISION = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128}
QUICK_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
}
"""Small stand-ins with the same structure, to check a benchmark end to end in seconds."""


def internvl3_1b_2d_mllm(
    image_size: int = 448,
    quick: bool = False,
    text_layers: int | None = None,
    seed: int = 0,
    pad_tokenizer: bool = False,
):
    """A random 2D InternVL with InternVL3-1B's shapes (built from transformers' config classes, no
    download) and the tiny tokenizer. ``quick``: a few narrow blocks of the same structure;
    ``text_layers``: fewer language-model blocks (and the tokenizer's vocabulary) where only the
    tower is measured; ``pad_tokenizer``: added tokens up to the model's vocabulary, so every id
    it generates decodes and its answers can come back as history."""
    from transformers import InternVLVisionConfig, Qwen2Config

    from model_core.tiny import assemble_internvl, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    vision = InternVLVisionConfig(
        **(QUICK_VISION if quick else INTERNVIT_300M),
        image_size=image_size,
        patch_size=14,
        use_qk_norm=False,
        layer_scale_init_value=0.1,
    )
    text_shape = dict(QUICK_TEXT if quick else QWEN2_0_5B)
    if text_layers is not None:
        text_shape.update(num_hidden_layers=text_layers, vocab_size=len(tokenizer))
    text = Qwen2Config(**text_shape, max_position_embeddings=32768, tie_word_embeddings=True)
    if pad_tokenizer:
        tokenizer.add_tokens([f"<t{index}>" for index in range(len(tokenizer), text.vocab_size)])
    torch.manual_seed(seed)
    return assemble_internvl(vision, text, tokenizer).eval(), tokenizer


BENCH_MODEL = "bench100m"
TINY_MODEL = "tiny"
BENCH_MODELS: dict[str, str] = {
    TINY_MODEL: "tiny random InternVL (model_core.tiny), 32 px",
    BENCH_MODEL: "~100M InternVL-shaped random model (ViT-B/16 at 256 px, small Qwen2)",
}
"""The models the benchmarks build, by name: neither needs a download."""


def bench_ctmllm(kind: str, moe: Any = None, num_3d_blocks: int = 2):
    """A ``BENCH_MODELS`` model as a CTMLLM with K 3D blocks and ``moe`` (a ``MoEConfig``), float32."""
    from model_core.config import VolumeAdapterConfig
    from model_core.model import CTMLLM
    from model_core.tiny import build_tiny_ctmllm

    if kind == TINY_MODEL:
        return build_tiny_ctmllm("internvl", num_3d_blocks=num_3d_blocks, moe=moe)
    if kind != BENCH_MODEL:
        raise ValueError(f"model {kind!r}: choose one of {', '.join(BENCH_MODELS)}")
    mllm, tokenizer = bench_2d_mllm()
    return CTMLLM.from_2d_model(
        mllm, tokenizer, volume=VolumeAdapterConfig(num_3d_blocks=num_3d_blocks), moe=moe
    )


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """This process's resident memory now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def median_seconds(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def machine_description() -> dict[str, Any]:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_cases_in_subprocesses(
    module: str | list[str], cases: list[dict[str, Any]], timeout: float
) -> list[dict[str, Any]]:
    """Run ``python -m module --case JSON`` (or ``[*command, "--case", JSON]`` when given a command
    list, e.g. a script's path) for each case; each prints one JSON line."""
    prefix = [sys.executable, "-m", module] if isinstance(module, str) else list(module)
    results = []
    for case in cases:
        command = [*prefix, "--case", json.dumps(case)]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, encoding="utf-8", timeout=timeout, check=False
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode == 0 and lines:
                results.append(json.loads(lines[-1]))
            else:
                results.append({**case, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]})
        except subprocess.TimeoutExpired:
            results.append({**case, "error": f"timed out after {timeout:.0f} s"})
        print(format_row(results[-1]), flush=True)
    return results


def format_row(row: dict[str, Any]) -> str:
    return "  ".join(
        f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}" for key, value in row.items()
    )


def write_report(
    path: Path, name: str, rows: list[dict[str, Any]], columns: list[str], settings: dict[str, Any]
) -> None:
    """Write the JSON and print a markdown table of ``columns``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_description(), "settings": settings, "results": rows}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    tmp.replace(path)
    print()
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [row.get(column, row.get("error", "")) for column in columns]
        print("| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    print(f"\nwrote {path}")


def case_main(argv: Sequence[str], run_case: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If called as ``--case JSON``, run that one case, print its JSON line and return True."""
    if len(argv) == 2 and argv[0] == "--case":
        print(json.dumps(run_case(json.loads(argv[1]))), flush=True)
        return True
    return False
