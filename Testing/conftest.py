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


REPORT_PROMPTS = [
    "Write a radiology report of the findings in this CT volume.",
    "Describe the findings of this CT scan.",
    "Write the report for this CT.",
]
QUESTIONS = [
    "Where is the lesion located?",
    "Is there a lesion? Choices: A. yes B. no",
    "What kind of lesion is there?",
]
"""Prompts whose task the tiny task router learns (``train_task_router``)."""


def randomise_experts(model, seed: int) -> None:
    """Give every MoE LoRA B a nonzero value, as training would, so experts change the output."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.volume_adapter.moe.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def train_task_router(model, steps: int = 25):
    """Teach a TGH-MoE model's task router ``REPORT_PROMPTS`` from ``QUESTIONS`` (router loss alone);
    returns the last training call's ``EncodedBatch``."""
    import torch

    torch.manual_seed(0)
    prompts = REPORT_PROMPTS + QUESTIONS
    labels = ["report"] * len(REPORT_PROMPTS) + ["vqa"] * len(QUESTIONS)
    batch = torch.rand(len(prompts), 9, 32, 32, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.volume_adapter.moe.task_router.parameters(), lr=1e-2)
    for _ in range(steps):
        encoded = model.encode(batch, prompts=prompts, labels=labels)
        optimizer.zero_grad()
        encoded.aux_losses["router"].backward()
        optimizer.step()
    return encoded


@pytest.fixture(scope="session")
def routed_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny TGH-MoE (hard) model whose task router tells reports from questions and whose two
    task experts differ, saved once per session."""
    from model_core.config import MoEConfig
    from model_core.tiny import build_tiny_ctmllm

    model = build_tiny_ctmllm("internvl", moe=MoEConfig(mode="tgh_hard", router_loss_weight=1.0))
    train_task_router(model)
    randomise_experts(model, seed=2)
    return model.eval().save_pretrained(tmp_path_factory.mktemp("model") / "tiny-routed")


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
