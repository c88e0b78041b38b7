"""One case of a batch run, from its input to its committed record and outcome.

``batch_run`` drives the run (options, output folder, lock, signals, the loop over cases, the
manifest's run entries); this module is what happens to each case inside that loop: checksum the
input, reuse its outputs if ``--resume`` allows, else load the volume, run the Logic's report and
questions, write Markdown, scene, SR and the JSON completion record (each atomically), and record
the outcome in the manifest. A failing case becomes a failed outcome whose message names the input;
the run goes on. It is separate so that the run's bookkeeping and a case's work each read in one
place.
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
from typing import TYPE_CHECKING, Any, TextIO

from CTMLLMSlicerLib.batch_cases import DICOM, FILE, Case, CaseListError
from CTMLLMSlicerLib.batch_files import atomic_write_text, is_output_problem
from CTMLLMSlicerLib.batch_manifest import CASE_FORMAT, Manifest, case_paths, check_reusable, output_entry
from CTMLLMSlicerLib.batch_scene import (
    SlicerContext,
    load_case_volume,
    nodes_added_during,
    save_scene,
    save_volume,
)
from CTMLLMSlicerLib.batch_sr import case_subject, write_case_sr
from CTMLLMSlicerLib.batch_summary import FAILED, OK, BatchSummary, CaseOutcome
from CTMLLMSlicerLib.conversation import QUESTION, REPORT, Conversation, Turn
from CTMLLMSlicerLib.errors import CTMLLMSlicerError, ModelOutOfMemoryError, isOutOfMemory
from CTMLLMSlicerLib.logic import CTMLLMLogicCore, ModelRequest
from model_core.data.errors import CTInputError, NotCTError
from model_core.data.files import check_readable

if TYPE_CHECKING:
    from CTMLLMSlicerLib.batch_run import BatchOptions, CaseSource

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


@dataclass
class BatchRun:
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


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_case(run: BatchRun, case: Case) -> CaseOutcome:
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
        if is_output_problem(error, run.output):
            raise
        outcome = _failed(run, case, error, time.perf_counter() - start)
        _free_memory()
        return outcome
    return ok_outcome(run, case, record, reused=reused, seconds=time.perf_counter() - start)


def _compute_case(
    run: BatchRun,
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
    started = utc_now()
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


def _answer(run: BatchRun, case: Case, node: Any, question: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One question's entry of the record: its answer, or the error that kept it from one (the case's
    other answers are kept). Out of memory and interruptions end the case, as before."""
    try:
        turn: Turn = run.logic.askQuestion(node, question, run.request, **kwargs).turn
    except (KeyboardInterrupt, ModelOutOfMemoryError):
        raise
    except Exception as error:
        if isOutOfMemory(error) or is_output_problem(error, run.output):
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
    run: BatchRun,
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
        "finished": utc_now(),
    }


def _case_markdown(conversation: Conversation, case: Case, input_sha256: str, run: BatchRun) -> str:
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


def _relative_outputs(run: BatchRun, paths: dict[str, Path], record: dict[str, Any]) -> dict[str, str]:
    kinds = ["json", *record.get("outputs", {})]
    return {kind: os.path.relpath(paths[kind], run.output) for kind in kinds}


def ok_outcome(
    run: BatchRun, case: Case, record: dict[str, Any], *, reused: bool, seconds: float | None = None
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


def committed_in_this_run(run: BatchRun, case: Case) -> dict[str, Any] | None:
    """The case's record if this run committed it (read after an interruption), else None."""
    try:
        record = json.loads(case_paths(run.output, case.case_id)["json"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if record.get("run_id") == run.summary.run_id and record.get("status") == OK else None


def _record_in_manifest(run: BatchRun, case: Case, record: dict[str, Any], outcome: CaseOutcome) -> None:
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


def _failed(run: BatchRun, case: Case, error: Exception, seconds: float) -> CaseOutcome:
    """A failed outcome whose message names the input; unexpected errors leave a traceback in errors.log."""
    message = _describe(error, case)
    if not isinstance(error, _EXPECTED_ERRORS):
        with open(run.output / ERROR_LOG, "a", encoding="utf-8") as log:
            log.write(f"--- {utc_now()} run {run.summary.run_id} case {case.case_id}\n")
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
            "finished": utc_now(),
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
