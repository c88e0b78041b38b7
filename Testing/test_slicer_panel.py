"""The panel on real Qt widgets (PySide6, offscreen) over a real MRML scene.

``slicer_compat`` stands in for PythonQt's ``qt``/``ctk`` and the Slicer-only parts of ``slicer``
(see its docstring). The widget is built from the module's .ui file, driven through its widgets,
and the event loop is pumped while a 10 ms heartbeat timer measures how long the GUI thread is
ever blocked. The tiny random model writes gibberish; the tests check behaviour, not wording.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import slicer_compat

standIn = slicer_compat.install()

import slicer  # noqa: E402
from conftest import ABDOMEN_CT, NOT_CT_MR, REPO, needs_shared_ct, save_scene_with_volume  # noqa: E402
from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402

import CTMLLMSlicer as module  # noqa: E402  (importable once the stand-ins are installed)
from CTMLLMSlicerLib.conversation import QUESTION, REPORT  # noqa: E402
from CTMLLMSlicerLib.logic import RESULT_REFERENCE_ROLE, ModelRequest  # noqa: E402

ARTIFACTS = REPO / "Testing" / "artifacts"
MAX_STALL_S = 0.2

pytestmark = needs_shared_ct


@pytest.fixture(scope="module", autouse=True)
def model_code_imported() -> None:
    """Import what the worker needs before any timed test, as after a first use in Slicer: a first
    import holds the GIL and would count as a GUI stall (see docs/SLICER.md, known limit)."""
    import model_core.data  # noqa: F401
    import model_core.hub  # noqa: F401


class Panel:
    """The module widget in a window, with a heartbeat that records GUI-thread stalls."""

    def __init__(self) -> None:
        self.window = slicer.qMRMLWidget()
        self.window.setLayout(QtWidgets.QVBoxLayout())
        self.window.setMRMLScene(slicer.mrmlScene)
        self.widget = module.CTMLLMSlicerWidget(self.window)
        self.widget.setup()
        self.ui = self.widget.ui
        self.window.resize(460, 940)
        self.window.show()
        self.beats: list[float] = []
        self.heartbeat = QtCore.QTimer()
        self.heartbeat.setInterval(10)
        self.heartbeat.timeout.connect(lambda: self.beats.append(time.perf_counter()))
        self.heartbeat.start()

    @property
    def parameters(self):
        return self.widget._parameterNode

    def busy(self) -> bool:
        return self.widget._runner.isRunning() or self.widget._runningButton is not None

    def pump(self, until, timeout: float = 60.0, onTick=None) -> None:
        """Run the event loop until ``until()`` is true; fail after ``timeout`` seconds."""
        deadline = time.perf_counter() + timeout
        while not until():
            assert time.perf_counter() < deadline, "timed out waiting for the panel"
            QtWidgets.QApplication.processEvents(QtCore.QEventLoop.AllEvents, 20)
            if onTick:
                onTick()

    def longestStall(self) -> float:
        return max(later - earlier for earlier, later in zip(self.beats, self.beats[1:], strict=False))

    def useModel(self, folder: Path, maxNewTokens: int) -> None:
        """Pick a local model folder through the widgets, as a user would."""
        self.ui.modelSourceComboBox.setCurrentText(module.SOURCE_FOLDER)
        self.ui.modelLocationLineEdit.setText(str(folder))
        self.ui.deviceComboBox.setCurrentText("cpu")
        self.ui.maxNewTokensSpinBox.setValue(maxNewTokens)

    def close(self) -> None:
        if not self.window.isVisible():
            return
        self.heartbeat.stop()
        self.widget.cleanup()
        self.window.close()
        self.window.deleteLater()


@pytest.fixture
def panel():
    slicer.mrmlScene.Clear(False)
    standIn.confirmAnswers.clear()
    standIn.confirmations.clear()
    standIn.pipInstalls.clear()
    panel = Panel()
    yield panel
    panel.close()


@pytest.fixture
def abdomen():
    return standIn.loadVolume(ABDOMEN_CT, "abdomen")


def test_selecting_a_volume_shows_it_in_the_slice_views_and_in_3d(panel, abdomen):
    mr = standIn.loadVolume(NOT_CT_MR, "brain_mr")
    panel.ui.inputSelector.setCurrentNode(mr)
    panel.ui.inputSelector.setCurrentNode(abdomen)
    assert panel.parameters.inputVolume is abdomen
    composites = [slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]
    assert [c.GetBackgroundVolumeID() for c in composites] == [abdomen.GetID()] * 3
    rendering = standIn.logics["VolumeRendering"].GetFirstVolumeRenderingDisplayNode(abdomen)
    assert rendering is not None and rendering.GetVisibility()
    panel.ui.windowPresetComboBox.setCurrentText("bone")
    assert abdomen.GetDisplayNode().GetWindow() == 1800.0  # the window the model reads, in the views


def test_generate_report_streams_in_chunks_while_the_gui_keeps_running(panel, abdomen, tiny_model_dir):
    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.useModel(tiny_model_dir, maxNewTokens=40)
    seen: list[int] = []

    def watch() -> None:
        length = len(panel.ui.historyView.toPlainText())
        if not seen or length != seen[-1]:
            seen.append(length)

    panel.beats.clear()
    panel.ui.generateButton.click()
    assert panel.ui.generateButton.text() == "Cancel"
    stages: set[str] = set()
    panel.pump(lambda: not panel.busy(), onTick=lambda: (watch(), stages.add(panel.ui.progressBar.format())))

    assert len(seen) >= 4, f"text arrived in {len(seen)} steps: {seen}"  # header, then several chunks
    assert panel.longestStall() < MAX_STALL_S, f"GUI thread blocked {panel.longestStall():.3f} s"
    assert any(stage.startswith("generating - ") and "tokens/s" in stage for stage in stages)
    assert panel.ui.generateButton.text() == "Generate Report" and not panel.ui.progressBar.isVisible()
    assert panel.ui.statusLabel.text().startswith("Done: ")
    conversation = panel.widget.logic.conversation(abdomen.GetID())
    (turn,) = conversation.turns
    assert turn.task == REPORT and 1 <= turn.newTokens <= 40
    assert panel.ui.historyView.toPlainText() == "Report:\n" + turn.answer + "\n\n"
    assert panel.ui.saveButton.isEnabled() and panel.ui.exportButton.isEnabled()


def test_cancel_stops_generation_within_a_second(panel, abdomen, tiny_model_dir):
    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.useModel(tiny_model_dir, maxNewTokens=1000)
    start = len(panel.ui.historyView.toPlainText())
    panel.ui.generateButton.click()
    panel.pump(lambda: len(panel.ui.historyView.toPlainText()) > start + len("Report:\n") + 2)
    clicked = time.perf_counter()
    panel.ui.generateButton.click()  # now labelled Cancel
    panel.pump(lambda: not panel.busy(), timeout=5)
    assert time.perf_counter() - clicked < 1.0
    (turn,) = panel.widget.logic.conversation(abdomen.GetID()).turns
    assert turn.cancelled and turn.newTokens < 1000
    assert (
        panel.ui.statusLabel.text().startswith("Cancelled")
        and panel.ui.generateButton.text() == "Generate Report"
    )
    assert panel.ui.historyView.toPlainText().endswith("[cancelled]\n\n")


def test_question_mode_adds_turns_and_a_follow_up_does_not_encode_again(panel, abdomen, tiny_model_dir):
    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.useModel(tiny_model_dir, maxNewTokens=12)
    panel.ui.modeComboBox.setCurrentText(module.MODE_QUESTION)
    assert panel.ui.generateButton.isHidden() and not panel.ui.askButton.isHidden()

    request = ModelRequest(str(tiny_model_dir), device="cpu", cacheFolder=panel.widget.modelCacheFolder())
    model = panel.widget.logic.loadModel(request)
    encodes: list[str] = []
    encode = model.encode_volume
    model.encode_volume = lambda volume, task=None, prompt=None: (
        encodes.append(task) or encode(volume, task, prompt)
    )

    for question in ("Is the liver enlarged?", "Is there free fluid?"):
        panel.ui.questionLineEdit.setText(question)
        assert panel.parameters.lastPrompt == question
        panel.ui.questionLineEdit.returnPressed.emit()
        assert panel.ui.askButton.text() == "Cancel" and panel.ui.questionLineEdit.selectedText() == question
        panel.pump(lambda: not panel.busy())

    assert encodes == [None]  # the task router's choice; the second question reused the encoded volume
    assert panel.parameters.lastPrompt == "Is there free fluid?"
    assert "no task experts, reused the encoded volume" in panel.ui.statusLabel.text()
    conversation = panel.widget.logic.conversation(abdomen.GetID())
    assert [turn.prompt for turn in conversation.turns] == ["Is the liver enlarged?", "Is there free fluid?"]
    history = panel.ui.historyView.toPlainText()
    assert history.index("Q: Is the liver enlarged?") < history.index("Q: Is there free fluid?")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "panel.png"
    assert panel.window.grab().save(str(shot))
    image = QtGui.QImage(str(shot))
    assert image.width() >= 400 and image.height() >= 600


def test_the_panel_shows_the_expert_the_router_chose_or_the_modes_when_forced(
    panel, abdomen, routed_model_dir
):
    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.useModel(routed_model_dir, maxNewTokens=3)
    assert panel.ui.routeByPromptCheckBox.isChecked() and panel.parameters.routeByPrompt  # the default
    panel.ui.generateButton.click()
    panel.pump(lambda: not panel.busy())
    assert "expert report (chosen by the task router)" in panel.ui.statusLabel.text()

    panel.ui.modeComboBox.setCurrentText(module.MODE_QUESTION)
    panel.ui.questionLineEdit.setText("Write a radiology report of the findings in this CT volume.")
    panel.ui.askButton.click()
    panel.pump(lambda: not panel.busy())
    assert "expert report (chosen by the task router)" in panel.ui.statusLabel.text()

    panel.ui.routeByPromptCheckBox.setChecked(False)
    assert not panel.parameters.routeByPrompt
    panel.ui.askButton.click()
    panel.pump(lambda: not panel.busy())
    assert "expert vqa (forced by the mode)" in panel.ui.statusLabel.text()
    turns = panel.widget.logic.conversation(abdomen.GetID()).turns
    assert [(turn.task, turn.expert, turn.routed) for turn in turns] == [
        (REPORT, "report", True),
        (QUESTION, "report", True),  # a question asking for a report: the router read it
        (QUESTION, "vqa", False),
    ]


def test_results_are_saved_copied_and_exported(panel, abdomen, tiny_model_dir, tmp_path):
    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.useModel(tiny_model_dir, maxNewTokens=6)
    panel.ui.generateButton.click()
    panel.pump(lambda: not panel.busy())

    panel.ui.saveButton.click()
    textNode = abdomen.GetNodeReference(RESULT_REFERENCE_ROLE)
    assert textNode is not None and "Report" in textNode.GetText()
    assert "Saved to text node" in panel.ui.statusLabel.text()
    panel.ui.copyButton.click()
    assert QtWidgets.QApplication.clipboard().text() == textNode.GetText()
    panel.widget.exportResults(str(tmp_path / "results.json"))
    exported = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert exported["settings"]["model"] == str(tiny_model_dir) and exported["turns"][0]["task"] == REPORT
    panel.widget.exportResults(str(tmp_path / "results.txt"))
    assert ".md" in panel.ui.statusLabel.text() and "color" in panel.ui.statusLabel.styleSheet()

    panel.ui.newConversationButton.click()
    assert panel.ui.historyView.toPlainText() == "" and not panel.ui.saveButton.isEnabled()


def test_dicom_sr_export_asks_a_non_dicom_volume_for_its_identifiers(
    panel, abdomen, tiny_model_dir, tmp_path, monkeypatch
):
    from model_core.dicom_sr import read_report_sr

    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.useModel(tiny_model_dir, maxNewTokens=6)
    panel.ui.generateButton.click()
    panel.pump(lambda: not panel.busy())
    assert panel.ui.exportSRButton.isEnabled()

    asked = []
    monkeypatch.setattr(QtWidgets.QInputDialog, "getText", lambda *args: asked.append(args[2]) or ("", False))
    panel.widget.exportSR(str(tmp_path / "cancelled.dcm"))
    assert not (tmp_path / "cancelled.dcm").exists() and "patient_id" in panel.ui.statusLabel.text()

    answers = iter(["PANEL-1", "1.2.826.0.1.3680043.10.11"])
    monkeypatch.setattr(
        QtWidgets.QInputDialog, "getText", lambda *args: asked.append(args[2]) or (next(answers), True)
    )
    panel.widget.exportSR(str(tmp_path / "report.dcm"))
    assert asked[0].startswith("PatientID") and asked[-1].startswith("StudyInstanceUID")
    assert "DICOM SR written to" in panel.ui.statusLabel.text()
    read = read_report_sr(tmp_path / "report.dcm")
    conversation = panel.widget.logic.conversation(abdomen.GetID())
    assert read.identifiers["patient_id"] == "PANEL-1" and read.references == []
    assert read.turns[0].answer == (conversation.turns[0].answer.strip() or "(no text)")


def test_a_non_ct_volume_is_refused_until_the_checkbox_is_checked(panel, tiny_model_dir):
    mr = standIn.loadVolume(NOT_CT_MR, "brain_mr")
    panel.useModel(tiny_model_dir, maxNewTokens=3)
    panel.ui.inputSelector.setCurrentNode(mr)
    panel.ui.generateButton.click()
    panel.pump(lambda: not panel.busy())
    status = panel.ui.statusLabel.text()
    assert "brain_mr" in status and "does not look like a CT" in status
    assert panel.ui.allowNonCTCheckBox.text() in status  # the message names the checkbox that accepts it
    assert "color" in panel.ui.statusLabel.styleSheet() and panel.ui.historyView.toPlainText().endswith(
        "[failed]\n\n"
    )

    panel.ui.allowNonCTCheckBox.setChecked(True)
    assert panel.parameters.allowNonCT
    low, high = np.percentile(slicer.util.arrayFromVolume(mr), [0.5, 99.5])
    assert mr.GetDisplayNode().GetWindow() == pytest.approx(high - low)  # the views show what the model reads
    panel.ui.generateButton.click()
    panel.pump(lambda: not panel.busy())
    assert panel.ui.statusLabel.text().startswith("Done: ") and "percentiles" in panel.ui.statusLabel.text()
    (turn,) = panel.widget.logic.conversation(mr.GetID()).turns
    assert turn.newTokens >= 1 and panel.widget.logic.conversation(mr.GetID()).settings["allow_non_ct"]


def test_errors_show_in_the_panel(panel, abdomen, tiny_model_dir):
    panel.useModel(tiny_model_dir, maxNewTokens=4)
    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.ui.modeComboBox.setCurrentText(module.MODE_QUESTION)
    panel.ui.askButton.click()
    assert "question is empty" in panel.ui.statusLabel.text() and not panel.busy()

    panel.ui.modelSourceComboBox.setCurrentText(module.SOURCE_FOLDER)
    panel.ui.modelLocationLineEdit.setText(str(tiny_model_dir.parent / "no-such-model"))
    panel.ui.questionLineEdit.setText("Anything?")
    panel.ui.askButton.click()
    panel.pump(lambda: not panel.busy())
    assert "does not exist" in panel.ui.statusLabel.text()


def test_a_hub_model_is_downloaded_only_after_the_user_agrees(panel, abdomen, tmp_path):
    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.ui.cacheFolderLineEdit.setText(str(tmp_path / "models"))
    panel.ui.cacheFolderLineEdit.editingFinished.emit()
    panel.ui.modelSourceComboBox.setCurrentText(module.SOURCE_HUB)
    panel.ui.modelLocationLineEdit.setText("someone/ct-model")
    standIn.confirmAnswers.append(False)
    panel.ui.generateButton.click()
    assert not panel.busy() and "declined" in panel.ui.statusLabel.text()
    (question,) = standIn.confirmations
    assert "someone/ct-model" in question and str(tmp_path / "models") in question
    panel.ui.modelLocationLineEdit.setText("not a repo id")
    panel.ui.generateButton.click()
    assert "owner/name" in panel.ui.statusLabel.text() and len(standIn.confirmations) == 1
    assert standIn.pipInstalls == []  # every dependency is installed in this environment


def test_the_panel_state_is_restored_from_a_saved_scene(panel, abdomen, tmp_path):
    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.ui.modeComboBox.setCurrentText(module.MODE_QUESTION)
    panel.ui.windowPresetComboBox.setCurrentText("lung")
    panel.ui.precisionComboBox.setCurrentText("bfloat16")
    panel.ui.allowNonCTCheckBox.setChecked(True)
    panel.ui.questionLineEdit.setText("Any nodules?")
    sceneFile = save_scene_with_volume(slicer.mrmlScene, abdomen, tmp_path)
    panel.close()

    slicer.mrmlScene.Clear(True)
    slicer.mrmlScene.SetURL(str(sceneFile))
    assert slicer.mrmlScene.Connect()
    restored = Panel()
    try:
        assert restored.ui.inputSelector.currentNode().GetName() == "abdomen"
        assert restored.ui.modeComboBox.currentText() == module.MODE_QUESTION
        assert restored.ui.windowPresetComboBox.currentText() == "lung"
        assert restored.ui.precisionComboBox.currentText() == "bfloat16"
        assert restored.ui.allowNonCTCheckBox.isChecked()
        assert restored.ui.questionLineEdit.text() == "Any nodules?"
    finally:
        restored.close()
        slicer.mrmlScene.Clear(True)
        for node in slicer_compat.build_view_nodes():
            slicer.mrmlScene.AddNode(node)


def test_closing_the_scene_resets_the_panel(panel, abdomen):
    panel.ui.inputSelector.setCurrentNode(abdomen)
    slicer.mrmlScene.Clear(False)  # Slicer's "close scene": the singleton parameter node is reset
    after = panel.parameters
    assert after is not None and slicer.mrmlScene.IsNodePresent(after.parameterNode)
    assert after.inputVolume is None and after.mode == module.MODE_REPORT
    assert panel.ui.historyView.toPlainText() == "" and not panel.ui.generateButton.isEnabled()
    again = standIn.loadVolume(ABDOMEN_CT, "abdomen")
    panel.ui.inputSelector.setCurrentNode(again)
    assert panel.parameters.inputVolume is again and panel.ui.generateButton.isEnabled()
