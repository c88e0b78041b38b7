"""The module's logic without Qt: CT volume node in, streamed report or answers out.

``CTMLLMLogicCore`` takes an MRML scene and plain values, reports through callbacks and raises
the typed errors of ``CTMLLMSlicerLib.errors``; it never opens a dialog. The Slicer module's
``CTMLLMSlicerLogic`` wraps it, and the batch script runs it as is on the slicer-core wheel.

Threads: ``volumeSnapshot`` (and everything else that reads or writes MRML) runs on the caller's
thread, i.e. Slicer's GUI thread; ``run`` (model load, preprocessing, encoding, generation) may
run in a worker thread because it only touches the snapshot's numpy copy and the model.

Caches: the last loaded model (one at a time) and the visual features of the last few
(volume, window preset, non-CT switch, expert) combinations, so a follow-up question skips the
encoder (``CTMLLM.feature_key`` says when features can be reused).

Task experts: a request of task None lets the model's task router pick the expert from the
prompt (the default of ``generateReport`` and ``askQuestion``); ``report`` or ``vqa`` force the
expert of that task. The turn records the expert and whether the router chose it.

Non-CT input: volumes whose intensities do not look like CT in Hounsfield units (MR, normalised
images) are refused unless the caller turns on ``allowNonCT``; accepted, they are scaled by their
own 0.5-99.5th percentiles (``model_core.data``'s ``"percentile"`` window), not an HU window.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from CTMLLMSlicerLib.conversation import QUESTION, REPORT, Conversation, Turn
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
from model_core.data.preprocess import (  # torch-free: offered before torch is installed
    WINDOW_PRESETS,
    percentile_window,
)

RESULT_REFERENCE_ROLE = "CTMLLMResult"
"""Node reference role from a volume node to the text node holding its report and answers."""

DEMO_MODEL = "demo"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
CT_RENDERING_PRESET = "CT-Chest-Contrast-Enhanced"
"""Slicer's volume rendering preset for contrast CT; built here when the presets are not loaded."""
ALLOW_NON_CT_LABEL = "Accept non-CT volumes (MR, normalised images)"
"""The panel's checkbox that turns on ``allowNonCT``."""
PANEL_NON_CT_HINT = f"check '{ALLOW_NON_CT_LABEL}' in the Input section"
"""How a panel user turns on ``allowNonCT``; the batch script names its ``--allow-non-ct`` instead."""


STAGE_LOADING = "loading model"
STAGE_PREPROCESSING = "preprocessing"
STAGE_ENCODING = "encoding"
STAGE_REUSING = "reusing encoded volume"
STAGE_GENERATING = "generating"

ProgressCallback = Callable[[str, "float | None", "float | None"], None]
"""``(stage, fraction or None when unknown, tokens per second or None)``."""


def _noProgress(stage: str, fraction: float | None = None, tokensPerSecond: float | None = None) -> None:
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


@dataclass
class VolumeSnapshot:
    """What the worker needs from a volume node, copied on the GUI thread.

    ``arrayKJI`` is the voxel array ``(slices, rows, columns)`` as MRML stores it, or None when
    the visual features for ``cacheKey`` are cached and no copy is needed; ``ijkToRAS`` is 4x4.
    ``sourceFile``: the file the node was read from (its storage node), checked for damage that
    readers let through silently (``model_core.data.files``); empty when there is none.
    """

    nodeID: str
    name: str
    cacheKey: tuple
    ijkToRAS: np.ndarray
    arrayKJI: np.ndarray | None = None
    sourceFile: str = ""


@dataclass
class PreparedVolume:
    """The model input ``volume`` ``(D, H, W)`` float32 in [0, 1], the preprocessing that made it
    (``PreprocessConfig.to_dict()``), and notices for the user (e.g. accepted as non-CT)."""

    volume: np.ndarray
    preprocessing: dict[str, Any]
    notices: list[str] = field(default_factory=list)


