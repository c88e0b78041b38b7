"""The module's Qt-free helpers: job runner, dependency decisions, conversation text, errors."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from CTMLLMSlicerLib import dependencies, jobs
from CTMLLMSlicerLib.conversation import QUESTION, REPORT, Conversation, Turn
from CTMLLMSlicerLib.errors import (
    JobBusyError,
    MissingDependenciesError,
    NotCTVolumeError,
    describeError,
    isOutOfMemory,
)


def drain(runner: jobs.JobRunner, timeout: float = 10.0) -> list[jobs.JobEvent]:
    assert runner.wait(timeout), "the job did not end in time"
    return runner.poll()


def test_job_events_arrive_in_order_and_the_result_last():
    runner = jobs.JobRunner()

    def job(context: jobs.JobContext) -> str:
        context.progress("encoding")
        context.notice("using the tiny model")
        for chunk in ("a", "b", ""):
            context.text(chunk)
        return "ab"

    runner.start(job)
    events = drain(runner)
    assert [e.kind for e in events] == [jobs.PROGRESS, jobs.NOTICE, jobs.TEXT, jobs.TEXT, jobs.FINISHED]
    assert events[0].stage == "encoding" and events[0].fraction is None
    assert events[-1].result == "ab" and runner.poll() == []


def test_a_failing_job_hands_its_error_to_the_poller():
    runner = jobs.JobRunner()
    runner.start(lambda context: 1 / 0)
    (event,) = drain(runner)
    assert event.kind == jobs.FAILED and isinstance(event.error, ZeroDivisionError)


def test_cancel_reaches_the_job_and_a_second_start_is_refused_while_busy():
    runner = jobs.JobRunner()
    started = threading.Event()

    def job(context: jobs.JobContext) -> None:
        started.set()
        while not context.cancelled:
            time.sleep(0.01)
        context.checkCancelled()

    runner.start(job)
    assert started.wait(5)
    with pytest.raises(JobBusyError, match="cancel it first"):
        runner.start(job)
    begin = time.perf_counter()
    runner.cancel()
    (event,) = drain(runner)
    assert event.kind == jobs.CANCELLED and time.perf_counter() - begin < 1.0
    runner.start(lambda context: "again")  # a finished runner takes the next job, with a fresh flag
    assert drain(runner)[-1].result == "again"


def test_poll_is_bounded():
    runner = jobs.JobRunner()
    runner.start(lambda context: [context.text(str(i)) for i in range(50)])
    runner.wait(5)
    assert len(runner.poll(maxEvents=20)) == 20 and len(runner.poll()) == 31


def test_dependencies_nothing_to_do_when_all_are_usable():
    pinned = dict(dependencies.PINNED)
    asked: list[str] = []
    installed = dependencies.ensureDependencies(asked.append, pytest.fail, versionOf=pinned.get)
    assert installed == [] and asked == []


def test_dependencies_missing_packages_are_installed_pinned_after_consent(tmp_path):
    versions = {"torch": "2.13.1", "transformers": "4.57.0", "numpy": "1.26.4", "simpleitk": "2.4.0"}

    def versionOf(name: str) -> str | None:  # package metadata is looked up by normalised name
        return versions.get(dependencies.normaliseName(name))

    calls: list[list[str]] = []

    def install(args: list[str]) -> None:
        calls.append(args)
        versions.update({name: version for name, version in dependencies.PINNED.items() if name != "torch"})

    questions: list[str] = []
    installed = dependencies.ensureDependencies(
        lambda question: questions.append(question) or True,
        install,
        versionOf=versionOf,
        constraintsFolder=str(tmp_path),
    )
    assert installed == [
        "transformers==5.23.0",
        "peft==0.21.2",
        "safetensors==0.8.0",
        "huggingface-hub==2.4.0",
    ]
    assert (
        "transformers==5.23.0 (found 4.57.0)" in questions[0]
        and "peft==0.21.2 (not installed)" in questions[0]
    )
    assert "torch" not in questions[0]  # same major version: left as another extension installed it
    (args,) = calls
    assert args[: len(installed)] == installed and args[-2] == "--constraint"
    constraints = Path(args[-1]).read_text(encoding="utf-8").split()
    assert "numpy==1.26.4" in constraints and "simpleitk==2.4.0" in constraints
    assert not any(req.split("==")[0] in dependencies.SLICER_OWNED for req in installed)


def test_dependencies_declined_or_still_missing_raise_with_the_fix():
    with pytest.raises(MissingDependenciesError, match="accept the install"):
        dependencies.ensureDependencies(lambda q: False, pytest.fail, versionOf=lambda name: None)
    with pytest.raises(MissingDependenciesError, match="still missing"):
        dependencies.ensureDependencies(lambda q: True, lambda args: None, versionOf=lambda name: None)


def test_the_plan_refuses_slicer_owned_packages():
    status = dependencies.DependencyStatus("numpy", "2.0.0", None)
    with pytest.raises(ValueError, match="Slicer-owned"):
        dependencies.planInstall([status])
    assert dependencies.normaliseName("Huggingface_Hub") == "huggingface-hub"


def test_installed_version_reads_metadata_without_importing():
    assert dependencies.installedVersion("pytest") is not None
    assert dependencies.installedVersion("surely-not-an-installed-package") is None


def test_conversation_history_text_and_json():
    conversation = Conversation("chest", modelId="tiny", settings={"device": "cpu"})
    conversation.add(Turn(REPORT, "Write a report.", "No acute findings.", newTokens=4, seconds=2.0))
    conversation.add(Turn(QUESTION, "Nodules?", "None.", newTokens=2, seconds=1.0))
    conversation.add(Turn(QUESTION, "Size?", "Partial", cancelled=True))
    assert conversation.history() == [("Nodules?", "None.")]
    text = conversation.toText()
    assert (
        "Report:\nNo acute findings." in text and "Q: Size?\nA [cancelled: partial answer]: Partial" in text
    )
    assert conversation.turns[0].tokensPerSecond == 2.0 and conversation.turns[2].tokensPerSecond == 0.0
    data = json.loads(conversation.toJSON())
    assert data["format"] == "ctmllm-conversation/1" and data["turns"][2]["cancelled"] is True
    markdown = conversation.toMarkdown()
    assert "- device: `cpu`" in markdown and "## Question 3 (cancelled, partial)" in markdown


def test_error_messages_for_the_panel():
    assert describeError(NotCTVolumeError("brain_mr: not a CT")) == "brain_mr: not a CT"
    assert describeError(KeyError("x")).startswith("Unexpected error (KeyError)")
    assert isOutOfMemory(MemoryError()) and isOutOfMemory(RuntimeError("CUDA out of memory. Tried"))
    assert not isOutOfMemory(RuntimeError("shape mismatch"))
