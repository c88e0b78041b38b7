"""What a batch run works on: the cases found in a folder, a volume file, or a CSV/JSONL list.

- A volume file (``VOLUME_SUFFIXES``) is one case.
- A folder is searched recursively: each volume file is a case, and each DICOM series (grouped as
  ``model_core.data.scan_dicom_folder`` groups them: by SeriesInstanceUID, or by the series'
  attributes when it is blank; files with or without an extension, wherever they lie under the
  folder) is a case. Localizer scouts are not cases: the cases of their folder note them.
- One DICOM file (or a DICOMDIR) is the case of its whole series (of the folder it indexes).
- A list (``.csv`` or ``.jsonl``) names one case per row: ``path`` (or ``volume``/``image``), an
  optional ``id``, ``series_uid`` (to pick one series of a DICOM folder), and ``question``
  (JSONL may give a ``questions`` list). Rows with the same id (or path) add their questions to
  one case. Relative paths are relative to the list file.

Discovery only reads names and DICOM headers; a case that cannot be read fails later, on its
own, with its error in the summary. Case ids are unique and safe as file names.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from CTMLLMSlicerLib.batch_files import sha256_file, sha256_files
from model_core.data.dicom import DicomSeries, is_dicomdir, looks_like_dicom
from model_core.data.io import VOLUME_SUFFIXES, volume_suffix
from model_core.dicom_sr import IDENTIFIER_KEYWORDS

LIST_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl")
FILE = "file"
DICOM = "dicom"

_NOT_DICOM_SUFFIXES = (*LIST_SUFFIXES, ".json", ".md", ".txt", ".mrml", ".py", ".log", ".raw", ".zraw")
"""Files a folder scan never opens as DICOM (results, notes, detached voxel data)."""

_PATH_KEYS = ("path", "volume", "image")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class CaseListError(ValueError):
    """The input (folder, file or case list) cannot be turned into cases; the message says why and what to do."""


@dataclass(frozen=True)
class Case:
    """One study to run: a volume file or one DICOM series, with the questions to ask about it.

    ``path``: the volume file, or the DICOM folder (or one file of the series, from a list).
    ``files``: the DICOM series' files when discovery found them; empty for a volume file and
    for a DICOM entry of a list (``resolve_series`` finds them when the case runs).
    ``origin``: where the case came from (file, series, list line), for messages. ``problem``:
    why a discovered series cannot be read as one volume (the case then fails with it).
    ``identifiers``: a case list's ``patient_id``, ``study_instance_uid``... columns (see ``batch_sr``).
    ``series``: the discovered series itself; ``notes``: what discovery wants its record to say
    (scouts skipped beside it).
    """

    case_id: str
    path: Path
    kind: str
    series_uid: str | None = None
    files: tuple[Path, ...] = ()
    questions: tuple[str, ...] = ()
    origin: str = ""
    problem: str = ""
    series: DicomSeries | None = field(default=None, compare=False, repr=False)
    notes: tuple[str, ...] = ()
    identifiers: tuple[tuple[str, str], ...] = ()
    """Patient and study identifiers a case list gives for the ``--sr`` export (name, value)."""

    def input_files(self) -> list[Path]:
        """Every file whose content makes this case's input (for the resume checksum)."""
        if self.kind == FILE:
            return [self.path, *detached_data_files(self.path)]
        return list(self.files) if self.files else list(resolve_series(self, allow_non_ct=True)[0].files)

    def input_checksum(self) -> str:
        """The sha256 of a single volume file (as ``sha256sum`` prints it); for a series or a header
        with its data file, sha256 over each file's name (relative to the case) and content."""
        files = self.input_files()
        if len(files) == 1 and self.kind == FILE:
            return sha256_file(files[0])
        base = self.path if self.path.is_dir() else self.path.parent
        return sha256_files(files, [os.path.relpath(f, base) for f in files])


def detached_data_files(header: Path) -> list[Path]:
    """The voxel file a ``.mhd`` or ``.nhdr`` header points to (changes there count as input changes)."""
    suffix = volume_suffix(header)
    if suffix not in (".mhd", ".nhdr") or not header.is_file():
        return []
    pattern = r"^\s*ElementDataFile\s*=\s*(.+?)\s*$" if suffix == ".mhd" else r"^\s*data file:\s*(.+?)\s*$"
    with open(header, encoding="latin-1") as stream:
        head = stream.read(65536)
    match = re.search(pattern, head, flags=re.MULTILINE | re.IGNORECASE)
    if not match or match.group(1).upper() == "LOCAL" or "%" in match.group(1):
        return []
    data = header.parent / match.group(1)
    return [data] if data.is_file() else []


def safe_case_id(text: str) -> str:
    """A file-name-safe id: runs of other characters become ``_``; path separators become ``__``."""
    parts = [_UNSAFE.sub("_", part).strip("._") for part in re.split(r"[\\/]+", text)]
    return "__".join(part for part in parts if part) or "case"


