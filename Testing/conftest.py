"""What several test files share: paths to the repository and the shared CT volumes, the tiny model.

pytest imports this file before any test module in ``Testing/``, so from here on the module's
folder (``CTMLLMSlicer/``, home of ``CTMLLMSlicerLib``) is importable. Test files import the
constants with ``from conftest import ...``; the fixtures need no import.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CTMLLMSlicer"
SHARED_CT = REPO.parent / "shared" / "data" / "ct"
"""The real CT volumes (read-only; see ../shared/data/README.md). Never copy them into the repo."""
ABDOMEN_CT = SHARED_CT / "abdomen_ct_3mm.nii.gz"
"""Upper abdomen CT, 122x101x30 voxels of 3 mm."""
TORSO_CT = SHARED_CT / "torso_ct_3mm.nii.gz"
"""Abdomen and pelvis CT, 122x101x112 voxels of 3 mm."""
NOT_CT_MR = SHARED_CT / "not_ct_mr_3mm.nii.gz"
"""An MR volume (117x91x20): what a non-CT input gets."""

needs_shared_ct = pytest.mark.skipif(
    not ABDOMEN_CT.is_file(),
    reason=f"the shared CT volumes are not at {SHARED_CT} (see ../shared/data/README.md)",
)
"""Mark (``pytestmark = needs_shared_ct``) for tests that read the shared CT volumes."""

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random InternVL-based ``CTMLLM`` saved once per session: fast, writes gibberish."""
    from model_core.tiny import build_tiny_ctmllm

    return build_tiny_ctmllm(family="internvl").save_pretrained(
        tmp_path_factory.mktemp("model") / "tiny-internvl"
    )


def save_scene_with_volume(scene, volume, folder: Path) -> Path:
    """Write ``volume`` as ``<name>.nrrd`` and ``scene`` as ``scene.mrml`` in ``folder`` (as Slicer's
    Save does); returns the ``.mrml`` path, for tests that reload a scene."""
    storage = volume.GetStorageNode()
    storage.SetFileName(str(folder / f"{volume.GetName()}.nrrd"))
    assert storage.WriteData(volume), f"could not write {volume.GetName()} into {folder}"
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Commit(), f"could not write the scene into {folder}"
    return folder / "scene.mrml"


def run_model_core_cli(*args: str, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m model_core ARGS`` as a user runs it: offline, a fresh model cache, UTF-8 output."""
    env = {"PATH": "/usr/bin:/bin", "CTMLLM_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "model_core", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
        env=env,
    )
