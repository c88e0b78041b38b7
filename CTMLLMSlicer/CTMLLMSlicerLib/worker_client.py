"""The parent's side of the model worker: start it, send requests, read its events without blocking.

``WorkerProcess`` is the child process and its pipes: requests are written as lines; its events
are read with non-blocking ``os.read`` calls, so the GUI thread can poll it from a QTimer and
never waits. ``ModelWorker`` adds what the module needs on top: one job at a time (load the model
if needed, encode the volume, or reuse its features or its prepared input kept in the child, then
generate), events for
the panel (``jobs.JobEvent``), cancel that kills a child which does not stop in time, and a clear
error when the child crashes, runs out of memory or is killed; the next job starts a new child.

Qt-free and MRML-free: the batch script can drive workers with the same classes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from CTMLLMSlicerLib import jobs
from CTMLLMSlicerLib import worker_protocol as protocol
from CTMLLMSlicerLib.errors import CTMLLMSlicerError, JobBusyError, WorkerError
from CTMLLMSlicerLib.session import ModelRequest, keyVolumeUID

BOOTSTRAP = (
    "import sys; sys.path[:0] = sys.argv[1:3]; from CTMLLMSlicerLib.worker import main; main(sys.argv[3:])"
)
"""What the child runs: the two import folders come first on its command line, then its options."""


def importFolders() -> list[str]:
    """The folders holding ``CTMLLMSlicerLib`` and ``model_core``: next to each other when the
    extension is built, ``CTMLLMSlicer/`` and the repository root in a source checkout."""
    import model_core

    lib = Path(__file__).resolve().parent.parent
    core = Path(model_core.__file__).resolve().parent.parent
    return [str(lib), str(core)]


def workerCommand(python: str | None = None, modelLoader: str | None = None, logPath: str = "") -> list[str]:
    """The child's command line. ``python`` defaults to ``sys.executable`` (Slicer sets it to its
    PythonSlicer launcher, so the child gets Slicer's Python and packages)."""
    command = [python or sys.executable, "-c", BOOTSTRAP, *importFolders()]
    if logPath:
        command += ["--log", logPath]
    if modelLoader:
        command += ["--model-loader", modelLoader]
    return command


def describeExit(returnCode: int) -> str:
    """Why a child ended, in words a user can act on."""
    if returnCode < 0:
        number = -returnCode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == getattr(signal, "SIGKILL", 9):
            return f"was killed by the system ({name}), most often because the computer ran out of memory"
        return f"crashed ({name})"
    return f"exited with code {returnCode}"


