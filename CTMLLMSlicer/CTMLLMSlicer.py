"""CT-MLLM: radiology reports and answers about a CT volume from a multimodal LLM, in 3D Slicer.

The four classes of Slicer's scripted-module template, in its order: the module (metadata), the
parameter node (panel state saved with the scene), the widget (GUI only), the logic (no GUI; the
``CTMLLMLogicCore`` of ``CTMLLMSlicerLib.logic`` with Slicer's parameter node on top) and the
self-test. The model runs in a worker thread; the widget polls its queue with a ``qt.QTimer``.

Only the Qt API that PythonQt (Slicer) and PySide6 (the tests' stand-in) share is used: signals
are connected with ``signal.connect(slot)``, values are set with setters and read through
``_qtValue`` (PythonQt exposes a Qt property such as ``text`` as an attribute, PySide6 as a
getter method of the same name).
"""

import logging
import os
import tempfile
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

from CTMLLMSlicerLib import dependencies, jobs
from CTMLLMSlicerLib.conversation import QUESTION, REPORT, Conversation
from CTMLLMSlicerLib.errors import CTMLLMSlicerError, describeError
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
POLL_INTERVAL_MS = 30
"""How often the GUI thread drains the worker's queue: short enough for smooth streaming."""


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
            "See docs/SLICER.md in the extension's repository."
        )
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer's scripted-module template (Jean-Christophe Fillion-Robin, Kitware; "
            "Andras Lasso, PerkLab; Steve Pieper, Isomics). The test CT volumes come from the "
            "TotalSegmentator project (Wasserthal et al., Radiology: AI 2023; CC BY 4.0)."
        )


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
    """The panel: GUI only. Reads the parameter node, hands work to the logic's job runner."""

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
        self._runner = jobs.JobRunner()
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTMLLMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CTMLLMSlicerLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.timeout.connect(self.onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.generateButton.clicked.connect(self.onGenerateButton)
        self.ui.askButton.clicked.connect(self.onAskButton)
        self.ui.questionLineEdit.returnPressed.connect(self.onAskButton)
        self.ui.browseModelButton.clicked.connect(self.onBrowseModelButton)
        self.ui.saveButton.clicked.connect(self.onSaveButton)
        self.ui.copyButton.clicked.connect(self.onCopyButton)
        self.ui.exportButton.clicked.connect(self.onExportButton)
        self.ui.exportSRButton.clicked.connect(self.onExportSRButton)
        self.ui.newConversationButton.clicked.connect(self.onNewConversationButton)
        self.ui.cacheFolderLineEdit.setText(self.modelCacheFolder())
        self.ui.cacheFolderLineEdit.editingFinished.connect(self.onCacheFolderEdited)
        self.ui.progressBar.setVisible(False)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._runner.cancel()
        self._runner.wait(2.0)
        self._pollTimer.stop()
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
        self._runner.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

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
        display = (node.windowPreset, node.allowNonCT) if node else None
        if volume is not self._shownVolume:
            self._shownVolume, self._shownPreset = volume, display
            self.showVolume(volume)
            self.renderConversation()
        elif volume is not None and display != self._shownPreset:
            self._shownPreset = display
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
        busy = self._runner.isRunning()
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
        """Show the selected volume in the slice views and as a CT volume rendering in 3D."""
        if volumeNode is None:
            return
        try:
            self.logic.applyWindowPreset(volumeNode, self.windowPreset(), self._parameterNode.allowNonCT)
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
            self.logic.showVolumeRendering(volumeNode)
        except Exception as error:  # display is a convenience: report, never block the panel
            self.showMessage(f"Could not display {volumeNode.GetName()}: {describeError(error)}", error=True)

    def windowPreset(self) -> str:
        """The preset name the logic takes: "" for the model's own window."""
        preset = self._parameterNode.windowPreset
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
        """At first use: install torch, transformers, ... into Slicer's Python after asking."""
        if self._dependenciesChecked:
            return
        installed = dependencies.ensureDependencies(
            confirm=lambda question: slicer.util.confirmOkCancelDisplay(
                question, windowTitle="CT-MLLM setup"
            ),
            install=slicer.util.pip_install,
        )
        if installed:
            self.showMessage("Installed " + ", ".join(installed))
        self._dependenciesChecked = True

    def onBrowseModelButton(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "CT-MLLM model folder")
        if folder:
            self._parameterNode.modelLocation = folder

    # -- running -----------------------------------------------------------------------------
    def onGenerateButton(self) -> None:
        if self._runner.isRunning():
            self.cancel()
        else:
            self.startJob(REPORT, None, self.ui.generateButton)

    def onAskButton(self) -> None:
        if self._runner.isRunning():
            self.cancel()
            return
        question = self._parameterNode.lastPrompt.strip()
        self.startJob(QUESTION, question, self.ui.askButton)
        if self._runner.isRunning():
            self.ui.questionLineEdit.selectAll()  # typing replaces it; the parameter node keeps it

    def startJob(self, task: str, prompt, button) -> None:
        """Check inputs here (GUI thread), then run the model in the worker thread."""
        node = self._parameterNode
        try:
            if task == QUESTION and not prompt:
                raise CTMLLMSlicerError("the question is empty: type a question, then click Ask")
            self.ensureDependencies()
            request = self.modelRequest()
            expertTask = None if node.routeByPrompt else task  # None: the task router decides
            snapshot = self.logic.volumeSnapshot(
                node.inputVolume, self.windowPreset(), expertTask, request, node.allowNonCT, prompt
            )
        except Exception as error:
            self.showError(error)
            return
        preset, maxNewTokens, allowNonCT = self.windowPreset(), node.maxNewTokens, node.allowNonCT

        def job(context: jobs.JobContext):
            return self.logic.run(
                snapshot, expertTask, prompt, request, preset, maxNewTokens,
                onText=context.text, progressCallback=context.progress,
                noticeCallback=context.notice, cancel=context.cancelEvent, allowNonCT=allowNonCT,
            )  # fmt: skip

        self._appendHistory("Report:\n" if task == REPORT else f"Q: {prompt}\nA: ")
        self._runner.start(job)
        self._runningButton = button
        button.setText(_("Cancel"))
        self.ui.progressBar.setVisible(True)
        self.showMessage("Working...")
        self._pollTimer.start()
        self._updateButtons()

    def cancel(self) -> None:
        """Stop the running job; generation ends after the token in progress."""
        self._runner.cancel()
        self.showMessage("Cancelling...")

    def onPollTimer(self) -> None:
        """GUI thread: drain the worker's events into the panel; stop polling when it is done."""
        for event in self._runner.poll():
            if event.kind == jobs.TEXT:
                self._appendHistory(event.text)
            elif event.kind == jobs.PROGRESS:
                self._showProgress(event.stage, event.fraction, event.tokensPerSecond)
            elif event.kind == jobs.NOTICE:
                self.showMessage(event.text)
            else:
                self._finishJob(event)
        if not self._runner.isRunning() and self._runningButton is None:
            self._pollTimer.stop()

    def _finishJob(self, event: jobs.JobEvent) -> None:
        if event.kind == jobs.FINISHED:
            turn = event.result.turn
            self._appendHistory(" [cancelled]\n\n" if turn.cancelled else "\n\n")
            reuse = "" if event.result.encoded else ", reused the encoded volume"
            state = "Cancelled" if turn.cancelled else "Done"
            notices = "".join(f" {notice}" for notice in event.result.notices)
            self.showMessage(
                f"{state}: {turn.newTokens} tokens in {turn.seconds:.1f} s, {turn.expertNote}{reuse}.{notices}"
            )
            node = self._parameterNode
            if node.inputVolume is not None and not self.windowPreset():  # the model's own window
                self.logic.applyWindowPreset(node.inputVolume, "", node.allowNonCT)
        elif event.kind == jobs.CANCELLED:
            self._appendHistory("[cancelled]\n\n")
            self.showMessage("Cancelled.")
        else:
            self._appendHistory("[failed]\n\n")
            self.showError(event.error)
        self._runningButton.setText(
            _("Generate Report") if self._runningButton is self.ui.generateButton else _("Ask")
        )
        self._runningButton = None
        self.ui.progressBar.setVisible(False)
        self._updateButtons()

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
        if volume is None:
            return Conversation("")  # nothing selected: an empty one, not stored
        return self.logic.conversation(volume.GetID(), volume.GetName())

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
            written = self.logic.exportConversation(self._parameterNode.inputVolume.GetID(), path)
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
        self.logic.clearConversation(self._parameterNode.inputVolume.GetID())
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
    parameter node. No GUI: scripts can call generateReport / askQuestion directly."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        CTMLLMLogicCore.__init__(
            self,
            slicer.mrmlScene,
            slicer.modules.volumerendering.logic(),
            volumesLogic=slicer.modules.volumes.logic(),
        )
        self.dicomDatabase = getattr(slicer, "dicomDatabase", None)

    def getParameterNode(self):
        return CTMLLMSlicerParameterNode(super().getParameterNode())


