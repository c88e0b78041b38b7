"""The model worker process and its protocol, with real processes (no Qt, real MRML on slicer-core).

The Logic starts jobs in a ``ModelWorker`` and polls it, as the panel does from its QTimer. The
tiny random model checks streaming and the caches kept in the worker; ``worker_fakes`` loaders
make a worker ignore Cancel, crash, be killed as by the out-of-memory killer, or run out of memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer.util
import vtk
import worker_fakes

from CTMLLMSlicerLib import jobs
from CTMLLMSlicerLib import worker_protocol as protocol
from CTMLLMSlicerLib.batch_scene import slicer_core_scene
from CTMLLMSlicerLib.conversation import QUESTION, REPORT
from CTMLLMSlicerLib.errors import (
    ModelOutOfMemoryError,
    NotCTVolumeError,
    NoVolumeError,
    WorkerError,
    describeError,
)
from CTMLLMSlicerLib.logic import (
    ALLOW_NON_CT_LABEL,
    PANEL_NON_CT_HINT,
    STAGE_ENCODING,
    STAGE_GENERATING,
    STAGE_LOADING,
    STAGE_PREPROCESSING,
    CTMLLMLogicCore,
    ModelRequest,
)
from CTMLLMSlicerLib.worker_client import ModelWorker, WorkerProcess, workerCommand
from model_core.data import CTImage

TESTING = Path(__file__).resolve().parent


class MRML:
    def __init__(self) -> None:
        self.scene, self.app, self.logics = slicer_core_scene(("Colors", "Volumes"))

    def ct(self, name: str = "ct"):
        """A small synthetic CT in HU: air, a soft-tissue block, a bone rod (slices, rows, columns)."""
        array = np.full((12, 40, 40), -1000, dtype=np.int16)
        array[:, 8:32, 8:32] = 40
        array[:, 18:22, 18:22] = 700
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, array)
        node.SetSpacing(1.0, 1.0, 3.0)
        return node


@pytest.fixture
def mrml() -> MRML:
    return MRML()


def fakeLogic(mrml: MRML, tmp_path: Path, loader: str) -> CTMLLMLogicCore:
    """A Logic whose worker loads ``worker_fakes.<loader>`` instead of a real model."""
    env = {**os.environ, "PYTHONPATH": str(TESTING)}
    worker = ModelWorker(env=env, folder=tmp_path / "worker", modelLoader=f"worker_fakes:{loader}")
    return CTMLLMLogicCore(mrml.scene, worker=worker)


def run(
    logic: CTMLLMLogicCore, volume, task, prompt, request, **kwargs
) -> tuple[list[jobs.JobEvent], jobs.JobEvent]:
    logic.startJob(volume, task, prompt, request, **kwargs)
    events: list[jobs.JobEvent] = []
    end = logic.waitForJob(events.append, timeout=180)
    return events, end


def isAlive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


FAKE = ModelRequest("fake", device="cpu")


def test_the_worker_streams_keeps_the_model_and_reuses_the_encoded_volume(mrml, tiny_model_dir, tmp_path):
    logic = CTMLLMLogicCore(mrml.scene, worker=ModelWorker(folder=tmp_path / "worker"))
    volume = mrml.ct()
    request = ModelRequest(str(tiny_model_dir), device="cpu")
    try:
        events, end = run(logic, volume, REPORT, None, request, maxNewTokens=12)
        assert end.kind == jobs.FINISHED, end.error
        stages = [e.stage for e in events if e.kind == jobs.PROGRESS]
        assert [stages.index(s) for s in (STAGE_LOADING, STAGE_ENCODING, STAGE_GENERATING)] == sorted(
            stages.index(s) for s in (STAGE_LOADING, STAGE_ENCODING, STAGE_GENERATING)
        )
        texts = [e.text for e in events if e.kind == jobs.TEXT]
        report = end.result
        assert len(texts) > 1 and "".join(texts) == report.turn.answer and 1 <= report.turn.newTokens <= 12
        assert report.encoded and report.modelId and logic.conversation(volume).turns == [report.turn]
        pid = logic.worker.process.pid

        first = run(logic, volume, QUESTION, "Is the liver enlarged?", request, maxNewTokens=4)[1].result
        events, end = run(logic, volume, QUESTION, "Is there a lesion?", request, maxNewTokens=4)
        second = end.result
        assert first.encoded and not second.encoded  # the follow-up reused the features kept in the worker
        assert STAGE_LOADING not in {e.stage for e in events}  # and the model it keeps loaded
        assert logic.worker.process.pid == pid and logic.worker.starts == 1
        assert [q for q, _ in logic.conversation(volume).history()] == [
            "Is the liver enlarged?",
            "Is there a lesion?",
        ]
        assert not list((tmp_path / "worker").glob("*.npy"))  # voxel hand-over files are deleted
    finally:
        assert logic.unloadModel()
    assert not logic.worker.isRunning() and not isAlive(pid) and logic.unloadModel() is False


def test_cancel_reaches_the_worker_within_one_token_and_the_worker_stays(mrml, tmp_path):
    logic = fakeLogic(mrml, tmp_path, "working")
    volume = mrml.ct()
    logic.startJob(volume, REPORT, None, FAKE, maxNewTokens=1000)
    seen: list[str] = []
    while not seen:
        seen += [e.text for e in logic.pollJob() if e.kind == jobs.TEXT]
        time.sleep(0.005)
    pid = logic.worker.process.pid
    logic.cancelJob()
    cancelled = time.perf_counter()
    end = logic.waitForJob(lambda e: seen.append(e.text) if e.kind == jobs.TEXT else None, timeout=10)
    turn = end.result.turn
    assert time.perf_counter() - cancelled < 1.0 and turn.cancelled
    assert turn.newTokens <= 3 + int((time.perf_counter() - cancelled) / 0.01)  # words written meanwhile
    assert turn.newTokens < 1000 and logic.worker.process.pid == pid and logic.worker.isRunning()
    assert logic.conversation(volume).history() == []  # a cancelled answer is no context for follow-ups
    logic.unloadModel()


def test_a_hung_worker_is_killed_after_cancel_and_a_new_one_starts(mrml, tmp_path):
    logic = fakeLogic(mrml, tmp_path, "hangs")
    logic.worker.cancelGraceSeconds = 1.0
    volume = mrml.ct()
    logic.startJob(volume, REPORT, None, FAKE)
    while STAGE_GENERATING not in {e.stage for e in logic.pollJob()}:
        time.sleep(0.01)
    pid = logic.worker.process.pid
    logic.cancelJob()
    start = time.perf_counter()
    end = logic.waitForJob(timeout=10)
    assert end.kind == jobs.FAILED and isinstance(end.error, WorkerError)
    message = str(end.error)
    assert "did not answer within 1 s of Cancel and was stopped" in message and "new worker" in message
    assert 1.0 <= time.perf_counter() - start < 3.0 and not isAlive(pid) and not logic.isJobRunning()
    log = Path(str(end.error).rsplit("Log: ", 1)[1])
    assert "ignoring cancel" in log.read_text(encoding="utf-8")

    logic.worker.modelLoader = "worker_fakes:working"  # the next job starts a fresh worker
    _, again = run(logic, volume, REPORT, None, FAKE, maxNewTokens=3)
    assert again.kind == jobs.FINISHED and again.result.encoded and logic.worker.starts == 2
    logic.unloadModel()


def test_a_worker_busy_in_a_long_step_answers_and_is_not_killed(mrml, tmp_path):
    """Encoding cannot stop midway: a worker that answers the ping is left to finish the step."""
    logic = fakeLogic(mrml, tmp_path, "encodesSlowly")
    logic.worker.cancelGraceSeconds = 0.5
    logic.startJob(mrml.ct(), REPORT, None, FAKE)
    while STAGE_ENCODING not in {e.stage for e in logic.pollJob()}:
        time.sleep(0.01)
    pid = logic.worker.process.pid
    logic.cancelJob()
    end = logic.waitForJob(timeout=30)
    assert end.kind == jobs.CANCELLED and logic.worker.process.pid == pid and logic.worker.isRunning()
    logic.unloadModel()


@pytest.mark.parametrize(
    ("loader", "said"),
    [
        ("crashes", ["crashed (SIGABRT)", "a native library aborts"]),
        ("killedBySystem", ["killed by the system (SIGKILL)", "ran out of memory", "allocating 80 GB"]),
    ],
)
def test_a_crashed_worker_leaves_a_clear_error_and_the_next_job_works(mrml, tmp_path, loader, said):
    logic = fakeLogic(mrml, tmp_path, loader)
    volume = mrml.ct()
    _, end = run(logic, volume, REPORT, None, FAKE)
    assert end.kind == jobs.FAILED and isinstance(end.error, WorkerError)
    message = str(end.error)
    assert all(text in message for text in said), message
    assert "Slicer is fine" in message and not logic.isJobRunning() and not logic.worker.isRunning()
    assert logic.conversation(volume).isEmpty()

    logic.worker.modelLoader = "worker_fakes:working"
    _, again = run(logic, volume, REPORT, None, FAKE, maxNewTokens=2)
    assert again.kind == jobs.FINISHED and logic.worker.starts == 2
    logic.unloadModel()


def test_out_of_memory_in_the_worker_is_a_clear_error_and_the_worker_stays(mrml, tmp_path):
    logic = fakeLogic(mrml, tmp_path, "runsOutOfMemory")
    _, end = run(logic, mrml.ct(), REPORT, None, FAKE)
    assert end.kind == jobs.FAILED and isinstance(end.error, ModelOutOfMemoryError)
    assert "out of memory" in str(end.error) and "bfloat16" in str(end.error)
    assert logic.worker.isRunning() and logic.worker.starts == 1
    logic.unloadModel()


def test_unload_during_a_job_ends_the_worker_and_the_job(mrml, tmp_path):
    logic = fakeLogic(mrml, tmp_path, "working")
    volume = mrml.ct()
    logic.startJob(volume, REPORT, None, FAKE, maxNewTokens=1000)
    while not any(e.kind == jobs.TEXT for e in logic.pollJob()):
        time.sleep(0.005)
    pid = logic.worker.process.pid
    assert logic.unloadModel()
    (end,) = logic.pollJob()
    assert end.kind == jobs.CANCELLED and not isAlive(pid) and not logic.isJobRunning()
    assert logic.conversation(volume).isEmpty()


def test_closing_the_scene_during_a_job_drops_its_result(mrml, tmp_path):
    logic = fakeLogic(mrml, tmp_path, "working")
    volume = mrml.ct()
    logic.startJob(volume, REPORT, None, FAKE, maxNewTokens=1000)
    logic.forgetAll()  # what the panel does on Close Scene
    mrml.scene.Clear(False)
    end = logic.waitForJob(timeout=10)
    assert end.kind == jobs.CANCELLED and logic.conversations == {}
    again = mrml.ct()
    assert again.GetID() == volume.GetID() and logic.peekConversation(again) is None
    logic.unloadModel()


def test_a_removed_volume_leaves_no_features_in_the_worker(mrml, tmp_path):
    logic = fakeLogic(mrml, tmp_path, "working")
    kept, removed = mrml.ct("kept"), mrml.ct("removed")
    for volume in (kept, removed):
        assert run(logic, volume, REPORT, None, FAKE, maxNewTokens=1)[1].kind == jobs.FINISHED
    assert len(logic.worker.cachedKeys) == 2
    logic.forgetVolume(removed)  # the panel calls it on NodeRemovedEvent
    mrml.scene.RemoveNode(removed)
    assert len(logic.worker.cachedKeys) == 1 and logic.peekConversation(kept) is not None
    _, end = run(logic, kept, REPORT, None, FAKE, maxNewTokens=1)
    assert not end.result.encoded and len(logic.worker.cachedKeys) == 1  # the child agrees
    logic.unloadModel()


def test_the_worker_exits_when_its_parent_goes_away(tmp_path):
    process = WorkerProcess(workerCommand(), tmp_path / "worker.log")
    process.start()
    deadline = time.monotonic() + 30
    while not any(m.get("event") == protocol.READY for m in process.read()):
        assert time.monotonic() < deadline, "the worker never said it was ready"
        time.sleep(0.01)
    process.process.stdin.close()  # what the parent's death does to the pipe
    assert process.process.wait(timeout=10) == 0
    process.close()


def test_voxels_travel_as_plain_npy_files_never_pickled(tmp_path):
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = protocol.writeVolumeFile(array, tmp_path, "v")
    assert np.array_equal(protocol.readVolumeFile(path), array)
    with pytest.raises(NoVolumeError, match="cannot be handed"):
        protocol.writeVolumeFile(np.array([[[{"a": 1}]]], dtype=object), tmp_path, "objects")
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([[[print]]], dtype=object), allow_pickle=True)
    with pytest.raises(NoVolumeError, match="could not read"):
        protocol.readVolumeFile(pickled)
    with pytest.raises(NoVolumeError, match="3D scalar volume"):
        protocol.readVolumeFile(protocol.writeVolumeFile(np.zeros((2, 2), np.float32), tmp_path, "flat"))


def test_lines_are_split_across_reads_and_broken_lines_are_named():
    splitter = protocol.LineSplitter()
    first = protocol.encodeMessage({"event": "text", "text": "a\nb"})
    assert splitter.feed(first[:5]) == [] and splitter.feed(first[5:] + b'{"event"') == [first.rstrip(b"\n")]
    assert protocol.decodeMessage(first)["text"] == "a\nb"
    with pytest.raises(protocol.ProtocolError, match="not a protocol line"):
        protocol.decodeMessage(b"Traceback (most recent call last):")
    error = protocol.errorFromMessage({"errorType": "ModelOutOfMemoryError", "message": "m"})
    assert isinstance(error, ModelOutOfMemoryError)
    assert isinstance(protocol.errorFromMessage({"errorType": "SystemExit", "message": "m"}), WorkerError)


def test_the_worker_is_started_with_this_python_and_finds_its_code_from_any_folder(tmp_path):
    command = workerCommand()
    assert command[0] == sys.executable  # Slicer sets sys.executable to its PythonSlicer
    done = subprocess.run(
        command, cwd=tmp_path, input=b'{"op":"shutdown"}\n', capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    (ready,) = [protocol.decodeMessage(line) for line in done.stdout.splitlines()]
    assert ready["event"] == protocol.READY and ready["pid"] > 0


def test_without_a_task_the_router_picks_the_expert_in_the_worker(mrml, tmp_path):
    """task=None (the routing mode) passes through the worker; the turn names the expert, and
    features are reused per expert the router picks, not per prompt."""
    logic = fakeLogic(mrml, tmp_path, "working")
    volume = mrml.ct()
    _, asked = run(logic, volume, None, "Is there a lesion?", FAKE, maxNewTokens=2)
    _, described = run(logic, volume, None, "Describe the scan.", FAKE, maxNewTokens=2)
    events, again = run(logic, volume, None, "Where is it?", FAKE, maxNewTokens=2)
    _, reported = run(logic, volume, None, None, FAKE, maxNewTokens=2)
    _, forced = run(logic, volume, QUESTION, "Describe the scan.", FAKE, maxNewTokens=2)
    turns = [r.result.turn for r in (asked, described, again, reported, forced)]
    assert [(t.task, t.expert, t.routed) for t in turns] == [
        (QUESTION, QUESTION, True),
        (QUESTION, REPORT, True),  # a prompt is a question turn, whichever expert the router picks
        (QUESTION, QUESTION, True),
        (REPORT, REPORT, True),
        (QUESTION, QUESTION, False),
    ]
    assert "expert vqa (chosen by the task router)" == turns[0].expertNote
    encoded = [r.result.encoded for r in (asked, described, again, reported, forced)]
    assert encoded == [True, True, False, False, True]  # the forced expert is not the routed one's key
    assert STAGE_PREPROCESSING not in {e.stage for e in events if e.kind == jobs.PROGRESS}
    assert [q for q, _ in logic.conversation(volume).history()] == [
        "Is there a lesion?",
        "Describe the scan.",
        "Where is it?",
        "Describe the scan.",
    ]
    logic.unloadModel()


def test_the_voxels_are_sent_once_and_another_expert_reuses_the_prepared_input(mrml, tmp_path, monkeypatch):
    import CTMLLMSlicerLib.logic as logicModule

    logic = fakeLogic(mrml, tmp_path, "working")
    volume = mrml.ct()
    sent = []
    original = protocol.writeVolumeFile

    def spy(array, folder, name):
        sent.append(name)
        return original(array, folder, name)

    monkeypatch.setattr(logicModule, "writeVolumeFile", spy)
    stages = []
    try:
        for task, prompt in ((REPORT, None), (QUESTION, "Any fluid?"), (None, "Any fluid?")):
            events, end = run(logic, volume, task, prompt, FAKE, maxNewTokens=1)
            assert end.kind == jobs.FINISHED, end.error
            stages.append([e.stage for e in events if e.kind == jobs.PROGRESS])
    finally:
        logic.unloadModel()
    assert len(sent) == 1  # the voxels travel once; the worker keeps the prepared input
    assert STAGE_PREPROCESSING in stages[0] and STAGE_ENCODING in stages[0]
    for later in stages[1:]:  # another expert, forced or picked by the router, encodes the kept input
        assert STAGE_PREPROCESSING not in later and STAGE_ENCODING in later


def test_a_refused_volume_reaches_the_panel_with_its_input_verdict(mrml, tmp_path):
    """The worker prepares volumes with model_core.data.prepare_input, as the CLI and the batch do:
    the same refusal, the same words, and the verdict behind it, through the protocol."""
    from model_core.data import prepare_input
    from model_core.data.errors import CTInputError, InvalidValuesError, NotCTError, TooFewSlicesError

    logic = fakeLogic(mrml, tmp_path, "working")
    preprocessing = worker_fakes.FakeModel().config.preprocessing
    cases = {
        "mr": (np.random.default_rng(0).normal(300, 80, (12, 40, 40)).astype(np.float32), NotCTError),
        "flat": (np.full((2, 40, 40), 40, np.int16), TooFewSlicesError),
    }
    try:
        for name, (array, verdict) in cases.items():
            node = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            slicer.util.updateVolumeFromArray(node, array)
            _, end = run(logic, node, REPORT, None, FAKE, maxNewTokens=1)
            assert end.kind == jobs.FAILED and isinstance(end.error, NotCTVolumeError)
            assert isinstance(end.error.__cause__, verdict), repr(end.error.__cause__)
            matrix = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(matrix)
            ijkToRAS = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
            with pytest.raises(CTInputError) as direct:  # the CLI's and the batch's decision
                prepare_input(CTImage.from_ijk_to_ras(array, ijkToRAS, source=name), preprocessing)
            if verdict is NotCTError:  # the panel names its checkbox instead of allow_non_ct=True
                assert describeError(end.error) == str(direct.value.with_hint(PANEL_NON_CT_HINT))
                assert ALLOW_NON_CT_LABEL in describeError(end.error)
            else:
                assert describeError(end.error) == str(direct.value)

        nan = mrml.ct("nan")
        path = tmp_path / "nan.nii"
        image = sitk.GetImageFromArray(np.where(np.arange(12 * 40 * 40).reshape(12, 40, 40) == 5, np.nan,
                                                40.0).astype(np.float32))  # fmt: skip
        sitk.WriteImage(image, str(path))
        storage = mrml.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        nan.SetAndObserveStorageNodeID(storage.GetID())
        _, end = run(logic, nan, REPORT, None, FAKE, maxNewTokens=1)
        assert end.kind == jobs.FAILED and isinstance(end.error.__cause__, InvalidValuesError)
        assert str(path) in str(end.error)  # the source file's check ran in the worker
    finally:
        logic.unloadModel()
