"""Headless batch runs of the CT-MLLM module: reports and answers for many CT studies, resumable.

In Slicer (this file is ``CTMLLMSlicer/batch.py`` in a source checkout and
``CTMLLMSlicerBatch/batch.py`` beside the module file in the installed extension; docs/SLICER.md
says how to find that folder)::

    Slicer --no-splash --no-main-window --python-script CTMLLMSlicer/batch.py -- \\
        --input IN --output OUT [--task report|vqa] [--routing router|task] [--questions FILE] [--model DIR]
        [--allow-non-ct] [--resume]

With plain Python on the slicer-core wheel (same options)::

    python CTMLLMSlicer/batch.py --input IN --output OUT ...

Exit status: 0 when every case succeeded; 1 when at least one case (or question) failed (see
summary.csv); 2 when the run could not start or had to stop (bad option, no cases, model not
loadable, output folder in use or not writable, disk full, or any unexpected error such as a
missing package: Slicer then exits too, it never hangs); 130 when interrupted (Ctrl-C), 143 when
terminated (SIGTERM). docs/BATCH.md describes inputs, outputs and --resume.
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
    from model_core.hub import add_precision_option

    parser = argparse.ArgumentParser(
        prog="batch.py",
        description="Run the CT-MLLM model over many CT studies: one JSON and one Markdown file per case, "
        "summary.csv and summary.md for the run. Exit status 0 only if every case succeeded.",
    )
    parser.add_argument("--input", type=Path, help="a folder, a volume file, or a .csv/.jsonl list")
    parser.add_argument(
        "--output", required=True, type=Path, help="folder for the results (created if missing)"
    )
    parser.add_argument("--task", default="report", choices=("report", "vqa"), help="default: report")
    parser.add_argument(
        "--routing",
        default="router",
        choices=("router", "task"),
        help="router (default): the model's task router picks each request's expert from its prompt; "
        "task: the report expert writes reports and the question expert answers",
    )
    parser.add_argument(
        "--questions", type=Path, help="questions for every case: a text file, one per line (or a .json list)"
    )
    parser.add_argument("--model", default="demo", help="'demo', a model folder, or a Hugging Face repo id")
    parser.add_argument("--allow-download", action="store_true", help="allow downloading a Hub model")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_precision_option(parser)
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
    parser.add_argument(
        "--sr", action="store_true", help="also write each case's report as a DICOM SR (cases/<id>.sr.dcm)"
    )
    pacs = parser.add_argument_group("PACS over DICOMweb (instead of --input; implies --sr)")
    pacs.add_argument(
        "--dicomweb", metavar="URL", help="the server's DICOMweb root, e.g. https://pacs/dicom-web"
    )
    pacs.add_argument(
        "--study", action="append", default=[], metavar="UID", help="a StudyInstanceUID to read"
    )
    pacs.add_argument("--studies", type=Path, metavar="FILE", help="StudyInstanceUIDs, one per line")
    pacs.add_argument(
        "--query",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="QIDO-RS study search, e.g. StudyDate=20260101-20260131 ModalitiesInStudy=CT",
    )
    pacs.add_argument("--user", default="", help="basic authentication user; password from DICOMWEB_PASSWORD")
    pacs.add_argument("--password-file", type=Path, help="file holding the basic authentication password")
    pacs.add_argument("--token-file", type=Path, help="file holding a bearer token (or set DICOMWEB_TOKEN)")
    pacs.add_argument(
        "--keep-images", action="store_true", help="keep the retrieved images in the output folder"
    )
    pacs.add_argument(
        "--undo-run", metavar="RUN_ID", help="delete from the PACS the SRs that run stored, then exit"
    )
    return parser


def _study_list(args: argparse.Namespace) -> list[str]:
    studies = list(args.study)
    if args.studies:
        lines = Path(args.studies).read_text(encoding="utf-8").splitlines()
        studies += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return studies


def _query(pairs: list[str]) -> dict[str, str]:
    query = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"--query {pair!r}: write KEY=VALUE, e.g. StudyDate=20260101-20260131")
        query[key.strip()] = value.strip()
    return query


def _dicomweb(args: argparse.Namespace) -> tuple[object, object]:
    """The DICOMweb settings and case source of the options; raises with a message naming the option."""
    from CTMLLMSlicerLib.dicomweb_batch import DicomwebSource
    from CTMLLMSlicerLib.dicomweb_connection import settings_from_options

    settings = settings_from_options(
        args.dicomweb, username=args.user, password_file=args.password_file, token_file=args.token_file
    )
    if args.undo_run:
        return settings, None
    source = DicomwebSource(
        settings,
        args.output,
        studies=_study_list(args),
        query=_query(args.query),
        keep_images=args.keep_images,
    )
    return settings, source


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the batch, print where the results are; returns the exit status."""
    _add_import_paths()
    from CTMLLMSlicerLib.batch_run import BatchOptions, run_batch
    from CTMLLMSlicerLib.batch_summary import EXIT_INTERRUPTED

    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["--"]:  # Slicer passes what follows "--" on to the script
        arguments = arguments[1:]
    parser = build_parser()
    args = parser.parse_args(arguments)
    if (args.input is None) == (args.dicomweb is None):
        parser.error("give either --input or --dicomweb")
    source = None
    if args.dicomweb:
        try:
            settings, source = _dicomweb(args)
            if args.undo_run:
                return _undo(settings, args)
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    options = BatchOptions(
        input=args.input,
        output=args.output,
        task=args.task,
        routing=args.routing,
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
        sr=args.sr or source is not None,
    )
    try:
        summary = run_batch(options, command_line=arguments, source=source)
    except KeyboardInterrupt:  # before the first case (imports, discovery, model loading)
        print("interrupted before any case finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary.setup_error or summary.run_error:
        print(summary.status_line(), file=sys.stderr)
    else:
        print(summary.status_line())
        print(f"summary: {summary.output / 'summary.csv'} and {summary.output / 'summary.md'}")
    return summary.exit_code


def _undo(settings: object, args: argparse.Namespace) -> int:
    from CTMLLMSlicerLib.dicomweb_batch import undo_run

    deleted = undo_run(settings, args.output, args.undo_run)
    print(f"deleted {len(deleted)} SR(s) of run {args.undo_run} from {args.dicomweb}")
    return 0


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
