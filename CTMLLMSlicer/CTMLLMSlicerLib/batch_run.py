"""A headless batch run: every case of an input through the module's Logic, outputs that survive a kill.

``run_batch(options)`` is the whole run and returns a ``BatchSummary`` (the CLI in
``CTMLLMSlicer/batch.py`` wraps it; a benchmark can time it and read ``cases_per_minute``). In
execution order: lock the output folder and remove leftovers of killed runs -> find the cases ->
load the model once (``CTMLLMLogicCore.loadModel``) -> per case (``batch_case_run.run_case``): checksum
the input, reuse its outputs if ``--resume`` allows, else load the volume into the MRML scene, run the
Logic's report and questions, write Markdown, scene and the JSON completion record (each
atomically), update the manifest and summaries -> mark the run finished.

A failing case (unreadable, truncated, not CT, empty series, out of memory) is recorded with its
error and the run goes on; a failing question is recorded with its error and the case's other
answers are kept. Ctrl-C and SIGTERM stop after recording what is finished. Problems of the run
itself (an output folder that cannot be written, a full disk, a model that does not load) stop
it with exit status 2 and a summary that says so.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

from CTMLLMSlicerLib.batch_case_run import (
    NON_CT_HINT,
    ROUTER,
    ROUTINGS,
    BatchRun,
    committed_in_this_run,
    ok_outcome,
    run_case,
    utc_now,
)
from CTMLLMSlicerLib.batch_cases import Case, CaseListError, discover_cases, read_questions_file
from CTMLLMSlicerLib.batch_files import (
    OutputFolderBusyError,
    OutputWriteError,
    RunLock,
    check_writable,
    is_output_problem,
    output_problem,
    remove_partial_files,
    sha256_file,
)
from CTMLLMSlicerLib.batch_manifest import (
    CASES_FOLDER,
    FINISHED,
    INTERRUPTED,
    STOPPED,
    Manifest,
)
from CTMLLMSlicerLib.batch_scene import (
    slicer_context,
)
from CTMLLMSlicerLib.batch_summary import (
    FAILED,
    NOT_RUN,
    OK,
    BatchSummary,
    CaseOutcome,
    ProgressLine,
    write_summaries,
)
from CTMLLMSlicerLib.conversation import QUESTION, REPORT
from CTMLLMSlicerLib.errors import CTMLLMSlicerError
from CTMLLMSlicerLib.logic import DEVICES, PRECISIONS, WINDOW_PRESETS, CTMLLMLogicCore, ModelRequest
from model_core.config import check_max_new_tokens

TASKS = (REPORT, QUESTION)
SLICER_LOG = "slicer.log"


@dataclass(frozen=True)
class BatchOptions:
    """The command line's options. ``task``: ``report`` (a report, plus answers when questions are
    given) or ``vqa`` (answers only; every case needs questions). ``window``: a window preset name,
    empty for the Logic's default. ``max_new_tokens``: None for the model's default.
    ``allow_non_ct``: run on volumes that do not look like CT (scaled by their own percentiles).
    ``sr``: also write each case's DICOM Structured Report (``cases/<id>.sr.dcm``, see ``batch_sr``).
    ``input``: None when a ``CaseSource`` (a DICOMweb server) gives the cases.
    ``routing``: ``router`` or ``task`` (``ROUTINGS``)."""

    input: Path | None
    output: Path
    task: str = REPORT
    questions_file: Path | None = None
    model: str = "demo"
    device: str = "auto"
    precision: str = "auto"
    max_new_tokens: int | None = None
    window: str = ""
    save_scene: bool = False
    resume: bool = False
    allow_download: bool = False
    allow_non_ct: bool = False
    sr: bool = False
    routing: str = ROUTER

    def validate(self) -> None:
        """Refuse option values before anything runs, naming the option and the accepted values."""
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r}: use report or vqa")
        if self.routing not in ROUTINGS:
            raise ValueError(f"--routing {self.routing!r}: use one of {', '.join(ROUTINGS)}")
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.window and self.window not in WINDOW_PRESETS:
            raise ValueError(f"--window {self.window!r}: use one of {', '.join(WINDOW_PRESETS)}")
        check_max_new_tokens(self.max_new_tokens, "--max-new-tokens")  # as the CLI and the panel


class CaseSource(Protocol):
    """Where cases come from and where results go, when not a folder (``dicomweb_batch``).

    ``discover`` lists the cases (raising ``CaseListError`` when it cannot); ``prepare`` makes a
    case's files local before it is computed (resumed cases skip it); ``deliver`` runs after a
    case's record is committed, computed or reused (so a run killed between the two delivers on
    resume), and returns notes for the progress line. An error in either fails that case only.
    """

    description: str

    def discover(self) -> list[Case]: ...

    def prepare(self, case: Case) -> Case: ...

    def deliver(self, case: Case, record: dict[str, Any], paths: dict[str, Path], run_id: str) -> str: ...


def run_batch(
    options: BatchOptions,
    *,
    progress_stream: TextIO | None = None,
    command_line: list[str] | None = None,
    source: CaseSource | None = None,
) -> BatchSummary:
    """Run every case of ``options.input``; returns the summary (``exit_code`` says how it went).

    Setup problems (bad options, no cases, model not loadable, output folder busy) come back as
    ``summary.setup_error`` with exit code 2, not as exceptions, so scripts get one account.
    ``source``: where the cases come from instead of ``options.input`` (a DICOMweb server).
    """
    output = Path(options.output).expanduser().resolve()
    run_id = f"{datetime.now():%Y%m%dT%H%M%S}-{os.getpid()}"
    summary = BatchSummary(run_id=run_id, output=output)
    try:
        options.validate()
        output.mkdir(parents=True, exist_ok=True)
        check_writable(output)
    except (ValueError, OSError) as error:
        summary.setup_error = output_problem(error, output) if isinstance(error, OSError) else str(error)
        summary.ended = time.perf_counter()
        if not isinstance(error, OutputWriteError) and output.is_dir():
            _write_summaries_safely(summary, running=False)  # no stale summary of an earlier run
        return summary
    with _sigterm_as_interrupt(summary):
        try:
            with RunLock(output):
                remove_partial_files([output, output / CASES_FOLDER])
                _run_locked(
                    options, output, summary, progress_stream or sys.stderr, command_line or [], source
                )
        except OutputFolderBusyError as error:
            summary.setup_error = str(error)
        except OSError as error:  # the manifest or a summary could not be written before any case ran
            if not is_output_problem(error, output):
                raise
            summary.setup_error = output_problem(error, output)
        except KeyboardInterrupt:  # before the first case: while finding cases or loading the model
            summary.interrupted = True
            _write_summaries_safely(summary, running=False)
    summary.ended = time.perf_counter()
    return summary


def _write_summaries_safely(summary: BatchSummary, *, running: bool) -> None:
    """Write the summaries; when the folder refuses them, say so on stderr instead of crashing."""
    try:
        write_summaries(summary, running=running)
    except OSError as error:
        sys.stderr.write(f"could not write the summary into {summary.output}: {error.strerror or error}\n")


@contextmanager
def _sigterm_as_interrupt(summary: BatchSummary) -> Iterator[None]:
    """SIGTERM (``timeout``, systemd, Slurm) ends the run as Ctrl-C does: finished cases kept,
    the manifest marked interrupted. Only the main thread may install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(_signal: int, _frame) -> None:
        summary.interrupted_by = "SIGTERM"
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_locked(
    options: BatchOptions,
    output: Path,
    summary: BatchSummary,
    stream: TextIO,
    command_line: list[str],
    source: CaseSource | None,
) -> None:
    context = slicer_context(output / SLICER_LOG)
    summary.environment = context.environment
    manifest, warning = Manifest.load(output)
    if warning:
        stream.write(f"warning: {warning}\n")
    try:
        questions = read_questions_file(options.questions_file) if options.questions_file else []
        if source is not None:
            cases = source.discover()
            cases = [c if c.questions else replace(c, questions=tuple(questions)) for c in cases]
        else:
            cases = discover_cases(options.input, exclude=[output], questions=questions)
    except (CaseListError, ValueError, OSError) as error:  # model_core.data's errors are ValueErrors
        summary.setup_error = str(error)
        _write_summaries_safely(summary, running=False)
        return
    summary.outcomes = [CaseOutcome(c.case_id, c.origin, NOT_RUN) for c in cases]
    request = ModelRequest(
        spec=options.model,
        device=options.device,
        precision=options.precision,
        allowDownload=options.allow_download,
    )
    logic = CTMLLMLogicCore(context.scene, nonCTHint=NON_CT_HINT, volumesLogic=context.volumesLogic)
    run = BatchRun(options, output, context, logic, request, manifest, summary, source=source, stream=stream)
    try:
        run.model_info = _load_model(run, stream)
    except (CTMLLMSlicerError, OSError, ValueError) as error:  # ValueError: model_core's ConfigError
        summary.setup_error = str(error)
        _write_summaries_safely(summary, running=False)
        return
    manifest.start_run(
        {
            "run_id": summary.run_id,
            "started": utc_now(),
            "command_line": command_line,
            "input": source.description if source is not None else str(options.input),
            "model": run.model_info,
            "environment": context.environment,
            "cases": len(cases),
        }
    )
    progress = ProgressLine(len(cases), stream)
    index = 0
    try:
        for index, case in enumerate(cases):
            progress.case_started(case.case_id)
            outcome = run_case(run, case)
            summary.outcomes[index] = outcome
            progress.case_finished(outcome)
            write_summaries(summary, running=True)
    except KeyboardInterrupt:
        summary.interrupted = True
        if cases and summary.outcomes[index].status == NOT_RUN:  # Ctrl-C may land just after its commit
            record = committed_in_this_run(run, cases[index])
            if record is not None:
                summary.outcomes[index] = ok_outcome(run, cases[index], record, reused=False)
        stream.write(
            f"\ninterrupted ({summary.interrupted_by}): the case in progress is dropped; finished cases are "
            "kept (use --resume)\n"
        )
    except OSError as error:
        if not is_output_problem(error, output):
            raise
        summary.run_error = output_problem(error, output)
        stream.write(f"\nrun stopped: {summary.run_error}\n")
    finally:
        status = INTERRUPTED if summary.interrupted else (STOPPED if summary.run_error else FINISHED)
        try:
            manifest.end_run(
                summary.run_id,
                status,
                finished=utc_now(),
                ok=summary.count(OK),
                failed=summary.count(FAILED),
                not_run=summary.count(NOT_RUN),
                **({"error": summary.run_error} if summary.run_error else {}),
            )
        except OSError as error:
            stream.write(f"could not update the manifest: {error.strerror or error}\n")
        summary.ended = time.perf_counter()
        _write_summaries_safely(summary, running=False)


def _load_model(run: BatchRun, stream: TextIO) -> dict[str, str]:
    """Load the model once through the Logic; its identity and weights checksum for every record."""
    from model_core.model_files import WEIGHTS_FILE

    start = time.perf_counter()

    def notice(message: str) -> None:
        run.model_notices.append(message)
        stream.write(f"note: {message}\n")

    model = run.logic.loadModel(run.request, noticeCallback=notice)
    run.summary.model_load_seconds = time.perf_counter() - start
    folder = Path(model.model_dir) if getattr(model, "model_dir", None) else None
    weights = folder / WEIGHTS_FILE if folder else None
    run.summary.model_id = model.model_id
    run.summary.model_sha256 = sha256_file(weights) if weights and weights.is_file() else ""
    run.preprocessing = run.logic.preprocessConfig(  # ConfigError for a model's bad preprocessing
        model, run.options.window, run.options.allow_non_ct
    ).to_dict()
    return {
        "id": model.model_id,
        "spec": run.request.spec,
        "path": str(folder or ""),
        "sha256": run.summary.model_sha256,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
    }
