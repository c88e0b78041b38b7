"""``python -m model_core.bench compare``: the adapted encoder beside a peer's 3D encoder.

One run, one preprocessed CT volume (a real CT from ``../shared/data``, M3D's 32 x 256 x 256 grid),
each case in its own process, for each precision:

- ``ours``: the adapted encoder (``CTMLLM.encode_volumes``: slice groups, 2D lower blocks, K 3D
  blocks, pixel shuffle, token budget, projector) at InternVL3-1B's tower shape (InternViT-300M,
  random weights from transformers' config classes) at 224 and 448 px, K = 0, 2, 4;
- ``m3d_vit``: M3D-LaMed's 3D vision encoder, MONAI's ``ViT`` with M3D's settings (one channel,
  32 x 256 x 256, patch 4 x 16 x 16, 768 wide, 12 blocks, perceptron patch embedding).

Each row: FLOPs of one forward (``torch.utils.flop_counter``, counted during the warm-up; not for
int8, whose quantized kernels it does not count), the median and minimum of ``--repeats`` timed
forwards, the process's peak resident memory, and the ratio to the peer's median in the same
precision of the same run. ``int8`` is torch's dynamic quantisation of every ``nn.Linear``.
``--compile`` adds each case (but int8) through ``torch.compile``, against the compiled peer.
``--quick`` runs the same cases at small shapes in seconds, to check the benchmark itself.
Needs MONAI (``pip install .[bench]``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_core.bench.common import (
    case_main,
    current_rss_mib,
    internvl3_1b_2d_mllm,
    median_seconds,
    peak_rss_mib,
    run_cases_in_subprocesses,
    write_report,
)

PRECISIONS = ("float32", "bfloat16", "int8")
PEER = "m3d_vit"
OURS = "ours"
DEFAULT_VOLUME = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct" / "torso_ct_3mm.nii.gz"
M3D_VIT = {"hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12}
"""M3D-LaMed's encoder settings (its ``build_vision_tower``: MONAI ViT, ``pos_embed="perceptron"``)."""
QUICK_VIT = {"hidden_size": 64, "mlp_dim": 128, "num_layers": 4, "num_heads": 4}
FULL = {"shape": (32, 256, 256), "sizes": (224, 448)}
QUICK = {"shape": (8, 64, 64), "sizes": (28, 56)}


def count_cpu_attention_flops() -> None:
    """Teach torch's flop counter the CPU attention kernel (it counts only the GPU kernels), so
    the attention of both encoders is counted alike."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    def formula(query_shape, key_shape, value_shape, *_args: Any, **_kwargs: Any) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if kernel.default not in flop_registry:
        register_flop_formula(kernel)(formula)


def prepared_volume(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """The CT at ``path`` as every caller prepares it (``model_core.data``), on the grid ``shape``."""
    from model_core.data import PreprocessConfig, preprocess, read_ct

    return preprocess(read_ct(path), PreprocessConfig(target_shape=shape))


def build_encoder(case: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """The case's encoder in its precision and a function of a ``(D, H, W)`` tensor that runs it."""
    dtype = torch.bfloat16 if case["precision"] == "bfloat16" else torch.float32
    torch.set_default_dtype(dtype)  # build in the measured precision: no float32 peak
    try:
        if case["model"] == PEER:
            from monai.networks.nets import ViT

            shape = tuple(case["shape"])
            net = ViT(
                in_channels=1,
                img_size=shape,
                patch_size=(4, 16, 16),
                proj_type="perceptron",
                classification=False,
                **(QUICK_VIT if case["quick"] else M3D_VIT),
            )
            run = lambda volume: net(volume[None, None].to(dtype))[0]  # noqa: E731
        else:
            from model_core.config import VolumeAdapterConfig
            from model_core.model import CTMLLM

            mllm, tokenizer = internvl3_1b_2d_mllm(case["image_size"], quick=case["quick"], text_layers=1)
            net = CTMLLM.from_2d_model(mllm, tokenizer, volume=VolumeAdapterConfig(num_3d_blocks=case["k"]))
            net.volume_adapter.skip_background = case.get("skip_background")
            run = lambda volume: net.encode_volumes(volume[None])  # noqa: E731
    finally:
        torch.set_default_dtype(torch.float32)
    net = net.to(dtype).eval()
    if case["precision"] == "int8":
        from torch.ao.quantization import quantize_dynamic

        quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return net, run


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from model_core.volume_encoder import slice_groups

    count_cpu_attention_flops()
    volume = torch.from_numpy(np.load(case["volume"]))
    net, run = build_encoder(case)
    model_mib = current_rss_mib()
    seconds, flops, compile_s = [], None, None
    with torch.inference_mode():
        if case.get("compile"):  # the eager row has the FLOPs; the warm-up here is the compilation
            run = torch.compile(run)
            start = time.perf_counter()
            output = run(volume)
            compile_s = round(time.perf_counter() - start, 1)
        elif case["precision"] == "int8":
            output = run(volume)  # warm-up
        else:
            with FlopCounterMode(display=False) as counter:
                output = run(volume)  # warm-up
            flops = counter.get_total_flops()
        for _ in range(case["repeats"]):
            start = time.perf_counter()
            run(volume)
            seconds.append(time.perf_counter() - start)
        skipping = {}
        if case.get("skip_background") is not None:  # the same encoder running every token
            adapter = net.volume_adapter
            kept = adapter._foreground_tokens(slice_groups(volume[None]))
            total = slice_groups(volume[None]).shape[1] * adapter.tokens_per_group
            adapter.skip_background = None
            skipping = {
                "skipped_share": round(1 - (total if kept is None else kept.numel()) / total, 3),
                "max_abs_change": round(float((run(volume) - output).abs().max()), 4),
                "max_abs": round(float(output.abs().max()), 4),
            }
    peak = peak_rss_mib()
    return {
        **{key: value for key, value in case.items() if key not in ("volume", "shape")},
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 1)
        if case["precision"] != "int8"
        else None,
        "tokens": int(output.shape[-2]),
        "flops": flops,
        "gflops": round(flops / 1e9, 3) if flops is not None else None,
        "median_s": round(median_seconds(seconds), 3),
        "min_s": round(min(seconds), 3),
        "peak_mib": round(peak, 1),
        "growth_mib": round(peak - model_mib, 1),
        "compile_s": compile_s,
        **skipping,
    }


