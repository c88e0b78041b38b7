"""``python -m model_core.benchmark build|score``: write the benchmark, or score generated reports.

build: ``--out DIR --train N --val N --test N --seed S --grid D H W [--real-anatomy]``.
score: ``--benchmark DIR --samples samples.csv`` (``model_core.evaluate``'s per-sample output).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from model_core.benchmark.build import BenchmarkConfig, build_benchmark, score_benchmark_reports
from model_core.benchmark.real_anatomy import CT_DIR_ENV
from model_core.data.preprocess import WINDOW_PRESETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_core.benchmark", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="generate the benchmark in M3D-Cap / M3D-VQA formats")
    build.add_argument("--out", required=True, help="output folder (the data root)")
    build.add_argument("--train", type=int, default=200, help="training studies")
    build.add_argument("--val", type=int, default=20, help="validation studies")
    build.add_argument("--test", type=int, default=40, help="test studies (held-out anatomy)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--grid", type=int, nargs=3, default=(32, 128, 128), metavar=("D", "H", "W"))
    build.add_argument(
        "--real-anatomy", action="store_true", help="also insert lesions into the shared real CTs"
    )
    build.add_argument("--real-fraction", type=float, default=0.25, help="share of studies on real CT")
    build.add_argument(
        "--ct-dir",
        default=None,
        help=f"folder of the shared CTs (default ${CT_DIR_ENV} or ../shared/data/ct)",
    )
    build.add_argument(
        "--window", default="soft_tissue", choices=sorted(WINDOW_PRESETS), help="HU window to [0, 1]"
    )
    build.add_argument("--max-questions", type=int, default=6, help="VQA rows per study at most")
    build.add_argument(
        "--fov-shift-share",
        type=float,
        default=0.0,
        help="share of phantoms framed towards the chest or the pelvis (organs in view vary)",
    )
    score = commands.add_parser("score", help="finding-level precision/recall/F1 of generated reports")
    score.add_argument("--benchmark", required=True, help="folder written by build (holds findings.jsonl)")
    score.add_argument("--samples", required=True, help="model_core.evaluate's samples.csv of a report run")
    score.add_argument("--with-level", action="store_true", help="also require the level (third) to match")
    score.add_argument("--out", default=None, help="write the scores to this JSON file too")
    return parser


def _build(args: argparse.Namespace) -> int:
    config = BenchmarkConfig(
        counts={"train": args.train, "validation": args.val, "test": args.test},
        seed=args.seed,
        grid=tuple(args.grid),
        real_anatomy=args.real_anatomy,
        real_fraction=args.real_fraction,
        max_questions=args.max_questions,
        window=args.window,
        ct_dir=args.ct_dir,
        fov_shift_share=args.fov_shift_share,
    )
    counts = build_benchmark(args.out, config, on_progress=lambda line: print(line, file=sys.stderr))
    print(json.dumps({"out": str(args.out), "studies": counts}))
    return 0


def _score(args: argparse.Namespace) -> int:
    scores = score_benchmark_reports(args.benchmark, args.samples, with_level=args.with_level)
    text = json.dumps(scores, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; input errors print one line and return 2 instead of a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return _build(args) if args.command == "build" else _score(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
