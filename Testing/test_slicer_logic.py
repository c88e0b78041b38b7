"""The module's Logic on real MRML (slicer-core), without Qt and without the Slicer application.

This is also how the batch script runs it. A real CT from ../shared/data goes through the
volumes logic; the tiny random model (gibberish text) checks streaming, caching, cancel,
persistence and errors, never wording.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import slicer
from conftest import ABDOMEN_CT, NOT_CT_MR, REPO, TORSO_CT, needs_shared_ct, save_scene_with_volume

from CTMLLMSlicerLib import logic as logic_module
from CTMLLMSlicerLib import scene_results
from CTMLLMSlicerLib.batch_scene import slicer_core_scene
from CTMLLMSlicerLib.conversation import QUESTION, REPORT, REVIEW_NOTICE
from CTMLLMSlicerLib.errors import (
    CTMLLMSlicerError,
    DownloadNotConfirmedError,
    ModelOutOfMemoryError,
    ModelUnavailableError,
    NotCTVolumeError,
    NoVolumeError,
    OperationCancelled,
)
from CTMLLMSlicerLib.logic import (
    ALLOW_NON_CT_LABEL,
    RESULT_REFERENCE_ROLE,
    STAGE_ENCODING,
    STAGE_GENERATING,
    STAGE_LOADING,
    STAGE_PREPROCESSING,
    STAGE_REUSING,
    CTMLLMLogicCore,
    ModelRequest,
)

pytestmark = needs_shared_ct


class MRML:
    """A slicer-core scene with the application, colors, volumes and volume rendering logics."""

    def __init__(self) -> None:
        self.scene, self.app, self.logics = slicer_core_scene(("Colors", "Volumes", "VolumeRendering"))

    def load(self, path: Path, name: str):
        """Read ``path`` into the scene through the Logic's loader (as the batch script does)."""
        return CTMLLMLogicCore(self.scene, volumesLogic=self.logics["Volumes"]).loadVolumeFile(path, name)


@pytest.fixture
def mrml() -> MRML:
    return MRML()


@pytest.fixture
def request_(tiny_model_dir) -> ModelRequest:
    return ModelRequest(str(tiny_model_dir), device="cpu")


def count_encodes(core: CTMLLMLogicCore, request: ModelRequest) -> list[str]:
    """Load the model and wrap its encoder so the test sees every encoding (task per call)."""
    model = core.loadModel(request)
    calls: list[str] = []
    original = model.encode_volume

    def spy(volume, task=None, prompt=None):
        calls.append(task)
        return original(volume, task=task, prompt=prompt)

    model.encode_volume = spy
    return calls


def test_report_streams_is_saved_in_a_text_node_and_survives_a_scene_reload(mrml, request_, tmp_path):
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    core = CTMLLMLogicCore(mrml.scene)
    chunks, stages = [], []
    result = core.generateReport(
        volume,
        request_,
        maxNewTokens=12,
        onText=chunks.append,
        progressCallback=lambda stage, fraction, speed: stages.append((stage, fraction, speed)),
    )
    assert result.encoded and result.turn.task == REPORT and not result.turn.cancelled
    assert 1 <= result.turn.newTokens <= 12
    assert len(chunks) > 1 and "".join(chunks) == result.turn.answer
    order = [stage for stage, _, _ in stages]
    first = [order.index(s) for s in (STAGE_LOADING, STAGE_PREPROCESSING, STAGE_ENCODING, STAGE_GENERATING)]
    assert first == sorted(first)
    speeds = [speed for stage, _, speed in stages if stage == STAGE_GENERATING and speed]
    assert speeds and all(speed > 0 for speed in speeds)

    textNode = core.saveResultToTextNode(volume)
    saved = textNode.GetText()
    assert volume.GetNodeReference(RESULT_REFERENCE_ROLE) is textNode
    assert result.turn.answer.strip() in saved and "abdomen" in saved
    assert core.saveResultToTextNode(volume) is textNode  # a second save updates the same node

    sceneFile = save_scene_with_volume(mrml.scene, volume, tmp_path)

    reloaded = MRML()
    reloaded.scene.SetURL(str(sceneFile))
    assert reloaded.scene.Connect()
    volumeAgain = reloaded.scene.GetFirstNodeByName("abdomen")
    assert volumeAgain is not None and volumeAgain.GetImageData().GetDimensions() == (122, 101, 30)
    textAgain = volumeAgain.GetNodeReference(RESULT_REFERENCE_ROLE)
    assert textAgain is not None and textAgain.GetText() == saved
    assert textAgain.GetAttribute("CTMLLM.ModelId") == result.modelId
    assert json.loads(textAgain.GetAttribute("CTMLLM.Settings"))["model"] == request_.spec


