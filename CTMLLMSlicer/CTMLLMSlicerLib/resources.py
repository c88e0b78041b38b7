"""Where the module's files are, in the built extension and in a source checkout alike.

Built, CMake copies ``Resources/`` next to the module file and ``CTMLLMSlicerLib/`` in
``qt-scripted-modules/``, so it is ``CTMLLMSlicerLib/../Resources``. In this repository the
module lives in ``CTMLLMSlicer/`` and ``Resources/`` at the root, one folder further up. Slicer's
own ``resourcePath()`` only knows the first place; the module asks here instead.
"""

from __future__ import annotations

from pathlib import Path

UI_FILE = "UI/CTMLLMSlicer.ui"
ICON_FILE = "Icons/CTMLLMSlicer.png"
SAMPLE_CT_FILE = "SampleData/CTMLLMPhantomCT.nii.gz"
SAMPLE_CT_THUMBNAIL = "SampleData/CTMLLMPhantomCT.png"
SAMPLE_CT_NAME = "CTMLLMPhantomCT"
SAMPLE_CT_SHA256 = "45b8f0f0f51e392f6eb6b4bb6fdec3e68aceac190236c9d910c66a30be497388"
"""Checked by SampleData when it loads the file, and by the tests against the shipped file."""


def resourcesFolder() -> Path:
    """The ``Resources`` folder holding the panel's .ui file."""
    lib = Path(__file__).resolve().parent
    candidates = (lib.parent / "Resources", lib.parent.parent / "Resources")
    for folder in candidates:
        if (folder / UI_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"the CT-MLLM module's Resources folder is missing (looked in {', '.join(map(str, candidates))}): "
        "reinstall the extension, or in a source checkout keep Resources/ at the repository root"
    )


def resourcePath(relative: str) -> str:
    """The absolute path of a file under ``Resources/`` (``"UI/CTMLLMSlicer.ui"``)."""
    return str(resourcesFolder() / relative)


def sampleCTPath() -> str:
    return resourcePath(SAMPLE_CT_FILE)


BATCH_FOLDER = "CTMLLMSlicerBatch"
"""Where the built extension puts the batch script: a folder beside the module file, because Slicer
would try to load a .py file at the top of qt-scripted-modules as a module."""


def batchScriptPath() -> str:
    """The batch script: ``CTMLLMSlicerBatch/batch.py`` beside the module when built,
    ``CTMLLMSlicer/batch.py`` in a source checkout."""
    lib = Path(__file__).resolve().parent
    built, checkout = lib.parent / BATCH_FOLDER / "batch.py", lib.parent / "batch.py"
    return str(checkout if checkout.is_file() and not built.is_file() else built)
