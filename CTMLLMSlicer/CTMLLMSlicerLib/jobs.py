"""What the panel receives about a running model job: progress, notices, text, and how it ended.

The model runs in a worker process (``worker_client.ModelWorker``), never in a thread of the
Slicer application: Slicer's GUI thread keeps Python's global interpreter lock while it idles,
so a Python thread there would only run during the panel's timer callbacks. The panel polls the
worker from a ``qt.QTimer`` on the GUI thread and receives these events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROGRESS = "progress"
NOTICE = "notice"
TEXT = "text"
FINISHED = "finished"
FAILED = "failed"
CANCELLED = "cancelled"
END_KINDS = (FINISHED, FAILED, CANCELLED)
"""Exactly one of these ends every job."""


@dataclass(frozen=True)
class JobEvent:
    """One message about a job: ``kind`` is progress, notice, text, finished, failed or cancelled.

    ``fraction`` is None while a stage cannot say how far it is (the bar then shows "busy").
    ``result`` comes with ``finished``, ``error`` with ``failed``.
    """

    kind: str
    stage: str = ""
    fraction: float | None = None
    tokensPerSecond: float | None = None
    text: str = ""
    result: Any = None
    error: BaseException | None = None