def test_follow_up_questions_reuse_the_encoded_volume_and_the_conversation(mrml, request_):
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    core = CTMLLMLogicCore(mrml.scene)
    encodes = count_encodes(core, request_)

    core.generateReport(volume, request_, maxNewTokens=4, forceExpert=True)
    first = core.askQuestion(volume, "Is the liver enlarged?", request_, maxNewTokens=4, forceExpert=True)
    snapshot = core.volumeSnapshot(volume, "", QUESTION, request_)
    stages: list[str] = []
    second = core.askQuestion(snapshot, "Is there a lesion?", request_, maxNewTokens=4, forceExpert=True,
                              progressCallback=lambda stage, *rest: stages.append(stage))  # fmt: skip

    assert encodes == [REPORT, QUESTION]  # the second question encoded nothing
    assert first.encoded and not second.encoded and STAGE_REUSING in stages
    assert snapshot.arrayKJI is None  # cached features: the GUI thread skips the voxel copy
    conversation = core.conversation(volume.GetID())
    assert [turn.task for turn in conversation.turns] == [REPORT, QUESTION, QUESTION]
    assert conversation.history() == [
        ("Is the liver enlarged?", first.turn.answer),
        ("Is there a lesion?", second.turn.answer),
    ]

    volume.GetImageData().Modified()  # edited voxels: the cache must not be used
    third = core.askQuestion(volume, "And now?", request_, maxNewTokens=2, forceExpert=True)
    assert third.encoded and encodes == [REPORT, QUESTION, QUESTION]


def test_a_follow_up_question_prefills_only_its_new_text(mrml, request_):
    """The session keeps the language model's cache with the encoded volume: the second question
    reuses the visual tokens and the first turn, and writes what it writes without the cache."""
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    core = CTMLLMLogicCore(mrml.scene)
    model = core.loadModel(request_)
    calls: list[tuple] = []
    original = model.generate

    def spy(features, prompt, **kwargs):
        result = original(features, prompt, **kwargs)
        cache = kwargs["prefix_cache"]
        calls.append((features, kwargs["history"], cache, cache.reused, result.text))
        return result

    model.generate = spy
    core.askQuestion(volume, "Is the liver enlarged?", request_, maxNewTokens=6, forceExpert=True)
    core.askQuestion(volume, "Is there a lesion?", request_, maxNewTokens=6, forceExpert=True)
    (features, _, cache, first_reused, _), (same, history, again, reused, text) = calls
    assert same is features and again is cache and first_reused == 0
    assert reused > features.tokens.shape[0]
    assert text == original(features, "Is there a lesion?", history=history, max_new_tokens=6).text


def test_by_default_the_task_router_picks_each_turns_expert_and_the_turn_says_which(mrml, routed_model_dir):
    """Automatic mode: the router reads each prompt; features are reused per expert it picks."""
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    core = CTMLLMLogicCore(mrml.scene)
    request = ModelRequest(str(routed_model_dir), device="cpu")
    encodes = count_encodes(core, request)

    report = core.generateReport(volume, request, maxNewTokens=3)
    first = core.askQuestion(volume, "Where is the lesion located?", request, maxNewTokens=3)
    snapshot = core.volumeSnapshot(volume, "", None, request, prompt="What kind of lesion is there?")
    second = core.askQuestion(snapshot, "What kind of lesion is there?", request, maxNewTokens=3)
    forced = core.generateReport(volume, request, maxNewTokens=3, forceExpert=True)

    turns = [report.turn, first.turn, second.turn, forced.turn]
    assert [(t.task, t.expert, t.routed) for t in turns] == [
        (REPORT, "report", True),
        (QUESTION, "vqa", True),
        (QUESTION, "vqa", True),
        (REPORT, "report", False),
    ]
    assert encodes == [None, None, REPORT]  # the second question reused the vqa expert's features
    assert snapshot.arrayKJI is None and not second.encoded
    markdown = core.conversation(volume.GetID()).toMarkdown()
    assert (
        "expert vqa (chosen by the task router)" in markdown
        and "expert report (forced by the mode)" in markdown
    )
    assert json.loads(core.conversation(volume.GetID()).toJSON())["turns"][1]["expert"] == "vqa"


