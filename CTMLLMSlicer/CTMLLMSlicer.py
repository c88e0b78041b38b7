"""CT-MLLM: radiology reports and answers about a CT volume from a multimodal LLM, in 3D Slicer.

The four classes of Slicer's scripted-module template, in its order: the module (metadata), the
parameter node (panel state saved with the scene), the widget (GUI only), the logic (no GUI; the
``CTMLLMLogicCore`` of ``CTMLLMSlicerLib.logic`` with Slicer's parameter node on top) and the
self-test. The model runs in a worker process started with Slicer's own Python (a Python thread
would crawl: Slicer's GUI thread holds the interpreter lock while it idles); the widget polls it
with a ``qt.QTimer`` and never waits.

Needs Slicer 5.10 or newer (Python 3.12); this file still loads on older versions (it keeps to
Python 3.9 syntax) so that the panel can say so instead of failing to load.

Only the Qt API that PythonQt (Slicer) and PySide6 (the tests' stand-in) share is used: signals
are connected with ``signal.connect(slot)``, values are set with setters and read through
``_qtValue`` (PythonQt exposes a Qt property such as ``text`` as an attribute, PySide6 as a
getter method of the same name).
"""

import logging
import os
from pathlib import Path
from typing import Annotated

import ctk  # noqa: F401  (loaded for the .ui file's ctk widgets, as in Slicer's template)
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CTMLLMSlicerLib import dependencies, jobs, resources, self_test
from CTMLLMSlicerLib.conversation import QUESTION, REPORT, Conversation
from CTMLLMSlicerLib.errors import (
    CTMLLMSlicerError,
    InstallFailedError,
    MissingDependenciesError,
    describeError,
)
from CTMLLMSlicerLib.logic import (
    DEMO_MODEL,
    DEVICES,
    PRECISIONS,
    WINDOW_PRESETS,
    CTMLLMLogicCore,
    ModelRequest,
    defaultModelCacheFolder,
    isRepoId,
)
from model_core.dicom_sr import IDENTIFIER_KEYWORDS, MissingIdentifiersError

MODE_REPORT = "Report"
MODE_QUESTION = "Question"
SOURCE_DEMO = "Demo model"
SOURCE_FOLDER = "Local folder"
SOURCE_HUB = "Hugging Face repo"
MODEL_WINDOW = "model default"
"""The window choice that keeps the preprocessing the model was trained with."""
CACHE_FOLDER_SETTING = "CTMLLMSlicer/ModelCacheFolder"
POLL_INTERVAL_MS = 15
"""How often the GUI thread reads the worker's messages while a job runs: text appears at most this
late (a non-blocking read costs microseconds; the timer stops between jobs)."""
SAMPLE_CATEGORY = "CT-MLLM"


#
# CTMLLMSlicer
#