def _unique_ids(cases: Sequence[Case]) -> list[Case]:
    """Suffix repeated ids with ``_2``, ``_3``... in order, so every output name is distinct."""
    seen: dict[str, int] = {}
    unique = []
    for case in cases:
        key = case.case_id.lower()  # case-insensitive file systems
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            case = replace(case, case_id=f"{case.case_id}_{seen[key]}")
        unique.append(case)
    return unique


def discover_cases(
    source: str | os.PathLike, *, exclude: Sequence[Path] = (), questions: Sequence[str] = ()
) -> list[Case]:
    """The cases under ``source`` (folder, volume file, DICOM file or case list), in a stable order.

    ``exclude``: folders not to search (the output folder when it lies inside the input);
    ``questions``: asked about every case that has none of its own in a case list.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise CaseListError(
            f"input {path} does not exist: pass a folder, a volume file or a .csv/.jsonl case list"
        )
    if path.is_dir():
        cases = _folder_cases(path, [Path(e).resolve() for e in exclude])
        if not cases:
            raise CaseListError(
                f"input folder {path} holds no volume files ({', '.join(VOLUME_SUFFIXES)}) and no DICOM series: "
                "check the path"
            )
    elif path.name.lower().endswith(LIST_SUFFIXES):
        cases = read_case_list(path)
    elif volume_suffix(path):
        cases = [Case(safe_case_id(_strip_volume_suffix(path.name)), path, FILE, origin=str(path))]
    elif is_dicomdir(path):
        cases = _folder_cases(path.parent, [Path(e).resolve() for e in exclude])
    elif looks_like_dicom(path):
        cases = _dicom_cases(path.parent, path.parent, only_file=path)
        if not cases:
            raise CaseListError(
                f"input {path} is a DICOM file without a readable image: pass an image file of the series, or "
                "its folder"
            )
    else:
        raise CaseListError(
            f"input {path} is neither a volume file ({', '.join(VOLUME_SUFFIXES)}), a DICOM file, nor a "
            f"case list ({', '.join(LIST_SUFFIXES)}): pass one of those or a folder"
        )
    if questions:
        cases = [c if c.questions else replace(c, questions=tuple(questions)) for c in cases]
    return _unique_ids(cases)


def _strip_volume_suffix(name: str) -> str:
    suffix = volume_suffix(Path(name))
    return name[: -len(suffix)] if suffix else name


def _folder_cases(folder: Path, exclude: Sequence[Path]) -> list[Case]:
    volume_files, others = [], []
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (root_path / d).resolve() not in exclude
        )
        for name in sorted(files):
            if name.startswith("."):
                continue
            file = root_path / name
            if volume_suffix(file):
                volume_files.append(file)
            elif not name.lower().endswith(_NOT_DICOM_SUFFIXES):
                others.append(file)
    cases = [
        Case(safe_case_id(_strip_volume_suffix(str(f.relative_to(folder)))), f, FILE, origin=str(f))
        for f in volume_files
    ]
    if others:
        cases += _dicom_cases(folder, folder, candidates=others)
    return cases


def _dicom_cases(
    folder: Path, base: Path, candidates: Iterable[Path] | None = None, only_file: Path | None = None
) -> list[Case]:
    """One case per DICOM series among ``candidates`` (default: the files of ``folder``); localizer
    scouts are noted on the cases of their folder instead of being cases."""
    from model_core.data.dicom import scan_dicom_folder

    series_list = scan_dicom_folder(folder, recursive=candidates is not None)
    if candidates is not None:
        wanted = set(candidates)
        series_list = [s for s in series_list if any(f in wanted for f in s.files)]
    if only_file is not None:
        series_list = [s for s in series_list if only_file in s.files]
    scouts: dict[Path, list[DicomSeries]] = {}
    for series in series_list:
        if series.localizer:
            scouts.setdefault(series.files[0].parent, []).append(series)
    volumes = [s for s in series_list if not s.localizer]
    by_folder: dict[Path, int] = {}
    for series in volumes:
        by_folder[series.files[0].parent] = by_folder.get(series.files[0].parent, 0) + 1
    cases = []
    for series in volumes:
        parent = series.files[0].parent
        relative = os.path.relpath(parent, base)
        name = "dicom" if relative == "." else relative
        if by_folder[parent] > 1:
            name += "/" + (series.description or series.modality or "series") + "_" + series.uid[-8:]
        notes = tuple(
            f"{parent}: skipped localizer (scout) series {scout.summary()}"
            for scout in scouts.get(parent, [])
        )
        cases.append(
            Case(
                safe_case_id(name),
                parent,
                DICOM,
                series_uid=series.uid,
                files=tuple(series.files),
                origin=f"{parent} (series {series.uid})",
                problem="; ".join(series.problems),
                series=series,
                notes=notes,
            )
        )
    return cases


def read_case_list(path: Path) -> list[Case]:
    """Cases from a ``.csv`` (header row) or ``.jsonl`` list; see the module docstring for the fields."""
    rows = _jsonl_rows(path) if path.name.lower().endswith(".jsonl") else _csv_rows(path)
    grouped: dict[str, dict] = {}
    for where, row in rows:
        raw = next((str(row[k]).strip() for k in _PATH_KEYS if row.get(k) not in (None, "")), "")
        if not raw:
            raise CaseListError(
                f"{where}: no 'path' (or 'volume'/'image') value: give the volume file or DICOM folder"
            )
        target = Path(raw).expanduser()
        target = target if target.is_absolute() else path.parent / target
        key = str(row.get("id") or "").strip() or str(target)
        entry = grouped.setdefault(
            key,
            {
                "target": target,
                "id": str(row.get("id") or "").strip(),
                "series": None,
                "questions": [],
                "where": where,
                "identifiers": {},
            },
        )
        if entry["target"] != target:
            raise CaseListError(
                f"{where}: id {key!r} already names {entry['target']} ({entry['where']}): give each volume its own id"
            )
        entry["series"] = str(row.get("series_uid") or "").strip() or entry["series"]
        entry["questions"] += _row_questions(row, where)
        entry["identifiers"].update(
            (name, str(row[name]).strip()) for name in IDENTIFIER_KEYWORDS if str(row.get(name) or "").strip()
        )
    cases = []
    for entry in grouped.values():
        target = entry["target"]
        kind = FILE if volume_suffix(target) else DICOM
        name = entry["id"] or (_strip_volume_suffix(target.name) if kind == FILE else target.name)
        cases.append(
            Case(
                safe_case_id(name),
                target,
                kind,
                series_uid=entry["series"],
                questions=tuple(entry["questions"]),
                origin=entry["where"],
                identifiers=tuple(entry["identifiers"].items()),
            )
        )
    if not cases:
        raise CaseListError(f"case list {path} has no rows: add one row per volume (column 'path')")
    return cases


def _row_questions(row: dict, where: str) -> list[str]:
    found = []
    single = row.get("question")
    if isinstance(single, str) and single.strip():
        found.append(single.strip())
    several = row.get("questions")
    if several not in (None, ""):
        if not isinstance(several, list) or not all(isinstance(q, str) for q in several):
            raise CaseListError(
                f"{where}: 'questions' must be a list of strings, e.g. [\"Is there ascites?\"]"
            )
        found += [q.strip() for q in several if q.strip()]
    return found


def _csv_rows(path: Path) -> list[tuple[str, dict]]:
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        header = [name.strip().lower() for name in reader.fieldnames or []]
        if not any(key in header for key in _PATH_KEYS):
            raise CaseListError(
                f"case list {path}: the header {reader.fieldnames} has no 'path' column: the first row must name "
                "the columns (path, and optionally id, question, series_uid)"
            )
        return [
            (f"{path}, line {reader.line_num}", {k.strip().lower(): v for k, v in row.items() if k})
            for row in reader
        ]


def _jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise CaseListError(
                    f"{where}: not valid JSON ({error.msg}): write one JSON object per line"
                ) from error
            if not isinstance(row, dict):
                raise CaseListError(f"{where}: is a JSON {type(row).__name__}; write one object per line")
            rows.append((where, {str(k).lower(): v for k, v in row.items()}))
    return rows


def resolve_series(case: Case, *, allow_non_ct: bool = False) -> tuple[DicomSeries, list[str]]:
    """The DICOM series a case reads, and warnings saying which one it is when there was a choice.

    A case found in a folder knows its series; a list entry names a folder (the CT series with the
    most slices, or ``series_uid``) or one file (its series), chosen by ``model_core.data``'s
    ``select_series`` exactly as ``read_ct`` chooses: a series whose Modality is not CT is refused
    unless ``allow_non_ct``. Raises ``model_core.data``'s typed errors (no series, broken series,
    not CT) with messages naming the input.
    """
    from model_core.data.dicom import scan_dicom_folder, select_series, series_of_file

    if case.kind != DICOM:
        raise ValueError(f"case {case.case_id} is a volume file, not a DICOM series")
    if case.series is not None:
        return case.series, []
    folder = case.path if case.path.is_dir() else case.path.parent
    series = scan_dicom_folder(folder, recursive=case.path.is_dir())
    uid = case.series_uid
    if uid is None and case.path.is_file():
        own = series_of_file(series, case.path)
        uid = own.uid if own is not None else None
    return select_series(series, source=str(case.path), series_uid=uid, allow_non_ct=allow_non_ct)


def read_questions_file(path: str | os.PathLike) -> list[str]:
    """Questions for every case: one per line of a text file (``#`` lines and blank lines skipped),
    or a JSON list of strings in a ``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise CaseListError(
            f"questions file {path} does not exist: pass a text file with one question per line"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise CaseListError(f"questions file {path}: not valid JSON ({error.msg})") from error
        if not isinstance(data, list) or not all(isinstance(q, str) for q in data):
            raise CaseListError(f"questions file {path}: must hold a JSON list of strings")
        questions = [q.strip() for q in data if q.strip()]
    else:
        questions = [
            line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
    if not questions:
        raise CaseListError(f"questions file {path} holds no questions: write one question per line")
    return questions
