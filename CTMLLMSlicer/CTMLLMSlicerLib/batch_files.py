"""Files of a batch run that are never half-written: atomic writes, checksums, the run lock.

Every output is written to a temporary name in its final folder (``.<name>.<pid>.partial``),
flushed to disk, then renamed over the final name; a run killed at any point leaves either the
old complete file, the new complete file, or a ``.partial`` leftover that the next run deletes.
One run at a time writes into an output folder: ``RunLock`` holds an OS lock that dies with
the process, so a run killed with ``kill -9`` never blocks the next one.

An output folder that refuses files (full disk, read-only, no permission) is a problem of the
run, not of a case: ``is_output_problem`` tells it apart and ``output_problem`` words it.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

PARTIAL_SUFFIX = ".partial"
"""Temporary files end with this; only a dead run can leave one behind."""

LOCK_FILE = ".batch.lock"

_CHUNK = 1 << 20
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
"""Errors writing outputs that every later case would hit too: the run stops instead."""


class OutputFolderBusyError(RuntimeError):
    """Another batch run is writing into the same output folder."""


class OutputWriteError(OSError):
    """The output folder cannot take more files (full disk, read-only, no permission): a run-level error."""


def check_writable(output: Path) -> None:
    """Fail now, not after the model has loaded, when the output folder takes no files."""
    probe = output / f".write-test.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputWriteError(error.errno, output_problem(error, output)) from error


def output_problem(error: OSError, output: Path) -> str:
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk of the output folder {output} is full ({reason}): free space or choose another --output"
    if isinstance(error, OutputWriteError):
        return str(error.strerror or error)
    return f"the output folder {output} cannot be written ({reason}): fix its permissions or choose another --output"


def is_output_problem(error: BaseException, output: Path) -> bool:
    """A full disk, a read-only file system, or a refused write inside the output folder."""
    if not isinstance(error, OSError):
        return False
    if error.errno in _OUTPUT_ERRNOS or isinstance(error, OutputWriteError):
        return True
    name = str(error.filename or "")
    return isinstance(error, PermissionError) and name.startswith(str(output))


def partial_path(path: Path, keep_suffix: bool = False) -> Path:
    """The temporary name for ``path``: hidden, in the same folder (so the rename is atomic).

    ``keep_suffix`` ends it with ``path``'s suffix too, for writers that pick the format by it.
    """
    suffix = path.suffix if keep_suffix else ""
    return path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}{suffix}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(target)
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write_bytes`` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def commit_partial(temporary: Path, target: Path) -> Path:
    """Rename a complete temporary file (written by another library) over ``target``."""
    with open(temporary, "rb") as stream:
        os.fsync(stream.fileno())
    os.replace(temporary, target)
    _fsync_folder(target.parent)
    return target


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); Windows cannot open folders and needs no such step."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_partial_files(folders: Iterable[Path]) -> list[Path]:
    """Delete the ``.partial`` leftovers of killed runs in ``folders`` (not recursive); returns them.

    Call it only while holding the ``RunLock``: then no live run owns these files.
    """
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") and PARTIAL_SUFFIX in path.name and path.is_file():
                path.unlink()
                removed.append(path)
    return removed


def sha256_files(paths: Iterable[Path], names: Iterable[str] | None = None) -> str:
    """sha256 over the contents of ``paths`` in order; with ``names``, each content is prefixed by its name.

    Names make a renamed or reordered DICOM series count as changed. Without names and with one
    path, the result equals ``sha256sum`` of that file.
    """
    digest = hashlib.sha256()
    name_list = list(names) if names is not None else None
    for index, path in enumerate(paths):
        if name_list is not None:
            digest.update(name_list[index].encode("utf-8") + b"\0")
        with open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of one file's content, read in 1 MiB chunks (model weights, inputs, outputs)."""
    return sha256_files([Path(path)])


class RunLock:
    """An exclusive OS lock on ``<folder>/.batch.lock``; the OS releases it when the process dies."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._stream = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(self.path, "a+b")
        try:
            _lock(stream)
        except OSError as error:
            stream.close()
            raise OutputFolderBusyError(
                f"output folder {self.path.parent} is in use by another batch run (lock {self.path}): wait for it "
                "to finish or choose another --output"
            ) from error
        stream.seek(0)
        stream.truncate()
        stream.write(f"{os.getpid()}\n".encode())
        stream.flush()
        self._stream = stream
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._stream is not None:
            _unlock(self._stream)
            self._stream.close()
            self._stream = None


if os.name == "nt":  # Slicer on Windows
    import msvcrt

    def _lock(stream) -> None:
        stream.seek(0)
        msvcrt.locking(stream.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock(stream) -> None:
        stream.seek(0)
        msvcrt.locking(stream.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock(stream) -> None:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(stream) -> None:
        fcntl.flock(stream.fileno(), fcntl.LOCK_UN)