@dataclass
class _Encoded:
    """A cache entry: the visual features, and the preprocessing and notices of their volume."""

    features: Any
    preprocessing: dict[str, Any]
    notices: list[str]


@dataclass
class RunResult:
    """The finished (or cancelled) turn, whether the encoder ran, and notices for the user."""

    volumeNodeID: str
    turn: Turn
    encoded: bool
    modelId: str
    notices: list[str] = field(default_factory=list)


def _defaultModelLoader(request: ModelRequest, notice: Callable[[str], None]) -> Any:
    from model_core.hub import load_model

    return load_model(
        request.spec,
        device=request.device,
        dtype=request.precision,
        cache_dir=request.cacheFolder or None,
        allow_download=request.allowDownload,
        notice=notice,
    )


class CTMLLMLogicCore:
    """Loads the model, turns volume nodes into model input, runs it, stores results in the scene.

    ``modelLoader(request, notice) -> CTMLLM`` defaults to ``model_core.hub.load_model``;
    ``volumeRenderingLogic`` is Slicer's (``slicer.modules.volumerendering.logic()``) or a
    ``vtkSlicerVolumeRenderingLogic`` from slicer-core; without it ``showVolumeRendering`` raises.
    ``volumesLogic`` likewise (``slicer.modules.volumes.logic()`` or a ``vtkSlicerVolumesLogic``
    on the same scene) reads files for ``loadVolumeFile``.
    ``scene`` may be None only while a subclass's other base class initialises first (Slicer's
    ``ScriptedLoadableModuleLogic.__init__`` calls ``super().__init__()`` without arguments).
    ``nonCTHint`` ends the refusal of a non-CT volume: how this caller's user turns ``allowNonCT``
    on (the panel's checkbox by default; the batch script passes its command-line flag).
    """

    featureCacheSize = 4
    dicomDatabase: Any = None
    """Slicer's DICOM database (``slicer.dicomDatabase``), where volumes from the DICOM module find their files."""

    def __init__(
        self,
        scene: Any = None,
        volumeRenderingLogic: Any = None,
        modelLoader: Callable[[ModelRequest, Callable[[str], None]], Any] | None = None,
        nonCTHint: str = PANEL_NON_CT_HINT,
        volumesLogic: Any = None,
    ) -> None:
        self.scene = scene
        self.volumeRenderingLogic = volumeRenderingLogic
        self.volumesLogic = volumesLogic
        self.nonCTHint = nonCTHint
        self._modelLoader = modelLoader or _defaultModelLoader
        self._model: Any = None
        self._modelKey: tuple | None = None
        self._features: OrderedDict[tuple, _Encoded] = OrderedDict()
        self._checkedFiles: dict[str, tuple[float, int]] = {}
        self._lock = threading.RLock()
        self.conversations: dict[str, Conversation] = {}

    # -- model -------------------------------------------------------------------------------
    def isModelCached(self, request: ModelRequest) -> bool:
        return self._model is not None and self._modelKey == request.key

    def needsDownloadConsent(self, request: ModelRequest) -> bool:
        """True when ``request`` names a Hub repo that is not in the cache folder yet."""
        if not isRepoId(request.spec):
            return False
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return True
        cached = try_to_load_from_cache(
            request.spec, "ctmllm_config.json", cache_dir=request.cacheFolder or None
        )
        return not isinstance(cached, str)

    def loadModel(
        self,
        request: ModelRequest,
        progressCallback: ProgressCallback | None = None,
        noticeCallback: Callable[[str], None] | None = None,
    ) -> Any:
        """The model for ``request``, loaded once and kept until another one is requested."""
        progress = progressCallback or _noProgress
        with self._lock:
            if self.isModelCached(request):
                return self._model
            if isRepoId(request.spec) and not request.allowDownload and self.needsDownloadConsent(request):
                raise DownloadNotConfirmedError(
                    f"{request.spec} is a Hugging Face repo that is not downloaded yet: agree to the download "
                    f"(into {request.cacheFolder or defaultModelCacheFolder()}) or pick another model"
                )
            progress(STAGE_LOADING, None, None)
            self.unloadModel()
            try:
                model = self._modelLoader(request, noticeCallback or (lambda message: None))
            except CTMLLMSlicerError:
                raise
            except FileNotFoundError as error:  # model_core.hub.ModelNotFoundError derives from it
                raise ModelUnavailableError(str(error)) from error
            except Exception as error:
                if isOutOfMemory(error):
                    raise self._outOfMemory(request, "loading the model") from error
                raise ModelUnavailableError(f"could not load model {request.spec!r}: {error}") from error
            self._model, self._modelKey = model, request.key
            return model

    def unloadModel(self) -> None:
        """Free the model and every cached feature (they belong to that model)."""
        with self._lock:
            self._model, self._modelKey = None, None
            self._features.clear()

    @staticmethod
    def _outOfMemory(request: ModelRequest, what: str) -> ModelOutOfMemoryError:
        return ModelOutOfMemoryError(
            f"out of memory while {what} on device {request.device!r} with precision {request.precision!r}: "
            f"choose bfloat16/float16, the CPU, a smaller model, or close other applications"
        )

    # -- volume ------------------------------------------------------------------------------
    def loadVolumeFile(
        self, pathOrSeriesFiles: str | os.PathLike | Sequence[str | os.PathLike], name: str | None = None
    ) -> Any:
        """Read a volume file, or the files of one DICOM series, into the scene; returns the
        ``vtkMRMLScalarVolumeNode``.

        Slicer's Volumes logic reads it, as "Add data" does. A truncated NIfTI is refused before
        Slicer's reader would zero-fill its missing voxels; a series is read from its explicit
        file list, so other series in the same folder never mix in. ``name`` defaults to the file
        name without its suffixes (the folder name for a series). Raises ``model_core.data``'s
        ``UnreadableVolumeError`` naming the input.
        """
        from model_core.data.errors import UnreadableVolumeError
        from model_core.data.files import check_readable
        from model_core.data.io import check_volume_file, volume_suffix

        if self.volumesLogic is None:
            raise CTMLLMSlicerError("no volumes logic: create the Logic with one to load volume files")
        single = isinstance(pathOrSeriesFiles, (str, os.PathLike))
        files = [Path(pathOrSeriesFiles)] if single else [Path(f) for f in pathOrSeriesFiles]
        if not files:
            raise UnreadableVolumeError(
                "no files to load: pass a volume file or the files of one DICOM series"
            )
        what = (
            str(files[0])
            if len(files) == 1
            else f"the DICOM series of {len(files)} files in {files[0].parent}"
        )
        for file in files:
            check_readable(file)
        if len(files) == 1 and volume_suffix(files[0]):
            check_volume_file(files[0])  # the verdict read_ct gives, before Slicer's reader
            self._rememberChecked(files[0])
        name = name or (files[0].parent.name if len(files) > 1 else _volumeName(files[0]))
        node = _addArchetypeVolume(self.volumesLogic, files, name)
        if node is None:
            raise UnreadableVolumeError(
                f"{what}: Slicer could not read it as a volume (corrupt, truncated or not an image); export or "
                "copy it again"
            )
        image = node.GetImageData()
        if (
            not node.IsA("vtkMRMLScalarVolumeNode")
            or node.IsA("vtkMRMLLabelMapVolumeNode")
            or image is None
            or image.GetNumberOfScalarComponents() != 1  # vector and tensor nodes derive from scalar ones
        ):
            _removeWithDisplayAndStorage(self.scene, node)
            raise UnreadableVolumeError(
                f"{what}: was read as a {node.GetClassName()}, not a scalar CT volume: pass a single-channel CT"
            )
        return node

    def addVolumeFromCT(self, ct: Any, name: str) -> Any:
        """A scalar volume node holding a ``model_core.data.CTImage`` (read by ``read_ct`` or
        ``read_dicom_series``: DICOM as scanners export it), with its geometry in RAS."""
        import vtk
        from slicer.util import updateVolumeFromArray

        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        matrix = vtk.vtkMatrix4x4()
        for row, values in enumerate(ct.ijk_to_ras()):
            for column, value in enumerate(values):
                matrix.SetElement(row, column, float(value))
        node.SetIJKToRASMatrix(matrix)
        updateVolumeFromArray(node, np.ascontiguousarray(ct.array))
        node.CreateDefaultDisplayNodes()
        return node

    @staticmethod
    def _volumeKey(volumeNode: Any) -> tuple:
        """Changes when the voxels or the geometry change (not on display or reference edits)."""
        image = volumeNode.GetImageData()
        matrix = _ijkToRAS(volumeNode)
        return (volumeNode.GetID(), image.GetMTime(), image.GetDimensions(), tuple(matrix.round(6).ravel()))

    @staticmethod
    def _featureKey(
        request: ModelRequest, volumeKey: tuple, windowPreset: str, allowNonCT: bool, featureKey: tuple
    ) -> tuple:
        return (request.key, volumeKey, windowPreset, allowNonCT, featureKey)

    def volumeSnapshot(
        self,
        volumeNode: Any,
        windowPreset: str = "",
        task: str | None = REPORT,
        request: ModelRequest | None = None,
        allowNonCT: bool = False,
        prompt: str | None = None,
    ) -> VolumeSnapshot:
        """Copy what the worker needs from ``volumeNode`` (GUI thread).

        The voxels are skipped when ``request``'s model is loaded and has the features cached
        for these settings (``task`` None: the expert the router picks for ``prompt``).
        """
        if volumeNode is None:
            raise NoVolumeError("no input volume: select a CT volume in the Input volume selector")
        if volumeNode.GetImageData() is None:
            raise NoVolumeError(f"volume {volumeNode.GetName()!r} holds no image data: load the CT again")
        key = self._volumeKey(volumeNode)
        cached = (
            request is not None
            and self.isModelCached(request)
            and self._featureKey(
                request,
                key,
                windowPreset,
                allowNonCT,
                self._model.feature_key(task, self._promptText(prompt)),
            )
            in self._features
        )
        array = None
        if not cached:
            from slicer.util import arrayFromVolume

            array = np.array(arrayFromVolume(volumeNode), copy=True)  # (slices, rows, columns)
        storage = volumeNode.GetStorageNode()
        source = (storage.GetFileName() or "") if storage is not None else ""
        return VolumeSnapshot(
            volumeNode.GetID(), volumeNode.GetName(), key, _ijkToRAS(volumeNode), array, source
        )

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

    def _rememberChecked(self, path: Path) -> None:
        stat = path.stat()
        self._checkedFiles[str(path)] = (stat.st_mtime, stat.st_size)

    def _checkSourceFile(self, snapshot: VolumeSnapshot) -> None:
        """The integrity check of the file a node was read from (a NIfTI damaged or holding NaN reads
        silently wrong in Slicer too), once per file version."""
        from model_core.data.files import check_file_integrity, is_nifti_name

        path = Path(snapshot.sourceFile) if snapshot.sourceFile else None
        if path is None or not is_nifti_name(path) or not path.is_file():
            return
        stat = path.stat()
        if self._checkedFiles.get(str(path)) != (stat.st_mtime, stat.st_size):
            check_file_integrity(path)
            self._rememberChecked(path)

    def prepareVolume(
        self, snapshot: VolumeSnapshot, model: Any, windowPreset: str = "", allowNonCT: bool = False
    ) -> PreparedVolume:
        """Checks and preprocessing of ``model_core.data``: ``(D, H, W)`` float32 in [0, 1].

        A volume that does not look like CT is refused (the message ends with ``nonCTHint``)
        unless ``allowNonCT``; then it is scaled by its own percentiles and a notice says so.
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

    def _promptText(self, prompt: str | None) -> str:
        """The prompt the model gets: the question, or the loaded model's report prompt."""
        return prompt.strip() if prompt and prompt.strip() else self._model.default_prompt(REPORT)

    # -- running the model -------------------------------------------------------------------
    def run(
        self,
        volume: Any,
        task: str | None,
        prompt: str | None,
        request: ModelRequest,
        windowPreset: str = "",
        maxNewTokens: int | None = None,
        onText: Callable[[str], None] | None = None,
        progressCallback: ProgressCallback | None = None,
        noticeCallback: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        allowNonCT: bool = False,
    ) -> RunResult:
        """Report (``task="report"``) or answer (``task="vqa"``) about a volume node or snapshot.

        ``task`` None: the model's task router picks the expert from the prompt; the turn is a
        question when a prompt is given, else a report with the model's report prompt.
        ``allowNonCT`` accepts a volume that does not look like CT (see the module docstring).

        Text reaches ``onText`` as it is generated; setting ``cancel`` stops after the token in
        progress and returns the partial answer (``turn.cancelled``); set before generation
        starts, it raises ``OperationCancelled`` after the stage in progress. The turn is added to the
        volume's conversation; questions see the earlier complete question turns as history.
        """
        if task not in (REPORT, QUESTION, None):
            raise ValueError(f"task {task!r}: use 'report', 'vqa', or None to let the task router decide")
        kind = task or (QUESTION if prompt and prompt.strip() else REPORT)
        if task == QUESTION and not (prompt and prompt.strip()):
            raise CTMLLMSlicerError("the question is empty: type a question, then click Ask")
        maxNewTokens = _checkedMaxNewTokens(maxNewTokens)
        progress = progressCallback or _noProgress
        notices: list[str] = []

        def notice(message: str) -> None:
            notices.append(message)
            if noticeCallback:
                noticeCallback(message)

        cancel = cancel or threading.Event()
        if not isinstance(volume, VolumeSnapshot):
            volume = self.volumeSnapshot(volume, windowPreset, task, request, allowNonCT, prompt)
        snapshot = volume
        with self._lock:
            model = self.loadModel(request, progress, notice)
            try:
                _raiseIfCancelled(cancel)
                text = self._promptText(prompt)
                entry, encoded = self._featuresFor(
                    model, request, snapshot, windowPreset, allowNonCT, task, text, progress
                )
                for message in entry.notices:
                    notice(message)
                _raiseIfCancelled(cancel)
                conversation = self.conversation(snapshot.nodeID, snapshot.name)
                history = conversation.history() if kind == QUESTION else []
                result = self._generate(
                    model, entry.features, text, task, history, maxNewTokens, onText, progress, cancel
                )
            except CTMLLMSlicerError:
                raise
            except Exception as error:
                if isOutOfMemory(error):
                    raise self._outOfMemory(request, "running the model") from error
                raise
            conversation.modelId = model.model_id
            conversation.settings = {
                **request.settings(),
                "window": windowPreset or "model default",
                "allow_non_ct": allowNonCT,
                "preprocessing": entry.preprocessing,
                "max_new_tokens": maxNewTokens or "model default",
            }
            turn = conversation.add(
                Turn(
                    kind,
                    text,
                    result.text,
                    result.cancelled,
                    result.new_tokens,
                    round(result.seconds, 3),
                    expert=result.expert,
                    routed=task is None and result.expert is not None,
                )
            )
        return RunResult(snapshot.nodeID, turn, encoded, model.model_id, notices)

    def generateReport(
        self, volume: Any, request: ModelRequest, forceExpert: bool = False, **kwargs: Any
    ) -> RunResult:
        """A full report of the volume with the model's default report prompt; the task router
        picks the expert, or with ``forceExpert`` the report expert reads the volume."""
        return self.run(volume, REPORT if forceExpert else None, None, request, **kwargs)

    def askQuestion(
        self, volume: Any, question: str, request: ModelRequest, forceExpert: bool = False, **kwargs: Any
    ) -> RunResult:
        """One more question turn on the volume, reusing its encoded features and the conversation;
        the task router picks the expert, or with ``forceExpert`` the question expert."""
        if not (question and question.strip()):
            raise CTMLLMSlicerError("the question is empty: type a question, then click Ask")
        return self.run(volume, QUESTION if forceExpert else None, question, request, **kwargs)

    def _featuresFor(
        self,
        model: Any,
        request: ModelRequest,
        snapshot: VolumeSnapshot,
        windowPreset: str,
        allowNonCT: bool,
        task: str | None,
        prompt: str,
        progress: ProgressCallback,
    ) -> tuple[_Encoded, bool]:
        key = self._featureKey(
            request, snapshot.cacheKey, windowPreset, allowNonCT, model.feature_key(task, prompt)
        )
        if key in self._features:
            self._features.move_to_end(key)
            progress(STAGE_REUSING, 1.0, None)
            return self._features[key], False
        if snapshot.arrayKJI is None:  # cached when snapshotted, evicted since: copy again
            raise NoVolumeError(f"the encoded {snapshot.name!r} left the cache: click again to re-encode")
        progress(STAGE_PREPROCESSING, None, None)
        prepared = self.prepareVolume(snapshot, model, windowPreset, allowNonCT)
        progress(STAGE_ENCODING, None, None)
        entry = _Encoded(
            model.encode_volume(prepared.volume, task=task, prompt=prompt),
            prepared.preprocessing,
            prepared.notices,
        )
        self._features[key] = entry
        while len(self._features) > self.featureCacheSize:
            self._features.popitem(last=False)
        return entry, True

    @staticmethod
    def _generate(
        model: Any,
        features: Any,
        prompt: str,
        task: str | None,
        history: list,
        maxNewTokens: int | None,
        onText: Callable[[str], None] | None,
        progress: ProgressCallback,
        cancel: threading.Event,
    ) -> Any:
        budget = maxNewTokens or model.config.generation.max_new_tokens
        start, tokens = time.perf_counter(), 0
        progress(STAGE_GENERATING, 0.0, None)

        def streamed(chunk: str) -> None:
            nonlocal tokens
            tokens += len(model.tokenizer(chunk, add_special_tokens=False).input_ids)
            elapsed = time.perf_counter() - start
            progress(STAGE_GENERATING, min(tokens / budget, 1.0), tokens / elapsed if elapsed > 0 else None)
            if onText:
                onText(chunk)

        return model.generate(
            features,
            prompt,
            task=task,
            history=history,
            max_new_tokens=budget,
            on_text=streamed,
            cancel=cancel,
        )

    # -- conversations and results in the scene ----------------------------------------------
    def conversation(self, volumeNodeID: str, volumeName: str = "") -> Conversation:
        """The conversation on a volume node, created empty on first use."""
        if volumeNodeID not in self.conversations:
            self.conversations[volumeNodeID] = Conversation(volumeName or volumeNodeID)
        return self.conversations[volumeNodeID]

    def clearConversation(self, volumeNodeID: str) -> None:
        """Start over on a volume: the next question has no history (features stay cached)."""
        self.conversations.pop(volumeNodeID, None)

    def resultTextNode(self, volumeNode: Any) -> Any:
        """The text node attached to ``volumeNode`` by ``saveResultToTextNode``, or None."""
        return volumeNode.GetNodeReference(RESULT_REFERENCE_ROLE)

    def saveResultToTextNode(self, volumeNode: Any, text: str | None = None) -> Any:
        """Store the conversation text in a ``vtkMRMLTextNode`` referenced by the volume.

        The reference and the text are saved with the scene. A second save updates the same node.
        """
        if volumeNode is None:
            raise NoVolumeError("no input volume: select the volume whose results should be saved")
        conversation = self.conversations.get(volumeNode.GetID())
        if text is None:
            if conversation is None or conversation.isEmpty():
                raise CTMLLMSlicerError(
                    f"nothing to save for {volumeNode.GetName()!r}: generate a report first"
                )
            text = conversation.toText()
        textNode = self.resultTextNode(volumeNode)
        if textNode is None:
            textNode = self.scene.AddNewNodeByClass(
                "vtkMRMLTextNode", f"{volumeNode.GetName()} CT-MLLM report"
            )
            volumeNode.SetNodeReferenceID(RESULT_REFERENCE_ROLE, textNode.GetID())
        textNode.SetText(text)
        if conversation is not None:
            textNode.SetAttribute("CTMLLM.ModelId", conversation.modelId)
            textNode.SetAttribute("CTMLLM.Settings", json.dumps(conversation.settings, sort_keys=True))
        return textNode

    def exportConversation(self, volumeNodeID: str, path: str | os.PathLike) -> Path:
        """Write the conversation as Markdown (``.md``) or JSON (``.json``, with model id and settings)."""
        conversation = self.conversations.get(volumeNodeID)
        if conversation is None or conversation.isEmpty():
            raise CTMLLMSlicerError("nothing to export: generate a report or ask a question first")
        target = Path(path)
        suffix = target.suffix.lower()
        if suffix in (".md", ".markdown"):
            content = conversation.toMarkdown()
        elif suffix == ".json":
            content = conversation.toJSON()
        else:
            raise CTMLLMSlicerError(
                f"cannot export to {target.name!r}: use a .md (Markdown) or .json file name"
            )
        target.write_text(content, encoding="utf-8")
        return target

    def exportReportSR(
        self, volumeNode: Any, path: str | os.PathLike, identifiers: dict[str, str] | None = None
    ) -> tuple[Path, list[str]]:
        """Write the volume's conversation as a DICOM SR (``sr_export``); returns the file and notices.

        Raises ``MissingIdentifiersError`` (its ``missing`` names them) for a volume that did not
        come from DICOM, until ``identifiers`` gives a patient ID and a Study Instance UID.
        """
        from CTMLLMSlicerLib.sr_export import exportVolumeSR

        if volumeNode is None:
            raise NoVolumeError("no input volume: select the volume whose results should be exported")
        conversation = self.conversations.get(volumeNode.GetID())
        return exportVolumeSR(volumeNode, conversation, self._model, path, identifiers, self.dicomDatabase)

    # -- display -----------------------------------------------------------------------------
    def windowRange(self, windowPreset: str = "") -> tuple[float, float]:
        """The HU range (low, high) the model reads: the preset's, or for "" the loaded model's own
        window (the default preset while no model is loaded or it uses a per-volume window)."""
        if windowPreset:
            if windowPreset not in WINDOW_PRESETS:
                raise CTMLLMSlicerError(f"window {windowPreset!r}: choose one of {', '.join(WINDOW_PRESETS)}")
            return WINDOW_PRESETS[windowPreset]
        window = self._model.config.preprocessing.get("window") if self._model is not None else None
        if isinstance(window, (list, tuple)) and len(window) == 2:
            return (float(window[0]), float(window[1]))
        return WINDOW_PRESETS.get(window, next(iter(WINDOW_PRESETS.values())))

    def applyWindowPreset(self, volumeNode: Any, windowPreset: str = "", allowNonCT: bool = False) -> None:
        """Show the volume in the slice views with the window the model reads: the HU window, or
        with ``allowNonCT`` for a volume that does not look like CT its own percentile window."""
        from slicer.util import arrayFromVolume

        array = arrayFromVolume(volumeNode) if allowNonCT else None  # (slices, rows, columns)
        if array is not None and not ct_intensity_verdict(array).is_ct:
            low, high = percentile_window(array)
        else:
            low, high = self.windowRange(windowPreset)
        displayNode = volumeNode.GetDisplayNode()
        if displayNode is not None:
            displayNode.SetAutoWindowLevel(False)
            displayNode.SetWindowLevel(high - low, (low + high) / 2.0)

    def showVolumeRendering(self, volumeNode: Any, presetName: str = CT_RENDERING_PRESET) -> Any:
        """Render ``volumeNode`` in the 3D view with a CT preset; returns its display node."""
        vrLogic = self.volumeRenderingLogic
        if vrLogic is None:
            raise CTMLLMSlicerError(
                "no volume rendering logic: create the Logic with one to show the 3D view"
            )
        displayNode = vrLogic.GetFirstVolumeRenderingDisplayNode(volumeNode)
        if displayNode is None:
            displayNode = vrLogic.CreateDefaultVolumeRenderingNodes(volumeNode)
        preset = vrLogic.GetPresetByName(presetName)
        if preset is None:
            preset = _buildCTPreset(presetName)
            vrLogic.AddPreset(preset)
        displayNode.GetVolumePropertyNode().Copy(preset)
        displayNode.SetVisibility(True)
        return displayNode


