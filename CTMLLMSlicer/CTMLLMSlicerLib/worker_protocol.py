"""The line protocol between the module and its model worker process (both sides use this file).

One message per line, UTF-8 JSON objects, over the child's stdin (requests) and stdout (events).

Requests carry ``op`` and an ``id`` chosen by the parent:
``load`` (``request``), ``encode`` (``request``, ``volume``, ``settings``: window, non-CT switch,
task or null for the task router, prompt), ``generate`` (``request``, ``key``: the input key,
``prompt``, ``task``, ``history``, ``maxNewTokens``), ``forget``
(``volumeUID`` or null for all), ``unload``, ``ping``, ``cancel`` (``target``: the id to stop) and
``shutdown``. The child runs one request at a time, in order; ``cancel`` and ``ping`` are answered
at once by its reader thread, so they work while a request runs.

Events carry ``event`` and the ``id`` of their request: ``progress`` (``stage``, ``fraction``,
``tokensPerSecond``), ``notice`` (``text``), ``text`` (``text``: a streamed chunk), then exactly one
of ``done`` (``result``, and ``cachedKeys``: every input key the child now holds, whose voxels need
not be sent again), ``error`` (``errorType``, ``message``, and ``inputVerdict``: the
``model_core.data`` input error behind a refused volume, e.g. ``InvalidValuesError``) or
``cancelled``. ``ready`` (no id) is the child's first line.

The voxel array never travels through the pipe and is never pickled: the parent writes it as a
``.npy`` file (``allow_pickle=False``) in a folder only it and the child use, and the child reads
it with ``allow_pickle=False``; ``volume`` names the file and carries the geometry, the volume's
ids and the file the volume node was read from (``sourceFile``, checked in the child).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from CTMLLMSlicerLib import errors

LOAD = "load"
ENCODE = "encode"
GENERATE = "generate"
FORGET = "forget"
UNLOAD = "unload"
PING = "ping"
CANCEL = "cancel"
SHUTDOWN = "shutdown"
QUEUED_OPS = (LOAD, ENCODE, GENERATE, FORGET, UNLOAD)
"""Requests the child runs one after another; ``ping``, ``cancel`` and ``shutdown`` are immediate."""

READY = "ready"
PROGRESS = "progress"
NOTICE = "notice"
TEXT = "text"
DONE = "done"
ERROR = "error"
CANCELLED = "cancelled"
PONG = "pong"
TERMINAL_EVENTS = (DONE, ERROR, CANCELLED)

VOLUME_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "float32", "float64")
"""What a voxel file may hold: plain numbers (``np.load`` refuses object arrays anyway)."""
MAX_LINE_BYTES = 64 * 1024 * 1024
"""A longer line is a broken child, not a message."""


class ProtocolError(errors.CTMLLMSlicerError):
    """The other side wrote something that is not a message of this protocol."""


def encodeMessage(message: dict[str, Any]) -> bytes:
    """One line: compact JSON, UTF-8, newline-terminated (JSON escapes newlines in strings)."""
    return (json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def decodeMessage(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"not a protocol line ({error}): {line[:200]!r}") from error
    if not isinstance(message, dict):
        raise ProtocolError(f"not a protocol message (a JSON object): {line[:200]!r}")
    return message


class LineSplitter:
    """Bytes in, complete lines out: what a non-blocking reader needs between two reads."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        *lines, self._pending = (self._pending + data).split(b"\n")
        if len(self._pending) > MAX_LINE_BYTES:
            raise ProtocolError(f"a line longer than {MAX_LINE_BYTES} bytes: the worker is broken")
        return [line for line in lines if line.strip()]


def writeVolumeFile(array: np.ndarray, folder: str | os.PathLike, name: str) -> Path:
    """Save ``array`` as ``folder/name.npy`` for the child (plain numbers only, never pickled)."""
    if array.dtype.name not in VOLUME_DTYPES:
        raise errors.NoVolumeError(
            f"voxels of type {array.dtype} cannot be handed to the model: convert the volume to a scalar type"
        )
    path = Path(folder) / f"{name}.npy"
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as stream:
        np.save(stream, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(partial, path)
    return path


def readVolumeFile(path: str | os.PathLike) -> np.ndarray:
    """The array of a voxel file: 3D plain numbers, refused otherwise (never unpickled)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise errors.NoVolumeError(f"the worker could not read the voxel file {path}: {error}") from error
    if array.ndim != 3 or array.dtype.name not in VOLUME_DTYPES:
        raise errors.NoVolumeError(
            f"voxel file {path} holds a {array.ndim}D {array.dtype} array: a 3D scalar volume is needed"
        )
    return array


def errorMessage(requestId: int | None, error: BaseException, logPath: str = "") -> dict[str, Any]:
    """An ``error`` event: our typed errors keep their type, and a refused volume its input verdict;
    others become ``WorkerError`` text."""
    from model_core.data.errors import CTInputError

    if isinstance(error, CTInputError):  # refused outside the session's wrapping: shown as the Logic shows it
        error, verdict = errors.NotCTVolumeError(str(error)), error
    else:
        verdict = error.__cause__ if isinstance(error.__cause__, CTInputError) else None
    if isinstance(error, errors.CTMLLMSlicerError):
        message = {"event": ERROR, "id": requestId, "errorType": type(error).__name__, "message": str(error)}
        if verdict is not None:
            message["inputVerdict"] = type(verdict).__name__
        return message
    where = f" (traceback in the worker log {logPath})" if logPath else ""
    return {
        "event": ERROR,
        "id": requestId,
        "errorType": "WorkerError",
        "message": f"the model worker failed: {type(error).__name__}: {error}{where}",
    }


def errorFromMessage(message: dict[str, Any]) -> errors.CTMLLMSlicerError:
    """The typed error an ``error`` event names (``WorkerError`` for unknown names), caused by its
    input verdict as in the Logic's own process (``model_core.data.errors``)."""
    from model_core.data import errors as inputErrors

    errorType = getattr(errors, str(message.get("errorType")), None)
    if not (isinstance(errorType, type) and issubclass(errorType, errors.CTMLLMSlicerError)):
        errorType = errors.WorkerError
    text = str(message.get("message", "the model worker failed without a message"))
    error = errorType(text)
    verdict = getattr(inputErrors, str(message.get("inputVerdict")), None)
    if isinstance(verdict, type) and issubclass(verdict, inputErrors.CTInputError):
        error.__cause__ = verdict(text)
    return error
