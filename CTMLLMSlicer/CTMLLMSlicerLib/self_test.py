"""The cases of the module's in-Slicer self-test, which ``CTMLLMSlicerTest`` runs in turn.

Slicer's template keeps the test class in the module file, and it stays there: Slicer's "Reload
and Test" and the CMake test find it. Its cases are here, apart from the panel they test, so the
module file holds the module, the parameter node, the widget and the logic. Each case takes the
running ``unittest.TestCase`` (its asserts and ``delayDisplay``) and the module's Logic and Widget
classes; the scene is cleared before each. The panel and the logic are tested without a model
(this passes on a Slicer without torch); the model part runs the shipped demo model in the worker
process when the model's packages are installed, and says it was skipped otherwise.
"""

import time
import unittest

import slicer

from CTMLLMSlicerLib import dependencies, jobs
from CTMLLMSlicerLib.conversation import QUESTION, REPORT, Turn
from CTMLLMSlicerLib.errors import describeError
from CTMLLMSlicerLib.logic import DEMO_MODEL, ModelRequest
from CTMLLMSlicerLib.scene_results import RESULT_REFERENCE_ROLE


def panelShowsTheSampleVolume(test: unittest.TestCase, Logic: type, Widget: type) -> None:
    logic = Logic()
    volume = logic.loadSampleVolume()
    test.assertEqual(volume.GetImageData().GetDimensions(), (160, 160, 64))
    widget = Widget()
    widget.setup()
    try:
        widget.ui.inputSelector.setCurrentNode(volume)
        test.assertIs(widget._parameterNode.inputVolume, volume)
        rendering = logic.volumeRenderingLogic.GetFirstVolumeRenderingDisplayNode(volume)
        test.assertTrue(rendering is not None and rendering.GetVisibility())
        test.assertFalse(widget.ui.saveButton.isEnabled())  # nothing to save yet
        test.assertFalse(widget.ui.exportSRButton.isEnabled())
        test.assertTrue(widget._parameterNode.routeByPrompt)  # the task router decides by default
    finally:
        widget.cleanup()
    test.delayDisplay("Panel shows the sample CT")


def resultsAreStoredAndRestoredWithTheScene(test: unittest.TestCase, Logic: type, Widget: type) -> None:
    logic = Logic()
    volume = logic.loadSampleVolume()
    conversation = logic.conversation(volume)
    conversation.add(Turn(QUESTION, "Is there a lesion?", "A cyst in the liver.", newTokens=6, seconds=0.1))
    textNode = logic.saveResultToTextNode(volume)
    test.assertIs(volume.GetNodeReference(RESULT_REFERENCE_ROLE), textNode)
    test.assertTrue(textNode.GetText().startswith("Machine-generated text, not a diagnosis"))
    reopened = Logic()  # as after reopening the saved scene: nothing in memory
    restored = reopened.peekConversation(volume)
    test.assertEqual(restored.history(), [("Is there a lesion?", "A cyst in the liver.")])
    test.delayDisplay("Results stored with the scene")


def closeSceneForgetsConversations(test: unittest.TestCase, Logic: type, Widget: type) -> None:
    logic = Logic()
    first = logic.loadSampleVolume()
    firstID = first.GetID()
    logic.conversation(first).add(Turn(REPORT, "Write a report.", "Previous patient."))
    slicer.mrmlScene.Clear()
    logic.forgetAll()  # what the panel does on Close Scene
    second = logic.loadSampleVolume()
    test.assertEqual(second.GetID(), firstID)  # MRML reuses the ID...
    test.assertIsNone(logic.peekConversation(second))  # ...but not the conversation
    test.delayDisplay("Close Scene forgets conversations")


def modelInWorker(test: unittest.TestCase, Logic: type, Widget: type) -> None:
    if not dependencies.dependenciesInstalled():
        test.delayDisplay("Model part skipped: torch and transformers are not installed in this Slicer")
        return
    logic = Logic()
    volume = logic.loadSampleVolume()
    request = ModelRequest(DEMO_MODEL, device="cpu")

    def idle():
        slicer.app.processEvents()
        time.sleep(0.02)

    try:
        answers = []
        jobsToRun = (
            (REPORT, None),
            (QUESTION, "Is there a lesion?"),
            (QUESTION, "Where?"),
            (None, "Is the liver enlarged?"),  # the panel's default: the task router picks the expert
            (None, "Is the spleen enlarged?"),
        )
        for task, prompt in jobsToRun:
            logic.startJob(volume, task, prompt, request, maxNewTokens=24)
            end = logic.waitForJob(timeout=300, idle=idle)
            test.assertEqual(end.kind, jobs.FINISHED, describeError(end.error) if end.error else "")
            answers.append(end.result)
        test.assertTrue(answers[0].encoded and answers[1].encoded)  # a question uses the question expert
        test.assertFalse(answers[2].encoded)  # the follow-up reuses the encoded volume in the worker
        first, second = answers[3].turn, answers[4].turn
        test.assertTrue(first.routed and first.expert in (REPORT, QUESTION), first.expertNote)
        # features are reused when the router picks the same expert for another prompt
        test.assertEqual(answers[4].encoded, second.expert != first.expert)
        test.assertEqual(logic.conversation(volume).history()[0][0], "Is there a lesion?")
        textNode = logic.saveResultToTextNode(volume)
        test.assertIn("Q: Where?", textNode.GetText())
    finally:
        test.assertTrue(logic.unloadModel())
    test.delayDisplay("Model ran in its worker process")


CASES = (
    panelShowsTheSampleVolume,
    resultsAreStoredAndRestoredWithTheScene,
    closeSceneForgetsConversations,
    modelInWorker,
)