def _checkedMaxNewTokens(value: int | None) -> int | None:
    """None (the model's default) or at least 1, as everywhere (``model_core.config``); 0 is refused."""
    from model_core.config import ConfigError, check_max_new_tokens

    try:
        return check_max_new_tokens(value, "maximum new tokens")
    except ConfigError as error:
        raise CTMLLMSlicerError(str(error)) from error


def _raiseIfCancelled(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise OperationCancelled("cancelled before generation started")


def _volumeName(path: Path) -> str:
    """``scan.nii.gz`` -> ``scan``: the file name without its compression and format suffixes."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return Path(name).stem or name


def _addArchetypeVolume(volumesLogic: Any, files: list[Path], name: str) -> Any:
    """One file through ``AddArchetypeVolume``; a series through its file-list overload."""
    import vtk

    if len(files) == 1:
        return volumesLogic.AddArchetypeVolume(str(files[0]), name)
    fileList = vtk.vtkStringArray()
    for file in files:
        fileList.InsertNextValue(str(file))
    return volumesLogic.AddArchetypeVolume(str(files[0]), name, 0, fileList)


def _removeWithDisplayAndStorage(scene: Any, node: Any) -> None:
    """Take a refused node out of the scene with the display and storage nodes its reader added."""
    companions = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    companions.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for companion in companions:
        if companion is not None and scene.IsNodePresent(companion):
            scene.RemoveNode(companion)


def _ijkToRAS(volumeNode: Any) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _buildCTPreset(name: str) -> Any:
    """A contrast-CT transfer function (fat and air clear, vessels and bone opaque)."""
    import slicer
    import vtk

    preset = slicer.vtkMRMLVolumePropertyNode()
    preset.SetName(name)
    opacity = vtk.vtkPiecewiseFunction()
    for hu, alpha in ((-1024, 0.0), (-100, 0.0), (120, 0.0), (250, 0.25), (600, 0.6), (3071, 0.8)):
        opacity.AddPoint(hu, alpha)
    colors = vtk.vtkColorTransferFunction()
    for hu, rgb in (
        (-1024, (0, 0, 0)),
        (120, (0.55, 0.25, 0.15)),
        (250, (0.9, 0.45, 0.3)),
        (600, (1.0, 0.9, 0.8)),
        (3071, (1, 1, 1)),
    ):
        colors.AddRGBPoint(hu, *rgb)
    volumeProperty = preset.GetVolumeProperty()
    volumeProperty.SetScalarOpacity(opacity)
    volumeProperty.SetColor(colors)
    volumeProperty.ShadeOn()
    volumeProperty.SetInterpolationTypeToLinear()
    return preset
