"""A Qt-free job runner: one worker thread, one event queue that the GUI thread polls.

Model loading, preprocessing, encoding and generation run in the worker; it never touches Qt or
MRML. It reports through ``JobContext`` (progress, text chunks), which only puts ``JobEvent``
objects on a ``queue.Queue``. The panel drains that queue from a ``qt.QTimer`` on the GUI thread,
so the application keeps painting while the model works; a batch script can ``wait()`` instead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from CTMLLMSlicerLib.errors import JobBusyError, OperationCancelled

PROGRESS = "progress"
NOTICE = "notice"
TEXT = "text"
FINISHED = "finished"
FAILED = "failed"
CANCELLED = "cancelled"


@dataclass(frozen=True)
class JobEvent:
    """One message from the worker: ``kind`` is progress, notice, text, finished, failed or cancelled.

    ``fraction`` is None while a stage cannot say how far it is (the bar then shows "busy").
    """

    kind: str
    stage: str = ""
    fraction: float | None = None
    tokensPerSecond: float | None = None
    text: str = ""
    result: Any = None
    error: BaseException | None = None


class JobContext:
    """What a running job sees: ways to report, and the cancel flag it must honour."""

    def __init__(self, events: queue.Queue, cancelEvent: threading.Event) -> None:
        self._events = events
        self.cancelEvent = cancelEvent

    def progress(
        self, stage: str, fraction: float | None = None, tokensPerSecond: float | None = None
    ) -> None:
        self._events.put(JobEvent(PROGRESS, stage=stage, fraction=fraction, tokensPerSecond=tokensPerSecond))

    def notice(self, message: str) -> None:
        """Something the user should read that is not an error (e.g. a stand-in model is used)."""
        self._events.put(JobEvent(NOTICE, text=message))

    def text(self, chunk: str) -> None:
        if chunk:
            self._events.put(JobEvent(TEXT, text=chunk))

    @property
    def cancelled(self) -> bool:
        return self.cancelEvent.is_set()

    def checkCancelled(self) -> None:
        """Stop between stages (a stage itself, e.g. generation, polls ``cancelEvent``)."""
        if self.cancelEvent.is_set():
            raise OperationCancelled("cancelled by the user")


class JobRunner:
    """Runs one job at a time in a daemon thread; ``poll()`` hands its events to the caller."""

    def __init__(self) -> None:
        self._events: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()

    def isRunning(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, job: Callable[[JobContext], Any], name: str = "ctmllm-job") -> None:
        """Start ``job(context)`` in a worker; its return value arrives as a ``finished`` event."""
        if self.isRunning():
            raise JobBusyError("a model job is still running: wait for it or cancel it first")
        self._cancel = threading.Event()
        context = JobContext(self._events, self._cancel)
        self._thread = threading.Thread(target=self._run, args=(job, context), name=name, daemon=True)
        self._thread.start()

    def _run(self, job: Callable[[JobContext], Any], context: JobContext) -> None:
        try:
            result = job(context)
        except OperationCancelled:
            self._events.put(JobEvent(CANCELLED))
        except BaseException as error:  # handed to the GUI thread, which shows it in the panel
            self._events.put(JobEvent(FAILED, error=error))
        else:
            self._events.put(JobEvent(FINISHED, result=result))

    def cancel(self) -> None:
        """Ask the running job to stop; generation stops after the token in progress."""
        self._cancel.set()

    def poll(self, maxEvents: int = 1000) -> list[JobEvent]:
        """Every event queued since the last poll (at most ``maxEvents``), oldest first; never blocks."""
        events: list[JobEvent] = []
        while len(events) < maxEvents:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        return events

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (scripts and tests); True if it ended within ``timeout``."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.isRunning()
