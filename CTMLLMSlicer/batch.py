"""Headless batch runs of the CT-MLLM module: reports and answers for many CT studies, resumable.

In Slicer (this file is ``CTMLLMSlicer/batch.py`` in a source checkout and
``CTMLLMSlicerBatch/batch.py`` beside the module file in the installed extension; docs/SLICER.md
says how to find that folder)::

    Slicer --no-splash --no-main-window --python-script CTMLLMSlicer/batch.py -- \\
        --input IN --output OUT [--task report|vqa] [--questions FILE] [--model DIR] [--allow-non-ct] [--resume]

With plain Python on the slicer-core wheel (same options)::

    python CTMLLMSlicer/batch.py --input IN --output OUT ...

Exit status: 0 when every case succeeded; 1 when at least one case failed (see summary.csv);
2 when the run could not start (bad option, no cases, model not loadable, output folder in use,
or any unexpected error such as a missing package: Slicer then exits too, it never hangs);
130 when interrupted (Ctrl-C). docs/BATCH.md describes inputs, outputs and --resume.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path


def _add_import_paths() -> None:
    """Make ``CTMLLMSlicerLib`` (next to this file) and ``model_core`` (repo root) importable from any cwd.

    Inside Slicer the module folder is on the path already and ``model_core`` is bundled next to
    the module; in a checkout ``model_core`` may also be installed in editable mode.
    """
    script = Path(globals().get("__file__") or sys.argv[0]).resolve()
    for folder in (script.parent, script.parent.parent):
        if str(folder) not in sys.path:
            sys.path.insert(0 if folder == script.parent else len(sys.path), str(folder))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batch.py",
        description="Run the CT-MLLM model over many CT studies: one JSON and one Markdown file per case, "
        "summary.csv and summary.md for the run. Exit status 0 only if every case succeeded.",
    )
    parser.add_argument(
        "--input", required=True, type=Path, help="a folder, a volume file, or a .csv/.jsonl list"
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="folder for the results (created if missing)"
    )
    parser.add_argument("--task", default="report", choices=("report", "vqa"), help="default: report")
    parser.add_argument(
        "--questions", type=Path, help="questions for every case: a text file, one per line (or a .json list)"
    )
    parser.add_argument("--model", default="demo", help="'demo', a model folder, or a Hugging Face repo id")
    parser.add_argument("--allow-download", action="store_true", help="allow downloading a Hub model")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--max-new-tokens", type=int, help="answer length limit (default: the model's)")
    parser.add_argument(
        "--window", default="", help="HU window preset for the model's input (default: the Logic's)"
    )
    parser.add_argument(
        "--allow-non-ct",
        action="store_true",
        help="accept volumes that do not look like CT (MR, normalised images), scaled by their own percentiles",
    )
    parser.add_argument(
        "--save-scene", action="store_true", help="also write each case's MRML scene with its report"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip cases whose outputs are complete and whose input is unchanged",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the batch, print where the results are; returns the exit status."""
    _add_import_paths()
    from CTMLLMSlicerLib.batch_run import BatchOptions, run_batch
    from CTMLLMSlicerLib.batch_summary import EXIT_INTERRUPTED

    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["--"]:  # Slicer passes what follows "--" on to the script
        arguments = arguments[1:]
    args = build_parser().parse_args(arguments)
    options = BatchOptions(
        input=args.input,
        output=args.output,
        task=args.task,
        questions_file=args.questions,
        model=args.model,
        device=args.device,
        precision=args.precision,
        max_new_tokens=args.max_new_tokens,
        window=args.window,
        save_scene=args.save_scene,
        resume=args.resume,
        allow_download=args.allow_download,
        allow_non_ct=args.allow_non_ct,
    )
    try:
        summary = run_batch(options, command_line=arguments)
    except KeyboardInterrupt:  # before the first case (imports, discovery, model loading)
        print("interrupted before any case finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary.setup_error:
        print(summary.status_line(), file=sys.stderr)
    else:
        print(summary.status_line())
        print(f"summary: {summary.output / 'summary.csv'} and {summary.output / 'summary.md'}")
    return summary.exit_code


def _exit(status: int) -> None:
    """Leave with ``status``: through the application inside Slicer, ``sys.exit`` elsewhere."""
    import slicer

    if hasattr(slicer, "app"):
        slicer.util.exit(status)
    else:
        sys.exit(status)


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as error:  # argparse: --help (0) and usage errors (2), as documented
        code = error.code if isinstance(error.code, int) else (0 if error.code is None else 2)
    except KeyboardInterrupt:
        code = 130
    except BaseException as error:  # anything else (a missing package, a bug): say so and exit 2, never hang
        traceback.print_exc()
        print(f"batch.py: the run could not start: {type(error).__name__}: {error}", file=sys.stderr)
        code = 2
    _exit(code)  # inside Slicer an uncaught exception would leave the application running, windowless
