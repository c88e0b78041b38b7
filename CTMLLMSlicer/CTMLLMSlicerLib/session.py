"""The model side of the module, without MRML and without Qt: load, preprocess, encode, generate.

``ModelSession`` keeps one loaded model and the visual features of the last few encoded volumes,
so a follow-up question skips the encoder. It runs where the model runs: inside the model worker
process that the panel starts (``CTMLLMSlicerLib.worker``), or in the caller's process for the
batch script and for scripts (``CTMLLMLogicCore.run``). Its input is a ``VolumeSnapshot``: the
voxel array and geometry copied from a volume node on the GUI thread, never the node itself.

Non-CT input: volumes whose intensities do not look like CT in Hounsfield units (MR, normalised
images) are refused unless the caller turns on ``allowNonCT``; accepted, they are scaled by their
own 0.5-99.5th percentiles (``model_core.data``'s ``"percentile"`` window), not an HU window.

Task routing: ``task=None`` lets the model's text-guided router pick the expert from the prompt;
``GenerationOutcome.routedTask`` and ``EncodedVolume.routedTask`` say which one it picked.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from CTMLLMSlicerLib.conversation import QUESTION, REPORT
from CTMLLMSlicerLib.errors import (
    CTMLLMSlicerError,
    DownloadNotConfirmedError,
    ModelOutOfMemoryError,
    ModelUnavailableError,
    NotCTVolumeError,
    NoVolumeError,
    OperationCancelled,
    isOutOfMemory,
)
from model_core.data.checks import ct_intensity_verdict
from model_core.data.preprocess import PERCENTILE_WINDOW  # torch-free: offered before torch is installed

DEMO_MODEL = "demo"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
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

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def noProgress(stage: str, fraction: float | None = None, tokensPerSecond: float | None = None) -> None:
    return None


def isRepoId(spec: str) -> bool:
    """``owner/name`` that is not an existing path: a Hugging Face repo id."""
    return bool(_REPO_ID.match(spec)) and not os.path.exists(os.path.expanduser(spec))


def defaultModelCacheFolder() -> str:
    """Where downloaded models go by default: a user folder that survives Slicer upgrades."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "CTMLLMSlicer", "models")