def lastLogLine(path: str | os.PathLike) -> str:
    """The last non-empty line of a log file ("" when there is none): the error, usually."""
    try:
        with open(path, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 8192))
            lines = [line.strip() for line in stream.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")


class WorkerProcess:
    """One child process: its pipes, its log, and non-blocking reads of its events."""

    def __init__(
        self, command: list[str], logPath: str | os.PathLike, env: dict[str, str] | None = None
    ) -> None:
        self.command = command
        self.logPath = str(logPath)
        self.env = env
        self.process: subprocess.Popen | None = None
        self._splitter = protocol.LineSplitter()
        self._endOfOutput = False
        self._logStream: Any = None

    def start(self) -> None:
        self._logStream = open(self.logPath, "ab")  # noqa: SIM115  (closed in close())
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window on Windows
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._logStream,
            env=self.env,
            bufsize=0,
            creationflags=flags,
        )
        os.set_blocking(self.process.stdout.fileno(), False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def exitCode(self) -> int | None:
        """None while it runs; its exit status once it has ended."""
        return None if self.process is None else self.process.poll()

    def send(self, message: dict[str, Any]) -> bool:
        """Write one request; False when the child is gone (the caller then reads its exit)."""
        try:
            self.process.stdin.write(protocol.encodeMessage(message))
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def read(self) -> list[dict[str, Any]]:
        """Every complete event the child has written so far; never waits."""
        messages: list[dict[str, Any]] = []
        if self.process is None or self._endOfOutput:
            return messages
        fd = self.process.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self._endOfOutput = True
                break
            for line in self._splitter.feed(data):
                try:
                    messages.append(protocol.decodeMessage(line))
                except protocol.ProtocolError as error:
                    messages.append({"event": protocol.ERROR, "id": None, "errorType": "WorkerError",
                                     "message": str(error)})  # fmt: skip
        return messages

    @property
    def outputEnded(self) -> bool:
        return self._endOfOutput

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Close the pipes and reap the child (killed if it has not ended within ``timeout``)."""
        if self.process is not None:
            for stream in (self.process.stdin, self.process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self._logStream is not None:
            self._logStream.close()
            self._logStream = None


@dataclass
class _Step:
    op: str
    fields: dict[str, Any]
    cleanup: list[Path] = field(default_factory=list)


@dataclass
class _Job:
    steps: list[_Step]
    result: dict[str, Any] = field(default_factory=dict)
    requestId: int | None = None
    cancelRequested: bool = False
    cancelDeadline: float | None = None
    pingId: int | None = None
    answered: bool = False
    """The child answered the ping sent with the cancel: alive, busy in a step that cannot stop."""


class ModelWorker:
    """The model worker the panel uses: started on demand, kept between jobs, ended by ``unload``.

    ``python``, ``env``: how to start the child (``sys.executable`` and this environment by
    default). ``folder``: where the worker logs and voxel files go (a new private temporary
    folder by default). ``modelLoader``: ``MODULE:FUNCTION`` replacing the model loader in the
    child (tests). ``cancelGraceSeconds``: how long a cancelled job may take to stop, or at least to
    answer the ping sent with the cancel, before the child is killed as hung; a child that answers
    is busy in a step that cannot stop midway (loading, encoding) and gets ``busyGraceSeconds``
    more. ``startTimeoutSeconds``: how long a new child may take to say it is ready.
    """

    cancelGraceSeconds = 10.0
    busyGraceSeconds = 300.0
    startTimeoutSeconds = 60.0

    def __init__(
        self,
        python: str | None = None,
        env: dict[str, str] | None = None,
        folder: str | os.PathLike | None = None,
        modelLoader: str | None = None,
    ) -> None:
        self.python = python
        self.env = env
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="ctmllm-worker-"))
        self.modelLoader = modelLoader
        self.process: WorkerProcess | None = None
        self.starts = 0
        self._nextId = 0
        self._job: _Job | None = None
        self._ready = False
        self._startedAt = 0.0
        self._resetState()

    def _resetState(self) -> None:
        self.modelKey: tuple | None = None
        self.modelInfo: dict[str, Any] = {}
        self.cachedKeys: set[str] = set()

    # -- the process -------------------------------------------------------------------------
    @property
    def logPath(self) -> str:
        return self.process.logPath if self.process else ""

    def isRunning(self) -> bool:
        return self.process is not None and self.process.exitCode() is None

    def ensureStarted(self) -> None:
        if self.isRunning():
            return
        self._discardProcess()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        logPath = self.folder / f"worker-{os.getpid()}-{self.starts}.log"
        self.process = WorkerProcess(
            workerCommand(self.python, self.modelLoader, str(logPath)), logPath, self.env
        )
        self.process.start()
        self._ready, self._startedAt = False, time.monotonic()

    def _discardProcess(self) -> None:
        if self.process is not None:
            self.process.kill()
        self.process = None
        self._resetState()

    def unload(self, timeout: float = 5.0) -> bool:
        """End the child (its memory, GPU memory included, goes with it); True if one was running.
        A running job is cancelled first and reported as cancelled by the next ``poll``."""
        if self.process is None:
            return False
        running = self.isRunning()
        if running:
            self.process.send({"op": protocol.SHUTDOWN})
        self.process.close(timeout)
        self.process = None
        self._resetState()
        return running

    # -- what the child holds ----------------------------------------------------------------
    def isModelLoaded(self, request: ModelRequest) -> bool:
        return self.isRunning() and self.modelKey == request.key

    def hasInput(self, key: str) -> bool:
        """Whether the child holds the prepared input of ``session.inputKey`` ``key`` (the voxels
        need not be sent again)."""
        return self.isRunning() and key in self.cachedKeys

    def forget(self, volumeUID: str | None = None) -> None:
        """Drop the child's features of one volume (or all): it was removed, or the scene closed."""
        self.cachedKeys = {key for key in self.cachedKeys if volumeUID not in (None, keyVolumeUID(key))}
        if self.isRunning():
            self._send(protocol.FORGET, {"volumeUID": volumeUID})

    # -- jobs --------------------------------------------------------------------------------
    def isBusy(self) -> bool:
        return self._job is not None

    def startJob(
        self,
        request: ModelRequest,
        prompt: str,
        task: str | None,
        key: str,
        encode: dict[str, Any],
        history: list[tuple[str, str]],
        maxNewTokens: int | None,
        cleanup: list[Path] | None = None,
    ) -> None:
        """Load the model if needed, encode (``encode``: the volume, with its voxel file unless the
        child holds input ``key``, and the settings; the child reuses features it has), then
        generate. ``cleanup``: files to delete once encoding ends."""
        if self._job is not None:
            raise JobBusyError("a model job is still running: wait for it or cancel it first")
        self.ensureStarted()
        steps = []
        if not self.isModelLoaded(request):
            steps.append(_Step(protocol.LOAD, {"request": request.toDict()}))
        steps.append(_Step(protocol.ENCODE, {"request": request.toDict(), **encode}, list(cleanup or [])))
        steps.append(
            _Step(
                protocol.GENERATE,
                {
                    "request": request.toDict(),
                    "key": key,
                    "prompt": prompt,
                    "task": task,
                    "history": [list(pair) for pair in history],
                    "maxNewTokens": maxNewTokens,
                },
            )
        )
        self._job = _Job(steps)
        self._sendNextStep()

    def cancel(self) -> None:
        """Ask the running job to stop (generation stops after the token in progress). ``poll``
        kills a child that neither stops nor answers a ping within ``cancelGraceSeconds``."""
        job = self._job
        if job is None or job.cancelRequested:
            return
        job.cancelRequested = True
        job.cancelDeadline = time.monotonic() + self.cancelGraceSeconds
        if job.requestId is not None and self.process is not None:
            self.process.send({"op": protocol.CANCEL, "target": job.requestId})
            job.pingId = self._send(protocol.PING, {})

    def poll(self) -> list[jobs.JobEvent]:
        """Everything the child said since the last poll, as panel events; never blocks."""
        events: list[jobs.JobEvent] = []
        if self.process is None:
            if self._job is not None:  # unloaded while a job ran
                events.append(self._endJob(jobs.JobEvent(jobs.CANCELLED)))
            return events
        for message in self.process.read():
            events += self._handle(message)
        if self._job is not None:
            events += self._checkHealth()
        elif self.process.outputEnded and self.process.exitCode() is not None:
            self._discardProcess()  # ended between jobs: the next job starts a new one
        return events

    def _send(self, op: str, fields: dict[str, Any]) -> int:
        self._nextId += 1
        self.process.send({"op": op, "id": self._nextId, **fields})
        return self._nextId

    def _sendNextStep(self) -> None:
        job = self._job
        step = job.steps[0]
        job.requestId = self._send(step.op, step.fields)

    def _handle(self, message: dict[str, Any]) -> list[jobs.JobEvent]:
        kind = message.get("event")
        if kind == protocol.READY:
            self._ready = True
            return []
        job = self._job
        if kind == protocol.PONG and job is not None and message.get("id") == job.pingId:
            job.answered = True
            job.cancelDeadline = time.monotonic() + self.busyGraceSeconds
            return []
        if "cachedKeys" in message:
            self.cachedKeys = set(message["cachedKeys"])
        if job is None or message.get("id") != job.requestId:
            return []  # an answer to forget/unload, or to a job that has ended
        if kind == protocol.PROGRESS:
            return [jobs.JobEvent(jobs.PROGRESS, stage=message.get("stage", ""), fraction=message.get("fraction"),
                                  tokensPerSecond=message.get("tokensPerSecond"))]  # fmt: skip
        if kind == protocol.NOTICE:
            return [jobs.JobEvent(jobs.NOTICE, text=message.get("text", ""))]
        if kind == protocol.TEXT:
            return [jobs.JobEvent(jobs.TEXT, text=message.get("text", ""))]
        if kind == protocol.CANCELLED:
            self._cleanupStep()
            return [self._endJob(jobs.JobEvent(jobs.CANCELLED))]
        if kind == protocol.ERROR:
            self._cleanupStep()
            return [self._endJob(jobs.JobEvent(jobs.FAILED, error=protocol.errorFromMessage(message)))]
        if kind == protocol.DONE:
            return self._stepDone(message.get("result") or {})
        return []

    def _stepDone(self, result: dict[str, Any]) -> list[jobs.JobEvent]:
        job = self._job
        step = self._cleanupStep()
        if step.op == protocol.LOAD:
            self.modelKey = ModelRequest.fromDict(step.fields["request"]).key
            self.modelInfo = dict(result)
        job.result.update(result)
        job.result.setdefault("encoded", False)
        if not job.steps:
            return [self._endJob(jobs.JobEvent(jobs.FINISHED, result=dict(job.result)))]
        if job.cancelRequested:  # cancelled between two steps: do not start the next one
            return [self._endJob(jobs.JobEvent(jobs.CANCELLED))]
        self._sendNextStep()
        return []

    def _cleanupStep(self) -> _Step:
        step = self._job.steps.pop(0)
        for path in step.cleanup:
            try:
                os.remove(path)
            except OSError:
                pass
        return step

    def _endJob(self, event: jobs.JobEvent) -> jobs.JobEvent:
        if self._job is not None:
            for step in self._job.steps:
                for path in step.cleanup:
                    try:
                        os.remove(path)
                    except OSError:
                        pass
        self._job = None
        return event

    def _checkHealth(self) -> list[jobs.JobEvent]:
        """A job whose child ended, or did not stop after Cancel, or never started, ends here."""
        job = self._job
        code = self.process.exitCode()
        if code is not None and self.process.outputEnded:
            log = self.process.logPath
            line = lastLogLine(log)
            detail = f" Its last message: {line}." if line else ""
            self._discardProcess()
            error = WorkerError(
                f"the model worker {describeExit(code)}.{detail} Slicer is fine; the next request starts a new "
                f"worker (the model loads again). Log: {log}"
            )
            return [self._endJob(jobs.JobEvent(jobs.FAILED, error=error))]
        now = time.monotonic()
        if job.cancelDeadline is not None and now > job.cancelDeadline:
            if job.answered:
                return [
                    self._killed(f"answered but did not stop within {self.busyGraceSeconds:.0f} s of Cancel")
                ]
            return [self._killed(f"did not answer within {self.cancelGraceSeconds:.0f} s of Cancel")]
        if not self._ready and now - self._startedAt > self.startTimeoutSeconds:
            return [self._killed(f"did not start within {self.startTimeoutSeconds:.0f} s")]
        return []

    def _killed(self, why: str) -> jobs.JobEvent:
        log = self.process.logPath
        self._discardProcess()
        error = WorkerError(
            f"the model worker {why} and was stopped. The next request starts a new worker (the model loads "
            f"again). Log: {log}"
        )
        return self._endJob(jobs.JobEvent(jobs.FAILED, error=error))


def volumeKey(volumeUID: str, modified: int, dimensions: tuple, ijkToRAS: list[float]) -> str:
    """Identifies a volume's voxels and geometry: changes when either changes, never reused."""
    return json.dumps([volumeUID, modified, list(dimensions), [round(v, 6) for v in ijkToRAS]])


def waitForJob(
    poll: Callable[[], list[jobs.JobEvent]],
    cancel: Callable[[], None],
    onEvent: Callable[[jobs.JobEvent], None] | None = None,
    timeout: float = 600.0,
    idle: Callable[[], None] | None = None,
) -> jobs.JobEvent:
    """Call ``poll`` until a job's end event arrives (scripts, the self-test, tests); returns it.
    ``idle`` runs between polls (a short sleep by default; in Slicer, ``slicer.app.processEvents``)."""
    deadline = time.monotonic() + timeout
    while True:
        for event in poll():
            if onEvent is not None:
                onEvent(event)
            if event.kind in jobs.END_KINDS:
                return event
        if time.monotonic() > deadline:
            cancel()
            raise CTMLLMSlicerError(f"the model job did not end within {timeout:.0f} s: cancelled")
        (idle or _shortSleep)()


def _shortSleep() -> None:
    time.sleep(0.02)
