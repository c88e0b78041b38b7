"""The run's account of itself: one outcome per case, ``summary.csv``/``summary.md``, the progress line.

The summaries are rewritten (atomically) after every case, so an overnight run can be watched
and a killed run still leaves an accurate account of what it finished.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from CTMLLMSlicerLib.batch_files import atomic_write_text

OK = "ok"
FAILED = "failed"
NOT_RUN = "not run"

EXIT_OK = 0
EXIT_CASES_FAILED = 1
EXIT_SETUP_FAILED = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
"""128 + SIGTERM: the run was stopped by ``timeout``, systemd or Slurm, and ended like Ctrl-C."""

SUMMARY_COLUMNS = (
    "case_id",
    "status",
    "reused",
    "error_type",
    "error",
    "source",
    "seconds",
    "answers",
    "warnings",
    "json",
    "markdown",
    "scene",
)


@dataclass
class CaseOutcome:
    """How one case ended in this run. ``reused``: its complete outputs came from an earlier run."""

    case_id: str
    source: str
    status: str
    reused: bool = False
    error_type: str = ""
    error: str = ""
    seconds: float = 0.0
    answers: int = 0
    warnings: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    """Output kind (``json``, ``markdown``, ``scene``, ``volume``) -> path relative to the output folder."""
    failed_questions: int = 0
    """Questions of an ``ok`` case that got an error instead of an answer (listed in its record)."""

    def row(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "status": self.status,
            "reused": "yes" if self.reused else "no",
            "error_type": self.error_type,
            "error": self.error,
            "source": self.source,
            "seconds": f"{self.seconds:.2f}",
            "answers": self.answers,
            "warnings": " | ".join(self.warnings),
            "json": self.outputs.get("json", ""),
            "markdown": self.outputs.get("markdown", ""),
            "scene": self.outputs.get("scene", ""),
        }


@dataclass
class BatchSummary:
    """What ``run_batch`` returns: every case's outcome, the model, and the run's timing.

    ``cases_per_minute`` counts cases computed in this run (not reused ones) over the time spent
    on cases, excluding model loading: the figure a benchmark wants.
    """

    run_id: str
    output: Path
    model_id: str = ""
    model_sha256: str = ""
    environment: str = ""
    model_load_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None
    outcomes: list[CaseOutcome] = field(default_factory=list)
    interrupted: bool = False
    interrupted_by: str = "Ctrl-C"
    setup_error: str = ""
    """Why the run could not start, or (``run_error``) why it stopped: exit status 2 either way."""
    run_error: str = ""

    @property
    def seconds(self) -> float:
        """Wall time of the run so far (until ``ended`` once it is over), model loading included."""
        return (self.ended or time.perf_counter()) - self.started

    def count(self, status: str) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status == status)

    @property
    def computed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status in (OK, FAILED) and not o.reused]

    @property
    def cases_per_minute(self) -> float:
        busy = sum(o.seconds for o in self.computed)
        return 60.0 * len(self.computed) / busy if busy > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 only when every case succeeded (reused or computed); see docs/BATCH.md for the others."""
        if self.setup_error or self.run_error:
            return EXIT_SETUP_FAILED
        if self.interrupted:
            return EXIT_TERMINATED if self.interrupted_by == "SIGTERM" else EXIT_INTERRUPTED
        complete = all(o.status == OK and not o.failed_questions for o in self.outcomes)
        return EXIT_OK if self.outcomes and complete else EXIT_CASES_FAILED

    def status_line(self) -> str:
        reused = sum(1 for o in self.outcomes if o.reused)
        text = (
            f"{self.count(OK)} ok ({reused} reused from an earlier run), {self.count(FAILED)} failed, "
            f"{self.count(NOT_RUN)} not run, of {len(self.outcomes)} case(s)"
        )
        unanswered = sum(o.failed_questions for o in self.outcomes)
        if unanswered:
            text += f"; {unanswered} question(s) got an error instead of an answer"
        if self.setup_error:
            return f"run could not start: {self.setup_error}"
        if self.run_error:
            return f"run stopped: {self.run_error} ({text})"
        return text + (f" - interrupted ({self.interrupted_by})" if self.interrupted else "")


