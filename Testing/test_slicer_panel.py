"""The panel on real Qt widgets (PySide6, offscreen) over a real MRML scene, its model in a worker process.

``slicer_compat`` stands in for PythonQt's ``qt``/``ctk`` and the Slicer-only parts of ``slicer``
(see its docstring). The widget is built from the module's .ui file and driven through its widgets.
The event loop is pumped the way Slicer's GUI thread runs it: idle time is spent holding Python's
global interpreter lock (``slicer_compat.idleHoldingGIL``), so anything that needed a Python thread
in this process would crawl here as in Slicer. A 10 ms heartbeat timer measures how long the GUI
thread is ever blocked. The tiny random model writes gibberish; the tests check behaviour, not wording.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
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
from CTMLLMSlicerLib.conversation import QUESTION, REPORT, REVIEW_NOTICE  # noqa: E402
from CTMLLMSlicerLib.logic import RESULT_REFERENCE_ROLE  # noqa: E402
from CTMLLMSlicerLib.worker_client import ModelWorker  # noqa: E402

ARTIFACTS = REPO / "Testing" / "artifacts"
TESTING = Path(__file__).resolve().parent
MAX_STALL_S = 0.2
IDLE_S = 0.005
"""Each pump round idles this long holding the GIL, as Slicer's GUI thread idles in Qt."""

pytestmark = needs_shared_ct


@pytest.fixture(scope="module")
def sharedWorker(tmp_path_factory):
    """One model worker for the panels of this file (each Slicer session keeps one too): the model
    and torch load once, not once per test."""
    worker = ModelWorker(folder=tmp_path_factory.mktemp("worker"))
    yield worker
    worker.unload()


class Panel:
    """The module widget in a window, with a heartbeat that records GUI-thread stalls.

    ``worker``: a model worker to use instead of the one the Logic would start (kept running
    when the panel closes)."""

    def __init__(self, worker: ModelWorker | None = None) -> None:
        self.window = slicer.qMRMLWidget()
        self.window.setLayout(QtWidgets.QVBoxLayout())
        self.window.setMRMLScene(slicer.mrmlScene)
        self.widget = module.CTMLLMSlicerWidget(self.window)
        self.widget.setup()
        self.sharedWorker = worker
        if worker is not None:
            self.widget.logic.worker = worker
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
        return self.widget.logic.isJobRunning() or self.widget._runningButton is not None

    def pump(self, until, timeout: float = 120.0, onTick=None) -> None:
        """Run the event loop as Slicer does until ``until()`` is true (idle time holds the GIL);
        fail after ``timeout`` seconds."""
        deadline = time.perf_counter() + timeout
        while not until():
            assert time.perf_counter() < deadline, "timed out waiting for the panel"
            QtWidgets.QApplication.processEvents(QtCore.QEventLoop.AllEvents)
            slicer_compat.idleHoldingGIL(IDLE_S)
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
        if self.sharedWorker is not None and self.widget.logic.worker is self.sharedWorker:
            self.widget.logic.worker = None  # cleanup ends the Logic's worker: keep the shared one
        self.widget.cleanup()
        self.window.close()
        self.window.deleteLater()


@pytest.fixture
def panel(sharedWorker):
    slicer.mrmlScene.Clear(False)
    standIn.confirmAnswers.clear()
    standIn.confirmations.clear()
    standIn.pipInstalls.clear()
    panel = Panel(sharedWorker)
    yield panel
    panel.close()


@pytest.fixture
def abdomen():
    return standIn.loadVolume(ABDOMEN_CT, "abdomen")


