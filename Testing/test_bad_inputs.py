"""Every bad input gets the same verdict, in the same words, from every entry point.

Two catalogues, both mirrored in docs/DATA.md ("Bad inputs and their messages"):

- ``VOLUMES``: each input is written here, then run through the shared decision code
  (``read_ct`` + ``prepare_input``, the Python API), the command line (``main``, in process),
  the batch (one run over a case list of all of them) and the panel's Logic on slicer-core
  (``loadVolumeFile`` as "Add data" loads a file, then ``generateReport``). Each must refuse it
  with the same ``CTInputError`` subclass and a message holding the same words. The panel gets
  DICOM through Slicer's own DICOM module, so DICOM rows skip it.
- ``MODELS``: broken model folders and options, through ``load_model``, the command line, the
  batch and the Logic's ``loadModel``: each a typed error naming the file or field.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import REPO

from CTMLLMSlicerLib.batch_run import BatchOptions, run_batch
from CTMLLMSlicerLib.batch_scene import slicer_core_scene
from CTMLLMSlicerLib.errors import CTMLLMSlicerError, ModelUnavailableError
from CTMLLMSlicerLib.logic import CTMLLMLogicCore, ModelRequest
from model_core.__main__ import main as cli_main
from model_core.data import CTInputError, prepare_input, read_ct
from model_core.data import files as data_files
from model_core.data.dicom_write import ct_phantom, write_dicom_series

DATA_DOC = REPO / "docs" / "DATA.md"


def write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def ct(shape=(8, 24, 24)) -> np.ndarray:
    return ct_phantom(shape)


def with_nan(array: np.ndarray) -> np.ndarray:
    volume = array.astype(np.float32)
    volume[1, 2, 3], volume[2, 3, 4] = np.nan, np.inf
    return volume


def not_gzip(folder: Path) -> Path:
    return write(folder / "plain.nii", ct()).rename(folder / "plain.nii.gz")


def damaged_gzip(folder: Path) -> Path:
    path = write(
        folder / "damaged.nii.gz",
        np.random.default_rng(0).integers(-1000, 900, (30, 128, 128)).astype(np.int16),
    )
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def truncated(folder: Path) -> Path:
    path = write(folder / "truncated.nii.gz", ct())
    path.write_bytes(path.read_bytes()[:-200])
    return path


def sheared(folder: Path) -> Path:
    path = write(folder / "sheared.nii", ct())
    header = bytearray(path.read_bytes())
    struct.pack_into("<2h", header, 252, 0, 1)
    struct.pack_into("<12f", header, 280, -1, 0, 0.5, 0, 0, -1, 0, 0, 0, 0, 2, 0)
    path.write_bytes(bytes(header))
    return path


def four_d(folder: Path) -> Path:
    path = folder / "timeseries.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(ct()) for _ in range(3)]), str(path))
    return path


def colour(folder: Path) -> Path:
    path = folder / "colour.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True), str(path))
    return path


def text_as_nrrd(folder: Path) -> Path:
    path = folder / "notes.nrrd"
    path.write_text("findings: none\n" * 20, encoding="utf-8")
    return path


def dicom_mr(folder: Path) -> Path:
    write_dicom_series(folder / "mr_series", ct(), (1.0, 1.0, 2.0), modality="MR")
    return folder / "mr_series"


def dicom_empty(folder: Path) -> Path:
    (folder / "no_images").mkdir()
    (folder / "no_images" / "README.txt").write_text("no images here", encoding="utf-8")
    return folder / "no_images"


def dicom_gap(folder: Path) -> Path:
    files = write_dicom_series(folder / "gap_series", ct(), (1.0, 1.0, 2.0))
    files[3].unlink()
    return folder / "gap_series"


def dicom_jpeg_xl(folder: Path) -> Path:
    for path in write_dicom_series(folder / "jxl_series", ct(), (1.0, 1.0, 2.0), transfer_syntax="jpeg2000"):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.110"
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True, force_encoding=True)
    return folder / "jxl_series"


def denied(folder: Path) -> Path:
    return write(folder / "denied.nii.gz", ct())


@dataclass(frozen=True)
class BadVolume:
    name: str
    verdict: str
    words: str
    make: Callable[[Path], Path]
    dicom: bool = False


VOLUMES = [
    BadVolume("missing file", "UnreadableVolumeError", "does not exist", lambda d: d / "absent.nii.gz"),
    BadVolume("unreadable file (permission)", "UnreadableVolumeError", "permission denied", denied),
    BadVolume("named .nii.gz but not gzip", "UnreadableVolumeError", "is named .gz but is not gzip-compressed", not_gzip),
    BadVolume("gzip stream damaged in the middle", "UnreadableVolumeError", "the gzip stream is damaged", damaged_gzip),
    BadVolume("truncated NIfTI", "UnreadableVolumeError", "is truncated", truncated),
    BadVolume("not an image", "UnreadableVolumeError", "cannot be read as an image", text_as_nrrd),
    BadVolume("sheared axes", "UnreadableVolumeError", "voxel axes are not perpendicular", sheared),
    BadVolume("NaN/inf in a float NIfTI", "InvalidValuesError", "1 NaN and 1 infinite", lambda d: write(d / "nan.nii.gz", with_nan(ct()))),
    BadVolume("NaN/inf in NRRD", "InvalidValuesError", "1 NaN and 1 infinite", lambda d: write(d / "nan.nrrd", with_nan(ct()))),
    BadVolume("one slice", "TooFewSlicesError", "(1 slice)", lambda d: write(d / "slice.nii.gz", ct((1, 24, 24)))),
    BadVolume("two slices", "TooFewSlicesError", "a CT series needs at least 3", lambda d: write(d / "slab.nii.gz", ct((2, 24, 24)))),
    BadVolume("4D (time series)", "TooFewSlicesError", "has 4 dimensions", four_d),
    BadVolume("colour image", "CTInputError", "values per voxel", colour),
    BadVolume("constant volume", "EmptyVolumeError", "every voxel has the value", lambda d: write(d / "blank.nii.gz", np.full((6, 20, 20), -1000, np.int16))),
    BadVolume("MR intensities", "NotCTError", "does not look like a CT", lambda d: write(d / "mr.nii.gz", ct() + 1100)),
    BadVolume("already normalised", "NotCTError", "already normalised", lambda d: write(d / "norm.nii.gz", (ct().astype(np.float32) + 1000) / 2000)),
    BadVolume("DICOM series labelled MR", "NotCTError", "holds no CT series", dicom_mr, dicom=True),
    BadVolume("folder without DICOM images", "DicomSeriesError", "holds no DICOM image files", dicom_empty, dicom=True),
    BadVolume("DICOM series with a missing slice", "DicomSeriesError", "missing slices", dicom_gap, dicom=True),
    BadVolume("DICOM compressed as JPEG XL", "UnreadableVolumeError", "compressed as JPEG XL Lossless", dicom_jpeg_xl, dicom=True),
]  # fmt: skip


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def deny_reads_of_denied_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, who reads every file: refuse reads of files named ``denied*`` as the OS would."""

    def guarded_open(file, *args, **kwargs):
        if Path(str(file)).name.startswith("denied"):
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(data_files, "open", guarded_open, raising=False)