#
# CTMLLMSlicerTest
#


class CTMLLMSlicerTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a synthetic CT, the tiny random model, report + two questions + save."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ReportQuestionsAndSave()

    def test_ReportQuestionsAndSave(self):
        import numpy as np

        from model_core.tiny import build_tiny_ctmllm

        self.delayDisplay("Building a synthetic CT and the tiny test model")
        volume = np.full((12, 40, 40), -1000, dtype=np.int16)  # air: (slices, rows, columns)
        volume[:, 8:32, 8:32] = 40  # soft tissue
        volume[:, 18:22, 18:22] = 700  # bone
        volumeNode = slicer.util.addVolumeFromArray(volume, name="SyntheticCT")
        modelFolder = os.path.join(tempfile.mkdtemp(), "tiny")
        build_tiny_ctmllm(family="internvl").save_pretrained(modelFolder)

        logic = CTMLLMSlicerLogic()
        request = ModelRequest(modelFolder, device="cpu")
        report = logic.generateReport(volumeNode, request, maxNewTokens=6)
        self.assertTrue(report.encoded)
        self.assertLessEqual(report.turn.newTokens, 6)
        first = logic.askQuestion(
            volumeNode, "Is there a fracture?", request, maxNewTokens=4, forceExpert=True
        )
        second = logic.askQuestion(volumeNode, "Where?", request, maxNewTokens=4, forceExpert=True)
        self.assertTrue(first.encoded)  # forced, questions use the question task's features
        self.assertFalse(second.encoded)  # the follow-up reuses them
        self.assertEqual(report.turn.expertNote, "no task experts")  # the tiny model has no task router
        self.assertEqual(logic.conversation(volumeNode.GetID()).history()[0][0], "Is there a fracture?")

        textNode = logic.saveResultToTextNode(volumeNode)
        self.assertIs(volumeNode.GetNodeReference("CTMLLMResult"), textNode)
        self.assertIn("Q: Where?", textNode.GetText())
        self.delayDisplay("Test passed")