def with_peer_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's median over the peer's median in the same precision and compilation (None
    without such a peer row)."""
    peers = {
        (row["precision"], bool(row.get("compile"))): row.get("median_s")
        for row in rows
        if row["model"] == PEER
    }
    for row in rows:
        peer = peers.get((row["precision"], bool(row.get("compile"))))
        row["x_peer"] = round(row["median_s"] / peer, 2) if peer and "median_s" in row else None
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if case_main(argv, run_case):
        return 0
    parser = argparse.ArgumentParser(prog="python -m model_core.bench compare", description=__doc__)
    parser.add_argument(
        "--volume", type=Path, default=DEFAULT_VOLUME, help="a CT file (default: shared torso CT)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="tower sides (default 224 448)")
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"], choices=PRECISIONS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small shapes, to check the benchmark")
    parser.add_argument(
        "--skip-background",
        type=float,
        default=None,
        help="also run ours with background tokens skipping the 3D blocks at this threshold (K > 0)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also run every case through torch.compile (inductor; its compile time is reported, not timed)",
    )
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=Path("bench_results/compare.json"))
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as folder:
        volume_file = Path(folder) / "volume.npy"
        np.save(volume_file, prepared_volume(args.volume, shapes["shape"]))
        common = {
            "quick": args.quick,
            "repeats": args.repeats,
            "volume": str(volume_file),
            "shape": shapes["shape"],
        }
        cases = []
        for precision in args.precisions:
            cases.append({"model": PEER, "precision": precision, "image_size": None, "k": None, **common})
            cases += [
                {"model": OURS, "precision": precision, "image_size": size, "k": k, **common}
                for size in args.sizes or shapes["sizes"]
                for k in args.ks
            ]
            if args.skip_background is not None:
                cases += [
                    {**case, "skip_background": args.skip_background}
                    for case in cases
                    if case["model"] == OURS and case["precision"] == precision and case["k"]
                ]
        if args.compile:
            cases += [{**case, "compile": True} for case in cases if case["precision"] != "int8"]
        rows = with_peer_ratios(run_cases_in_subprocesses("model_core.bench.compare", cases, args.timeout))
    columns = ["model", "precision", "compile", "image_size", "k", "skip_background", "tokens", "gflops"]
    columns += ["median_s", "min_s", "x_peer", "skipped_share", "max_abs_change", "compile_s"]
    settings = vars(args) | {"out": str(args.out), "volume": str(args.volume), "shape": shapes["shape"]}
    write_report(args.out, "compare", rows, columns + ["peak_mib", "growth_mib"], settings)
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