def write_summaries(summary: BatchSummary, *, running: bool) -> tuple[Path, Path]:
    """Write ``summary.csv`` (one row per case) and ``summary.md`` (counts, failures, table)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for outcome in summary.outcomes:
        writer.writerow(outcome.row())
    csv_path = atomic_write_text(summary.output / "summary.csv", buffer.getvalue())
    md_path = atomic_write_text(summary.output / "summary.md", _markdown(summary, running))
    return csv_path, md_path


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(summary: BatchSummary, running: bool) -> str:
    state = "running" if running else ("interrupted" if summary.interrupted else "finished")
    if summary.setup_error or summary.run_error:
        state = "failed"
    lines = [
        "# CT-MLLM batch run",
        "",
        f"- Run: `{summary.run_id}` ({state})",
        f"- Result: {summary.status_line()}",
        f"- Model: `{summary.model_id or 'not loaded'}` (sha256 `{summary.model_sha256 or '-'}`)",
        f"- Slicer: {summary.environment or '-'}",
        f"- Time: {summary.seconds:.1f} s, model loading {summary.model_load_seconds:.1f} s, "
        f"{summary.cases_per_minute:.2f} computed case(s) per minute",
        "",
        "> Machine-generated text; not a diagnosis. A radiologist must review every report.",
        "",
    ]
    failures = [o for o in summary.outcomes if o.status == FAILED]
    if failures:
        lines += ["## Failures", ""]
        lines += [f"- **{o.case_id}** ({o.error_type}): {_cell(o.error)}" for o in failures]
        lines.append("")
    lines += [
        "## Cases",
        "",
        "| case | status | reused | seconds | answers | report | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in summary.outcomes:
        link = f"[md]({o.outputs['markdown']})" if "markdown" in o.outputs else ""
        lines.append(
            f"| {_cell(o.case_id)} | {o.status} | {'yes' if o.reused else 'no'} | {o.seconds:.1f} | "
            f"{o.answers} | {link} | {_cell(o.source)} |"
        )
    return "\n".join(lines) + "\n"


class ProgressLine:
    """Cases done of the total, failures, elapsed time and ETA, on one line of ``stream``.

    On a terminal the line is redrawn in place; in a log file each update is its own line. The ETA
    uses the mean time of the cases computed so far (reused cases cost nothing).
    """

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._busy = 0.0
        self._computed = 0
        self._interactive = bool(getattr(self.stream, "isatty", lambda: False)())

    def case_started(self, case_id: str) -> None:
        self._show(f"running {case_id}")

    def case_finished(self, outcome: CaseOutcome) -> None:
        self.done += 1
        self.failed += outcome.status == FAILED
        if not outcome.reused:
            self._busy += outcome.seconds
            self._computed += 1
        note = "reused" if outcome.reused else outcome.status
        if outcome.status == FAILED:
            note += f": {outcome.error[:160]}"
        self._show(f"{outcome.case_id} {note}", final=True)

    def eta_seconds(self) -> float | None:
        if not self._computed:
            return None
        return (self._busy / self._computed) * (self.total - self.done)

    def _show(self, what: str, final: bool = False) -> None:
        percent = 100.0 * self.done / self.total if self.total else 100.0
        bar_width = 20
        filled = int(bar_width * self.done / self.total) if self.total else bar_width
        eta = self.eta_seconds()
        text = (
            f"[{'#' * filled}{'.' * (bar_width - filled)}] {self.done}/{self.total} ({percent:.0f}%) "
            f"failed {self.failed} | elapsed {_clock(time.monotonic() - self.started)} "
            f"ETA {_clock(eta) if eta is not None else '?'} | {what}"
        )
        if self._interactive:
            end = "\n" if final and self.done == self.total else ""
            self.stream.write("\r\033[K" + text + end)
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
