"""A headless batch run: every case of an input through the module's Logic, outputs that survive a kill.

``run_batch(options)`` is the whole run and returns a ``BatchSummary`` (the CLI in
``CTMLLMSlicer/batch.py`` wraps it; a benchmark can time it and read ``cases_per_minute``). In
execution order: lock the output folder and remove leftovers of killed runs -> find the cases ->
load the model once (``CTMLLMLogicCore.loadModel``) -> per case: checksum the input, reuse its
outputs if ``--resume`` allows, else load the volume into the MRML scene (``load_case_volume``), run the Logic's
report and questions, write Markdown, scene and the JSON completion record (each atomically),
update the manifest and summaries -> mark the run finished.

A failing case (unreadable, truncated, not CT, empty series, out of memory) is recorded with its
error and the run goes on; a failing question is recorded with its error and the case's other
answers are kept. Ctrl-C and SIGTERM stop after recording what is finished. Problems of the run
itself (an output folder that cannot be written, a full disk, a model that does not load) stop
it with exit status 2 and a summary that says so.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TextIO

from CTMLLMSlicerLib.batch_cases import DICOM, FILE, Case, CaseListError, discover_cases, read_questions_file
from CTMLLMSlicerLib.batch_files import (
    OutputFolderBusyError,
    RunLock,
    atomic_write_text,
    remove_partial_files,
    sha256_file,
)
from CTMLLMSlicerLib.batch_manifest import (
    CASE_FORMAT,
    CASES_FOLDER,
    FINISHED,
    INTERRUPTED,
    STOPPED,
    Manifest,
    case_paths,
    check_reusable,
    output_entry,
)
from CTMLLMSlicerLib.batch_scene import (
    SlicerContext,
    load_case_volume,
    nodes_added_during,
    save_scene,
    save_volume,
    slicer_context,
)
from CTMLLMSlicerLib.batch_sr import case_subject, write_case_sr
from CTMLLMSlicerLib.batch_summary import (
    FAILED,
    NOT_RUN,
    OK,
    BatchSummary,
    CaseOutcome,
    ProgressLine,
    write_summaries,
)
from CTMLLMSlicerLib.conversation import QUESTION, REPORT, Conversation, Turn
from CTMLLMSlicerLib.errors import CTMLLMSlicerError, ModelOutOfMemoryError, isOutOfMemory
from CTMLLMSlicerLib.logic import DEVICES, PRECISIONS, WINDOW_PRESETS, CTMLLMLogicCore, ModelRequest
from model_core.config import check_max_new_tokens
from model_core.data.errors import CTInputError, NotCTError
from model_core.data.files import check_readable

TASKS = (REPORT, QUESTION)
ROUTER = "router"
FORCED = "task"
ROUTINGS = (ROUTER, FORCED)
"""``--routing``: the model's task router picks each request's expert from its prompt (default), or
the task forces it (the report expert writes the report, the question expert answers)."""
_EXPECTED_ERRORS = (CTMLLMSlicerError, CTInputError, CaseListError, OSError)
"""Errors about the input, the model or the disk, whose message says it all; others are bugs to report."""
NON_CT_HINT = "pass --allow-non-ct"
"""How the Logic's refusal of a non-CT volume tells a batch user to accept it."""
ERROR_LOG = "errors.log"
SLICER_LOG = "slicer.log"
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
"""Errors writing outputs that every later case would hit too: the run stops instead."""


class OutputWriteError(OSError):
    """The output folder cannot take more files (full disk, read-only, no permission): a run-level error."""


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


