"""What a batch output folder holds, and whether a case's outputs there can be reused by ``--resume``.

Each finished case leaves ``cases/<id>.md`` (and ``<id>.mrml`` with ``--save-scene``), then its
``cases/<id>.json`` last: the JSON is the case's completion record. It carries the input's
checksum, the run fingerprint (model checksum and every setting that changes the text) and the
sha256 of each other output file. ``--resume`` reuses a case only when all of these still hold,
so an edited input, another model, other settings, or a damaged output make it run again.

``manifest.json`` indexes the folder: every run (its id, start, end, how it ended) and every
case's latest status, including failures with their errors. It is rewritten atomically after
each case; when a run is killed between a case's JSON and the manifest update, the next run
rebuilds the entry from the JSON, so nothing finished is recomputed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from CTMLLMSlicerLib.batch_files import atomic_write_text, sha256_file

CASE_FORMAT = "ctmllm-batch-case/1"
MANIFEST_FORMAT = "ctmllm-batch-manifest/1"
MANIFEST_FILE = "manifest.json"
CASES_FOLDER = "cases"

RUNNING = "running"
FINISHED = "finished"
INTERRUPTED = "interrupted"
STOPPED = "stopped"
"""A run-level error (full disk, output folder no longer writable) ended the run."""


def case_paths(output: Path, case_id: str) -> dict[str, Path]:
    """Where a case's outputs go: ``json`` (the completion record), ``markdown``, ``scene``, ``sr`` (the
    DICOM SR), and for a DICOM case's scene its ``volume``."""
    folder = output / CASES_FOLDER
    return {
        "json": folder / f"{case_id}.json",
        "markdown": folder / f"{case_id}.md",
        "scene": folder / f"{case_id}.mrml",
        "sr": folder / f"{case_id}.sr.dcm",
        "volume": folder / f"{case_id}.nrrd",
    }


@dataclass(frozen=True)
class ReuseCheck:
    """Whether a case's earlier outputs are complete and current, and if not, why (for the log)."""

    record: dict[str, Any] | None
    reason: str

    @property
    def reusable(self) -> bool:
        return self.record is not None


def check_reusable(
    output: Path,
    case_id: str,
    input_sha256: str,
    fingerprint: dict[str, Any],
    required: Sequence[str] = ("markdown",),
) -> ReuseCheck:
    """Reuse the case's completion record if it is complete, and its input and settings are unchanged.

    ``required``: output kinds this run writes (``markdown``, ``scene``); each must be listed and
    intact, so a run that adds ``--save-scene`` recomputes cases that have no scene yet.
    """
    path = case_paths(output, case_id)["json"]
    if not path.is_file():
        return ReuseCheck(None, "no earlier result")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return ReuseCheck(None, f"{path.name} is unreadable")
    if not isinstance(record, dict) or record.get("format") != CASE_FORMAT or record.get("status") != "ok":
        return ReuseCheck(None, f"{path.name} is not a completed case record")
    if record.get("input_sha256") != input_sha256:
        return ReuseCheck(None, "the input changed since")
    if record.get("fingerprint") != fingerprint:
        return ReuseCheck(None, "the model or settings changed since")
    outputs = record.get("outputs")
    if not isinstance(outputs, dict) or not all(kind in outputs for kind in required):
        return ReuseCheck(None, f"{path.name} lacks some of the outputs {', '.join(required)}")
    for kind, entry in outputs.items():
        target = path.parent / str(entry.get("file", ""))
        if not target.is_file() or sha256_file(target) != entry.get("sha256"):
            return ReuseCheck(None, f"its {kind} output {target.name} is missing or changed")
    return ReuseCheck(record, "complete and current")


def output_entry(path: Path) -> dict[str, str]:
    """How a case record names one of its output files: relative name and sha256."""
    return {"file": path.name, "sha256": sha256_file(path)}


class Manifest:
    """``manifest.json`` of an output folder: runs and the latest status of every case."""

    def __init__(self, output: Path, data: dict[str, Any] | None = None) -> None:
        self.path = output / MANIFEST_FILE
        self.data: dict[str, Any] = data or {"format": MANIFEST_FORMAT, "runs": [], "cases": {}}

    @classmethod
    def load(cls, output: Path) -> tuple[Manifest, str | None]:
        """The folder's manifest (a new one if there is none); a warning when the old one was unreadable."""
        path = output / MANIFEST_FILE
        if not path.is_file():
            return cls(output), None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
        except (OSError, ValueError, AttributeError) as error:
            return cls(output), f"{path} was unreadable ({error}); started a new manifest"
        return cls(output, data), None

    @property
    def cases(self) -> dict[str, dict[str, Any]]:
        return self.data["cases"]

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.data["runs"]

    def start_run(self, run: dict[str, Any]) -> None:
        """Append a run (``run_id``, start time, command line, model) with status ``running``."""
        self.runs.append({**run, "status": RUNNING})
        self.save()

    def end_run(self, run_id: str, status: str, **details: Any) -> None:
        """Mark the run ``finished``, ``interrupted`` or ``stopped`` with its counts and end time."""
        for run in self.runs:
            if run["run_id"] == run_id:
                run.update(status=status, **details)
        self.save()

    def record_case(self, case_id: str, entry: dict[str, Any]) -> None:
        """Set a case's latest status (``ok`` or ``failed``) and save the manifest atomically."""
        self.cases[case_id] = entry
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, ensure_ascii=False) + "\n")
