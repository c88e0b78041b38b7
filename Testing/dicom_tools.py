"""DICOM helpers shared by the SR and PACS tests: generated CT series and the dciodvfy validator.

``dciodvfy`` (Debian's dicom3tools, installed by ``make venv`` where apt exists) is the DICOM
standard's IOD checker; ``assert_valid_dicom`` fails on any of its errors and skips, with a
notice saying how to install it, where it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest

DCIODVFY = shutil.which("dciodvfy")
INSTALL_NOTICE = "install Debian's dicom3tools (make venv does it as root where apt-get exists)"


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for ``path`` (warnings are not errors)."""
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    if result.returncode != 0 and not errors:
        errors = [f"dciodvfy exited with {result.returncode}: {' / '.join(lines)}"]
    return errors


def assert_valid_dicom(path: Path) -> None:
    """dciodvfy finds no error in ``path``; skips (with how to install it) where it is missing."""
    if DCIODVFY is None:
        pytest.skip(f"dciodvfy is not installed, so {path.name} was not validated: {INSTALL_NOTICE}")
    errors = dciodvfy_errors(path)
    assert not errors, f"dciodvfy rejects {path}:\n" + "\n".join(errors)


def ct_series(
    folder: Path,
    *,
    slices: int = 6,
    size: int = 32,
    patient_id: str = "PAT-1",
    seed: int = 0,
    study_description: str = "",
    edit: Callable[[pydicom.Dataset], None] | None = None,
) -> list[Path]:
    """A small CT series (air, a soft-tissue block, a bone rod) written one file per slice.

    ``edit`` changes each file's dataset before it is saved again (blank UIDs, compression).
    """
    from model_core.data import write_dicom_series

    rng = np.random.default_rng(seed)
    volume = np.full((slices, size, size), -1000, dtype=np.int16)
    volume[:, size // 4 : -size // 4, size // 4 : -size // 4] = 40
    volume[:, size // 2 - 2 : size // 2 + 2, size // 2 - 2 : size // 2 + 2] = 700
    volume += rng.integers(-20, 20, volume.shape, dtype=np.int16)
    files = write_dicom_series(folder, volume, (0.8, 0.8, 2.5), patient_id=patient_id)
    if edit is not None or study_description:
        for file in files:
            dataset = pydicom.dcmread(file)
            dataset.StudyDescription = study_description
            if edit is not None:
                edit(dataset)
            dataset.save_as(file, enforce_file_format=True)
    return files


def blank_uids(dataset: pydicom.Dataset) -> None:
    """What some anonymisers do: empty Study and Series Instance UIDs."""
    dataset.StudyInstanceUID = ""
    dataset.SeriesInstanceUID = ""


def rle_compressed(dataset: pydicom.Dataset) -> None:
    """RLE Lossless, a compressed transfer syntax pydicom can write without extra plugins."""
    dataset.compress(pydicom.uid.RLELossless)


def sop_uids(files: Sequence[Path]) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