class CTMLLMSlicer(ScriptedLoadableModule):
    """Module metadata (title, category, contributors, help) shown by Slicer's module selector."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT-MLLM Report")
        self.parent.categories = [_("Informatics")]
        self.parent.dependencies = []
        self.parent.contributors = ["CTMLLMSlicer contributors"]
        self.parent.helpText = _(
            "Writes a radiology report of a loaded CT volume and answers questions about it with a "
            "multimodal large language model adapted from 2D to 3D. Pick a volume, choose Report or "
            "Question mode and click Generate Report or Ask; the text streams into the history. "
            "Volumes that do not look like CT (MR, normalised images) are refused unless 'Accept "
            "non-CT volumes' is checked. "
            "The output is machine-generated and must be reviewed by a radiologist. "
            "Needs Slicer 5.10 or newer; at first use it installs PyTorch through the PyTorch extension and "
            "the other model packages with pip, after asking. 'Unload model' ends the model's worker process. "
            "See docs/SLICER.md in the extension's repository."
        ) + _(" Batch runs over folders of CT: {command} (docs/BATCH.md).").format(
            command=f'Slicer --no-main-window --python-script "{resources.batchScriptPath()}" -- --input IN --output OUT'
        )
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer's scripted-module template (Jean-Christophe Fillion-Robin, Kitware; "
            "Andras Lasso, PerkLab; Steve Pieper, Isomics). The test CT volumes come from the "
            "TotalSegmentator project (Wasserthal et al., Radiology: AI 2023; CC BY 4.0). The sample CT is a "
            "phantom made by this project's own generator."
        )
        # The icon sits next to the module when built, one folder up in a source checkout.
        self.parent.icon = qt.QIcon(resources.resourcePath(resources.ICON_FILE))
        slicer.app.startupCompleted.connect(registerSampleData)


def registerSampleData() -> None:
    """Offer the phantom CT in the Sample Data module (category CT-MLLM), from the module's files."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=resources.SAMPLE_CT_NAME,
        uris=Path(resources.sampleCTPath()).as_uri(),
        fileNames=Path(resources.SAMPLE_CT_FILE).name,
        nodeNames=resources.SAMPLE_CT_NAME,
        thumbnailFileName=resources.resourcePath(resources.SAMPLE_CT_THUMBNAIL),
        checksums=f"SHA256:{resources.SAMPLE_CT_SHA256}",
    )


def installTorchWithPyTorchExtension(requirement: str) -> bool:
    """torch the Slicer way: the PyTorch extension's installer picks the CPU or CUDA build for this
    computer. False when the user declined there."""
    try:
        import PyTorchUtils
    except ImportError as error:
        raise MissingDependenciesError(
            "PyTorch is not installed and the PyTorch extension is missing: install 'PyTorch' from the Extensions "
            "Manager (CT-MLLM depends on it; it picks the CPU or CUDA build for this computer), restart Slicer, "
            "then click again"
        ) from error
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=requirement
        )
    except Exception as error:
        raise InstallFailedError(
            f"the PyTorch extension could not install torch{requirement} ({type(error).__name__}: {error}): "
            "check the internet connection; the installer's output is in the Python console"
        ) from error
    return torch is not None


#
# CTMLLMSlicerParameterNode
#