@dataclass
class _Run:
    """What every case of one run shares: options, scene, Logic, model identity, manifest."""

    options: BatchOptions
    output: Path
    context: SlicerContext
    logic: CTMLLMLogicCore
    request: ModelRequest
    manifest: Manifest
    summary: BatchSummary
    model_info: dict[str, str] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    """The Logic's preprocessing for this model and window (it lives in the model's config, not its weights)."""
    model_notices: list[str] = field(default_factory=list)
    """What loading the model said (e.g. a stand-in model is used): a warning in every record."""
    source: CaseSource | None = None
    stream: TextIO = sys.stderr

    def fingerprint(self, case: Case) -> dict[str, Any]:
        """Everything besides the input that changes a case's text: equal fingerprints allow reuse."""
        return {
            "model_sha256": self.model_info["sha256"],
            "preprocessing": self.preprocessing,
            "task": self.options.task,
            "routing": self.options.routing,
            "questions": list(case.questions),
            "max_new_tokens": self.options.max_new_tokens,
            "window": self.options.window,
            "precision": self.options.precision,
            "allow_non_ct": self.options.allow_non_ct,
        }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        _check_writable(output)
    except (ValueError, OSError) as error:
        summary.setup_error = _output_problem(error, output) if isinstance(error, OSError) else str(error)
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
            if not _is_output_problem(error, output):
                raise
            summary.setup_error = _output_problem(error, output)
        except KeyboardInterrupt:  # before the first case: while finding cases or loading the model
            summary.interrupted = True
            _write_summaries_safely(summary, running=False)
    summary.ended = time.perf_counter()
    return summary


def _check_writable(output: Path) -> None:
    """Fail now, not after the model has loaded, when the output folder takes no files."""
    probe = output / f".write-test.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputWriteError(error.errno, _output_problem(error, output)) from error


def _output_problem(error: OSError, output: Path) -> str:
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk of the output folder {output} is full ({reason}): free space or choose another --output"
    if isinstance(error, OutputWriteError):
        return str(error.strerror or error)
    return f"the output folder {output} cannot be written ({reason}): fix its permissions or choose another --output"


