"""The module's logic without Qt: CT volume node in, streamed report or answers out.

``CTMLLMLogicCore`` takes an MRML scene and plain values, reports through callbacks and raises
the typed errors of ``CTMLLMSlicerLib.errors``; it never opens a dialog. The Slicer module's
``CTMLLMSlicerLogic`` wraps it, and the batch script runs it as is on the slicer-core wheel.

Two ways to run the model, one implementation of it (``session.ModelSession``):

- ``startJob`` / ``pollJob`` (the panel): the model runs in a worker process
  (``worker_client.ModelWorker``) that keeps it loaded, with the encoded volumes, between
  requests. The voxels and geometry are copied here, on the GUI thread (MRML is read only there),
  and handed over as a file; the panel polls from a QTimer and never waits.
- ``run`` / ``generateReport`` / ``askQuestion`` (the batch script, scripts): the model runs in
  this process and the call returns when the text is complete.

Conversations are kept per volume, keyed by a unique id stored on the volume node
(``scene_results.VolumeIds``), never by its node ID, which MRML reuses after a scene close;
``forgetVolume`` and ``forgetAll`` drop a removed volume's (or a closed scene's) conversations and
cached features. A saved result text node restores the conversation when a scene is reopened.

Task experts: a request of task None lets the model's task router pick the expert from the
prompt (the default of ``generateReport`` and ``askQuestion``, and of the panel); ``report`` or
``vqa`` force the expert of that task. The turn records the expert and whether the router chose
it. The turn's own kind is the request's: a question when a prompt is given, else a report.

Input: files are checked before Slicer's reader (``loadVolumeFile``), and every volume is
prepared by ``model_core.data.prepare_input``, the decision the command line and the batch take;
refusals are ``NotCTVolumeError`` caused by the input verdict, in the worker too.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from CTMLLMSlicerLib import display, jobs, scene_results, volume_nodes
from CTMLLMSlicerLib.conversation import QUESTION, REPORT, Conversation, Turn
from CTMLLMSlicerLib.errors import CTMLLMSlicerError, JobBusyError, NoVolumeError
from CTMLLMSlicerLib.scene_results import RESULT_REFERENCE_ROLE, VolumeIds  # noqa: F401  (re-exported)
from CTMLLMSlicerLib.session import (  # noqa: F401  (names the module and the batch script import from here)
    ALLOW_NON_CT_LABEL,
    DEMO_MODEL,
    DEVICES,
    PANEL_NON_CT_HINT,
    PRECISIONS,
    STAGE_ENCODING,
    STAGE_GENERATING,
    STAGE_LOADING,
    STAGE_PREPROCESSING,
    STAGE_REUSING,
    EncodeSettings,
    ModelRequest,
    ModelSession,
    NoticeCallback,
    PreparedVolume,
    ProgressCallback,
    VolumeSnapshot,
    checkedMaxNewTokens,
    checkTask,
    defaultModelCacheFolder,
    inputKey,
    isRepoId,
    needsDownloadConsent,
    noProgress,
    raiseIfCancelled,
)
from CTMLLMSlicerLib.worker_client import ModelWorker, waitForJob
from CTMLLMSlicerLib.worker_protocol import writeVolumeFile
from model_core.data.preprocess import WINDOW_PRESETS  # noqa: F401  (torch-free; offered before torch is installed)
from model_core.prompts import DEFAULT_REPORT_PROMPT

CT_RENDERING_PRESET = display.CT_RENDERING_PRESET


@dataclass
class RunResult:
    """The finished (or cancelled) turn (``turn.expert`` read the volume), whether the encoder
    ran, and notices for the user."""

    volumeNodeID: str
    turn: Turn
    encoded: bool
    modelId: str
    notices: list[str] = field(default_factory=list)


@dataclass
class _PendingJob:
    """A worker job as the Logic remembers it until its end event arrives."""

    volumeUID: str
    volumeName: str
    nodeID: str
    kind: str
    task: str | None
    prompt: str
    request: ModelRequest
    settings: EncodeSettings
    maxNewTokens: int | None
    detached: bool = False
    """Its volume left the scene (removed, scene closed): the result is not recorded."""


def _promptText(prompt: str | None) -> str:
    """The text the model is asked: the question, or the report prompt when there is none."""
    return (prompt or "").strip() or DEFAULT_REPORT_PROMPT


def _request(task: str | None, prompt: str | None) -> tuple[str, str]:
    """``(kind, text)``: the turn's kind (a question when a prompt is given or the question expert
    is forced, else a report) and the text the model is asked (``_promptText``)."""
    checkTask(task)
    given = bool((prompt or "").strip())
    if task == QUESTION and not given:
        raise CTMLLMSlicerError("the question is empty: type a question, then click Ask")
    return task or (QUESTION if given else REPORT), _promptText(prompt)


class CTMLLMLogicCore:
    """Turns volume nodes into model input, runs the model, stores results in the scene.

    ``modelLoader(request, notice) -> CTMLLM`` defaults to ``model_core.hub.load_model`` (for
    ``run``; the worker loads with ``model_core.hub``). ``volumeRenderingLogic`` is Slicer's
    (``slicer.modules.volumerendering.logic()``) or a ``vtkSlicerVolumeRenderingLogic`` from
    slicer-core; without it ``showVolumeRendering`` raises. ``volumesLogic`` likewise
    (``slicer.modules.volumes.logic()`` or a ``vtkSlicerVolumesLogic`` on the same scene) reads
    files for ``loadVolumeFile``. ``worker``: the model worker for ``startJob`` (one is made on
    first use, in ``workerFolder``).
    ``scene`` may be None only while a subclass's other base class initialises first (Slicer's
    ``ScriptedLoadableModuleLogic.__init__`` calls ``super().__init__()`` without arguments).
    ``nonCTHint`` ends the refusal of a non-CT volume: how this caller's user turns ``allowNonCT``
    on (the panel's checkbox by default; the batch script passes its command-line flag).
    """

    dicomDatabase: Any = None
    """Slicer's DICOM database (``slicer.dicomDatabase``), where volumes from the DICOM module find their files."""

    def __init__(
        self,
        scene: Any = None,
        volumeRenderingLogic: Any = None,
        modelLoader: Callable[[ModelRequest, NoticeCallback], Any] | None = None,
        nonCTHint: str = PANEL_NON_CT_HINT,
        volumesLogic: Any = None,
        worker: ModelWorker | None = None,
    ) -> None:
        self.scene = scene
        self.volumeRenderingLogic = volumeRenderingLogic
        self.volumesLogic = volumesLogic
        self.session = ModelSession(modelLoader, nonCTHint)
        self.worker = worker
        self.workerFolder: str | None = None
        self.volumeIds = VolumeIds(scene)
        self.conversations: dict[str, Conversation] = {}
        self._job: _PendingJob | None = None

    @property
    def nonCTHint(self) -> str:
        return self.session.nonCTHint

    # -- model in this process (batch script, scripts) ---------------------------------------
    def isModelCached(self, request: ModelRequest) -> bool:
        return self.session.isModelCached(request)

    def needsDownloadConsent(self, request: ModelRequest) -> bool:
        """True when ``request`` names a Hub repo that is not in the cache folder yet."""
        return needsDownloadConsent(request)

    def loadModel(
        self,
        request: ModelRequest,
        progressCallback: ProgressCallback | None = None,
        noticeCallback: NoticeCallback | None = None,
    ) -> Any:
        """The model for ``request`` in this process, loaded once and kept until another one is requested."""
        return self.session.loadModel(request, progressCallback or noProgress, noticeCallback)

    def unloadModel(self) -> bool:
        """Free the model and its cached features here, and end the model worker (its memory, GPU
        memory included, goes with it); True if a worker was running."""
        self.session.unloadModel()
        return self.worker.unload() if self.worker is not None else False

    preprocessConfig = staticmethod(ModelSession.preprocessConfig)

    def prepareVolume(
        self, snapshot: VolumeSnapshot, model: Any, windowPreset: str = "", allowNonCT: bool = False
    ) -> PreparedVolume:
        """Checks and preprocessing of ``model_core.data`` (see ``ModelSession.prepareVolume``)."""
        return self.session.prepareVolume(snapshot, model, windowPreset, allowNonCT)

    def modelWindow(self) -> Any:
        """The HU window of the loaded model (here or in the worker), or None while none is loaded."""
        return self.loadedModelInfo().get("window")

    def loadedModelInfo(self) -> dict[str, Any]:
        """The model loaded here, else the worker's (``ModelSession.modelInfo``); {} while none is."""
        info = self.session.modelInfo()
        if not info and self.worker is not None and self.worker.isRunning():
            info = self.worker.modelInfo
        return info

    # -- volume ------------------------------------------------------------------------------
    def loadVolumeFile(
        self, pathOrSeriesFiles: str | os.PathLike | Sequence[str | os.PathLike], name: str | None = None
    ) -> Any:
        """Read a volume file, or the files of one DICOM series, into the scene; returns the
        ``vtkMRMLScalarVolumeNode`` (checked first: see ``volume_nodes.loadVolumeFile``)."""
        return volume_nodes.loadVolumeFile(
            self.scene, self.volumesLogic, pathOrSeriesFiles, name, self.session.rememberChecked
        )

    def addVolumeFromCT(self, ct: Any, name: str) -> Any:
        """A scalar volume node holding a ``model_core.data.CTImage``, its geometry in RAS (``volume_nodes``)."""
        return volume_nodes.addVolumeFromCT(self.scene, ct, name)

    def volumeUID(self, volumeNode: Any) -> str:
        """The volume's unique id (stored on the node, saved with the scene; never reused)."""
        return self.volumeIds.get(volumeNode)

    def _snapshot(
        self,
        volumeNode: Any,
        settings: EncodeSettings,
        request: ModelRequest | None,
        isCached: Callable[[str], bool],
    ) -> VolumeSnapshot:
        return volume_nodes.snapshotVolume(
            volumeNode,
            self.volumeIds,
            lambda key: request is None or not isCached(inputKey(request, key, settings)),
        )

    def volumeSnapshot(
        self,
        volumeNode: Any,
        windowPreset: str = "",
        task: str | None = REPORT,
        request: ModelRequest | None = None,
        allowNonCT: bool = False,
        prompt: str | None = None,
    ) -> VolumeSnapshot:
        """Copy what the model needs from ``volumeNode`` (GUI thread) for ``run``.

        The voxels are skipped when ``request``'s model is loaded in this process and holds this
        volume's input prepared for these settings (any expert can then encode it).
        """
        settings = EncodeSettings(windowPreset, allowNonCT, task, _promptText(prompt))
        cached = request is not None and self.session.isModelCached(request)
        return self._snapshot(
            volumeNode, settings, request, lambda key: cached and self.session.hasInput(key)
        )

    # -- running the model in this process ---------------------------------------------------
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
        noticeCallback: NoticeCallback | None = None,
        cancel: threading.Event | None = None,
        allowNonCT: bool = False,
    ) -> RunResult:
        """Report (``task="report"``) or answer (``task="vqa"``) about a volume node or snapshot,
        in this process.

        ``task`` None: the model's task router picks the expert from the prompt (``turn.expert``
        says which); the turn is a question when a prompt is given, else a report with the
        report prompt. ``allowNonCT`` accepts a volume that does not look like CT (see ``session``).

        Text reaches ``onText`` as it is generated; setting ``cancel`` stops after the token in
        progress and returns the partial answer (``turn.cancelled``); set before generation
        starts, it raises ``OperationCancelled`` after the stage in progress. The turn is added to the
        volume's conversation; questions see the earlier complete question turns as history.
        """
        kind, text = _request(task, prompt)
        maxNewTokens = checkedMaxNewTokens(maxNewTokens)
        progress = progressCallback or noProgress
        notices: list[str] = []

        def notice(message: str) -> None:
            notices.append(message)
            if noticeCallback:
                noticeCallback(message)

        cancel = cancel or threading.Event()
        settings = EncodeSettings(windowPreset, allowNonCT, task, text)
        snapshot = volume
        if not isinstance(volume, VolumeSnapshot):
            snapshot = self.volumeSnapshot(volume, windowPreset, task, request, allowNonCT, text)
        model = self.session.loadModel(request, progress, notice)
        raiseIfCancelled(cancel)
        key, entry, encoded = self.session.encode(request, snapshot, settings, progress)
        for message in entry.input.notices:
            notice(message)
        raiseIfCancelled(cancel)
        conversation = self.conversation(snapshot.volumeUID, snapshot.name)
        history = conversation.history() if kind == QUESTION else []
        outcome = self.session.generate(
            request, key, text, task, history, maxNewTokens, onText, progress, cancel
        )
        turn = self._recordTurn(
            conversation, model.model_id, request, settings, entry.input.preprocessing, maxNewTokens,
            _turn(kind, task, text, outcome.text, outcome.cancelled, outcome.newTokens, outcome.seconds,
                  outcome.expert),
            snapshot.nodeID,
        )  # fmt: skip
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

    def _recordTurn(
        self,
        conversation: Conversation,
        modelId: str,
        request: ModelRequest,
        settings: EncodeSettings,
        preprocessing: dict[str, Any],
        maxNewTokens: int | None,
        turn: Turn,
        nodeID: str,
    ) -> Turn:
        """Add ``turn`` to the conversation with the settings that produced it; refresh the volume's
        result text node when there is one, so a saved scene never holds an older conversation."""
        conversation.modelId = modelId
        conversation.settings = {
            **request.settings(),
            "window": settings.windowPreset or "model default",
            "allow_non_ct": settings.allowNonCT,
            "preprocessing": preprocessing,
            "max_new_tokens": maxNewTokens or "model default",
        }
        conversation.add(turn)
        node = self.scene.GetNodeByID(nodeID) if self.scene is not None and nodeID else None
        if (
            node is not None
            and self.conversations.get(self.volumeIds.get(node, assign=False) or "") is conversation
        ):
            if scene_results.resultTextNode(node) is not None:
                self.saveResultToTextNode(node)
        return turn

    # -- running the model in the worker process (the panel) ---------------------------------
    def modelWorker(self) -> ModelWorker:
        """The worker that runs the panel's jobs (made on first use; a new process after it ended)."""
        if self.worker is None:
            self.worker = ModelWorker(folder=self.workerFolder)
        return self.worker

    def isJobRunning(self) -> bool:
        return self._job is not None

    def startJob(
        self,
        volumeNode: Any,
        task: str | None,
        prompt: str | None,
        request: ModelRequest,
        windowPreset: str = "",
        maxNewTokens: int | None = None,
        allowNonCT: bool = False,
    ) -> None:
        """Start a report or an answer in the model worker and return at once (GUI thread: the
        volume is read here). ``pollJob`` then hands over its events; exactly one of finished,
        failed or cancelled ends it. Same arguments as ``run`` (``task`` None: the router decides).
        The voxels are copied and handed over only when the worker does not hold this volume's
        input prepared for these settings; it reuses the features of the expert it picks."""
        if self._job is not None:
            raise JobBusyError("a model job is still running: wait for it or cancel it first")
        kind, text = _request(task, prompt)
        maxNewTokens = checkedMaxNewTokens(maxNewTokens)
        worker = self.modelWorker()
        settings = EncodeSettings(windowPreset, allowNonCT, task, text)
        snapshot = self._snapshot(volumeNode, settings, request, worker.hasInput)
        key = inputKey(request, snapshot.volumeKey, settings)
        volume = {
            "name": snapshot.name,
            "volumeUID": snapshot.volumeUID,
            "volumeKey": snapshot.volumeKey,
            "ijkToRAS": snapshot.ijkToRAS.tolist(),
            "sourceFile": snapshot.sourceFile,
        }
        cleanup = []
        if snapshot.arrayKJI is not None:
            worker.folder.mkdir(parents=True, exist_ok=True)
            path = writeVolumeFile(snapshot.arrayKJI, worker.folder, f"volume-{uuid.uuid4().hex}")
            cleanup.append(path)
            volume["path"] = str(path)
        encode = {"volume": volume, "settings": settings.toDict()}
        conversation = self.conversation(volumeNode)
        history = conversation.history() if kind == QUESTION else []
        try:
            worker.startJob(request, text, task, key, encode, history, maxNewTokens, cleanup)
        except BaseException:
            for path in cleanup:
                path.unlink(missing_ok=True)
            raise
        self._job = _PendingJob(
            snapshot.volumeUID,
            snapshot.name,
            snapshot.nodeID,
            kind,
            task,
            text,
            request,
            settings,
            maxNewTokens,
        )

    def pollJob(self) -> list[jobs.JobEvent]:
        """The running job's events since the last poll (never waits). Its ``finished`` event
        carries a ``RunResult``, and the turn is then in the volume's conversation; a job whose
        volume left the scene ends as ``cancelled``, its result dropped."""
        if self.worker is None:
            return []
        events = []
        for event in self.worker.poll():
            if event.kind in jobs.END_KINDS:
                job, self._job = self._job, None
                if job is None or job.detached:
                    event = jobs.JobEvent(jobs.CANCELLED)
                elif event.kind == jobs.FINISHED:
                    event = jobs.JobEvent(jobs.FINISHED, result=self._finishJob(job, event.result))
            events.append(event)
        return events

    def cancelJob(self) -> None:
        """Stop the running job: generation ends after the token in progress; a worker that does
        not stop in time is ended (the next job starts a new one)."""
        if self.worker is not None:
            self.worker.cancel()

    def waitForJob(
        self,
        onEvent: Callable[[jobs.JobEvent], None] | None = None,
        timeout: float = 600.0,
        idle: Callable[[], None] | None = None,
    ) -> jobs.JobEvent:
        """Poll until the running job ends (scripts and the self-test); returns its end event."""
        if self._job is None:
            raise CTMLLMSlicerError("no model job is running: start one with startJob")
        return waitForJob(self.pollJob, self.cancelJob, onEvent, timeout, idle)

    def _finishJob(self, job: _PendingJob, result: dict[str, Any]) -> RunResult:
        conversation = self.conversation(job.volumeUID, job.volumeName)
        turn = self._recordTurn(
            conversation, result.get("modelId", ""), job.request, job.settings, result.get("preprocessing", {}),
            job.maxNewTokens,
            _turn(job.kind, job.task, job.prompt, result.get("text", ""), bool(result.get("cancelled")),
                  int(result.get("newTokens", 0)), float(result.get("seconds", 0.0)), result.get("expert")),
            job.nodeID,
        )  # fmt: skip
        return RunResult(
            job.nodeID, turn, bool(result.get("encoded")), result.get("modelId", ""),
            list(result.get("notices", [])),
        )  # fmt: skip

    # -- conversations and results in the scene ----------------------------------------------
    def _conversationKey(self, volume: Any) -> tuple[str, str, Any]:
        """``(key, name, node or None)`` for a volume node, a node ID of this scene, or a volume id."""
        node = volume
        if isinstance(volume, str):
            node = self.scene.GetNodeByID(volume) if self.scene is not None and volume else None
            if node is None:
                return volume, "", None
        return self.volumeIds.get(node), node.GetName(), node

    def conversation(self, volume: Any, volumeName: str = "") -> Conversation:
        """The conversation on a volume (a node, its ID in this scene, or its unique id), created
        on first use; a conversation saved with the scene in the volume's result node is restored."""
        key, name, node = self._conversationKey(volume)
        if key not in self.conversations:
            stored = scene_results.storedConversation(node) if node is not None else None
            self.conversations[key] = stored or Conversation(volumeName or name or key)
        return self.conversations[key]

    def peekConversation(self, volumeNode: Any) -> Conversation | None:
        """The volume's conversation if it has one (in memory or saved in the scene); never creates
        one and never writes to the node (for display)."""
        if volumeNode is None:
            return None
        uid = self.volumeIds.get(volumeNode, assign=False)
        if uid in self.conversations:
            return self.conversations[uid]
        if scene_results.storedConversation(volumeNode) is None:
            return None
        return self.conversation(volumeNode)

    def clearConversation(self, volume: Any) -> None:
        """Start over on a volume: the next question has no history (features stay cached). A
        result node saved earlier keeps its text until the next turn updates it."""
        key, name, _ = self._conversationKey(volume)
        self.conversations[key] = Conversation(name or key)

    def forgetVolume(self, volumeNode: Any) -> None:
        """The volume left the scene: drop its conversation and cached features, and let a job
        still running on it end without a result."""
        uid = self.volumeIds.get(volumeNode, assign=False)
        if uid is None:
            return
        self.conversations.pop(uid, None)
        self.session.dropFeatures(uid)
        if self.worker is not None:
            self.worker.forget(uid)
        self.volumeIds.forget(uid)
        if self._job is not None and self._job.volumeUID == uid:
            self._job.detached = True
            self.cancelJob()

    def forgetAll(self) -> None:
        """The scene is closing: drop every conversation and cached feature; a running job is
        cancelled and ends without a result. The loaded model stays."""
        self.conversations.clear()
        self.session.dropFeatures()
        if self.worker is not None:
            self.worker.forget()
        self.volumeIds.forget()
        if self._job is not None:
            self._job.detached = True
            self.cancelJob()

    def resultTextNode(self, volumeNode: Any) -> Any:
        """The text node attached to ``volumeNode`` by ``saveResultToTextNode``, or None."""
        return scene_results.resultTextNode(volumeNode)

    def saveResultToTextNode(self, volumeNode: Any, text: str | None = None) -> Any:
        """Store the conversation in a ``vtkMRMLTextNode`` referenced by the volume, beside it in
        the subject hierarchy; its text starts with the machine-generated notice.

        The reference, the text and the conversation are saved with the scene. A second save
        updates the same node.
        """
        if volumeNode is None:
            raise NoVolumeError("no input volume: select the volume whose results should be saved")
        conversation = self.peekConversation(volumeNode)
        if text is None:
            if conversation is None or conversation.isEmpty():
                raise CTMLLMSlicerError(
                    f"nothing to save for {volumeNode.GetName()!r}: generate a report first"
                )
            text = conversation.toText()
        return scene_results.writeResultTextNode(self.scene, volumeNode, conversation, text)

    def exportConversation(self, volume: Any, path: str | os.PathLike) -> Path:
        """Write the conversation as Markdown (``.md``) or JSON (``.json``, with model id and settings)."""
        key, _, node = self._conversationKey(volume)
        conversation = self.conversations.get(key) or (
            self.peekConversation(node) if node is not None else None
        )
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

        The SR's observer device is the model that wrote the conversation, loaded here or in the
        worker (its weights checksum when it is still loaded). Raises ``MissingIdentifiersError``
        (its ``missing`` names them) for a volume that did not come from DICOM, until
        ``identifiers`` gives a patient ID and a Study Instance UID.
        """
        from CTMLLMSlicerLib.sr_export import exportVolumeSR

        if volumeNode is None:
            raise NoVolumeError("no input volume: select the volume whose results should be exported")
        return exportVolumeSR(
            volumeNode,
            self.peekConversation(volumeNode),
            self.loadedModelInfo(),
            path,
            identifiers,
            self.dicomDatabase,
        )

    # -- display -----------------------------------------------------------------------------
    def windowRange(self, windowPreset: str = "") -> tuple[float, float]:
        """The HU range (low, high) the model reads: the preset's, or for "" the loaded model's own
        window (the default preset while no model is loaded or it uses a per-volume window)."""
        return display.windowRange(windowPreset, self.modelWindow())

    def applyWindowPreset(self, volumeNode: Any, windowPreset: str = "", allowNonCT: bool = False) -> None:
        """Show the volume in the slice views with the window the model reads (``display``)."""
        display.applyWindowPreset(volumeNode, windowPreset, allowNonCT, self.modelWindow())

    def showVolumeRendering(self, volumeNode: Any, presetName: str = CT_RENDERING_PRESET) -> Any:
        """Render ``volumeNode`` in the 3D view with a CT preset, other volumes hidden; returns its
        display node."""
        return display.showVolumeRendering(self.volumeRenderingLogic, volumeNode, presetName)

    def showVolume(
        self, volumeNode: Any, windowPreset: str = "", allowNonCT: bool = False, keepWindowLevel: bool = False
    ) -> Any:
        """Show the selected volume: a layout with a 3D view, its volume rendering alone in 3D,
        and (unless ``keepWindowLevel``) the window the model reads in the slice views."""
        display.useLayoutWith3DView(self.scene)
        if not keepWindowLevel:
            self.applyWindowPreset(volumeNode, windowPreset, allowNonCT)
        return self.showVolumeRendering(volumeNode)

    def loadSampleVolume(self) -> Any:
        """The module's sample CT (a phantom made by the project's phantom code) into the scene."""
        from CTMLLMSlicerLib.resources import SAMPLE_CT_NAME, sampleCTPath

        return self.loadVolumeFile(sampleCTPath(), SAMPLE_CT_NAME)


def _turn(
    kind: str,
    task: str | None,
    prompt: str,
    answer: str,
    cancelled: bool,
    newTokens: int,
    seconds: float,
    expert: str | None,
) -> Turn:
    """The turn of a request of ``kind``; ``routed`` when the task router picked the ``expert``."""
    return Turn(kind, prompt, answer, cancelled, newTokens, seconds, expert=expert,
                routed=task is None and expert is not None)  # fmt: skip