def test_a_different_window_or_model_setting_encodes_again(mrml, request_):
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    core = CTMLLMLogicCore(mrml.scene)
    encodes = count_encodes(core, request_)
    core.askQuestion(volume, "Any fluid?", request_, windowPreset="wide", maxNewTokens=2)
    core.askQuestion(volume, "Any fluid?", request_, windowPreset="lung", maxNewTokens=2)
    assert encodes == [None, None]  # the task router's choice, once per window
    assert core.isModelCached(request_)
    other = ModelRequest(request_.spec, device="cpu", precision="float32")
    core.askQuestion(volume, "Any fluid?", other, windowPreset="lung", maxNewTokens=2)
    assert core.isModelCached(other) and not core.isModelCached(request_)


def test_cancel_stops_generation_and_keeps_the_partial_answer_out_of_the_history(mrml, request_):
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    core = CTMLLMLogicCore(mrml.scene)
    cancel = threading.Event()
    chunks: list[str] = []

    def on_text(chunk: str) -> None:
        chunks.append(chunk)
        if len(chunks) == 2:
            cancel.set()

    result = core.askQuestion(volume, "Describe everything.", request_, maxNewTokens=200,
                              onText=on_text, cancel=cancel)  # fmt: skip
    assert result.turn.cancelled and result.turn.newTokens < 10
    assert core.conversation(volume.GetID()).history() == []
    assert "cancelled" in core.conversation(volume.GetID()).toText()


def test_a_cancel_before_generation_raises_after_the_stage_in_progress(mrml, request_):
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    core = CTMLLMLogicCore(mrml.scene)
    cancel = threading.Event()

    def progress(stage, fraction, speed):
        if stage == STAGE_ENCODING:
            cancel.set()

    with pytest.raises(OperationCancelled, match="before generation"):
        core.generateReport(volume, request_, progressCallback=progress, cancel=cancel)
    assert core.conversation(volume.GetID()).isEmpty()


def test_a_non_ct_volume_is_refused_naming_the_switch_and_accepted_with_it(mrml, request_):
    volume = mrml.load(NOT_CT_MR, "brain_mr")
    core = CTMLLMLogicCore(mrml.scene)
    with pytest.raises(
        NotCTVolumeError, match=r"brain_mr \(.*not_ct_mr_3mm\.nii\.gz\): does not look like a CT"
    ) as refused:
        core.generateReport(volume, request_, maxNewTokens=2)
    assert f"check '{ALLOW_NON_CT_LABEL}'" in str(refused.value)
    with pytest.raises(NoVolumeError, match="select a CT volume"):
        core.generateReport(None, request_)

    notices: list[str] = []
    result = core.generateReport(
        volume, request_, windowPreset="lung", maxNewTokens=2, allowNonCT=True, noticeCallback=notices.append
    )
    assert result.encoded and result.turn.newTokens >= 1
    assert any("does not look like a CT" in n and "percentiles" in n and "lung" in n for n in notices)
    settings = core.conversation(volume.GetID()).settings
    assert settings["allow_non_ct"] is True
    assert settings["preprocessing"]["window"] == "percentile" and settings["preprocessing"]["allow_non_ct"]
    # the features encoded with the switch on are not reused once it is off: refused again
    with pytest.raises(NotCTVolumeError, match="does not look like a CT"):
        core.generateReport(volume, request_, windowPreset="lung", maxNewTokens=2)

    batchCore = CTMLLMLogicCore(mrml.scene, nonCTHint="pass --allow-non-ct")
    with pytest.raises(NotCTVolumeError, match="to run on it anyway, pass --allow-non-ct"):
        batchCore.prepareVolume(batchCore.volumeSnapshot(volume), core.loadModel(request_))


def test_the_switch_keeps_a_ct_in_its_hu_window(mrml, request_):
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    core = CTMLLMLogicCore(mrml.scene)
    model = core.loadModel(request_)
    snapshot = core.volumeSnapshot(volume)
    prepared = core.prepareVolume(snapshot, model, "soft_tissue", allowNonCT=True)
    assert prepared.notices == [] and prepared.preprocessing["window"] == "soft_tissue"
    plain = core.prepareVolume(snapshot, model, "soft_tissue")
    assert np.array_equal(prepared.volume, plain.volume) and not plain.preprocessing["allow_non_ct"]


