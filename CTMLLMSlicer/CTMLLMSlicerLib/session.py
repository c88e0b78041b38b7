"""The model side of the module, without MRML and without Qt: load, preprocess, encode, generate.

``ModelSession`` keeps one loaded model, the prepared input of the last few volumes and their
visual features, so a follow-up question skips the encoder and another expert skips the
preprocessing. It runs where the model runs: inside the model worker process that the panel
starts (``CTMLLMSlicerLib.worker``), or in the caller's process for the batch script and for
scripts (``CTMLLMLogicCore.run``). Its input is a ``VolumeSnapshot``: the voxel array and geometry
copied from a volume node on the GUI thread, never the node itself.

Input: every volume goes through ``model_core.data.prepare_input``, the decision the command line
and the Python API take (same checks, window and preprocessing); the file a node was read from is
checked for damage that readers let through (``model_core.data.files``), here, off the GUI thread.

Non-CT input: volumes whose intensities do not look like CT in Hounsfield units (MR, normalised
images) are refused unless the caller turns on ``allowNonCT``; accepted, they are scaled by their
own 0.5-99.5th percentiles (``model_core.data``'s ``"percentile"`` window), not an HU window.

Task routing: ``task=None`` lets the model's task router pick the expert from the prompt;
``EncodedVolume.expert`` and ``GenerationOutcome.expert`` say which expert read the volume.
Features are reused exactly when ``CTMLLM.feature_key`` says they are the same (the router picks
the same expert for another prompt), so the caller keys volumes by ``inputKey`` alone.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from CTMLLMSlicerLib.conversation import QUESTION, REPORT
from CTMLLMSlicerLib.errors import (
    CTMLLMSlicerError,
    DownloadNotConfirmedError,
    MissingDependenciesError,
    ModelOutOfMemoryError,
    ModelUnavailableError,
    NotCTVolumeError,
    NoVolumeError,
    OperationCancelled,
    isOutOfMemory,
)

DEMO_MODEL = "demo"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")
"""``int8``: float32 on the CPU with the language model's linears in dynamic int8 (``model_core.int8``)."""
TASKS = (REPORT, QUESTION, None)
"""``None``: the model's text-guided router picks the expert from the prompt."""
ALLOW_NON_CT_LABEL = "Accept non-CT volumes (MR, normalised images)"
"""The panel's checkbox that turns on ``allowNonCT``."""
PANEL_NON_CT_HINT = f"check '{ALLOW_NON_CT_LABEL}' in the Input section"
"""How a panel user turns on ``allowNonCT``; the batch script names its ``--allow-non-ct`` instead."""

STAGE_LOADING = "loading model"
STAGE_PREPROCESSING = "preprocessing"
STAGE_ENCODING = "encoding"
STAGE_REUSING = "reusing encoded volume"
STAGE_GENERATING = "generating"
PROGRESS_INTERVAL_S = 0.1
"""Generation reports progress (tokens so far, tokens/s) at most ten times a second."""

ProgressCallback = Callable[[str, "float | None", "float | None"], None]
"""``(stage, fraction or None when unknown, tokens per second or None)``."""
NoticeCallback = Callable[[str], None]


def noProgress(stage: str, fraction: float | None = None, tokensPerSecond: float | None = None) -> None:
    return None


def isRepoId(spec: str) -> bool:
    """``owner/name`` that is not a path: a Hugging Face repo id (``model_core.hub``'s rule, so a
    mistyped relative folder is never mistaken for a repo to download)."""
    from model_core.hub import looks_like_hub_repo_id  # torch-free

    return looks_like_hub_repo_id(spec)


def defaultModelCacheFolder() -> str:
    """Where downloaded models go by default: a user folder that survives Slicer upgrades."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "CTMLLMSlicer", "models")


def checkTask(task: str | None) -> None:
    if task not in TASKS:
        raise ValueError(f"task {task!r}: use 'report', 'vqa', or None to let the task router decide")


def checkedMaxNewTokens(value: int | None) -> int | None:
    """None (the model's default) or at least 1, as everywhere (``model_core.config``); 0 is refused."""
    from model_core.config import ConfigError, check_max_new_tokens

    try:
        return check_max_new_tokens(value, "maximum new tokens")
    except ConfigError as error:
        raise CTMLLMSlicerError(str(error)) from error


@dataclass(frozen=True)
class ModelRequest:
    """Which model to use and how: ``spec`` is "demo", a local folder or a Hugging Face repo id."""

    spec: str = DEMO_MODEL
    device: str = "auto"
    precision: str = "auto"
    cacheFolder: str = ""
    allowDownload: bool = False

    def __post_init__(self) -> None:
        if not self.spec.strip():
            raise ModelUnavailableError("no model chosen: pick the demo model, a local folder or a repo id")
        if self.device not in DEVICES:
            raise ModelUnavailableError(f"device {self.device!r}: choose one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ModelUnavailableError(
                f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}"
            )

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.spec, self.device, self.precision)

    def settings(self) -> dict[str, str]:
        return {"model": self.spec, "device": self.device, "precision": self.precision}

    def toDict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "device": self.device,
            "precision": self.precision,
            "cacheFolder": self.cacheFolder,
            "allowDownload": self.allowDownload,
        }

    @classmethod
    def fromDict(cls, data: dict[str, Any]) -> ModelRequest:
        return cls(**{name: data[name] for name in cls().toDict() if name in data})


