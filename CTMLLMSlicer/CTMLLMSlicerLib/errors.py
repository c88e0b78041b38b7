"""Typed errors of the CT-MLLM module: each message names the input and the fix.

The Logic raises these and never opens a dialog; the panel shows ``str(error)`` in its status
line, the batch script prints it. ``describeError`` turns any exception into such a message.
"""

from __future__ import annotations


class CTMLLMSlicerError(Exception):
    """Base class: something the user can fix (input, model, settings); show the message as is."""


class NoVolumeError(CTMLLMSlicerError):
    """No input volume was given, or the node holds no image data."""


class NotCTVolumeError(CTMLLMSlicerError):
    """The volume failed the CT checks of ``model_core.data`` (not HU, too few slices, empty...)."""


class ModelUnavailableError(CTMLLMSlicerError):
    """No model at the chosen source (missing folder, not downloaded, unreadable checkpoint)."""


class DownloadNotConfirmedError(ModelUnavailableError):
    """A Hugging Face repo id was chosen, it is not in the cache, and the user has not agreed to download it."""


class ModelOutOfMemoryError(CTMLLMSlicerError):
    """The device ran out of memory while loading or running the model."""


class MissingDependenciesError(CTMLLMSlicerError):
    """torch, transformers, ... are not installed in this Python and the user declined the install."""


class OperationCancelled(CTMLLMSlicerError):
    """The user cancelled between two stages (a cancelled generation returns its partial answer)."""


class JobBusyError(CTMLLMSlicerError):
    """A second job was started while one is still running."""


class WorkerError(CTMLLMSlicerError):
    """The model worker process failed, crashed, or stopped answering; a new one can be started."""


class UnsupportedSlicerError(CTMLLMSlicerError):
    """This Slicer (or its Python) is older than the module needs."""


class InstallFailedError(MissingDependenciesError):
    """pip (or the PyTorch extension) could not install the packages: offline, or pip failed."""


_OOM_MARKERS = ("out of memory", "cuda error: out of memory", "cannot allocate memory")


def isOutOfMemory(error: BaseException) -> bool:
    """True for MemoryError and torch's (CUDA) out-of-memory errors, recognised by type name or text."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error).lower() for marker in _OOM_MARKERS)


def describeError(error: BaseException) -> str:
    """One message for the panel: our typed errors and model_core's input errors as they are
    (their messages name the problem and the fix), anything else with its type name."""
    from model_core.data.errors import CTInputError

    if isinstance(error, (CTMLLMSlicerError, CTInputError)):
        return str(error)
    return f"Unexpected error ({type(error).__name__}): {error}. The Python console has the details."