def checkTask(task: str | None) -> None:
    if task not in TASKS:
        raise ValueError(f"task {task!r}: use 'report', 'vqa' or None (the router picks from the prompt)")


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
    IDs after a scene close: never key anything by it).
    """

    volumeUID: str
    name: str
    volumeKey: str
    ijkToRAS: np.ndarray
    arrayKJI: np.ndarray | None = None
    nodeID: str = ""


@dataclass(frozen=True)
class EncodeSettings:
    """Everything besides the voxels that changes the visual features of a volume."""

    windowPreset: str = ""
    allowNonCT: bool = False
    task: str | None = REPORT
    prompt: str | None = None
    """Read only when ``task`` is None (the router picks the expert from it)."""

    def toDict(self) -> dict[str, Any]:
        return {
            "windowPreset": self.windowPreset,
            "allowNonCT": self.allowNonCT,
            "task": self.task,
            "prompt": self.prompt,
        }


def featureKey(request: ModelRequest, volumeKey: str, settings: EncodeSettings) -> str:
    """One string per (model, voxels and geometry, window, non-CT switch, expert): the cache key.

    With ``task=None`` the router's choice depends on the prompt, so the prompt is part of the key.
    """
    routing = settings.task if settings.task is not None else ["router", settings.prompt or ""]
    return json.dumps([list(request.key), volumeKey, settings.windowPreset, settings.allowNonCT, routing])


@dataclass
class PreparedVolume:
    """The model input ``volume`` ``(D, H, W)`` float32 in [0, 1], the preprocessing that made it
    (``PreprocessConfig.to_dict()``), and notices for the user (e.g. accepted as non-CT)."""

    volume: np.ndarray
    preprocessing: dict[str, Any]
    notices: list[str] = field(default_factory=list)


@dataclass
class EncodedVolume:
    """A cache entry: the visual features, their volume, preprocessing, notices and expert."""

    features: Any
    volumeUID: str
    preprocessing: dict[str, Any]
    notices: list[str]
    routedTask: str | None


@dataclass
class GenerationOutcome:
    """What one generation produced; ``routedTask`` is the expert whose features were used."""

    text: str
    newTokens: int
    seconds: float
    cancelled: bool
    routedTask: str | None


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
    cached = try_to_load_from_cache(request.spec, "ctmllm_config.json", cache_dir=request.cacheFolder or None)
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
    """One loaded model and the features of the last ``featureCacheSize`` encodings.

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
        self._features: OrderedDict[str, EncodedVolume] = OrderedDict()
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
            except Exception as error:
                if isOutOfMemory(error):
                    raise outOfMemoryError(request, "loading the model") from error
                raise ModelUnavailableError(f"could not load model {request.spec!r}: {error}") from error
            self.model, self.modelKey = model, request.key
            return model

    def unloadModel(self) -> None:
        """Free the model and every cached feature (they belong to that model)."""
        with self._lock:
            self.model, self.modelKey = None, None
            self._features.clear()

    def modelWindow(self) -> Any:
        """The loaded model's own HU window (a preset name or ``[low, high]``), or None."""
        return self.model.config.preprocessing.get("window") if self.model is not None else None

    # -- features ----------------------------------------------------------------------------
    def hasFeatures(self, key: str) -> bool:
        return key in self._features

    def cachedKeys(self) -> list[str]:
        return list(self._features)

    def dropFeatures(self, volumeUID: str | None = None) -> None:
        """Forget the features of one volume (removed from the scene), or all (scene closed)."""
        with self._lock:
            for key in [k for k, v in self._features.items() if volumeUID in (None, v.volumeUID)]:
                del self._features[key]

    @staticmethod
    def preprocessConfig(
        model: Any, windowPreset: str = "", allowNonCT: bool = False, looksLikeCT: bool = True
    ) -> Any:
        """How volumes are prepared for ``model``: the preprocessing it was trained with
        (``CTMLLM.preprocess_config``), with the user's window preset if one is chosen ("" keeps
        the model's own). With ``allowNonCT`` non-CT volumes are accepted, and one that does not
        look like CT (``looksLikeCT`` False) takes its own percentile window, whatever the preset:
        an HU window means nothing for it."""
        overrides: dict[str, Any] = {"window": windowPreset} if windowPreset else {}
        if allowNonCT:
            overrides["allow_non_ct"] = True
            if not looksLikeCT:
                overrides["window"] = PERCENTILE_WINDOW
        return model.preprocess_config(**overrides)

    def prepareVolume(
        self, snapshot: VolumeSnapshot, model: Any, windowPreset: str = "", allowNonCT: bool = False
    ) -> PreparedVolume:
        """Checks and preprocessing of ``model_core.data``: ``(D, H, W)`` float32 in [0, 1].

        A volume that does not look like CT is refused (the message ends with ``nonCTHint``)
        unless ``allowNonCT``; then it is scaled by its own percentiles and a notice says so.
        """
        from model_core.data import CTImage, CTInputError, NotCTError, preprocess

        if snapshot.arrayKJI is None:
            raise NoVolumeError(
                f"volume {snapshot.name!r} was snapshotted without voxels: take a new snapshot"
            )
        try:
            ct = CTImage.from_ijk_to_ras(
                snapshot.arrayKJI, snapshot.ijkToRAS, source=snapshot.name, allow_non_ct=allowNonCT
            )
            looksLikeCT = not allowNonCT or ct_intensity_verdict(ct.array).is_ct
            config = self.preprocessConfig(model, windowPreset, allowNonCT, looksLikeCT)
            volume = preprocess(ct, config)
        except NotCTError as error:
            reason = ct_intensity_verdict(snapshot.arrayKJI).reason
            raise NotCTVolumeError(
                f"{snapshot.name}: does not look like a CT in Hounsfield units: {reason}. If it is a CT, or "
                f"to run on it anyway, {self.nonCTHint}."
            ) from error
        except CTInputError as error:
            raise NotCTVolumeError(str(error)) from error
        notices = []
        if not looksLikeCT:
            ignored = f" (the {windowPreset} HU window is not used)" if windowPreset else ""
            notices.append(
                f"{snapshot.name} does not look like a CT: read as non-CT input, scaled by its own "
                f"0.5-99.5th percentiles{ignored}."
            )
        return PreparedVolume(np.asarray(volume, dtype=np.float32), config.to_dict(), notices)

    def encode(
        self,
        request: ModelRequest,
        snapshot: VolumeSnapshot,
        settings: EncodeSettings,
        progress: ProgressCallback = noProgress,
    ) -> tuple[str, EncodedVolume, bool]:
        """``(key, entry, encoded)``: the features of ``snapshot`` for ``settings``, from the cache
        when they are there (``encoded`` False), else preprocessed and encoded now."""
        checkTask(settings.task)
        with self._lock:
            model = self.loadModel(request, progress)
            key = featureKey(request, snapshot.volumeKey, settings)
            if key in self._features:
                self._features.move_to_end(key)
                progress(STAGE_REUSING, 1.0, None)
                return key, self._features[key], False
            if snapshot.arrayKJI is None:  # cached when snapshotted, evicted since: copy again
                raise NoVolumeError(f"the encoded {snapshot.name!r} left the cache: click again to re-encode")
            progress(STAGE_PREPROCESSING, None, None)
            prepared = self.prepareVolume(snapshot, model, settings.windowPreset, settings.allowNonCT)
            progress(STAGE_ENCODING, None, None)
            try:
                features = model.encode_volume(prepared.volume, task=settings.task, prompt=settings.prompt)
            except Exception as error:
                if isOutOfMemory(error):
                    raise outOfMemoryError(request, "encoding the volume") from error
                raise
            entry = EncodedVolume(
                features,
                snapshot.volumeUID,
                prepared.preprocessing,
                prepared.notices,
                getattr(features, "task", settings.task),
            )
            self._features[key] = entry
            while len(self._features) > self.featureCacheSize:
                self._features.popitem(last=False)
            return key, entry, True

    def features(self, key: str) -> EncodedVolume:
        if key not in self._features:
            raise NoVolumeError("the encoded volume left the cache: click again to re-encode")
        return self._features[key]

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
        """Stream the answer to ``prompt`` about the features cached under ``key``.

        ``task=None`` uses the expert the router picked when the volume was encoded. Setting
        ``cancel`` stops after the token in progress and returns the partial text.
        """
        checkTask(task)
        with self._lock:
            model = self.loadModel(request, progress)
            entry = self.features(key)
            cancel = cancel or threading.Event()
            budget = maxNewTokens or model.config.generation.max_new_tokens
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
                    task=task or entry.routedTask,
                    history=history or [],
                    max_new_tokens=budget,
                    on_text=streamed,
                    cancel=cancel,
                )
            except Exception as error:
                if isOutOfMemory(error):
                    raise outOfMemoryError(request, "running the model") from error
                raise
            report(result.new_tokens, time.perf_counter() - start)
            return GenerationOutcome(
                result.text, result.new_tokens, round(result.seconds, 3), result.cancelled, entry.routedTask
            )