@dataclass
class VolumeSnapshot:
    """What the model needs from a volume node, copied on the GUI thread.

    ``volumeKey`` identifies the voxels and geometry (it starts with the volume's unique id, see
    ``CTMLLMLogicCore.volumeUID``); ``arrayKJI`` is the voxel array ``(slices, rows, columns)`` as
    MRML stores it, or None when the features for this volume are cached and no copy is needed;
    ``ijkToRAS`` is 4x4. ``nodeID`` is the node's ID when the snapshot was taken (MRML reuses
    IDs after a scene close: never key anything by it). ``sourceFile``: the file the node was read
    from (its storage node), checked for damage that readers let through silently; "" when none.
    """

    volumeUID: str
    name: str
    volumeKey: str
    ijkToRAS: np.ndarray
    arrayKJI: np.ndarray | None = None
    nodeID: str = ""
    sourceFile: str = ""


@dataclass(frozen=True)
class EncodeSettings:
    """Everything besides the voxels that changes the visual features of a volume: the window and
    the non-CT switch change the model's input; the task (None: the router reads the prompt)
    picks the expert."""

    windowPreset: str = ""
    allowNonCT: bool = False
    task: str | None = REPORT
    prompt: str = ""
    """The prompt the model gets; with ``task`` None the task router picks the expert from it."""

    def toDict(self) -> dict[str, Any]:
        return {
            "windowPreset": self.windowPreset,
            "allowNonCT": self.allowNonCT,
            "task": self.task,
            "prompt": self.prompt,
        }


def inputKey(request: ModelRequest, volumeKey: str, settings: EncodeSettings) -> str:
    """One string per model input (model, voxels and geometry, window, non-CT switch): what the
    caller needs to know to send the voxels only once. The expert is added by ``ModelSession``
    (``CTMLLM.feature_key``), which alone knows what the router makes of a prompt."""
    return json.dumps([list(request.key), volumeKey, settings.windowPreset, settings.allowNonCT])


def keyVolumeUID(key: str) -> str | None:
    """The volume's unique id inside an ``inputKey`` (its volume key starts with it, see
    ``worker_client.volumeKey``)."""
    try:
        return json.loads(json.loads(key)[1])[0]
    except (ValueError, IndexError, TypeError):
        return None


@dataclass
class PreparedVolume:
    """The model input ``volume`` ``(D, H, W)`` float32 in [0, 1], the preprocessing that made it
    (``PreprocessConfig.to_dict()``), and notices for the user (e.g. accepted as non-CT)."""

    volume: np.ndarray
    preprocessing: dict[str, Any]
    notices: list[str] = field(default_factory=list)


@dataclass
class EncodedVolume:
    """A cache entry: the visual features, the expert that encoded them (None for a model without
    task experts), and their input's preprocessing and notices. ``prefix``: the language model's
    key/value cache of the last conversation on these features (``model_core.prefix_cache``), so
    a follow-up question prefills only its new text."""

    features: Any
    expert: str | None
    input: PreparedVolume
    prefix: Any = None


@dataclass
class GenerationOutcome:
    """What one generation produced; ``expert`` read the volume (None without task experts)."""

    text: str
    newTokens: int
    seconds: float
    cancelled: bool
    expert: str | None


def defaultModelLoader(request: ModelRequest, notice: NoticeCallback) -> Any:
    from model_core.hub import load_model

    return load_model(
        request.spec,
        device=request.device,
        dtype=request.precision,
        cache_dir=request.cacheFolder or None,
        allow_download=request.allowDownload,
        notice=notice,
    )