def _is_output_problem(error: BaseException, output: Path) -> bool:
    """A full disk, a read-only file system, or a refused write inside the output folder."""
    if not isinstance(error, OSError):
        return False
    if error.errno in _OUTPUT_ERRNOS or isinstance(error, OutputWriteError):
        return True
    name = str(error.filename or "")
    return isinstance(error, PermissionError) and name.startswith(str(output))


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
    run = _Run(options, output, context, logic, request, manifest, summary, source=source, stream=stream)
    try:
        run.model_info = _load_model(run, stream)
    except (CTMLLMSlicerError, OSError, ValueError) as error:  # ValueError: model_core's ConfigError
        summary.setup_error = str(error)
        _write_summaries_safely(summary, running=False)
        return
    manifest.start_run(
        {
            "run_id": summary.run_id,
            "started": _now(),
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
            outcome = _run_case(run, case)
            summary.outcomes[index] = outcome
            progress.case_finished(outcome)
            write_summaries(summary, running=True)
    except KeyboardInterrupt:
        summary.interrupted = True
        if cases and summary.outcomes[index].status == NOT_RUN:  # Ctrl-C may land just after its commit
            record = _committed_in_this_run(run, cases[index])
            if record is not None:
                summary.outcomes[index] = _ok_outcome(run, cases[index], record, reused=False)
        stream.write(
            f"\ninterrupted ({summary.interrupted_by}): the case in progress is dropped; finished cases are "
            "kept (use --resume)\n"
        )
    except OSError as error:
        if not _is_output_problem(error, output):
            raise
        summary.run_error = _output_problem(error, output)
        stream.write(f"\nrun stopped: {summary.run_error}\n")
    finally:
        status = INTERRUPTED if summary.interrupted else (STOPPED if summary.run_error else FINISHED)
        try:
            manifest.end_run(
                summary.run_id,
                status,
                finished=_now(),
                ok=summary.count(OK),
                failed=summary.count(FAILED),
                not_run=summary.count(NOT_RUN),
                **({"error": summary.run_error} if summary.run_error else {}),
            )
        except OSError as error:
            stream.write(f"could not update the manifest: {error.strerror or error}\n")
        summary.ended = time.perf_counter()
        _write_summaries_safely(summary, running=False)


def _load_model(run: _Run, stream: TextIO) -> dict[str, str]:
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


def _run_case(run: _Run, case: Case) -> CaseOutcome:
    """One case from input to recorded outcome; any error becomes a failed outcome, the run goes on."""
    start = time.perf_counter()
    paths = case_paths(run.output, case.case_id)
    try:
        if case.kind == FILE:
            check_readable(case.path)  # missing or unreadable: the verdict read_ct gives, not an OSError
        input_sha256 = case.input_checksum()
        fingerprint = run.fingerprint(case)
        record = None
        if run.options.resume:
            required = [
                "markdown",
                *(["scene"] if run.options.save_scene else []),
                *(["sr"] if run.options.sr else []),
            ]
            check = check_reusable(run.output, case.case_id, input_sha256, fingerprint, required)
            record = check.record
        reused = record is not None
        if record is None:
            case = run.source.prepare(case) if run.source is not None else case
            record = _compute_case(run, case, input_sha256, fingerprint, paths, start)
        if run.source is not None:
            note = run.source.deliver(case, record, paths, run.summary.run_id)
            run.stream.write(f"{case.case_id}: {note}\n")
    except KeyboardInterrupt:
        raise
    except Exception as error:
        if _is_output_problem(error, run.output):
            raise
        outcome = _failed(run, case, error, time.perf_counter() - start)
        _free_memory()
        return outcome
    return _ok_outcome(run, case, record, reused=reused, seconds=time.perf_counter() - start)


def _compute_case(
    run: _Run,
    case: Case,
    input_sha256: str,
    fingerprint: dict[str, Any],
    paths: dict[str, Path],
    start: float,
) -> dict[str, Any]:
    """Load the volume into the scene, run the Logic, write the outputs; returns the case record."""
    if run.options.task == QUESTION and not case.questions:
        raise CaseListError(
            f"{case.origin}: task vqa needs questions: pass --questions FILE, or a 'question' column in the case list"
        )
    started = _now()
    timings: dict[str, Any] = {}
    notices: list[str] = []
    subject = case_subject(case) if run.options.sr else None  # before the model: fail fast
    if subject is not None:
        notices += subject.notices
    kwargs = {
        "windowPreset": run.options.window,
        "maxNewTokens": run.options.max_new_tokens,
        "noticeCallback": notices.append,
        "allowNonCT": run.options.allow_non_ct,
        "forceExpert": run.options.routing == FORCED,
    }
    timings["checksum_s"] = round(time.perf_counter() - start, 3)
    with nodes_added_during(run.context.scene):
        tick = time.perf_counter()
        node, warnings = load_case_volume(run.logic, case, allow_non_ct=run.options.allow_non_ct)
        timings["load_volume_s"] = round(time.perf_counter() - tick, 3)
        try:
            if run.options.task == REPORT:
                tick = time.perf_counter()
                run.logic.generateReport(node, run.request, **kwargs)
                timings["report_s"] = round(time.perf_counter() - tick, 3)
            timings["questions_s"] = []
            answers = []
            for question in case.questions:
                tick = time.perf_counter()
                answers.append(_answer(run, case, node, question, kwargs))
                timings["questions_s"].append(round(time.perf_counter() - tick, 3))
            if answers and all("error" in a for a in answers) and run.options.task == QUESTION:
                raise CaseListError(f"{case.origin}: no question got an answer: {answers[0]['error']}")
            conversation = run.logic.conversation(node.GetID())
            run.logic.saveResultToTextNode(node)
            outputs = {}
            atomic_write_text(paths["markdown"], _case_markdown(conversation, case, input_sha256, run))
            outputs["markdown"] = output_entry(paths["markdown"])
            if run.options.save_scene:
                if case.kind == DICOM:  # read by model_core, not from a file Slicer could point at
                    save_volume(node, paths["volume"])
                    outputs["volume"] = output_entry(paths["volume"])
                save_scene(run.context.scene, paths["scene"])
                outputs["scene"] = output_entry(paths["scene"])
            if subject is not None:
                write_case_sr(paths["sr"], subject, conversation, run.model_info, input_sha256, fingerprint)
                outputs["sr"] = output_entry(paths["sr"])
        finally:
            run.logic.clearConversation(node.GetID())
    timings["total_s"] = round(time.perf_counter() - start, 3)
    record = _case_record(
        run, case, conversation, answers, input_sha256, fingerprint, started, timings, outputs
    )
    failed = [a for a in answers if "error" in a]
    unanswered = (
        [f"{len(failed)} of {len(answers)} question(s) got an error: {failed[0]['error']}"] if failed else []
    )
    record["warnings"] = list(dict.fromkeys([*warnings, *run.model_notices, *notices, *unanswered]))
    atomic_write_text(paths["json"], json.dumps(record, indent=2, ensure_ascii=False) + "\n")  # last: commits
    return record


def _answer(run: _Run, case: Case, node: Any, question: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One question's entry of the record: its answer, or the error that kept it from one (the case's
    other answers are kept). Out of memory and interruptions end the case, as before."""
    try:
        turn: Turn = run.logic.askQuestion(node, question, run.request, **kwargs).turn
    except (KeyboardInterrupt, ModelOutOfMemoryError):
        raise
    except Exception as error:
        if isOutOfMemory(error) or _is_output_problem(error, run.output):
            raise
        return {"question": question, "answer": None, "error": _describe(error, case)}
    return {
        "question": turn.prompt,
        "answer": turn.answer,
        "expert": turn.expert,
        "new_tokens": turn.newTokens,
        "seconds": turn.seconds,
        "cancelled": turn.cancelled,
    }


def _case_record(
    run: _Run,
    case: Case,
    conversation: Conversation,
    answers: list[dict[str, Any]],
    input_sha256: str,
    fingerprint: dict[str, Any],
    started: str,
    timings: dict[str, Any],
    outputs: dict[str, Any],
) -> dict[str, Any]:
    settings = dict(conversation.settings)
    report_turn = next((t for t in conversation.turns if t.task == REPORT), None)
    return {
        "format": CASE_FORMAT,
        "case_id": case.case_id,
        "status": OK,
        "source": str(case.path),
        "kind": case.kind,
        "series_uid": case.series_uid,
        "series_grouping": case.series.grouping if case.series is not None else None,
        "input_sha256": input_sha256,
        "model": run.model_info,
        "task": run.options.task,
        "routing": run.options.routing,
        "report": report_turn.answer if report_turn else None,
        "report_expert": report_turn.expert if report_turn else None,
        "answers": answers,
        "preprocessing": settings.pop("preprocessing", None),  # as the Logic applied it
        "generation": {**settings, "max_new_tokens": run.options.max_new_tokens or "model default"},
        "timings": timings,
        "warnings": [],
        "fingerprint": fingerprint,
        "outputs": outputs,
        "environment": run.context.environment,
        "run_id": run.summary.run_id,
        "started": started,
        "finished": _now(),
    }


def _case_markdown(conversation: Conversation, case: Case, input_sha256: str, run: _Run) -> str:
    """The Logic's Markdown export, followed by where the case came from and its checksums."""
    lines = [
        conversation.toMarkdown().rstrip(),
        "",
        "## Case",
        "",
        f"- Case id: `{case.case_id}`",
        f"- Input: `{case.path}`" + (f" (series `{case.series_uid}`)" if case.series_uid else ""),
        f"- Input sha256: `{input_sha256}`",
        f"- Model sha256: `{run.model_info['sha256'] or 'unknown'}`",
        f"- Batch run: `{run.summary.run_id}`",
    ]
    return "\n".join(lines) + "\n"


def _relative_outputs(run: _Run, paths: dict[str, Path], record: dict[str, Any]) -> dict[str, str]:
    kinds = ["json", *record.get("outputs", {})]
    return {kind: os.path.relpath(paths[kind], run.output) for kind in kinds}


def _ok_outcome(
    run: _Run, case: Case, record: dict[str, Any], *, reused: bool, seconds: float | None = None
) -> CaseOutcome:
    """The outcome of a case whose record is committed; its manifest entry is written if it lacks one."""
    outcome = CaseOutcome(
        case.case_id,
        case.origin,
        OK,
        reused=reused,
        seconds=0.0 if reused else (seconds if seconds is not None else record["timings"]["total_s"]),
        answers=sum(1 for a in record.get("answers", []) if "error" not in a),
        failed_questions=sum(1 for a in record.get("answers", []) if "error" in a),
        warnings=list(record.get("warnings", [])),
        outputs=_relative_outputs(run, case_paths(run.output, case.case_id), record),
    )
    entry = run.manifest.cases.get(case.case_id, {})
    if entry.get("status") != OK or entry.get("run_id") != record.get("run_id"):
        _record_in_manifest(run, case, record, outcome)  # also after a kill between record and manifest
    return outcome


def _committed_in_this_run(run: _Run, case: Case) -> dict[str, Any] | None:
    """The case's record if this run committed it (read after an interruption), else None."""
    try:
        record = json.loads(case_paths(run.output, case.case_id)["json"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if record.get("run_id") == run.summary.run_id and record.get("status") == OK else None


def _record_in_manifest(run: _Run, case: Case, record: dict[str, Any], outcome: CaseOutcome) -> None:
    run.manifest.record_case(
        case.case_id,
        {
            "status": OK,
            "source": case.origin,
            "input_sha256": record["input_sha256"],
            "run_id": record["run_id"],
            "finished": record["finished"],
            "outputs": outcome.outputs,
        },
    )


def _failed(run: _Run, case: Case, error: Exception, seconds: float) -> CaseOutcome:
    """A failed outcome whose message names the input; unexpected errors leave a traceback in errors.log."""
    message = _describe(error, case)
    if not isinstance(error, _EXPECTED_ERRORS):
        with open(run.output / ERROR_LOG, "a", encoding="utf-8") as log:
            log.write(f"--- {_now()} run {run.summary.run_id} case {case.case_id}\n")
            log.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        message += f" (traceback in {ERROR_LOG})"
    outcome = CaseOutcome(
        case.case_id, case.origin, FAILED, error_type=verdict_name(error), error=message, seconds=seconds
    )
    run.manifest.record_case(
        case.case_id,
        {
            "status": FAILED,
            "source": case.origin,
            "run_id": run.summary.run_id,
            "finished": _now(),
            "error_type": outcome.error_type,
            "error": message,
        },
    )
    return outcome


def verdict_name(error: BaseException) -> str:
    """The error's type, or for the Logic's wrapping of an input verdict the verdict itself
    (``NotCTError``, ``TooFewSlicesError``...): the same name ``read_ct`` and the CLI give."""
    cause = error.__cause__
    if isinstance(error, CTMLLMSlicerError) and isinstance(cause, CTInputError):
        return type(cause).__name__
    return type(error).__name__


def _describe(error: Exception, case: Case) -> str:
    """Our and ``model_core.data``'s typed errors already name the input; others get the case's origin."""
    if isOutOfMemory(error) and not isinstance(error, CTMLLMSlicerError):
        return f"{case.origin}: out of memory ({error}); use --precision bfloat16, --device cpu or a smaller model"
    if isinstance(error, NotCTError):
        error = error.with_hint(NON_CT_HINT)
    text = " ".join((str(error) or type(error).__name__).split())
    return text if str(case.path) in text or case.origin in text else f"{case.origin}: {text}"


def _free_memory() -> None:
    """After a failure (out of memory in particular) give the memory back before the next case."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