def test_selecting_a_volume_shows_it_in_the_slice_views_and_alone_in_3d(panel, abdomen):
    mr = standIn.loadVolume(NOT_CT_MR, "brain_mr")
    layout = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
    resets = slicer.app.layoutManager().view.cameraResets
    panel.ui.inputSelector.setCurrentNode(mr)
    panel.ui.inputSelector.setCurrentNode(abdomen)
    assert panel.parameters.inputVolume is abdomen
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView  # a layout with 3D
    composites = [slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3)]
    assert [c.GetBackgroundVolumeID() for c in composites] == [abdomen.GetID()] * 3
    vrLogic = standIn.logics["VolumeRendering"]
    rendering = vrLogic.GetFirstVolumeRenderingDisplayNode(abdomen)
    assert rendering is not None and rendering.GetVisibility()
    assert not vrLogic.GetFirstVolumeRenderingDisplayNode(mr).GetVisibility()  # the previous one is hidden
    assert slicer.app.layoutManager().view.cameraResets == resets + 2  # the camera follows each selection
    panel.ui.windowPresetComboBox.setCurrentText("bone")
    assert abdomen.GetDisplayNode().GetWindow() == 1800.0  # the window the model reads, in the views

    panel.ui.keepWindowLevelCheckBox.setChecked(True)
    abdomen.GetDisplayNode().SetWindowLevel(350.0, 40.0)  # the user's own window/level
    panel.ui.windowPresetComboBox.setCurrentText("lung")
    panel.ui.inputSelector.setCurrentNode(mr)
    panel.ui.inputSelector.setCurrentNode(abdomen)
    assert (abdomen.GetDisplayNode().GetWindow(), abdomen.GetDisplayNode().GetLevel()) == (350.0, 40.0)


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
    conversation = panel.widget.logic.conversation(abdomen)
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
    (turn,) = panel.widget.logic.conversation(abdomen).turns
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

    statuses = []
    for question in ("Is the liver enlarged?", "Is there free fluid?"):
        panel.ui.questionLineEdit.setText(question)
        assert panel.parameters.lastPrompt == question
        panel.ui.questionLineEdit.returnPressed.emit()
        assert panel.ui.askButton.text() == "Cancel" and panel.ui.questionLineEdit.selectedText() == question
        panel.pump(lambda: not panel.busy())
        statuses.append(panel.ui.statusLabel.text())

    assert "reused the encoded volume" not in statuses[0]  # the volume was encoded once
    # the task router's choice (no task experts in the tiny model): the follow-up reused the features
    # kept in the worker, though its prompt differs
    assert "no task experts, reused the encoded volume" in statuses[1]
    assert panel.parameters.lastPrompt == "Is there free fluid?"
    conversation = panel.widget.logic.conversation(abdomen)
    assert [turn.prompt for turn in conversation.turns] == ["Is the liver enlarged?", "Is there free fluid?"]
    history = panel.ui.historyView.toPlainText()
    assert history.index("Q: Is the liver enlarged?") < history.index("Q: Is there free fluid?")
    assert "loaded (worker process" in panel.ui.workerStatusLabel.text()

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
    assert textNode.GetText().startswith(REVIEW_NOTICE)
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
    # the model that wrote it is loaded in the worker: the SR names its weights checksum
    weights = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert read.device["Device Observer Serial Number"] == f"sha256:{weights}"

    panel.ui.unloadModelButton.click()  # the worker ends: the SR can name the model, not its checksum
    panel.widget.exportSR(str(tmp_path / "unloaded.dcm"), {"patient_id": "PANEL-1",
                          "study_instance_uid": "1.2.826.0.1.3680043.10.11"})  # fmt: skip
    assert "no longer loaded" in panel.ui.statusLabel.text()
    unloaded = read_report_sr(tmp_path / "unloaded.dcm")
    assert "Device Observer Serial Number" not in unloaded.device
    assert unloaded.device["Device Observer Name"] == conversation.modelId


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
    (turn,) = panel.widget.logic.conversation(mr).turns
    assert turn.newTokens >= 1 and panel.widget.logic.conversation(mr).settings["allow_non_ct"]


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


def test_the_panel_state_and_the_conversation_are_restored_from_a_saved_scene(
    panel, abdomen, tiny_model_dir, tmp_path, sharedWorker
):
    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.useModel(tiny_model_dir, maxNewTokens=3)
    panel.ui.modeComboBox.setCurrentText(module.MODE_QUESTION)
    panel.ui.questionLineEdit.setText("Is the liver enlarged?")
    panel.ui.askButton.click()
    panel.pump(lambda: not panel.busy())
    panel.ui.saveButton.click()
    shown = panel.widget.logic.conversation(abdomen).toText() + "\n"  # what the panel shows for it
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
    restored = Panel(sharedWorker)
    try:
        assert restored.ui.inputSelector.currentNode().GetName() == "abdomen"
        assert restored.ui.historyView.toPlainText() == shown  # the conversation came back with the scene
        assert "Q: Is the liver enlarged?" in shown
        assert restored.ui.saveButton.isEnabled()
        assert restored.ui.modeComboBox.currentText() == module.MODE_QUESTION
        assert restored.ui.windowPresetComboBox.currentText() == "lung"
        assert restored.ui.precisionComboBox.currentText() == "bfloat16"
        assert restored.ui.allowNonCTCheckBox.isChecked()
        assert restored.ui.questionLineEdit.text() == "Any nodules?"
        restored.ui.askButton.click()  # a follow-up continues the restored conversation
        restored.pump(lambda: not restored.busy())
        volume = restored.parameters.inputVolume
        history = restored.widget.logic.conversation(volume).history()
        assert [q for q, _ in history] == ["Is the liver enlarged?", "Any nodules?"]
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


def test_a_new_volume_after_close_scene_starts_an_empty_conversation(panel, abdomen, tiny_model_dir):
    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.useModel(tiny_model_dir, maxNewTokens=4)
    panel.ui.generateButton.click()
    panel.pump(lambda: not panel.busy())
    oldID = abdomen.GetID()
    slicer.mrmlScene.Clear(False)
    other = standIn.loadVolume(NOT_CT_MR, "another_patient")
    assert other.GetID() == oldID  # MRML reuses the node ID...
    panel.ui.inputSelector.setCurrentNode(other)
    assert (
        panel.ui.historyView.toPlainText() == "" and not panel.ui.saveButton.isEnabled()
    )  # ...not the report
    assert panel.widget.logic.peekConversation(other) is None and panel.widget.logic.conversations == {}