def test_model_errors_are_typed_and_say_what_to_do(mrml, tmp_path):
    core = CTMLLMLogicCore(mrml.scene)
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        core.loadModel(ModelRequest(str(tmp_path / "missing" / "model")))
    with pytest.raises(DownloadNotConfirmedError, match="agree to the download"):
        core.loadModel(ModelRequest("someone/ct-model", cacheFolder=str(tmp_path)))
    with pytest.raises(ModelUnavailableError, match="device"):
        ModelRequest("demo", device="tpu")

    def out_of_memory(request, notice):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(ModelOutOfMemoryError, match="bfloat16"):
        CTMLLMLogicCore(mrml.scene, modelLoader=out_of_memory).loadModel(ModelRequest("demo"))


def test_the_model_is_loaded_once_per_request(mrml, request_):
    loads: list[ModelRequest] = []

    def loader(request, notice):
        loads.append(request)
        notice("a stand-in notice")
        return object()

    core = CTMLLMLogicCore(mrml.scene, modelLoader=loader)
    notices: list[str] = []
    first = core.loadModel(request_, noticeCallback=notices.append)
    assert core.loadModel(request_) is first and len(loads) == 1 and notices == ["a stand-in notice"]
    core.loadModel(ModelRequest(request_.spec, device="cpu", precision="bfloat16"))
    assert len(loads) == 2


def test_exports_carry_model_id_and_settings(mrml, request_, tmp_path):
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    core = CTMLLMLogicCore(mrml.scene)
    with pytest.raises(CTMLLMSlicerError, match="nothing to export"):
        core.exportConversation(volume.GetID(), tmp_path / "empty.md")
    report = core.generateReport(volume, request_, windowPreset="soft_tissue", maxNewTokens=3)
    core.askQuestion(volume, "Is the spleen normal?", request_, windowPreset="soft_tissue", maxNewTokens=3)

    data = json.loads(
        core.exportConversation(volume.GetID(), tmp_path / "out.json").read_text(encoding="utf-8")
    )
    assert data["modelId"] == report.modelId and data["volumeName"] == "abdomen"
    assert data["settings"]["window"] == "soft_tissue" and data["settings"]["device"] == "cpu"
    preprocessing = core.loadModel(request_).preprocess_config(window="soft_tissue").to_dict()
    assert data["settings"]["preprocessing"] == preprocessing
    assert [turn["task"] for turn in data["turns"]] == [REPORT, QUESTION]
    assert data["turns"][1]["prompt"] == "Is the spleen normal?"
    markdown = core.exportConversation(volume.GetID(), tmp_path / "out.md").read_text(encoding="utf-8")
    assert markdown.startswith("# CT-MLLM results: abdomen") and "**Q:** Is the spleen normal?" in markdown
    with pytest.raises(CTMLLMSlicerError, match=r"\.md .*\.json"):
        core.exportConversation(volume.GetID(), tmp_path / "out.docx")


def test_display_window_and_ct_volume_rendering(mrml):
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    with pytest.raises(CTMLLMSlicerError, match="volume rendering logic"):
        CTMLLMLogicCore(mrml.scene).showVolumeRendering(volume)
    core = CTMLLMLogicCore(mrml.scene, mrml.logics["VolumeRendering"])
    core.applyWindowPreset(volume, "lung")
    display = volume.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (1500.0, -600.0)
    core.applyWindowPreset(volume)  # no model loaded: the model_core default (wide, -1000..1000)
    assert (display.GetWindow(), display.GetLevel()) == (2000.0, 0.0)
    with pytest.raises(CTMLLMSlicerError, match="choose one of"):
        core.applyWindowPreset(volume, "brain")
    core.applyWindowPreset(volume, "lung", allowNonCT=True)  # a CT keeps its HU window with the switch on
    assert (display.GetWindow(), display.GetLevel()) == (1500.0, -600.0)
    mr = mrml.load(NOT_CT_MR, "brain_mr")
    core.applyWindowPreset(mr, "lung", allowNonCT=True)  # an MR shows its own percentile window
    low, high = np.percentile(slicer.util.arrayFromVolume(mr), [0.5, 99.5])
    assert mr.GetDisplayNode().GetWindow() == pytest.approx(high - low)
    assert mr.GetDisplayNode().GetLevel() == pytest.approx((low + high) / 2)

    rendering = core.showVolumeRendering(volume)  # presets not loaded here: the module builds its own
    assert rendering.GetVisibility() and rendering.GetVolumeNode() is volume
    opacity = rendering.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
    assert opacity.GetValue(-1000) == 0.0 and opacity.GetValue(700) > 0.5  # air clear, bone opaque
    assert core.showVolumeRendering(volume) is rendering  # shown again: the same display node