def needsDownloadConsent(request: ModelRequest) -> bool:
    """True when ``request`` names a Hub repo that is not in the cache folder yet."""
    if not isRepoId(request.spec):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return True
    from model_core.hub import CONFIG_FILE

    cached = try_to_load_from_cache(request.spec, CONFIG_FILE, cache_dir=request.cacheFolder or None)
    return not isinstance(cached, str)


def outOfMemoryError(request: ModelRequest, what: str) -> ModelOutOfMemoryError:
    return ModelOutOfMemoryError(
        f"out of memory while {what} on device {request.device!r} with precision {request.precision!r}: "
        f"choose bfloat16/float16, the CPU, a smaller model, or close other applications"
    )


def raiseIfCancelled(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise OperationCancelled("cancelled before generation started")


class ModelSession:
    """One loaded model, the prepared input of the last ``featureCacheSize`` volumes and the
    features of the last ``featureCacheSize`` encodings.

    ``modelLoader(request, notice) -> CTMLLM`` defaults to ``model_core.hub.load_model``.
    ``nonCTHint`` ends the refusal of a non-CT volume: how this caller's user turns ``allowNonCT``
    on (the panel's checkbox by default; the batch script passes its command-line flag).
    """

    featureCacheSize = 4

    def __init__(
        self,
        modelLoader: Callable[[ModelRequest, NoticeCallback], Any] | None = None,
        nonCTHint: str = PANEL_NON_CT_HINT,
    ) -> None:
        self.nonCTHint = nonCTHint
        self._modelLoader = modelLoader or defaultModelLoader
        self.model: Any = None
        self.modelKey: tuple | None = None
        self._inputs: OrderedDict[str, PreparedVolume] = OrderedDict()
        self._features: OrderedDict[tuple[str, str], EncodedVolume] = OrderedDict()
        self._checkedFiles: dict[str, tuple[float, int]] = {}
        self._lock = threading.RLock()

    # -- model -------------------------------------------------------------------------------
    def isModelCached(self, request: ModelRequest) -> bool:
        return self.model is not None and self.modelKey == request.key

    def loadModel(
        self,
        request: ModelRequest,
        progress: ProgressCallback = noProgress,
        notice: NoticeCallback | None = None,
    ) -> Any:
        """The model for ``request``, loaded once and kept until another one is requested."""
        with self._lock:
            if self.isModelCached(request):
                return self.model
            if isRepoId(request.spec) and not request.allowDownload and needsDownloadConsent(request):
                raise DownloadNotConfirmedError(
                    f"{request.spec} is a Hugging Face repo that is not downloaded yet: agree to the download "
                    f"(into {request.cacheFolder or defaultModelCacheFolder()}) or pick another model"
                )
            progress(STAGE_LOADING, None, None)
            self.unloadModel()
            try:
                model = self._modelLoader(request, notice or (lambda message: None))
            except CTMLLMSlicerError:
                raise
            except FileNotFoundError as error:  # model_core.hub.ModelNotFoundError derives from it
                raise ModelUnavailableError(str(error)) from error
            except ModuleNotFoundError as error:  # the batch script in a Slicer whose Python lacks them
                raise MissingDependenciesError(
                    f"could not load model {request.spec!r}: {error}: the model's Python packages are not all "
                    "installed here; in Slicer, open the CT-MLLM module once and accept its install of the "
                    "model's packages (outside Slicer: the README's set-up)"
                ) from error
            except Exception as error:  # ModelLoadError, ConfigError: their messages name the file and fix
                if isOutOfMemory(error):
                    raise outOfMemoryError(request, "loading the model") from error
                raise ModelUnavailableError(f"could not load model {request.spec!r}: {error}") from error
            self.model, self.modelKey = model, request.key
            return model

    def unloadModel(self) -> None:
        """Free the model and every cached input and feature (they belong to that model)."""
        with self._lock:
            self.model, self.modelKey = None, None
            self._inputs.clear()
            self._features.clear()

    def modelWindow(self) -> Any:
        """The loaded model's own HU window (a preset name or ``[low, high]``), or None."""
        return self.model.config.preprocessing.get("window") if self.model is not None else None

    def modelInfo(self) -> dict[str, Any]:
        """What the Logic needs to know of the loaded model without holding it: its name, window,
        answer budget and weights file (the DICOM SR's observer device names its checksum)."""
        if self.model is None:
            return {}
        folder = getattr(self.model, "model_dir", None)
        weights = ""
        if folder:
            from model_core.model_files import WEIGHTS_FILE

            weights = os.path.join(str(folder), WEIGHTS_FILE)
        return {
            "modelId": self.model.model_id,
            "window": self.modelWindow(),
            "maxNewTokens": self.model.config.generation.max_new_tokens,
            "weightsFile": weights,
        }

    # -- inputs and features -----------------------------------------------------------------
    def hasInput(self, key: str) -> bool:
        """Whether the prepared input of ``inputKey`` is here (the voxels need not be sent)."""
        return key in self._inputs

    def cachedKeys(self) -> list[str]:
        """The input keys held here (see ``inputKey``)."""
        return list(self._inputs)

    def dropFeatures(self, volumeUID: str | None = None) -> None:
        """Forget the inputs and features of one volume (removed from the scene), or all (scene closed)."""
        with self._lock:
            for key in [k for k in self._inputs if volumeUID in (None, keyVolumeUID(k))]:
                del self._inputs[key]
            for key in [k for k in self._features if volumeUID in (None, keyVolumeUID(k[0]))]:
                del self._features[key]

    @staticmethod
    def preprocessConfig(
        model: Any, windowPreset: str = "", allowNonCT: bool = False, looksLikeCT: bool = True
    ) -> Any:
        """How volumes are prepared for ``model`` (``model_core.data.input_settings``, the rule every
        entry point shares): its training preprocessing, the user's window preset if one is chosen
        ("" keeps the model's own), the volume's own percentiles for non-CT input accepted with
        ``allowNonCT``."""
        from model_core.data.decision import input_settings

        return input_settings(model.config.preprocessing, windowPreset, allowNonCT, looksLikeCT)

    def _checkSourceFile(self, snapshot: VolumeSnapshot) -> None:
        """The integrity check of the file a node was read from (a NIfTI damaged or holding NaN reads
        silently wrong in Slicer too), once per file version."""
        from model_core.data.files import check_file_integrity, is_nifti_name

        path = snapshot.sourceFile
        if not path or not is_nifti_name(Path(path)) or not os.path.isfile(path):
            return
        stat = os.stat(path)
        if self._checkedFiles.get(path) != (stat.st_mtime, stat.st_size):
            check_file_integrity(Path(path))
            self._checkedFiles[path] = (stat.st_mtime, stat.st_size)

    def rememberChecked(self, path: str | os.PathLike) -> None:
        """``path`` was just checked (before Slicer read it): its next use skips the check."""
        stat = os.stat(path)
        self._checkedFiles[str(path)] = (stat.st_mtime, stat.st_size)

    def prepareVolume(
        self, snapshot: VolumeSnapshot, model: Any, windowPreset: str = "", allowNonCT: bool = False
    ) -> PreparedVolume:
        """``model_core.data.prepare_input``, as the command line and the batch: ``(D, H, W)``
        float32 in [0, 1], with the source file's integrity checked first.

        A volume that does not look like CT is refused (the message ends with ``nonCTHint``)
        unless ``allowNonCT``; then it is scaled by its own percentiles and a notice says so.
        Refusals are ``NotCTVolumeError`` caused by the input verdict (a ``CTInputError``).
        """
        from model_core.data import CTImage, CTInputError, NotCTError, prepare_input

        if snapshot.arrayKJI is None:
            raise NoVolumeError(
                f"volume {snapshot.name!r} was snapshotted without voxels: take a new snapshot"
            )
        try:
            self._checkSourceFile(snapshot)
            source = f"{snapshot.name} ({snapshot.sourceFile})" if snapshot.sourceFile else snapshot.name
            ct = CTImage.from_ijk_to_ras(  # named as the user sees it, and by its file as read_ct names it
                snapshot.arrayKJI, snapshot.ijkToRAS, source=source, allow_non_ct=allowNonCT
            )
            prepared = prepare_input(
                ct, model.config.preprocessing, window=windowPreset or None, allow_non_ct=allowNonCT
            )
        except NotCTError as error:
            raise NotCTVolumeError(str(error.with_hint(self.nonCTHint))) from error
        except CTInputError as error:
            raise NotCTVolumeError(str(error)) from error
        return PreparedVolume(prepared.volume, prepared.config.to_dict(), prepared.notices)

    @staticmethod
    def _featureKey(model: Any, key: str, task: str | None, prompt: str) -> tuple[str, str]:
        """``inputKey`` and what else the features depend on (``CTMLLM.feature_key``: a forced
        task, the expert the router picks for the prompt, or nothing without task experts)."""
        return key, json.dumps(list(model.feature_key(task, prompt)))

    def encode(
        self,
        request: ModelRequest,
        snapshot: VolumeSnapshot,
        settings: EncodeSettings,
        progress: ProgressCallback = noProgress,
    ) -> tuple[str, EncodedVolume, bool]:
        """``(inputKey, entry, encoded)``: the features of ``snapshot`` for ``settings``, from the
        cache when they are there (``encoded`` False), else encoded now from the input prepared
        earlier or from the snapshot's voxels."""
        checkTask(settings.task)
        with self._lock:
            model = self.loadModel(request, progress)
            key = inputKey(request, snapshot.volumeKey, settings)
            featureKey = self._featureKey(model, key, settings.task, settings.prompt)
            if featureKey in self._features:
                self._features.move_to_end(featureKey)
                if key in self._inputs:
                    self._inputs.move_to_end(key)
                progress(STAGE_REUSING, 1.0, None)
                return key, self._features[featureKey], False
            prepared = self._inputs.get(key)
            if prepared is None:
                if snapshot.arrayKJI is None:  # cached when snapshotted, evicted since: copy again
                    raise NoVolumeError(
                        f"the encoded {snapshot.name!r} left the cache: click again to re-encode"
                    )
                progress(STAGE_PREPROCESSING, None, None)
                prepared = self.prepareVolume(snapshot, model, settings.windowPreset, settings.allowNonCT)
                _remember(self._inputs, key, prepared, self.featureCacheSize)
            progress(STAGE_ENCODING, None, None)
            try:
                features = model.encode_volume(prepared.volume, task=settings.task, prompt=settings.prompt)
            except Exception as error:
                if isOutOfMemory(error):
                    raise outOfMemoryError(request, "encoding the volume") from error
                raise
            entry = EncodedVolume(features, features.task, prepared)
            _remember(self._features, featureKey, entry, self.featureCacheSize)
            return key, entry, True

    # -- generation --------------------------------------------------------------------------
    def generate(
        self,
        request: ModelRequest,
        key: str,
        prompt: str,
        task: str | None,
        history: list[tuple[str, str]] | None = None,
        maxNewTokens: int | None = None,
        onText: Callable[[str], None] | None = None,
        progress: ProgressCallback = noProgress,
        cancel: threading.Event | None = None,
    ) -> GenerationOutcome:
        """Stream the answer to ``prompt`` about the volume of input key ``key``, with the features
        ``encode`` made for this task and prompt.

        ``task`` None uses the expert the router picked; setting ``cancel`` stops after the token in
        progress and returns the partial text.
        """
        checkTask(task)
        with self._lock:
            model = self.loadModel(request, progress)
            entry = self._features.get(self._featureKey(model, key, task, prompt))
            if entry is None:
                raise NoVolumeError("the encoded volume left the cache: click again to re-encode")
            if entry.prefix is None:
                from model_core.prefix_cache import PrefixCache

                entry.prefix = PrefixCache()
            cancel = cancel or threading.Event()
            budget = checkedMaxNewTokens(maxNewTokens) or model.config.generation.max_new_tokens
            start, last, pieces = time.perf_counter(), 0.0, []
            progress(STAGE_GENERATING, 0.0, None)

            def report(tokens: int, elapsed: float) -> None:
                progress(
                    STAGE_GENERATING, min(tokens / budget, 1.0), tokens / elapsed if elapsed > 0 else None
                )

            def streamed(chunk: str) -> None:
                # counting tokens costs a tokenizer call: do it only when the bar is updated
                nonlocal last
                pieces.append(chunk)
                now = time.perf_counter()
                if now - last >= PROGRESS_INTERVAL_S:
                    last = now
                    report(
                        len(model.tokenizer("".join(pieces), add_special_tokens=False).input_ids), now - start
                    )
                if onText:
                    onText(chunk)

            try:
                result = model.generate(
                    entry.features,
                    prompt,
                    task=task,
                    history=history or [],
                    max_new_tokens=budget,
                    on_text=streamed,
                    cancel=cancel,
                    prefix_cache=entry.prefix,
                )
            except Exception as error:
                if isOutOfMemory(error):
                    raise outOfMemoryError(request, "running the model") from error
                raise
            report(result.new_tokens, time.perf_counter() - start)
            return GenerationOutcome(
                result.text, result.new_tokens, round(result.seconds, 3), result.cancelled, result.expert
            )


def _remember(cache: OrderedDict, key: Any, value: Any, size: int) -> None:
    """Put ``value`` in an LRU ``cache`` of ``size`` entries, dropping the oldest."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)