def test_closing_the_scene_while_a_job_runs_resets_the_button_and_stops_polling(
    panel, abdomen, tiny_model_dir
):
    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.useModel(tiny_model_dir, maxNewTokens=1000)
    panel.ui.generateButton.click()
    panel.pump(lambda: "generating" in panel.ui.progressBar.format())
    slicer.mrmlScene.Clear(False)
    panel.pump(lambda: not panel.busy(), timeout=20)
    assert panel.ui.generateButton.text() == "Generate Report" and not panel.ui.progressBar.isVisible()
    assert not panel.widget._pollTimer.isActive()
    assert panel.ui.historyView.toPlainText() == "" and "left the scene" in panel.ui.statusLabel.text()
    assert panel.widget.logic.conversations == {}


def fakeWorker(tmp_path: Path, loader: str) -> ModelWorker:
    env = {**os.environ, "PYTHONPATH": str(TESTING)}
    return ModelWorker(env=env, folder=tmp_path / "worker", modelLoader=f"worker_fakes:{loader}")


def test_a_crashed_worker_leaves_the_panel_usable(abdomen, tmp_path):
    panel = Panel()
    try:
        panel.widget.logic.worker = fakeWorker(tmp_path, "crashes")
        panel.ui.inputSelector.setCurrentNode(abdomen)
        panel.ui.generateButton.click()
        panel.pump(lambda: not panel.busy())
        status = panel.ui.statusLabel.text()
        assert "crashed" in status and "next request starts a new worker" in status
        assert (
            "color" in panel.ui.statusLabel.styleSheet()
            and panel.ui.generateButton.text() == "Generate Report"
        )
        assert panel.ui.historyView.toPlainText().endswith("[failed]\n\n")

        panel.widget.logic.worker.modelLoader = "worker_fakes:working"
        panel.ui.generateButton.click()
        panel.pump(lambda: not panel.busy())
        assert panel.ui.statusLabel.text().startswith("Done: ") and panel.widget.logic.worker.starts == 2
    finally:
        panel.close()


def test_unload_model_ends_the_worker(abdomen, tmp_path):
    panel = Panel()
    try:
        worker = panel.widget.logic.worker = fakeWorker(tmp_path, "working")
        panel.ui.inputSelector.setCurrentNode(abdomen)
        panel.ui.generateButton.click()
        panel.pump(lambda: not panel.busy())
        process = worker.process.process
        assert "fake-model loaded" in panel.ui.workerStatusLabel.text()
        panel.ui.unloadModelButton.click()
        assert process.poll() is not None and not worker.isRunning()
        assert "memory is free" in panel.ui.statusLabel.text()
        assert panel.ui.workerStatusLabel.text() == "No model loaded."
    finally:
        panel.close()


def test_the_pump_idles_holding_the_gil_as_slicers_gui_thread_does():
    """The simulation the panel tests rely on: a Python thread here runs only between idles."""
    counts = {"running": True, "rounds": 0}

    def spin() -> None:
        while counts["running"]:
            counts["rounds"] += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        counts["rounds"] = 0
        time.sleep(0.3)  # releases the lock: the thread spins freely
        free = counts["rounds"]
        counts["rounds"] = 0
        slicer_compat.idleHoldingGIL(
            0.3
        )  # keeps the lock: the thread waits (at most one switch interval runs)
        held = counts["rounds"]
    finally:
        counts["running"] = False
        thread.join()
    assert held < free / 10, (held, free)


def test_an_older_slicer_is_told_which_version_it_needs_before_any_install(panel, abdomen, monkeypatch):
    monkeypatch.setattr(slicer.app, "minorVersion", 8)
    panel.widget._dependenciesChecked = False
    panel.ui.inputSelector.setCurrentNode(abdomen)
    panel.ui.generateButton.click()
    status = panel.ui.statusLabel.text()
    assert "needs 3D Slicer 5.10 or newer" in status and "this is Slicer 5.8" in status
    assert standIn.pipInstalls == [] and standIn.confirmations == [] and not panel.busy()


def test_a_volume_loaded_while_the_panel_is_open_is_shown_once_loaded(panel):
    """The selector picks a volume the moment it enters the scene, before the reader attaches its
    display node; the rendering made then would be dropped by the reader."""
    assert panel.parameters.inputVolume is None
    volume = standIn.loadVolume(ABDOMEN_CT, "abdomen")
    assert panel.parameters.inputVolume is volume
    panel.pump(
        lambda: standIn.logics["VolumeRendering"].GetFirstVolumeRenderingDisplayNode(volume), timeout=5
    )
    rendering = standIn.logics["VolumeRendering"].GetFirstVolumeRenderingDisplayNode(volume)
    assert rendering.GetVisibility() and volume.GetDisplayNode().GetWindow() == 2000.0  # the model's window