@parameterNodeWrapper
class CTMLLMSlicerParameterNode:
    """The panel state, saved with the scene.

    inputVolume - the CT volume to describe.
    mode - Report (one full report) or Question (a chat about the volume).
    routeByPrompt - the model's task router picks the expert from each prompt (the default);
        off, the mode's expert (report or question) reads the volume.
    modelSource, modelLocation - the demo model, a local model folder, or a Hugging Face repo id.
    device, precision - where and how the model runs.
    windowPreset - the HU window the model (and the slice views) see; "model default" keeps the
        preprocessing the model was trained with.
    allowNonCT - accept volumes that do not look like CT (MR, normalised images); they are scaled
        by their own intensity percentiles instead of an HU window.
    keepWindowLevel - leave the slice views' window/level as the user set it.
    lastPrompt - the question typed last.
    maxNewTokens - the length budget of one answer.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    mode: Annotated[str, Choice([MODE_REPORT, MODE_QUESTION])] = MODE_REPORT
    routeByPrompt: bool = True
    modelSource: Annotated[str, Choice([SOURCE_DEMO, SOURCE_FOLDER, SOURCE_HUB])] = SOURCE_DEMO
    modelLocation: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    precision: Annotated[str, Choice(list(PRECISIONS))] = "auto"
    windowPreset: Annotated[str, Choice([MODEL_WINDOW, *WINDOW_PRESETS])] = MODEL_WINDOW
    allowNonCT: bool = False
    keepWindowLevel: bool = False
    lastPrompt: str = ""
    maxNewTokens: Annotated[int, WithinRange(1, 4096)] = 256


def _qtValue(widget, name):
    """Read Qt property ``name``: an attribute in PythonQt, a getter method in PySide6."""
    value = getattr(widget, name)
    return value() if callable(value) else value


def _dialogPath(result):
    """``QFileDialog.getSaveFileName`` returns a path in PythonQt, ``(path, filter)`` in PySide6."""
    return result[0] if isinstance(result, tuple) else result


def _dialogText(result):
    """``QInputDialog.getText`` returns the text in PythonQt ("" when cancelled), ``(text, ok)`` in PySide6."""
    if isinstance(result, tuple):
        return result[0] if result[1] else ""
    return result or ""


#
# CTMLLMSlicerWidget
#


class CTMLLMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: GUI only. Reads the parameter node, hands work to the logic's model worker."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shownVolume = None
        self._shownPreset = None
        self._dependenciesChecked = False
        self._runningButton = None
        self._jobVolume = None
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        # resources.resourcePath finds the .ui both in the built extension and in a source checkout
        uiWidget = slicer.util.loadUI(resources.resourcePath(resources.UI_FILE))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CTMLLMSlicerLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.timeout.connect(self.onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)

        self.ui.generateButton.clicked.connect(self.onGenerateButton)
        self.ui.askButton.clicked.connect(self.onAskButton)
        self.ui.questionLineEdit.returnPressed.connect(self.onAskButton)
        self.ui.browseModelButton.clicked.connect(self.onBrowseModelButton)
        self.ui.unloadModelButton.clicked.connect(self.onUnloadModelButton)
        self.ui.saveButton.clicked.connect(self.onSaveButton)
        self.ui.copyButton.clicked.connect(self.onCopyButton)
        self.ui.exportButton.clicked.connect(self.onExportButton)
        self.ui.exportSRButton.clicked.connect(self.onExportSRButton)
        self.ui.newConversationButton.clicked.connect(self.onNewConversationButton)
        self.ui.cacheFolderLineEdit.setText(self.modelCacheFolder())
        self.ui.cacheFolderLineEdit.editingFinished.connect(self.onCacheFolderEdited)
        self.ui.progressBar.setVisible(False)

        self.initializeParameterNode()
        try:
            dependencies.checkSlicerVersion((slicer.app.majorVersion, slicer.app.minorVersion))
        except CTMLLMSlicerError as error:
            self.showMessage(str(error), error=True)

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._pollTimer.stop()
        self.logic.unloadModel()  # ends the worker process: no model left running in the background
        self.exit()  # unbind the widgets from the parameter node: they are about to go
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )

    def onSceneStartClose(self, caller, event) -> None:
        """Another patient may come next: forget every conversation and encoded volume; a running
        job is cancelled and its result dropped (MRML reuses node IDs after a close)."""
        self.logic.forgetAll()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeRemoved(self, caller, event, node) -> None:
        if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
            self.logic.forgetVolume(node)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    # -- reacting to the parameter node -------------------------------------------------------
    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Keep the panel consistent with the state: shown volume, mode, enabled buttons."""
        node = self._parameterNode
        volume = node.inputVolume if node else None
        display = (node.windowPreset, node.allowNonCT, node.keepWindowLevel) if node else None
        if volume is not self._shownVolume:
            self._shownVolume, self._shownPreset = volume, display
            self.showVolume(volume)
            self.renderConversation()
        elif volume is not None and display != self._shownPreset:
            self._shownPreset = display
            if not node.keepWindowLevel:
                self.logic.applyWindowPreset(volume, self.windowPreset(), node.allowNonCT)
        questionMode = bool(node) and node.mode == MODE_QUESTION
        self.ui.generateButton.setVisible(not questionMode)
        self.ui.questionLineEdit.setVisible(questionMode)
        self.ui.askButton.setVisible(questionMode)
        local = bool(node) and node.modelSource != SOURCE_DEMO
        self.ui.modelLocationLineEdit.setEnabled(local)
        self.ui.browseModelButton.setEnabled(bool(node) and node.modelSource == SOURCE_FOLDER)
        self._updateButtons()

    def _updateButtons(self) -> None:
        busy = self.logic.isJobRunning()
        hasVolume = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.generateButton.setEnabled(busy or hasVolume)
        self.ui.askButton.setEnabled(busy or hasVolume)
        hasResults = hasVolume and not busy and not self._currentConversation().isEmpty()
        for button in (
            self.ui.saveButton,
            self.ui.copyButton,
            self.ui.exportButton,
            self.ui.exportSRButton,
            self.ui.newConversationButton,
        ):
            button.setEnabled(hasResults)

    def showVolume(self, volumeNode) -> None:
        """Show the selected volume: a layout with a 3D view, its CT volume rendering alone in 3D
        with the camera reset on it, and in the slice views (with the window the model reads
        unless 'keep my window/level' is checked)."""
        if volumeNode is None:
            return
        if volumeNode.GetDisplayNode() is None or volumeNode.GetImageData() is None:
            # Still being loaded: the selector picks a volume as soon as it enters the scene, before
            # the reader attaches its display node (which would drop ours). Show it once loaded.
            qt.QTimer.singleShot(0, lambda: self._showWhenLoaded(volumeNode))
            return
        node = self._parameterNode
        try:
            self.logic.showVolume(volumeNode, self.windowPreset(), node.allowNonCT, node.keepWindowLevel)
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
            self.reset3DViews()
        except Exception as error:  # display is a convenience: report, never block the panel
            self.showMessage(f"Could not display {volumeNode.GetName()}: {describeError(error)}", error=True)

    def _showWhenLoaded(self, volumeNode) -> None:
        node = self._parameterNode
        if node is not None and node.inputVolume is volumeNode and volumeNode.GetDisplayNode() is not None:
            self.showVolume(volumeNode)

    @staticmethod
    def reset3DViews() -> None:
        """Point every 3D view's camera at what it shows (the selected volume's rendering)."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:  # no main window (--no-main-window)
            return
        for index in range(_qtValue(layoutManager, "threeDViewCount")):
            layoutManager.threeDWidget(index).threeDView().resetCamera()

    def windowPreset(self) -> str:
        """The preset name the logic takes: "" for the model's own window."""
        preset = self._parameterNode.windowPreset if self._parameterNode else MODEL_WINDOW
        return "" if preset == MODEL_WINDOW else preset

    # -- model choice, dependencies, consent (GUI thread) ------------------------------------
    def modelCacheFolder(self) -> str:
        return str(qt.QSettings().value(CACHE_FOLDER_SETTING, defaultModelCacheFolder()))

    def onCacheFolderEdited(self) -> None:
        folder = _qtValue(self.ui.cacheFolderLineEdit, "text").strip()
        qt.QSettings().setValue(CACHE_FOLDER_SETTING, folder or defaultModelCacheFolder())

    def modelRequest(self) -> ModelRequest:
        """The model to use, from the parameter node; asks before a first download from the Hub."""
        node = self._parameterNode
        spec = DEMO_MODEL if node.modelSource == SOURCE_DEMO else node.modelLocation.strip()
        if node.modelSource == SOURCE_HUB and not isRepoId(spec):
            raise CTMLLMSlicerError(f"{spec!r} is not a Hugging Face repo id: write it as owner/name")
        request = ModelRequest(spec, node.device, node.precision, self.modelCacheFolder())
        if node.modelSource != SOURCE_HUB:
            return request
        if self.logic.needsDownloadConsent(request) and not slicer.util.confirmOkCancelDisplay(
            f"Download the model {spec} from the Hugging Face Hub into\n{request.cacheFolder}?\n\n"
            "Only safetensors weights, configuration and tokenizer files are fetched.",
            windowTitle="CT-MLLM model download",
        ):
            raise CTMLLMSlicerError(f"download of {spec} declined: pick the demo model or a local folder")
        return ModelRequest(spec, node.device, node.precision, request.cacheFolder, allowDownload=True)

    def ensureDependencies(self) -> None:
        """At first use: check the Slicer version, then install what the model needs after asking
        (torch through the PyTorch extension, the rest with pip)."""
        if self._dependenciesChecked:
            return
        dependencies.checkSlicerVersion((slicer.app.majorVersion, slicer.app.minorVersion))
        installed = dependencies.ensureDependencies(
            confirm=lambda question: slicer.util.confirmOkCancelDisplay(
                question, windowTitle="CT-MLLM setup"
            ),
            pipInstall=slicer.util.pip_install,
            installTorch=installTorchWithPyTorchExtension,
            workFolder=self.logic.workFolder(),
        )
        if installed:
            self.showMessage("Installed " + ", ".join(installed))
        self._dependenciesChecked = True

    def onBrowseModelButton(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "CT-MLLM model folder")
        if folder:
            self._parameterNode.modelLocation = folder

    def onUnloadModelButton(self) -> None:
        ended = self.logic.unloadModel()
        self.showMessage("Model unloaded: its worker process ended and its memory is free." if ended
                         else "No model was loaded.")  # fmt: skip
        self._showWorkerStatus()

    def _showWorkerStatus(self) -> None:
        worker = self.logic.worker
        if worker is None or not worker.isRunning():
            text = "No model loaded."
        elif worker.modelInfo:
            text = f"{worker.modelInfo.get('modelId', 'model')} loaded (worker process {worker.process.pid})."
        else:
            text = f"Worker process {worker.process.pid} running."
        self.ui.workerStatusLabel.setText(text)

    # -- running -----------------------------------------------------------------------------
    def onGenerateButton(self) -> None:
        if self.logic.isJobRunning():
            self.cancel()
        else:
            self.startJob(REPORT, None, self.ui.generateButton)

    def onAskButton(self) -> None:
        if self.logic.isJobRunning():
            self.cancel()
            return
        question = self._parameterNode.lastPrompt.strip()
        self.startJob(QUESTION, question, self.ui.askButton)
        if self.logic.isJobRunning():
            self.ui.questionLineEdit.selectAll()  # typing replaces it; the parameter node keeps it

    def startJob(self, task: str, prompt, button) -> None:
        """Check inputs and copy the volume here (GUI thread), then let the worker run the model."""
        node = self._parameterNode
        try:
            if task == QUESTION and not prompt:
                raise CTMLLMSlicerError("the question is empty: type a question, then click Ask")
            self.ensureDependencies()
            request = self.modelRequest()
            self.logic.startJob(
                node.inputVolume,
                None if node.routeByPrompt else task,  # None: the task router picks the expert
                prompt,
                request,
                self.windowPreset(),
                node.maxNewTokens,
                node.allowNonCT,
            )
        except Exception as error:
            self.showError(error)
            return
        self._jobVolume = node.inputVolume
        self._appendHistory("Report:\n" if task == REPORT else f"Q: {prompt}\nA: ")
        self._runningButton = button
        button.setText(_("Cancel"))
        self.ui.progressBar.setVisible(True)
        self.showMessage("Working...")
        self._pollTimer.start()
        self._updateButtons()

    def cancel(self) -> None:
        """Stop the running job; generation ends after the token in progress."""
        self.logic.cancelJob()
        self.showMessage("Cancelling...")

    def _showingJobVolume(self) -> bool:
        """True while the panel shows the volume the running job is about (not after a scene close)."""
        return self._parameterNode is not None and self._parameterNode.inputVolume is self._jobVolume

    def onPollTimer(self) -> None:
        """GUI thread: hand the worker's messages to the panel; stop polling when the job is done."""
        text = ""  # the chunks of one poll go into the history view at once
        for event in self.logic.pollJob():
            if event.kind == jobs.TEXT:
                text += event.text
                continue
            if text and self._showingJobVolume():
                self._appendHistory(text)
            text = ""
            if event.kind == jobs.PROGRESS:
                self._showProgress(event.stage, event.fraction, event.tokensPerSecond)
            elif event.kind == jobs.NOTICE:
                self.showMessage(event.text)
            else:
                self._finishJob(event)
        if text and self._showingJobVolume():
            self._appendHistory(text)
        if not self.logic.isJobRunning() and self._runningButton is None:
            self._pollTimer.stop()

    def _finishJob(self, event: jobs.JobEvent) -> None:
        showing = self._showingJobVolume()
        if event.kind == jobs.FINISHED:
            turn = event.result.turn
            if showing:
                self._appendHistory(" [cancelled]\n\n" if turn.cancelled else "\n\n")
            reuse = "" if event.result.encoded else ", reused the encoded volume"
            state = "Cancelled" if turn.cancelled else "Done"
            notices = "".join(f" {notice}" for notice in event.result.notices)
            self.showMessage(
                f"{state}: {turn.newTokens} tokens in {turn.seconds:.1f} s, {turn.expertNote}{reuse}.{notices}"
            )
            node = self._parameterNode
            if showing and not self.windowPreset() and not node.keepWindowLevel:  # the model's own window
                self.logic.applyWindowPreset(node.inputVolume, "", node.allowNonCT)
        elif event.kind == jobs.CANCELLED:
            if showing:
                self._appendHistory("[cancelled]\n\n")
            self.showMessage("Cancelled." if showing else "Cancelled: its volume left the scene.")
        else:
            if showing:
                self._appendHistory("[failed]\n\n")
            self.showError(event.error)
        if self._runningButton is not None:
            self._runningButton.setText(
                _("Generate Report") if self._runningButton is self.ui.generateButton else _("Ask")
            )
        self._runningButton = None
        self._jobVolume = None
        self.ui.progressBar.setVisible(False)
        if not showing:
            self.renderConversation()
        self._updateButtons()
        self._showWorkerStatus()

    def _showProgress(self, stage: str, fraction, tokensPerSecond) -> None:
        bar = self.ui.progressBar
        if fraction is None:
            bar.setRange(0, 0)  # busy indicator: the stage cannot say how far it is
        else:
            bar.setRange(0, 100)
            bar.setValue(int(round(100 * fraction)))
        speed = f" - {tokensPerSecond:.1f} tokens/s" if tokensPerSecond else ""
        bar.setFormat(f"{stage}{speed}")

    # -- history and results -----------------------------------------------------------------
    def _currentConversation(self) -> Conversation:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        return self.logic.peekConversation(volume) or Conversation("")  # none yet: an empty one, not stored

    def _appendHistory(self, text: str) -> None:
        cursor = self.ui.historyView.textCursor()
        cursor.movePosition(qt.QTextCursor.End)
        cursor.insertText(text)
        self.ui.historyView.setTextCursor(cursor)
        self.ui.historyView.ensureCursorVisible()

    def renderConversation(self) -> None:
        """Show the selected volume's conversation (each volume keeps its own)."""
        conversation = self._currentConversation()
        self.ui.historyView.setPlainText("" if conversation.isEmpty() else conversation.toText() + "\n")
        self._updateButtons()

    def onSaveButton(self) -> None:
        try:
            textNode = self.logic.saveResultToTextNode(self._parameterNode.inputVolume)
        except Exception as error:
            self.showError(error)
            return
        self.showMessage(f"Saved to text node {textNode.GetName()!r}; it is kept when the scene is saved.")

    def onCopyButton(self) -> None:
        qt.QApplication.clipboard().setText(self._currentConversation().toText())
        self.showMessage("Copied to the clipboard.")

    def onExportButton(self) -> None:
        path = self._askSavePath("Export CT-MLLM results", "-ctmllm.md", "Markdown (*.md);;JSON (*.json)")
        if path:
            self.exportResults(path)

    def _askSavePath(self, title: str, nameSuffix: str, filters: str) -> str:
        """The file picked in a save dialog offering the selected volume's name ("" when cancelled)."""
        name = self._parameterNode.inputVolume.GetName() + nameSuffix
        return _dialogPath(qt.QFileDialog.getSaveFileName(self.parent, title, name, filters))

    def exportResults(self, path: str) -> None:
        """Write the selected volume's conversation to ``path`` (.md or .json)."""
        try:
            written = self.logic.exportConversation(self._parameterNode.inputVolume, path)
        except Exception as error:
            self.showError(error)
            return
        self.showMessage(f"Exported to {written}")

    def onExportSRButton(self) -> None:
        path = self._askSavePath("Export CT-MLLM results as DICOM SR", "-ctmllm-sr.dcm", "DICOM (*.dcm)")
        if path:
            self.exportSR(path)

    def exportSR(self, path: str, identifiers=None) -> None:
        """Write the selected volume's results as a DICOM SR; for a volume that did not come from
        DICOM, ask for the identifiers the SR needs (a PACS files it under the patient's study)."""
        try:
            written, notices = self.logic.exportReportSR(self._parameterNode.inputVolume, path, identifiers)
        except MissingIdentifiersError as error:
            given = self.askIdentifiers(error.missing, identifiers or {})
            if given is None:
                self.showError(error)
            else:
                self.exportSR(path, given)
            return
        except Exception as error:
            self.showError(error)
            return
        self.showMessage(" ".join([f"DICOM SR written to {written}.", *notices]))

    def askIdentifiers(self, names, known):
        """Ask for each missing identifier; None when the user leaves one empty or cancels."""
        given = dict(known)
        for name in names:
            label = f"{IDENTIFIER_KEYWORDS[name]} (the volume did not come from DICOM):"
            value = _dialogText(qt.QInputDialog.getText(self.parent, "DICOM SR", label)).strip()
            if not value:
                return None
            given[name] = value
        return given

    def onNewConversationButton(self) -> None:
        self.logic.clearConversation(self._parameterNode.inputVolume)
        self.renderConversation()

    # -- messages ----------------------------------------------------------------------------
    def showMessage(self, text: str, error: bool = False) -> None:
        """The panel's status line: errors in red, never only in the console."""
        self.ui.statusLabel.setStyleSheet("color: #c62828;" if error else "")
        self.ui.statusLabel.setText(text)

    def showError(self, error: BaseException) -> None:
        if not isinstance(error, CTMLLMSlicerError):
            logging.error("CT-MLLM failed", exc_info=error)
        self.showMessage(describeError(error), error=True)


