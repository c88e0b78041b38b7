"""DICOM helpers shared by the SR and PACS tests: generated CT series and the dciodvfy validator.

``dciodvfy`` (Debian's dicom3tools, installed by ``make venv`` where apt exists) is the DICOM
standard's IOD checker; ``assert_valid_dicom`` fails on any of its errors and skips, with a
notice saying how to install it, where it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

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
    transfer_syntax: str = "uncompressed",
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Path]:
    """A small CT phantom series, one file per slice, with the patient and study given.

    Built with ``model_core.data.dicom_write`` (the generator of DICOM exports as scanners write
    them): ``transfer_syntax`` one of its names (``jpeg2000``, ``rle``...); ``""`` UIDs are written
    blank, as anonymisers leave them.
    """
    from model_core.data.dicom_write import ct_phantom, write_dicom_series

    files = write_dicom_series(
        folder,
        ct_phantom((slices, size, size), seed=seed),
        (0.8, 0.8, 2.5),
        study_uid=study_uid,
        series_uid=series_uid,
        transfer_syntax=transfer_syntax,
    )
    for file in files:  # the generator makes up a patient; the tests name theirs
        dataset = pydicom.dcmread(file)
        dataset.PatientID = patient_id
        dataset.StudyDescription = study_description
        dataset.save_as(file, enforce_file_format=True)
    return files


def sop_uids(files: Sequence[Path]) -> list[str]:
    return [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
