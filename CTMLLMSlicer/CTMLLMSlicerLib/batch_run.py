"""A headless batch run: every case of an input through the module's Logic, outputs that survive a kill.

``run_batch(options)`` is the whole run and returns a ``BatchSummary`` (the CLI in
``CTMLLMSlicer/batch.py`` wraps it; a benchmark can time it and read ``cases_per_minute``). In
execution order: lock the output folder and remove leftovers of killed runs -> find the cases ->
load the model once (``CTMLLMLogicCore.loadModel``) -> per case: checksum the input, reuse its
outputs if ``--resume`` allows, else load the volume into the MRML scene (``loadVolumeFile``), run the Logic's
report and questions, write Markdown, scene and the JSON completion record (each atomically),
update the manifest and summaries -> mark the run finished.

A failing case (unreadable, truncated, not CT, empty series, out of memory) is recorded with its
error and the run goes on; Ctrl-C stops after recording what is finished.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from CTMLLMSlicerLib.batch_cases import Case, CaseListError, discover_cases, read_questions_file
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
from CTMLLMSlicerLib.conversation import QUESTION, REPORT, Conversation
from CTMLLMSlicerLib.errors import CTMLLMSlicerError, isOutOfMemory
from CTMLLMSlicerLib.logic import DEVICES, PRECISIONS, WINDOW_PRESETS, CTMLLMLogicCore, ModelRequest
from model_core.data.errors import CTInputError

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


@dataclass(frozen=True)
class BatchOptions:
    """The command line's options. ``task``: ``report`` (a report, plus answers when questions are
    given) or ``vqa`` (answers only; every case needs questions). ``window``: a window preset name,
    empty for the Logic's default. ``max_new_tokens``: None for the model's default.
    ``allow_non_ct``: run on volumes that do not look like CT (scaled by their own percentiles).
    ``routing``: ``router`` or ``task`` (``ROUTINGS``)."""

    input: Path
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
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: use at least 1")


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
    options: BatchOptions, *, progress_stream: TextIO | None = None, command_line: list[str] | None = None
) -> BatchSummary:
    """Run every case of ``options.input``; returns the summary (``exit_code`` says how it went).

    Setup problems (bad options, no cases, model not loadable, output folder busy) come back as
    ``summary.setup_error`` with exit code 2, not as exceptions, so scripts get one account.
    """
    output = Path(options.output).expanduser().resolve()
    run_id = f"{datetime.now():%Y%m%dT%H%M%S}-{os.getpid()}"
    summary = BatchSummary(run_id=run_id, output=output)
    try:
        options.validate()
        output.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as error:
        summary.setup_error = str(error)
        summary.ended = time.perf_counter()
        return summary
    try:
        with RunLock(output):
            remove_partial_files([output, output / CASES_FOLDER])
            _run_locked(options, output, summary, progress_stream or sys.stderr, command_line or [])
    except OutputFolderBusyError as error:
        summary.setup_error = str(error)
    summary.ended = time.perf_counter()
    return summary


def _run_locked(
    options: BatchOptions, output: Path, summary: BatchSummary, stream: TextIO, command_line: list[str]
) -> None:
    context = slicer_context(output / SLICER_LOG)
    summary.environment = context.environment
    manifest, warning = Manifest.load(output)
    if warning:
        stream.write(f"warning: {warning}\n")
    try:
        questions = read_questions_file(options.questions_file) if options.questions_file else []
        cases = discover_cases(options.input, exclude=[output], questions=questions)
    except (CaseListError, ValueError, OSError) as error:  # model_core.data's errors are ValueErrors
        summary.setup_error = str(error)
        write_summaries(summary, running=False)
        return
    summary.outcomes = [CaseOutcome(c.case_id, c.origin, NOT_RUN) for c in cases]
    request = ModelRequest(
        spec=options.model,
        device=options.device,
        precision=options.precision,
        allowDownload=options.allow_download,
    )
    logic = CTMLLMLogicCore(context.scene, nonCTHint=NON_CT_HINT, volumesLogic=context.volumesLogic)
    run = _Run(options, output, context, logic, request, manifest, summary)
    try:
        run.model_info = _load_model(run, stream)
    except (CTMLLMSlicerError, OSError) as error:
        summary.setup_error = str(error)
        write_summaries(summary, running=False)
        return
    manifest.start_run(
        {
            "run_id": summary.run_id,
            "started": _now(),
            "command_line": command_line,
            "input": str(options.input),
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
            "\ninterrupted: the case in progress is dropped; finished cases are kept (use --resume)\n"
        )
    finally:
        manifest.end_run(
            summary.run_id,
            INTERRUPTED if summary.interrupted else FINISHED,
            finished=_now(),
            ok=summary.count(OK),
            failed=summary.count(FAILED),
            not_run=summary.count(NOT_RUN),
        )
        summary.ended = time.perf_counter()
        write_summaries(summary, running=False)


def _load_model(run: _Run, stream: TextIO) -> dict[str, str]:
    """Load the model once through the Logic; its identity and weights checksum for every record."""
    from model_core.model import WEIGHTS_FILE

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
    run.preprocessing = run.logic.preprocessConfig(
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
        input_sha256 = case.input_checksum()
        fingerprint = run.fingerprint(case)
        if run.options.resume:
            required = ("markdown", "scene") if run.options.save_scene else ("markdown",)
            check = check_reusable(run.output, case.case_id, input_sha256, fingerprint, required)
            if check.reusable:
                return _ok_outcome(run, case, check.record, reused=True)
        record = _compute_case(run, case, input_sha256, fingerprint, paths, start)
    except KeyboardInterrupt:
        raise
    except Exception as error:
        outcome = _failed(run, case, error, time.perf_counter() - start)
        _free_memory()
        return outcome
    return _ok_outcome(run, case, record, reused=False, seconds=time.perf_counter() - start)


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
        node, warnings = load_case_volume(run.logic, case)
        timings["load_volume_s"] = round(time.perf_counter() - tick, 3)
        try:
            if run.options.task == REPORT:
                tick = time.perf_counter()
                run.logic.generateReport(node, run.request, **kwargs)
                timings["report_s"] = round(time.perf_counter() - tick, 3)
            timings["questions_s"] = []
            for question in case.questions:
                tick = time.perf_counter()
                run.logic.askQuestion(node, question, run.request, **kwargs)
                timings["questions_s"].append(round(time.perf_counter() - tick, 3))
            conversation = run.logic.conversation(node.GetID())
            run.logic.saveResultToTextNode(node)
            outputs = {}
            atomic_write_text(paths["markdown"], _case_markdown(conversation, case, input_sha256, run))
            outputs["markdown"] = output_entry(paths["markdown"])
            if run.options.save_scene:
                save_scene(run.context.scene, paths["scene"])
                outputs["scene"] = output_entry(paths["scene"])
        finally:
            run.logic.clearConversation(node.GetID())
    timings["total_s"] = round(time.perf_counter() - start, 3)
    record = _case_record(run, case, conversation, input_sha256, fingerprint, started, timings, outputs)
    record["warnings"] = list(dict.fromkeys([*warnings, *run.model_notices, *notices]))
    atomic_write_text(paths["json"], json.dumps(record, indent=2, ensure_ascii=False) + "\n")  # last: commits
    return record


def _case_record(
    run: _Run,
    case: Case,
    conversation: Conversation,
    input_sha256: str,
    fingerprint: dict[str, Any],
    started: str,
    timings: dict[str, Any],
    outputs: dict[str, Any],
) -> dict[str, Any]:
    settings = dict(conversation.settings)
    report_turn = next((t for t in conversation.turns if t.task == REPORT), None)
    answers = [
        {
            "question": t.prompt,
            "answer": t.answer,
            "expert": t.expert,
            "new_tokens": t.newTokens,
            "seconds": t.seconds,
            "cancelled": t.cancelled,
        }
        for t in conversation.turns
        if t.task == QUESTION
    ]
    return {
        "format": CASE_FORMAT,
        "case_id": case.case_id,
        "status": OK,
        "source": str(case.path),
        "kind": case.kind,
        "series_uid": case.series_uid,
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
        answers=len(record.get("answers", [])),
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
        case.case_id, case.origin, FAILED, error_type=type(error).__name__, error=message, seconds=seconds
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


def _describe(error: Exception, case: Case) -> str:
    """Our and ``model_core.data``'s typed errors already name the input; others get the case's origin."""
    if isOutOfMemory(error) and not isinstance(error, CTMLLMSlicerError):
        return f"{case.origin}: out of memory ({error}); use --precision bfloat16, --device cpu or a smaller model"
    text = str(error) or type(error).__name__
    return text if str(case.path) in text or case.origin in text else f"{case.origin}: {text}"


def _free_memory() -> None:
    """After a failure (out of memory in particular) give the memory back before the next case."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
