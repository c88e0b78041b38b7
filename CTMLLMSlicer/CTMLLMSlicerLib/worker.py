"""The model worker: a child process that holds the model and answers the panel's requests.

Why a process: Slicer's GUI thread holds Python's global interpreter lock while it idles in Qt's
event loop, so a Python thread in Slicer runs only while the GUI thread runs Python. A child
process has its own interpreter and runs at full speed; the panel reads its messages from a QTimer
without blocking (``worker_client``). The child is started with Slicer's own Python
(``sys.executable`` is PythonSlicer inside Slicer), keeps the model and the encoded volumes between
requests, and is ended by "Unload model", which frees its memory, GPU memory included.

Messages: ``worker_protocol``. Threads here: the main thread reads requests and answers ``ping``
and ``cancel`` at once; one job thread runs the queued requests one at a time. The protocol owns
the original stdout; anything else printed (by Python or C libraries) goes to stderr, which the
parent sends to the worker log file.

Started as ``python -c BOOTSTRAP FOLDER... [--model-loader MODULE:FUNCTION]`` by
``worker_client.workerCommand``; ``--model-loader`` replaces ``model_core.hub.load_model`` (tests
use it to make a worker hang, crash or run out of memory on purpose).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from CTMLLMSlicerLib import worker_protocol as protocol
from CTMLLMSlicerLib.errors import CTMLLMSlicerError, ModelOutOfMemoryError, OperationCancelled, isOutOfMemory
from CTMLLMSlicerLib.session import EncodeSettings, ModelRequest, ModelSession, VolumeSnapshot, checkTask

_STOP = object()


class WorkerServer:
    """Reads requests from ``requests``, writes events to ``events``; ``serve()`` until shutdown."""

    def __init__(
        self, requests: BinaryIO, events: BinaryIO, session: ModelSession, logPath: str = ""
    ) -> None:
        self._requests = requests
        self._events = events
        self._session = session
        self._logPath = logPath
        self._writeLock = threading.Lock()
        self._stateLock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._cancelledIds: set[int] = set()
        self._current: tuple[int, threading.Event] | None = None

    # -- output ------------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        data = protocol.encodeMessage(message)
        with self._writeLock:
            self._events.write(data)
            self._events.flush()

    # -- main thread: requests in ------------------------------------------------------------
    def serve(self) -> int:
        """Answer requests until ``shutdown`` or until the parent closes the pipe (it went away)."""
        jobThread = threading.Thread(target=self._runQueue, name="ctmllm-worker-job", daemon=True)
        jobThread.start()
        self.send({"event": protocol.READY, "pid": os.getpid(), "python": sys.version.split()[0]})
        try:
            for line in iter(self._requests.readline, b""):
                if not line.strip():
                    continue
                try:
                    request = protocol.decodeMessage(line)
                except protocol.ProtocolError as error:
                    print(f"ignored: {error}", file=sys.stderr, flush=True)
                    continue
                op = request.get("op")
                if op == protocol.SHUTDOWN:
                    break
                if op == protocol.PING:
                    self.send({"event": protocol.PONG, "id": request.get("id")})
                elif op == protocol.CANCEL:
                    self._cancel(int(request.get("target", -1)))
                elif op in protocol.QUEUED_OPS:
                    self._queue.put(request)
                else:
                    self.send(
                        protocol.errorMessage(request.get("id"), protocol.ProtocolError(f"unknown op {op!r}"))
                    )
        finally:
            self._stopJobs()
        jobThread.join(timeout=5.0)
        return 0

    def _cancel(self, target: int) -> None:
        with self._stateLock:
            self._cancelledIds.add(target)
            if self._current is not None and self._current[0] == target:
                self._current[1].set()

    def _stopJobs(self) -> None:
        with self._stateLock:
            if self._current is not None:
                self._current[1].set()
        self._queue.put(_STOP)

    # -- job thread: one request at a time ---------------------------------------------------
    def _runQueue(self) -> None:
        while (request := self._queue.get()) is not _STOP:
            self._run(request)

    def _run(self, request: dict[str, Any]) -> None:
        requestId = int(request.get("id", -1))
        cancel = threading.Event()
        with self._stateLock:
            if requestId in self._cancelledIds:
                cancel.set()
            self._current = (requestId, cancel)
        try:
            if cancel.is_set():
                raise OperationCancelled("cancelled before it started")
            result = self._handlers()[request["op"]](request, requestId, cancel)
            self.send(
                {
                    "event": protocol.DONE,
                    "id": requestId,
                    "result": result,
                    "cachedKeys": self._session.cachedKeys(),
                }
            )
        except OperationCancelled:
            self.send({"event": protocol.CANCELLED, "id": requestId})
        except BaseException as error:  # reported to the parent; the worker stays up for the next request
            if isOutOfMemory(error) and not isinstance(error, CTMLLMSlicerError):
                error = ModelOutOfMemoryError(
                    f"out of memory in the model worker ({type(error).__name__}): choose bfloat16/float16, the "
                    "CPU, a smaller model, or close other applications"
                )
            if not isinstance(error, CTMLLMSlicerError):
                traceback.print_exception(error, file=sys.stderr)
                sys.stderr.flush()
            self.send(protocol.errorMessage(requestId, error, self._logPath))
        finally:
            with self._stateLock:
                self._current = None
                self._cancelledIds.discard(requestId)

    def _handlers(self) -> dict[str, Callable[[dict, int, threading.Event], Any]]:
        return {
            protocol.LOAD: self._load,
            protocol.ENCODE: self._encode,
            protocol.GENERATE: self._generate,
            protocol.FORGET: self._forget,
            protocol.UNLOAD: self._unload,
        }

    def _reporters(self, requestId: int) -> tuple[Callable, Callable[[str], None]]:
        """Progress and notice senders for one request (generation throttles its own progress)."""

        def progress(stage: str, fraction: float | None = None, tokensPerSecond: float | None = None) -> None:
            self.send(
                {
                    "event": protocol.PROGRESS,
                    "id": requestId,
                    "stage": stage,
                    "fraction": fraction,
                    "tokensPerSecond": tokensPerSecond,
                }
            )

        def notice(text: str) -> None:
            self.send({"event": protocol.NOTICE, "id": requestId, "text": text})

        return progress, notice

    def _load(self, request: dict, requestId: int, cancel: threading.Event) -> dict[str, Any]:
        progress, notice = self._reporters(requestId)
        self._session.loadModel(ModelRequest.fromDict(request["request"]), progress, notice)
        return self._session.modelInfo()

    def _encode(self, request: dict, requestId: int, cancel: threading.Event) -> dict[str, Any]:
        progress, notice = self._reporters(requestId)
        volume = request["volume"]
        settings = EncodeSettings(**request["settings"])
        snapshot = VolumeSnapshot(
            volumeUID=volume["volumeUID"],
            name=volume["name"],
            volumeKey=volume["volumeKey"],
            ijkToRAS=np.asarray(volume["ijkToRAS"], dtype=float),
            arrayKJI=protocol.readVolumeFile(volume["path"]) if volume.get("path") else None,
            sourceFile=volume.get("sourceFile", ""),
        )
        key, entry, encoded = self._session.encode(
            ModelRequest.fromDict(request["request"]), snapshot, settings, progress
        )
        for text in entry.input.notices:
            notice(text)
        return {
            "key": key,
            "encoded": encoded,
            "preprocessing": entry.input.preprocessing,
            "notices": entry.input.notices,
            "expert": entry.expert,
        }

    def _generate(self, request: dict, requestId: int, cancel: threading.Event) -> dict[str, Any]:
        progress, _ = self._reporters(requestId)
        checkTask(request.get("task"))

        def onText(chunk: str) -> None:
            self.send({"event": protocol.TEXT, "id": requestId, "text": chunk})

        outcome = self._session.generate(
            ModelRequest.fromDict(request["request"]),
            request["key"],
            request["prompt"],
            request.get("task"),
            history=[tuple(pair) for pair in request.get("history") or []],
            maxNewTokens=request.get("maxNewTokens"),
            onText=onText,
            progress=progress,
            cancel=cancel,
        )
        return {
            "text": outcome.text,
            "newTokens": outcome.newTokens,
            "seconds": outcome.seconds,
            "cancelled": outcome.cancelled,
            "expert": outcome.expert,
            "modelId": self._session.model.model_id,
        }

    def _forget(self, request: dict, requestId: int, cancel: threading.Event) -> dict[str, Any]:
        self._session.dropFeatures(request.get("volumeUID"))
        return {}

    def _unload(self, request: dict, requestId: int, cancel: threading.Event) -> dict[str, Any]:
        self._session.unloadModel()
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {}


def _modelLoader(spec: str | None) -> Callable | None:
    if not spec:
        return None
    moduleName, _, functionName = spec.partition(":")
    return getattr(importlib.import_module(moduleName), functionName)


def main(argv: list[str] | None = None) -> int:
    """The child's entry point: take the protocol's pipes, serve, exit."""
    parser = argparse.ArgumentParser(prog="ctmllm-worker")
    parser.add_argument("--model-loader", help="MODULE:FUNCTION replacing model_core.hub.load_model (tests)")
    parser.add_argument("--log", default="", help="the log file stderr goes to (named in error messages)")
    args = parser.parse_args(argv)
    events = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints, even from C code, go to the log
    sys.stdout = sys.stderr
    server = WorkerServer(sys.stdin.buffer, events, ModelSession(_modelLoader(args.model_loader)), args.log)
    try:
        code = server.serve()
    except BrokenPipeError:  # the parent went away while we wrote
        code = 0
    sys.stderr.flush()
    os._exit(code)  # do not wait for a job thread stuck in a long native call