#
# CTMLLMSlicerLogic
#


class CTMLLMSlicerLogic(ScriptedLoadableModuleLogic, CTMLLMLogicCore):
    """The module's logic in Slicer: ``CTMLLMLogicCore`` on the application's scene, plus the
    parameter node. No GUI: scripts can call startJob / pollJob, or generateReport / askQuestion
    (in this process), directly."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        CTMLLMLogicCore.__init__(
            self,
            slicer.mrmlScene,
            slicer.modules.volumerendering.logic(),
            volumesLogic=slicer.modules.volumes.logic(),
        )
        self.workerFolder = self.workFolder()
        self.dicomDatabase = getattr(slicer, "dicomDatabase", None)

    @staticmethod
    def workFolder() -> str:
        """Worker logs, voxel hand-over files and pip logs: in Slicer's temporary folder."""
        return os.path.join(slicer.app.temporaryPath, "CTMLLMSlicer")

    def getParameterNode(self):
        return CTMLLMSlicerParameterNode(super().getParameterNode())


#
# CTMLLMSlicerTest
#


class CTMLLMSlicerTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test on the module's sample CT: the cases of ``CTMLLMSlicerLib.self_test``
    (the panel and the logic without a model; the demo model in the worker process when the
    model's packages are installed), each on a cleared scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for case in self_test.CASES:
            self.setUp()
            case(self, CTMLLMSlicerLogic, CTMLLMSlicerWidget)
