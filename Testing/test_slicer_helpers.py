"""The module's Qt-free helpers: Slicer version and dependency decisions, conversation text, errors."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import MODULE_DIR, REPO

from CTMLLMSlicerLib import dependencies
from CTMLLMSlicerLib.conversation import QUESTION, REPORT, REVIEW_NOTICE, Conversation, Turn
from CTMLLMSlicerLib.errors import (
    InstallFailedError,
    MissingDependenciesError,
    NotCTVolumeError,
    UnsupportedSlicerError,
    describeError,
    isOutOfMemory,
)

USABLE = {"torch": "2.13.0", "transformers": "5.23.0", "safetensors": "0.8.0", "huggingface-hub": "2.4.0"}


def test_an_older_slicer_is_refused_naming_the_version_it_needs():
    dependencies.checkSlicerVersion((5, 10), (3, 12, 10))
    dependencies.checkSlicerVersion((5, 12), (3, 12, 10))
    with pytest.raises(UnsupportedSlicerError) as refused:
        dependencies.checkSlicerVersion((5, 8, 1), (3, 9, 10))
    message = str(refused.value)
    assert "Slicer 5.10 or newer" in message and "Slicer 5.8.1 with Python 3.9.10" in message
    assert "nothing was installed" in message
    with pytest.raises(UnsupportedSlicerError, match="Python 3.11 or newer"):
        dependencies.checkSlicerVersion((5, 10), (3, 10, 2))  # a self-built Slicer on an older Python


def test_the_module_loads_on_slicer_5_8s_python_to_say_so():
    """Slicer 5.8 runs Python 3.9: the files the module imports must parse there, or it cannot tell
    the user which Slicer it needs."""
    files = [MODULE_DIR / "CTMLLMSlicer.py", *sorted((MODULE_DIR / "CTMLLMSlicerLib").glob("*.py"))]
    files += [
        REPO / "model_core" / "__init__.py",
        REPO / "model_core" / "prompts.py",
        REPO / "model_core" / "config.py",
    ]
    files += sorted((REPO / "model_core" / "data").glob("*.py"))
    for path in files:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def test_dependencies_nothing_to_do_when_all_are_usable():
    asked: list[str] = []
    installed = dependencies.ensureDependencies(asked.append, pytest.fail, pytest.fail, versionOf=USABLE.get)
    assert installed == [] and asked == [] and dependencies.dependenciesInstalled(USABLE.get)


def test_torch_comes_from_the_pytorch_extension_and_the_rest_from_pip_as_ranges(tmp_path):
    versions = {"transformers": "4.57.0", "numpy": "1.26.4", "simpleitk": "2.4.0", "huggingface-hub": "2.4.1"}

    def versionOf(name: str) -> str | None:  # package metadata is looked up by normalised name
        return versions.get(dependencies.normaliseName(name))

    torchRequests: list[str] = []
    pipCalls: list[list[str]] = []

    def installTorch(requirement: str) -> bool:
        torchRequests.append(requirement)
        versions["torch"] = "2.9.1+cu128"  # whatever build the PyTorch extension picked
        return True

    def pipInstall(args: list[str]) -> None:
        pipCalls.append(args)
        versions.update({"transformers": "5.24.0", "safetensors": "0.7.0"})

    questions: list[str] = []
    installed = dependencies.ensureDependencies(
        lambda question: questions.append(question) or True,
        pipInstall,
        installTorch,
        versionOf,
        str(tmp_path),
    )
    assert torchRequests == [dependencies.TORCH_REQUIREMENT]
    assert installed == ["torch>=2.6", "transformers>=5.23,<6", "safetensors>=0.6,<1"]
    assert (
        "transformers>=5.23,<6 (found 4.57.0)" in questions[0]
        and "torch>=2.6 (not installed)" in questions[0]
    )
    assert "PyTorch extension" in questions[0] and "huggingface-hub" not in questions[0]  # 2.4.1 is in range
    (args,) = pipCalls
    assert args[:2] == ["transformers>=5.23,<6", "safetensors>=0.6,<1"]
    assert not any(arg.startswith("torch") for arg in args)  # pip never installs torch
    constraints = Path(args[args.index("--constraint") + 1]).read_text(encoding="utf-8").split()
    assert "numpy==1.26.4" in constraints and "simpleitk==2.4.0" in constraints
    assert args[args.index("--log") + 1] == str(tmp_path / "pip-install.log")


def test_declined_installs_raise_with_the_fix():
    with pytest.raises(MissingDependenciesError, match="accept the install"):
        dependencies.ensureDependencies(
            lambda q: False, pytest.fail, pytest.fail, versionOf=lambda name: None
        )
    with pytest.raises(MissingDependenciesError, match="accept the PyTorch install"):
        dependencies.ensureDependencies(
            lambda q: True, pytest.fail, lambda req: False, versionOf=lambda name: None
        )
    with pytest.raises(InstallFailedError, match="still not usable"):
        dependencies.ensureDependencies(
            lambda q: True, lambda args: None, lambda req: True, versionOf=lambda n: None
        )


def _failingPip(log: str):
    """A pip that writes ``log`` to its --log file and fails, as ``slicer.util.pip_install`` does."""

    def pipInstall(args: list[str]) -> None:
        Path(args[args.index("--log") + 1]).write_text(log, encoding="utf-8")
        raise RuntimeError(
            "Command '['PythonSlicer', '-m', 'pip', 'install', ...]' returned non-zero exit status 1."
        )

    return pipInstall


def test_an_offline_install_says_there_is_no_internet_and_where_the_log_is(tmp_path):
    log = (
        "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError(\"Failed to establish a "
        "new connection: [Errno -3] Temporary failure in name resolution\")': /simple/transformers/\n"
        "ERROR: Could not find a version that satisfies the requirement transformers<6,>=5.23\n"
    )
    with pytest.raises(InstallFailedError) as failed:
        dependencies.ensureDependencies(
            lambda q: True, _failingPip(log), pytest.fail, {"torch": "2.13.0"}.get, str(tmp_path)
        )
    message = str(failed.value)
    assert "no internet connection" in message and str(tmp_path / "pip-install.log") in message
    assert "Unexpected" not in describeError(failed.value)


def test_a_failed_install_shows_pips_last_error_line(tmp_path):
    log = "Collecting transformers\nERROR: first problem\nERROR: No space left on device: '/opt/slicer/lib'\n"
    with pytest.raises(InstallFailedError) as failed:
        dependencies.ensureDependencies(
            lambda q: True, _failingPip(log), pytest.fail, {"torch": "2.13.0"}.get, str(tmp_path)
        )
    message = str(failed.value)
    assert "No space left on device: '/opt/slicer/lib'" in message and "first problem" not in message
    assert str(tmp_path / "pip-install.log") in message


def test_the_plan_refuses_slicer_owned_packages():
    status = dependencies.DependencyStatus("numpy", ">=2", None)
    with pytest.raises(ValueError, match="Slicer-owned"):
        dependencies.planInstall([status])
    assert dependencies.normaliseName("Huggingface_Hub") == "huggingface-hub"
    assert not any(
        dependencies.normaliseName(name) in dependencies.SLICER_OWNED for name in dependencies.REQUIREMENTS
    )


def test_version_ranges_not_pins_for_shared_packages():
    assert all(spec.startswith(">=") for spec in dependencies.REQUIREMENTS.values())
    assert dependencies.DependencyStatus("transformers", ">=5.23,<6", "5.30.1").usable
    assert not dependencies.DependencyStatus("transformers", ">=5.23,<6", "6.0.0").usable


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
    assert text.startswith(REVIEW_NOTICE + "\n")
    assert (
        "Report:\nNo acute findings." in text and "Q: Size?\nA [cancelled: partial answer]: Partial" in text
    )
    assert conversation.turns[0].tokensPerSecond == 2.0 and conversation.turns[2].tokensPerSecond == 0.0
    data = json.loads(conversation.toJSON())
    assert data["format"] == "ctmllm-conversation/1" and data["turns"][2]["cancelled"] is True
    markdown = conversation.toMarkdown()
    assert "- device: `cpu`" in markdown and "## Question 3 (cancelled, partial)" in markdown
    assert REVIEW_NOTICE in markdown
    again = Conversation.fromJSON(conversation.toJSON())
    assert again == conversation and again.history() == [("Nodules?", "None.")]
    with pytest.raises(ValueError, match="not a CT-MLLM conversation"):
        Conversation.fromDict({"turns": []})


def test_error_messages_for_the_panel():
    assert describeError(NotCTVolumeError("brain_mr: not a CT")) == "brain_mr: not a CT"
    assert describeError(KeyError("x")).startswith("Unexpected error (KeyError)")
    assert isOutOfMemory(MemoryError()) and isOutOfMemory(RuntimeError("CUDA out of memory. Tried"))
    assert not isOutOfMemory(RuntimeError("shape mismatch"))