def test_logic_imports_without_torch():
    """The module must load (and offer its choices) before torch is installed in Slicer."""
    code = (
        "import sys; sys.path.insert(0, 'CTMLLMSlicer'); import CTMLLMSlicerLib.logic as logic; "
        "assert 'torch' not in sys.modules, 'logic imported torch'; print(list(logic.WINDOW_PRESETS))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, encoding="utf-8", timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "soft_tissue" in done.stdout


def test_repo_ids_and_the_default_cache_folder(tmp_path, monkeypatch):
    assert logic_module.isRepoId("owner/ct-model.v2")
    assert not logic_module.isRepoId("demo") and not logic_module.isRepoId("/abs/path")
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert not logic_module.isRepoId("owner/model")  # an existing relative folder wins
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert logic_module.defaultModelCacheFolder() == os.path.join(
        str(tmp_path / "cache"), "CTMLLMSlicer", "models"
    )


def test_load_volume_file_reads_files_and_series_and_refuses_bad_input(mrml, tmp_path):
    import SimpleITK as sitk

    from model_core.data import CTInputError, UnreadableVolumeError, write_dicom_series

    core = CTMLLMLogicCore(mrml.scene, volumesLogic=mrml.logics["Volumes"])
    volume = core.loadVolumeFile(ABDOMEN_CT)
    assert volume.IsA("vtkMRMLScalarVolumeNode") and volume.GetName() == "abdomen_ct_3mm"
    assert volume.GetImageData().GetDimensions() == (122, 101, 30)

    voxels = np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5) * 20 - 1000  # (slices, rows, columns)
    files = write_dicom_series(tmp_path / "series", voxels, (1.0, 1.0, 2.0))
    for other in write_dicom_series(tmp_path / "other", voxels + 7, (1.0, 1.0, 2.0)):
        other.rename(tmp_path / "series" / f"other_{other.name}")  # a second series beside it
    series = core.loadVolumeFile(files, "series")
    assert np.array_equal(slicer.util.arrayFromVolume(series), voxels)  # only its own files were read

    count = mrml.scene.GetNumberOfNodes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(ABDOMEN_CT.read_bytes()[: ABDOMEN_CT.stat().st_size // 2])
    with pytest.raises(UnreadableVolumeError, match=r"truncated\.nii\.gz: is truncated"):
        core.loadVolumeFile(truncated)
    with pytest.raises(UnreadableVolumeError, match="does not exist"):
        core.loadVolumeFile(tmp_path / "missing.nrrd")
    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True), str(rgb))
    with pytest.raises(CTInputError, match="3 values per voxel"):  # read_ct's verdict, before Slicer's reader
        core.loadVolumeFile(rgb)
    assert mrml.scene.GetNumberOfNodes() == count  # refused input leaves nothing in the scene
    with pytest.raises(CTMLLMSlicerError, match="no volumes logic"):
        CTMLLMLogicCore(mrml.scene).loadVolumeFile(ABDOMEN_CT)


def test_snapshot_copies_voxels_and_geometry(mrml):
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    snapshot = CTMLLMLogicCore(mrml.scene).volumeSnapshot(volume)
    assert snapshot.arrayKJI.shape == (30, 101, 122) and snapshot.arrayKJI.dtype == np.int16
    assert np.allclose(np.diag(snapshot.ijkToRAS)[:3], [3.0, 3.0, 3.0])
    snapshot.arrayKJI[0, 0, 0] = 1234  # a copy: the scene's voxels are untouched
    assert slicer.util.arrayFromVolume(volume)[0, 0, 0] != 1234


def test_a_new_volume_after_close_scene_never_inherits_the_previous_conversation(mrml, request_):
    """MRML reuses node IDs after a scene close: conversations and features are keyed by a unique
    id stored on the node, so another patient's CT starts empty even if nobody calls forgetAll."""
    core = CTMLLMLogicCore(mrml.scene)
    first = mrml.load(ABDOMEN_CT, "patient_a")
    core.generateReport(first, request_, maxNewTokens=2)
    firstID = first.GetID()
    mrml.scene.Clear(False)
    second = mrml.load(NOT_CT_MR, "patient_b")
    assert second.GetID() == firstID
    assert core.peekConversation(second) is None and core.conversation(second.GetID()).isEmpty()
    result = core.generateReport(second, request_, maxNewTokens=2, allowNonCT=True)
    assert result.encoded  # no features of the first patient were reused
    assert [t.task for t in core.conversation(second).turns] == [REPORT]