@pytest.fixture(autouse=True)
def permission_denied_for_denied_files(monkeypatch):
    deny_reads_of_denied_files(monkeypatch)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_inputs")
    return {row.name: row.make(folder) for row in VOLUMES}


@pytest.fixture(scope="module")
def batch_outcomes(inputs, tiny_model_dir, tmp_path_factory) -> dict[str, object]:
    """One batch run over a case list naming every bad input."""
    folder = tmp_path_factory.mktemp("batch")
    lines = ["path,id"] + [f"{inputs[row.name]},{slug(row.name)}" for row in VOLUMES]
    (folder / "cases.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        deny_reads_of_denied_files(patch)
        from CTMLLMSlicerLib import batch_scene

        patch.setattr(batch_scene, "in_slicer_application", lambda: False)
        summary = run_batch(
            BatchOptions(folder / "cases.csv", folder / "out", model=str(tiny_model_dir), device="cpu"),
            progress_stream=io.StringIO(),
        )
    assert summary.exit_code == 1
    return {o.case_id: o for o in summary.outcomes}


@pytest.fixture(scope="module")
def panel(tiny_model_dir):
    scene, app, logics = slicer_core_scene(("Colors", "Volumes"))
    logic = CTMLLMLogicCore(scene, volumesLogic=logics["Volumes"])
    return logic, ModelRequest(str(tiny_model_dir), device="cpu"), (scene, app, logics)


def verdict_of(error: BaseException) -> str:
    """The input verdict an error carries: its own type, or the ``CTInputError`` it wraps."""
    if isinstance(error, CTMLLMSlicerError) and isinstance(error.__cause__, CTInputError):
        return type(error.__cause__).__name__
    return type(error).__name__


@pytest.mark.parametrize("row", VOLUMES, ids=[slug(r.name) for r in VOLUMES])
def test_every_entry_point_gives_the_same_verdict(row, inputs, batch_outcomes, panel, tiny_model_dir, capsys):
    path = inputs[row.name]

    with pytest.raises(CTInputError) as api:  # the shared decision: read_ct, then prepare_input
        prepare_input(read_ct(path), {})
    assert type(api.value).__name__ == row.verdict and row.words in str(api.value)

    code = cli_main(["generate", "--model", str(tiny_model_dir), "--volume", str(path), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert row.words in err and str(path) in err

    outcome = batch_outcomes[slug(row.name)]
    assert outcome.status == "failed" and outcome.error_type == row.verdict, outcome.error
    assert row.words in outcome.error and str(path) in outcome.error

    if row.dicom:
        return  # the panel loads DICOM through Slicer's DICOM module
    logic, request, _ = panel
    with pytest.raises((CTInputError, CTMLLMSlicerError)) as shown:
        logic.generateReport(logic.loadVolumeFile(path), request)
    assert verdict_of(shown.value) == row.verdict and row.words in str(shown.value)


def test_the_refusal_of_non_ct_names_each_entry_points_switch(
    inputs, batch_outcomes, panel, tiny_model_dir, capsys
):
    mr = inputs["MR intensities"]
    with pytest.raises(CTInputError, match="pass allow_non_ct=True"):
        read_ct(mr)
    cli_main(["generate", "--model", str(tiny_model_dir), "--volume", str(mr)])
    assert "pass --allow-non-ct" in capsys.readouterr().err
    assert "pass --allow-non-ct" in batch_outcomes[slug("MR intensities")].error
    logic, request, _ = panel
    with pytest.raises(CTMLLMSlicerError, match="Accept non-CT volumes"):
        logic.generateReport(logic.loadVolumeFile(mr), request)


def test_the_same_input_is_prepared_alike_by_the_cli_the_batch_and_the_panel(tmp_path, panel, tiny_model_dir):
    """A CT and (accepted as non-CT) an MR: the CLI's input equals the Logic's, voxel for voxel."""
    from model_core.__main__ import load_input_volume
    from model_core.config import CTMLLMConfig

    logic, request, _ = panel
    preprocessing = CTMLLMConfig.load(tiny_model_dir / "ctmllm_config.json").preprocessing
    model = logic.loadModel(request)
    for name, array, allow in (
        ("ct.nii.gz", ct((9, 30, 28)), False),
        ("mr.nii.gz", ct((9, 30, 28)) + 1100, True),
    ):
        path = write(tmp_path / name, array, spacing=(0.7, 0.8, 2.5))
        cli_volume, description, _ = load_input_volume(preprocessing, str(path), None, allow)
        snapshot = logic.volumeSnapshot(logic.loadVolumeFile(path), allowNonCT=allow)
        prepared = logic.prepareVolume(snapshot, model, allowNonCT=allow)
        np.testing.assert_array_equal(cli_volume, prepared.volume)
        assert prepared.preprocessing["window"] == ("percentile" if allow else "wide")
        assert "9 slices of 30x28 voxels" in description


def test_the_catalogue_is_documented_in_data_md():
    table = DATA_DOC.read_text(encoding="utf-8")
    for row in [*VOLUMES, *MODELS]:
        assert f"| {row.name} |" in table, f"docs/DATA.md lacks the row '{row.name}'"
        assert row.words in table, f"docs/DATA.md lacks the words '{row.words}' of '{row.name}'"


# --- model folders and options --------------------------------------------------------------------


def edit_config(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / "ctmllm_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def weights(folder: Path) -> Path:
    return folder / "model.safetensors"


@dataclass(frozen=True)
class BadModel:
    name: str
    words: str
    damage: Callable[[Path], None]


MODELS = [
    BadModel("weights file missing", "has no model.safetensors", lambda f: weights(f).unlink()),
    BadModel("weights file empty", "is empty (0 bytes)", lambda f: weights(f).write_bytes(b"")),
    BadModel("weights file truncated", "not a complete safetensors file", lambda f: weights(f).write_bytes(weights(f).read_bytes()[:5000])),
    BadModel("weights file corrupt", "not a complete safetensors file", lambda f: weights(f).write_bytes(b"\x00garbage" * 64)),
    BadModel("weights file unreadable (permission)", "permission denied", lambda f: weights(f).rename(f / "model.safetensors.denied")),
    BadModel("tokenizer missing", "has no tokenizer files", lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")]),
    BadModel("config not JSON", "is not valid JSON", lambda f: (f / "ctmllm_config.json").write_text("{oops", encoding="utf-8")),
    BadModel("max_new_tokens a string", "generation.max_new_tokens='256' is a string; use an integer", lambda f: edit_config(f, lambda d: d["generation"].update(max_new_tokens="256"))),
    BadModel("num_3d_blocks a string", "volume.num_3d_blocks='2' is a string; use an integer", lambda f: edit_config(f, lambda d: d["volume"].update(num_3d_blocks="2"))),
    BadModel("generation a list", "generation=[256] is a list", lambda f: edit_config(f, lambda d: d.update(generation=[256]))),
    BadModel("mllm_config null", "mllm_config=None is null", lambda f: edit_config(f, lambda d: d.update(mllm_config=None))),
    BadModel("unknown model type", "model_type='qwen9_vision' is not a model type", lambda f: edit_config(f, lambda d: d["mllm_config"].update(model_type="qwen9_vision"))),
    BadModel("bad preprocessing window", "preprocessing: window='purple'", lambda f: edit_config(f, lambda d: d.update(preprocessing={"window": "purple"}))),
]  # fmt: skip


@pytest.fixture
def broken_model(request, tiny_model_dir, tmp_path, monkeypatch) -> tuple[BadModel, Path]:
    row: BadModel = request.param
    folder = tmp_path / "models" / "broken"
    shutil.copytree(tiny_model_dir, folder)
    row.damage(folder)
    if "permission" in row.name:  # root reads everything: the weights file refuses reads as the OS would
        (folder / "model.safetensors.denied").rename(weights(folder))

        def guarded_open(file, *args, **kwargs):
            if Path(str(file)) == weights(folder):
                raise PermissionError(13, "Permission denied", str(file))
            return open(file, *args, **kwargs)

        monkeypatch.setattr(data_files, "open", guarded_open, raising=False)
    return row, folder


@pytest.mark.parametrize("broken_model", MODELS, ids=[slug(r.name) for r in MODELS], indirect=True)
def test_broken_model_folders_get_the_projects_words_everywhere(broken_model, tmp_path, capsys, monkeypatch):
    from CTMLLMSlicerLib import batch_scene
    from model_core.config import ConfigError
    from model_core.hub import load_model
    from model_core.model_files import ModelLoadError

    row, folder = broken_model
    with pytest.raises((ConfigError, ModelLoadError)) as api:
        load_model(folder, device="cpu")
    assert row.words in str(api.value)

    volume = tmp_path / "case.npy"
    np.save(volume, np.random.default_rng(0).random((1, 9, 32, 32), dtype=np.float32))
    assert cli_main(["generate", "--model", str(folder), "--volume", str(volume), "--device", "cpu"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after "read: ..." when the input was fine
    assert last.startswith("error: ") and row.words in last, last

    monkeypatch.setattr(batch_scene, "in_slicer_application", lambda: False)
    case = write(tmp_path / "case.nii.gz", ct())
    summary = run_batch(
        BatchOptions(case, tmp_path / "out", model=str(folder)), progress_stream=io.StringIO()
    )
    assert summary.exit_code == 2 and row.words in summary.setup_error
    assert "run could not start" in (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")

    with pytest.raises(ModelUnavailableError) as shown:
        CTMLLMLogicCore(None).loadModel(ModelRequest(str(folder), device="cpu"))
    assert row.words in str(shown.value)


def test_a_relative_path_that_does_not_exist_is_not_sent_to_the_hub(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_network(*_args, **_kwargs):
        raise AssertionError("a path must never be looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # models/ct3d reads as a path here, not as the repo "models/ct3d"
    for spec in ("models/ct3d", "./ct3d", "a/b/c"):
        assert cli_main(["generate", "--model", spec, "--volume", "x.npy", "--allow-download"]) == 2
        err = capsys.readouterr().err
        assert "does not exist" in err and "check the path" in err and "Hub" not in err, err
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        CTMLLMLogicCore(None).loadModel(ModelRequest("models/ct3d"))


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens=0: use an integer of at least 1"),
        (["--prompt", "Is there a lesion\udcff?"], "--prompt holds bytes that are not UTF-8"),
        (["--prompt", "   "], "--prompt is empty"),
    ],
    ids=["max_new_tokens_0", "prompt_not_utf8", "prompt_empty"],
)
def test_bad_options_are_one_line_errors(options, words, tiny_model_dir, tmp_path, capsys):
    volume = tmp_path / "case.npy"
    np.save(volume, np.random.default_rng(0).random((1, 9, 32, 32), dtype=np.float32))
    code = cli_main(["generate", "--model", str(tiny_model_dir), "--volume", str(volume), *options])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and words in err, err
