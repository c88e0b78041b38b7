"""DICOM as scanners and PACS export it: blank UIDs, no extensions, compressed pixels, scouts, tilt.

Every export is written here by ``model_core.data.dicom_write`` (nothing from ../shared); each
test reads it with ``read_ct`` and checks the voxels, the geometry and what the reader said.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from model_core.data import (
    DicomSeriesError,
    NotCTError,
    UnreadableVolumeError,
    dicom_read,
    read_ct,
    scan_dicom_folder,
)
from model_core.data.dicom import BY_ATTRIBUTES, BY_UID
from model_core.data.dicom_write import (
    LOCALIZER,
    TRANSFER_SYNTAXES,
    ct_phantom,
    tilted_directions,
    write_dicom_series,
)

SPACING = (0.8, 0.9, 2.5)
CORONAL = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # rows run toward the feet: a scout plane


def blank_uid_export(folder: Path, array: np.ndarray, **options) -> list[Path]:
    """An anonymized export: empty series and study UIDs, files without an extension, one frame of reference."""
    options = {"name_prefix": "IM", "frame_of_reference_uid": "1.2.3.4", **options}
    return write_dicom_series(folder, array, SPACING, series_uid="", study_uid="", extension="", **options)


@pytest.mark.parametrize("syntax", list(TRANSFER_SYNTAXES))
def test_each_transfer_syntax_reads_back_exactly(tmp_path, syntax):
    if syntax == "jpeg-ls":
        pytest.importorskip("jpeg_ls", reason="writing JPEG-LS test files needs pyjpegls")
    array = ct_phantom((6, 24, 20))
    files = write_dicom_series(tmp_path, array, SPACING, transfer_syntax=syntax)
    assert str(pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID) == TRANSFER_SYNTAXES[syntax]
    ct = read_ct(tmp_path)
    np.testing.assert_array_equal(ct.array, array)
    np.testing.assert_allclose(ct.spacing, SPACING[::-1])


def test_blank_uids_without_extensions_group_by_series_attributes_and_say_so(tmp_path):
    array = ct_phantom((8, 24, 20))
    blank_uid_export(tmp_path / "DICOM", array, transfer_syntax="jpeg2000")
    (series,) = scan_dicom_folder(tmp_path)
    assert series.grouping == BY_ATTRIBUTES and series.uid.startswith("no-uid-1-") and series.num_slices == 8
    ct = read_ct(tmp_path)
    np.testing.assert_array_equal(ct.array, array)
    assert ct.series_uid == series.uid and ct.series_grouping == BY_ATTRIBUTES
    assert any("SeriesInstanceUID empty or missing" in w for w in ct.warnings)
    assert read_ct(tmp_path, series_uid=series.uid).shape == array.shape  # the derived id selects it


def test_one_file_of_a_blank_uid_series_reads_the_whole_series(tmp_path):
    array = ct_phantom((7, 16, 16))
    files = blank_uid_export(tmp_path, array)
    ct = read_ct(files[3])
    np.testing.assert_array_equal(ct.array, array)


def test_dicomdir_layout_with_other_files_beside_it(tmp_path):
    array = ct_phantom((6, 16, 18))
    blank_uid_export(tmp_path / "DICOM" / "ST000001" / "SE000001", array)
    (tmp_path / "README.TXT").write_text("exported by the PACS", encoding="utf-8")
    (tmp_path / "DICOM" / "thumbnail.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    dicomdir = tmp_path / "DICOMDIR"
    index = pydicom.Dataset()
    index.file_meta = pydicom.dataset.FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    index.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    index.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    index.FileSetID = "EXPORT"
    index.save_as(dicomdir, enforce_file_format=True)
    np.testing.assert_array_equal(read_ct(tmp_path).array, array)
    np.testing.assert_array_equal(read_ct(dicomdir).array, array)  # the index file stands for its folder


def test_two_blank_uid_series_in_one_folder_are_told_apart(tmp_path):
    big, small = ct_phantom((9, 16, 16), seed=1), ct_phantom((5, 16, 16), seed=2)
    blank_uid_export(tmp_path, big, series_number=2, series_description="soft tissue", name_prefix="A")
    blank_uid_export(tmp_path, small, series_number=3, series_description="lung", name_prefix="B")
    found = scan_dicom_folder(tmp_path)
    assert sorted(s.num_slices for s in found) == [5, 9] and all(s.usable for s in found)
    ct = read_ct(tmp_path)
    np.testing.assert_array_equal(ct.array, big)
    assert any("holds 2 series" in w and "'lung'" in w for w in ct.warnings)


def test_a_scout_beside_the_ct_is_skipped_with_a_note(tmp_path):
    array = ct_phantom((6, 16, 16))
    write_dicom_series(tmp_path, array, SPACING, series_description="axial")
    write_dicom_series(
        tmp_path, ct_phantom((1, 20, 16)), (1.0, 1.0, 1.0), (0, 0, 0), CORONAL,
        image_type=LOCALIZER, series_description="topogram", name_prefix="scout_",
    )  # fmt: skip
    scout = next(s for s in scan_dicom_folder(tmp_path) if s.localizer)
    assert scout.num_slices == 1
    ct = read_ct(tmp_path)
    np.testing.assert_array_equal(ct.array, array)
    assert any("skipped 1 localizer (scout) series" in w and "topogram" in w for w in ct.warnings)


def test_a_scout_inside_the_ct_series_is_split_off(tmp_path):
    array = ct_phantom((6, 16, 16))
    files = write_dicom_series(tmp_path, array, SPACING, series_description="axial")
    uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    write_dicom_series(
        tmp_path, ct_phantom((1, 20, 16)), (1.0, 1.0, 1.0), (0, 0, 0), CORONAL,
        image_type=LOCALIZER, series_uid=uid, name_prefix="scout_",
    )  # fmt: skip
    main = next(s for s in scan_dicom_folder(tmp_path) if s.uid == uid)
    assert main.usable and main.num_slices == 6
    ct = read_ct(tmp_path)
    np.testing.assert_array_equal(ct.array, array)
    assert ct.series_uid == uid and ct.series_grouping == BY_UID
    assert any(f"split off as {uid}#localizer" in w for w in ct.warnings)


def test_missing_and_duplicate_slices_are_refused_naming_the_problem(tmp_path):
    files = blank_uid_export(tmp_path / "missing", ct_phantom((6, 16, 16)))
    files[2].unlink()
    with pytest.raises(DicomSeriesError, match=r"gap.*missing slices"):
        read_ct(tmp_path / "missing")
    files = blank_uid_export(tmp_path / "duplicate", ct_phantom((6, 16, 16)))
    copy = pydicom.dcmread(files[2])
    copy.SOPInstanceUID = pydicom.uid.generate_uid()
    copy.save_as(tmp_path / "duplicate" / "IM_copy")
    with pytest.raises(DicomSeriesError, match="repeat a slice position"):
        read_ct(tmp_path / "duplicate")


def test_two_acquisitions_at_the_same_positions_are_split_by_acquisition_number(tmp_path):
    first, second = ct_phantom((6, 16, 16), seed=1), ct_phantom((6, 16, 16), seed=2)
    blank_uid_export(tmp_path, first, acquisition_number=1, name_prefix="A")
    blank_uid_export(tmp_path, second, acquisition_number=2, name_prefix="B")
    found = scan_dicom_folder(tmp_path)
    assert len(found) == 2 and all(s.usable and "acquisition number" in s.grouping for s in found)
    ct = read_ct(tmp_path)
    assert any("split into 2 acquisitions" in w for w in ct.warnings)


def hu_ramp(points: np.ndarray) -> np.ndarray:
    """A CT-like linear field (HU) of LPS positions (..., 3): resampling it linearly is exact."""
    return 8.0 * points[..., 0] + 10.0 * points[..., 1] + 4.0 * points[..., 2] - 200.0


def voxel_positions(origin, direction, spacing_xyz, shape_kji) -> np.ndarray:
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    index = np.stack([i, j, k], axis=-1) * np.asarray(spacing_xyz)
    return np.asarray(origin) + index @ np.asarray(direction).T


def test_a_tilted_gantry_series_is_resampled_to_its_true_geometry(tmp_path):
    tilt, origin, spacing = 15.0, (-20.0, -25.0, 10.0), (1.0, 1.2, 2.5)
    shape = (20, 40, 36)
    acquired = voxel_positions(origin, tilted_directions(np.eye(3), tilt), spacing, shape)
    write_dicom_series(
        tmp_path, np.rint(hu_ramp(acquired)).astype(np.int16), spacing, origin, gantry_tilt_deg=tilt
    )
    (series,) = scan_dicom_folder(tmp_path)
    assert (
        series.usable and series.tilt is not None and series.tilt.angle_deg == pytest.approx(tilt, abs=0.01)
    )
    ct = read_ct(tmp_path)
    assert any("gantry was tilted 15.0 degrees" in w and "resampled" in w for w in ct.warnings)
    positions = voxel_positions(ct.origin, ct.direction, ct.spacing_xyz, ct.shape)
    inside = ct.array > ct.array.min() + 1
    core = inside.copy()
    for axis in range(3):  # away from the edges, where interpolation meets the air fill
        core &= np.roll(inside, 1, axis) & np.roll(inside, -1, axis)
    core[[0, -1]] = False
    assert core.mean() > 0.5
    np.testing.assert_allclose(ct.array[core], hu_ramp(positions)[core], atol=0.6)  # within int16 rounding


def test_pydicom_decodes_when_simpleitk_cannot(tmp_path, monkeypatch):
    array = ct_phantom((5, 16, 16))
    write_dicom_series(tmp_path, array, SPACING, transfer_syntax="rle")

    def no_codec(*_args):
        raise RuntimeError("GDCM: no codec for this transfer syntax")

    monkeypatch.setattr(dicom_read, "_read_with_itk", no_codec)
    ct = read_ct(tmp_path)
    np.testing.assert_array_equal(ct.array, array)
    np.testing.assert_allclose(ct.spacing, SPACING[::-1])
    assert any("decoded with pydicom instead" in w and "RLE Lossless" in w for w in ct.warnings)


def test_a_transfer_syntax_no_decoder_reads_is_named_with_the_fix(tmp_path):
    files = write_dicom_series(tmp_path, ct_phantom((5, 16, 16)), SPACING, transfer_syntax="jpeg2000")
    for path in files:  # relabel as JPEG XL, which nothing here decodes
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.110"
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True, force_encoding=True)
    with pytest.raises(UnreadableVolumeError, match=r"compressed as JPEG XL Lossless.*convert the series"):
        read_ct(tmp_path)


def test_a_series_labelled_mr_is_refused_however_it_is_chosen(tmp_path):
    files = write_dicom_series(tmp_path, ct_phantom((5, 16, 16)), SPACING, modality="MR")
    for target in (tmp_path, files[2]):  # the folder, and one file of it
        with pytest.raises(NotCTError, match="MR"):
            read_ct(target)
        assert read_ct(target, allow_non_ct=True).shape == (5, 16, 16)


def test_exports_without_preamble_are_still_found(tmp_path):
    files = write_dicom_series(tmp_path / "src", ct_phantom((5, 16, 16)), SPACING, extension="")
    for path in files:  # raw data sets, as some old archives store them
        ds = pydicom.dcmread(path)
        pydicom.dcmwrite(tmp_path / path.name, ds, enforce_file_format=False)
    shutil.rmtree(tmp_path / "src")
    assert read_ct(tmp_path).shape == (5, 16, 16)