def test_a_cloned_volume_gets_its_own_conversation(mrml, request_):
    core = CTMLLMLogicCore(mrml.scene)
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    core.generateReport(volume, request_, maxNewTokens=2)
    clone = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "clone")
    clone.Copy(volume)  # attributes (the volume id among them) come along
    assert clone.GetAttribute(scene_results.VOLUME_UID_ATTRIBUTE) == core.volumeUID(volume)
    assert core.volumeUID(clone) != core.volumeUID(volume) and core.peekConversation(clone) is None


def test_forgetting_a_volume_drops_its_conversation_and_features(mrml, request_):
    core = CTMLLMLogicCore(mrml.scene)
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    core.askQuestion(volume, "Any fluid?", request_, maxNewTokens=2)
    assert core.session.cachedKeys()
    core.forgetVolume(volume)
    assert core.session.cachedKeys() == [] and core.conversations == {}
    core.askQuestion(volume, "Any fluid?", request_, maxNewTokens=2)
    core.forgetAll()
    assert core.session.cachedKeys() == [] and core.conversations == {} and core.isModelCached(request_)


def test_the_result_node_is_marked_placed_under_the_study_and_restores_the_chat(mrml, request_, tmp_path):
    core = CTMLLMLogicCore(mrml.scene)
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Anonymous")
    study = hierarchy.CreateStudyItem(patient, "CT abdomen")
    hierarchy.CreateItem(study, volume)  # where a volume loaded from DICOM sits
    core.askQuestion(volume, "Is the liver enlarged?", request_, maxNewTokens=3)
    textNode = core.saveResultToTextNode(volume)
    assert textNode.GetText().splitlines()[0] == REVIEW_NOTICE
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(textNode)) == study
    core.askQuestion(volume, "Is the spleen normal?", request_, maxNewTokens=3)
    assert "Is the spleen normal?" in textNode.GetText()  # a saved result follows the conversation

    sceneFile = save_scene_with_volume(mrml.scene, volume, tmp_path)
    reloaded = MRML()
    reloaded.scene.SetURL(str(sceneFile))
    assert reloaded.scene.Connect()
    volumeAgain = reloaded.scene.GetFirstNodeByName("abdomen")
    reopened = CTMLLMLogicCore(reloaded.scene)
    restored = reopened.peekConversation(volumeAgain)
    assert [q for q, _ in restored.history()] == ["Is the liver enlarged?", "Is the spleen normal?"]
    chunks: list[str] = []
    follow = reopened.askQuestion(volumeAgain, "Where?", request_, maxNewTokens=2, onText=chunks.append)
    assert follow.encoded and [q for q, _ in reopened.conversation(volumeAgain).history()][-1] == "Where?"
    assert len(reopened.conversation(volumeAgain).turns) == 3  # the follow-up continues the saved chat


def test_the_router_picks_the_expert_of_the_demo_model_when_no_task_is_given(mrml):
    """task=None with the shipped demo model (task experts): the turn names the expert used."""
    core = CTMLLMLogicCore(mrml.scene)
    volume = mrml.load(ABDOMEN_CT, "abdomen")
    request = ModelRequest("demo", device="cpu")
    result = core.run(volume, None, "Is there a lesion in the liver?", request, maxNewTokens=4)
    assert result.turn.expert in (REPORT, QUESTION) and result.turn.routed and result.turn.task == QUESTION
    assert result.turn.expert == core.loadModel(request).route("Is there a lesion in the liver?")
    assert result.turn.prompt == "Is there a lesion in the liver?" and result.encoded


def test_showing_a_volume_sets_a_3d_layout_and_hides_other_renderings(mrml):
    core = CTMLLMLogicCore(mrml.scene, mrml.logics["VolumeRendering"])
    layout = mrml.scene.AddNewNodeByClass("vtkMRMLLayoutNode")
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
    first, second = mrml.load(ABDOMEN_CT, "first"), mrml.load(TORSO_CT, "second")
    core.showVolume(first, "lung")
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView
    secondRendering = core.showVolume(second, "lung")
    assert not mrml.logics["VolumeRendering"].GetFirstVolumeRenderingDisplayNode(first).GetVisibility()
    assert secondRendering.GetVisibility() and secondRendering.GetVolumeNode() is second
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUp3DView)
    display = second.GetDisplayNode()
    display.SetWindowLevel(123.0, 45.0)
    core.showVolume(second, "bone", keepWindowLevel=True)
    assert (display.GetWindow(), display.GetLevel()) == (123.0, 45.0)  # the user's window/level stays
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutOneUp3DView  # has a 3D view
