"""Reading CT: real NIfTI files, DICOM series written here, orientation, spacing and every refusal."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_CT, needs_shared_ct

from model_core.data import (
    CTImage,
    CTInputError,
    DicomSeriesError,
    EmptyVolumeError,
    InvalidValuesError,
    NotCTError,
    TooFewSlicesError,
    UnreadableVolumeError,
    read_ct,
    slabs,
    write_dicom_series,
)
from model_core.data.slabs import shrink_factors

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# x axis toward the patient's right, z toward the feet: a non-LPS DICOM acquisition.
FLIPPED_XZ = np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, -1]])


def ct_like(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 HU with air (-1000) and tissue (-100..900); no two voxels need be equal."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(-100, 900, size=shape).astype(np.int16)
    volume[..., :2] = -1000
    return volume


@pytest.fixture
def dicom_ct(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 5-slice CT series stored with x toward R and z toward the feet, 0.7 x 0.8 x 2.5 mm."""
    array = ct_like((5, 6, 7))
    write_dicom_series(
        tmp_path / "ct", array, (0.7, 0.8, 2.5), (10.0, 20.0, 30.0), FLIPPED_XZ, series_description="ax"
    )
    return tmp_path / "ct", array


# --- real NIfTI files ---------------------------------------------------------------------------


@needs_shared_ct
def test_nifti_stored_ras_is_read_lps_with_slice_0_inferior():
    path = SHARED_CT / "abdomen_ct_3mm.nii.gz"
    raw = sitk.ReadImage(str(path))  # stored RAS: x toward the left... of the viewer, i.e. patient's right
    ct = read_ct(path)
    assert ct.shape == (30, 101, 122)
    assert ct.spacing == (3.0, 3.0, 3.0)
    assert ct.orientation == "LPS"
    np.testing.assert_allclose(ct.direction, np.eye(3), atol=1e-6)
    # LPS flips x and y of the stored grid: voxel [0, 0, 0] is the stored voxel (121, 100, 0).
    np.testing.assert_allclose(ct.origin, raw.TransformIndexToPhysicalPoint((121, 100, 0)), atol=1e-4)
    np.testing.assert_array_equal(ct.array, sitk.GetArrayFromImage(raw)[:, ::-1, ::-1])
    assert ct.array.dtype == np.int16 and int(ct.array.min()) == -1100  # HU kept, not windowed
    assert ct.series_uid is None and ct.warnings == []


@needs_shared_ct
def test_every_voxel_keeps_its_physical_position():
    path = SHARED_CT / "torso_ct_3mm.nii.gz"
    raw = sitk.ReadImage(str(path))
    ct = read_ct(path)
    oriented = ct.to_sitk()
    for index_xyz in [(0, 0, 0), (5, 17, 100), (121, 100, 111)]:
        point = oriented.TransformIndexToPhysicalPoint(index_xyz)
        assert oriented[index_xyz] == raw[raw.TransformPhysicalPointToIndex(point)]
    # z grows with the slice index: the last slice is the most superior.
    assert oriented.TransformIndexToPhysicalPoint((0, 0, 111))[2] > ct.origin[2]


@needs_shared_ct
def test_nifti_already_lps_is_unchanged():
    path = SHARED_CT / "cardiac_cta_1p5mm.nii.gz"
    raw = sitk.ReadImage(str(path))
    ct = read_ct(path)
    assert ct.shape == (164, 126, 120) and ct.spacing == (1.5, 1.5, 1.5)
    np.testing.assert_array_equal(ct.array, sitk.GetArrayFromImage(raw))
    np.testing.assert_allclose(ct.origin, raw.GetOrigin())


@needs_shared_ct
def test_mr_volume_is_refused_as_not_ct_and_accepted_with_override():
    path = SHARED_CT / "not_ct_mr_3mm.nii.gz"
    with pytest.raises(NotCTError) as refused:
        read_ct(path)
    message = str(refused.value)
    assert "not_ct_mr_3mm.nii.gz" in message and "allow_non_ct=True" in message and "-1000 HU" in message
    assert isinstance(refused.value, CTInputError)
    ct = read_ct(path, allow_non_ct=True)
    assert ct.shape == (20, 91, 117) and ct.spacing == (3.0, 3.0, 3.0)
    assert len(ct.warnings) == 1 and "allow_non_ct=True" in ct.warnings[0]


@needs_shared_ct
def test_huge_volume_is_block_averaged_while_read(tmp_path, monkeypatch):
    monkeypatch.setattr(slabs, "MIN_SLAB_VOXELS", 0)  # slabs of 2 slices: many reads, as for a huge file
    path = tmp_path / "torso.nii"  # uncompressed: each slab read seeks instead of decompressing again
    sitk.WriteImage(sitk.ReadImage(str(SHARED_CT / "torso_ct_3mm.nii.gz")), str(path))
    ct = read_ct(path, max_voxels=100_000)
    assert ct.array.size <= 100_000
    assert ct.shape == (56, 33, 40) and ct.spacing == (6.0, 9.0, 9.0)  # blocks of 3x3x2 (x, y, z)
    whole = sitk.BinShrink(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32), [3, 3, 2])
    expected = sitk.DICOMOrient(whole, "LPS")
    np.testing.assert_array_equal(ct.array, sitk.GetArrayFromImage(expected))
    np.testing.assert_allclose(ct.origin, expected.GetOrigin())
    assert "max_voxels=100,000" in ct.warnings[0] and "3x3x2" in ct.warnings[0]


def test_shrink_factors_coarsen_the_finest_axis_first():
    # 0.5 mm in-plane, 3 mm slices: in-plane blocks grow until they pass the slice spacing.
    assert shrink_factors((512, 512, 100), (0.5, 0.5, 3.0), 512 * 512 * 100) == (1, 1, 1)
    assert shrink_factors((512, 512, 100), (0.5, 0.5, 3.0), 128 * 128 * 100) == (4, 4, 1)
    factors = shrink_factors((512, 512, 4), (1.0, 1.0, 1.0), 1000)
    assert 4 // factors[2] >= 3  # never below 3 slices


# --- Slicer's in-memory volumes -------------------------------------------------------------------


@needs_shared_ct
@pytest.mark.parametrize("name", ["abdomen_ct_3mm.nii.gz", "cardiac_cta_1p5mm.nii.gz"])
def test_from_ijk_to_ras_equals_reading_the_file(name):
    raw = sitk.ReadImage(str(SHARED_CT / name))
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.reshape(raw.GetDirection(), (3, 3)) @ np.diag(raw.GetSpacing())
    ijk_to_lps[:3, 3] = raw.GetOrigin()
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps
    held = CTImage.from_ijk_to_ras(sitk.GetArrayFromImage(raw), ijk_to_ras, source=name)
    read = read_ct(SHARED_CT / name)
    np.testing.assert_array_equal(held.array, read.array)
    np.testing.assert_allclose(held.spacing, read.spacing)
    np.testing.assert_allclose(held.origin, read.origin, atol=1e-6)
    np.testing.assert_allclose(held.direction, read.direction, atol=1e-9)
    np.testing.assert_allclose(
        read.ijk_to_ras(), CTImage.from_ijk_to_ras(read.array, read.ijk_to_ras()).ijk_to_ras()
    )


@needs_shared_ct
def test_volume_loaded_by_slicer_core_matches_read_ct():
    slicer = pytest.importorskip("slicer", reason="slicer-core not installed")
    slicer_util = pytest.importorskip("slicer.util")
    vtk = pytest.importorskip("vtk")

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app)
    colors.SetMRMLScene(scene)
    app.SetModuleLogic("Colors", colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLApplicationLogic(app)
    volumes.SetMRMLScene(scene)
    node = volumes.AddArchetypeVolume(str(SHARED_CT / "abdomen_ct_3mm.nii.gz"), "abdomen")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]
    held = CTImage.from_ijk_to_ras(slicer_util.arrayFromVolume(node), ijk_to_ras)
    read = read_ct(SHARED_CT / "abdomen_ct_3mm.nii.gz")
    np.testing.assert_array_equal(held.array, read.array)
    np.testing.assert_allclose(held.origin, read.origin, atol=1e-4)
    np.testing.assert_allclose(held.ijk_to_ras(), read.ijk_to_ras(), atol=1e-4)


# --- DICOM ------------------------------------------------------------------------------------------


def test_dicom_series_is_read_lps_with_known_spacing(dicom_ct):
    folder, array = dicom_ct
    ct = read_ct(folder)
    assert ct.shape == (5, 6, 7)
    np.testing.assert_allclose(ct.spacing, (2.5, 0.8, 0.7))
    np.testing.assert_allclose(ct.direction, np.eye(3), atol=1e-6)
    # Stored x toward R and z toward the feet: LPS reverses both; voxel [0,0,0] was stored (6, 0, 4).
    np.testing.assert_array_equal(ct.array, array[::-1, :, ::-1])
    np.testing.assert_allclose(ct.origin, (10.0 - 6 * 0.7, 20.0, 30.0 - 4 * 2.5), atol=1e-4)
    assert ct.series_uid and ct.warnings == []


def test_one_file_of_a_series_reads_the_whole_series(dicom_ct):
    folder, array = dicom_ct
    ct = read_ct(folder / "slice_0003.dcm")
    np.testing.assert_array_equal(ct.array, array[::-1, :, ::-1])


def test_folder_with_several_series_takes_the_ct_with_most_slices(tmp_path):
    big, small, mr = ct_like((5, 6, 7), 1), ct_like((3, 6, 7), 2), ct_like((8, 6, 7), 3) + 1000
    write_dicom_series(tmp_path / "a", big, (1, 1, 2), series_uid="1.2.3.5")
    write_dicom_series(tmp_path / "b", small, (1, 1, 2), series_uid="1.2.3.3")
    write_dicom_series(tmp_path / "c", mr, (1, 1, 2), series_uid="1.2.3.8", modality="MR")
    ct = read_ct(tmp_path)
    assert ct.series_uid == "1.2.3.5" and ct.shape == (5, 6, 7)
    assert len(ct.warnings) == 1
    assert (
        "holds 3 series" in ct.warnings[0] and "1.2.3.3" in ct.warnings[0] and "1.2.3.8 (MR" in ct.warnings[0]
    )
    assert read_ct(tmp_path, series_uid="1.2.3.3").shape == (3, 6, 7)
    with pytest.raises(
        DicomSeriesError, match=r"no series with UID 9\.9; found: 1\.2\.3\.3 \(CT, 3 slice.*1\.2\.3\.5"
    ):
        read_ct(tmp_path, series_uid="9.9")


def test_folder_with_only_mr_is_refused_unless_allowed(tmp_path):
    write_dicom_series(tmp_path, ct_like((4, 6, 7)) + 1000, (1, 1, 2), series_uid="1.2.7", modality="MR")
    with pytest.raises(NotCTError, match=r"no CT series.*1\.2\.7 \(MR.*allow_non_ct=True"):
        read_ct(tmp_path)
    ct = read_ct(tmp_path, allow_non_ct=True)
    assert ct.series_uid == "1.2.7" and any("allow_non_ct=True" in w for w in ct.warnings)


def test_series_with_a_missing_slice_is_refused_with_what_was_found(dicom_ct):
    folder, _ = dicom_ct
    (folder / "slice_0002.dcm").unlink()
    with pytest.raises(DicomSeriesError, match=r"4 slice\(s\).*gap"):
        read_ct(folder)


def test_series_mixing_image_sizes_is_refused(dicom_ct, tmp_path):
    folder, _ = dicom_ct
    uid = read_ct(folder).series_uid
    write_dicom_series(
        tmp_path / "other", ct_like((3, 9, 9)), (1, 1, 2), (0, 0, 0), FLIPPED_XZ, series_uid=uid
    )  # same orientation: a broken series, not a scout to split off
    shutil.copy(tmp_path / "other" / "slice_0000.dcm", folder / "stray.dcm")
    with pytest.raises(DicomSeriesError, match=r"mixed image sizes 6x7 \(5 file\(s\)\), 9x9 \(1 file\(s\)\)"):
        read_ct(folder)


def test_truncated_dicom_file_is_named(dicom_ct):
    folder, _ = dicom_ct
    damaged = folder / "slice_0001.dcm"
    damaged.write_bytes(damaged.read_bytes()[:-40])
    with pytest.raises(UnreadableVolumeError, match="slice_0001.dcm"):
        read_ct(folder)


def test_huge_dicom_series_is_read_in_bounded_slabs(dicom_ct, monkeypatch):
    monkeypatch.setattr(slabs, "MIN_SLAB_VOXELS", 0)  # slabs of 2, 2 and 1 files
    folder, _ = dicom_ct
    ct = read_ct(folder, max_voxels=100)
    assert ct.array.size <= 100 and ct.array.dtype == np.float32
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sorted(str(p) for p in folder.glob("*.dcm")))
    expected = sitk.DICOMOrient(
        sitk.BinShrink(sitk.Cast(reader.Execute(), sitk.sitkFloat32), [2, 1, 1]), "LPS"
    )
    np.testing.assert_array_equal(ct.array, sitk.GetArrayFromImage(expected))
    np.testing.assert_allclose(ct.spacing, (2.5, 0.8, 1.4))


def test_multi_frame_dicom_file_is_one_series(tmp_path):
    array = ct_like((5, 6, 7))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetMetaData("0008|0060", "CT")
    sitk.WriteImage(image, str(tmp_path / "enhanced.dcm"))  # one file, 5 frames
    ct = read_ct(tmp_path)
    np.testing.assert_array_equal(ct.array, array)
    np.testing.assert_allclose(ct.spacing, (2.5, 0.8, 0.7))


def test_empty_folder_says_what_to_pass(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    with pytest.raises(DicomSeriesError, match="no DICOM image files"):
        read_ct(tmp_path)


# --- broken and unsuitable files ----------------------------------------------------------------------


def write_volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz", "v.nrrd", "v.mha"])
def test_truncated_file_is_unreadable(tmp_path, name):
    path = write_volume(tmp_path / name, ct_like((6, 20, 20)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])
    with pytest.raises(UnreadableVolumeError, match=name.replace(".", r"\.")):
        read_ct(path)


def test_truncated_gzip_nifti_says_truncated(tmp_path):
    path = write_volume(tmp_path / "v.nii.gz", ct_like((6, 20, 20)))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UnreadableVolumeError, match="is truncated"):
        read_ct(path)
    with gzip.open(path) as stream:  # the header itself is intact: the check is on the data size
        assert len(stream.read(348)) == 348


def test_missing_and_non_image_files_are_unreadable(tmp_path):
    with pytest.raises(UnreadableVolumeError, match="does not exist"):
        read_ct(tmp_path / "absent.nii.gz")
    text = tmp_path / "report.txt"
    text.write_text("findings: none", encoding="utf-8")
    with pytest.raises(UnreadableVolumeError, match="cannot be read as an image"):
        read_ct(text)


def test_2d_image_and_thin_slab_are_refused(tmp_path):
    with pytest.raises(TooFewSlicesError, match="1 slice"):
        read_ct(write_volume(tmp_path / "slice.nii.gz", ct_like((1, 20, 20))[0]))
    with pytest.raises(TooFewSlicesError, match=r"2 voxel\(s\) along its slice \(z\) axis.*at least 3"):
        read_ct(write_volume(tmp_path / "slab.nii.gz", ct_like((2, 20, 20))))


def test_nan_and_constant_volumes_are_refused(tmp_path):
    volume = ct_like((4, 10, 10)).astype(np.float32)
    volume[1, 2, 3] = np.nan
    volume[2, 2, 3] = np.inf
    # NRRD keeps NaN/inf as stored (ITK's NIfTI reader turns them into 0).
    with pytest.raises(InvalidValuesError, match=r"nan\.nrrd: holds 1 NaN and 1 infinite"):
        read_ct(write_volume(tmp_path / "nan.nrrd", volume))
    with pytest.raises(InvalidValuesError, match=r"1 NaN and 1 infinite"):
        CTImage.from_array(volume, (1, 1, 1), (0, 0, 0), np.eye(3))
    with pytest.raises(EmptyVolumeError, match="every voxel has the value -1000"):
        read_ct(write_volume(tmp_path / "blank.nii.gz", np.full((4, 10, 10), -1000, np.int16)))


def test_normalised_image_is_not_ct(tmp_path):
    normalised = (ct_like((4, 10, 10)).astype(np.float32) + 1000) / 2000
    with pytest.raises(NotCTError, match="already normalised"):
        read_ct(write_volume(tmp_path / "norm.nii.gz", normalised))


def test_from_array_checks_like_a_file():
    with pytest.raises(TooFewSlicesError):
        CTImage.from_array(np.zeros((10, 10)), (1, 1, 1), (0, 0, 0), np.eye(3))
    with pytest.raises(CTInputError, match="spacing"):
        CTImage.from_array(ct_like((4, 5, 6)), (1, 0, 1), (0, 0, 0), np.eye(3))
    ct = CTImage.from_array(ct_like((4, 5, 6)), (0.5, 0.6, 2.0), (1, 2, 3), FLIPPED_XZ, source="memory")
    assert ct.orientation == "LPS" and ct.spacing == (2.0, 0.6, 0.5) and ct.source == "memory"
    np.testing.assert_array_equal(ct.array, ct_like((4, 5, 6))[::-1, :, ::-1])


# --- damage that readers let through silently ---------------------------------------------------------


def test_gzip_damaged_in_the_middle_is_refused_not_read_with_blank_slices(tmp_path):
    path = write_volume(tmp_path / "v.nii.gz", ct_like((30, 128, 128)))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))  # the end of the file (size, CRC) stays intact
    silent = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert (silent[-5:] == 0).all()  # what ITK (and Slicer) make of it: blank slices, no error
    with pytest.raises(UnreadableVolumeError, match=r"v\.nii\.gz: the gzip stream is damaged"):
        read_ct(path)


def test_a_nii_gz_that_is_not_gzip_says_so(tmp_path):
    plain = write_volume(tmp_path / "v.nii", ct_like((4, 10, 10)))
    misnamed = plain.rename(tmp_path / "v.nii.gz")
    with pytest.raises(
        UnreadableVolumeError, match="not gzip-compressed; it is an uncompressed NIfTI: rename"
    ):
        read_ct(misnamed)
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all" * 40)
    with pytest.raises(UnreadableVolumeError, match="not gzip-compressed; copy or export it again"):
        read_ct(tmp_path / "junk.nii.gz")


@pytest.mark.parametrize("name", ["nan.nii.gz", "nan.nii", "nan.nrrd", "nan.mha"])
def test_nan_and_inf_voxels_get_the_same_verdict_in_every_format(tmp_path, name):
    volume = ct_like((4, 10, 10)).astype(np.float32)
    volume[1, 2, 3] = np.nan
    volume[2, 2, 3] = -np.inf
    with pytest.raises(InvalidValuesError, match=r"holds 1 NaN and 1 infinite voxel\(s\) out of 400"):
        read_ct(write_volume(tmp_path / name, volume))


def test_an_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    from model_core.data import files

    path = write_volume(tmp_path / "v.nii.gz", ct_like((4, 10, 10)))

    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(files, "open", denied, raising=False)  # root reads everything: simulate the OS
    with pytest.raises(UnreadableVolumeError, match=r"v\.nii\.gz: cannot be read: permission denied"):
        read_ct(path)


def test_a_sheared_nifti_is_explained(tmp_path):
    import struct

    path = write_volume(tmp_path / "sheared.nii", ct_like((6, 20, 20)))
    header = bytearray(path.read_bytes())
    struct.pack_into("<2h", header, 252, 0, 1)  # qform_code 0, sform_code 1: only the sform counts
    struct.pack_into("<12f", header, 280, -1, 0, 0.5, 0, 0, -1, 0, 0, 0, 0, 2, 0)  # x leans on z
    path.write_bytes(bytes(header))
    with pytest.raises(UnreadableVolumeError, match="voxel axes are not perpendicular"):
        read_ct(path)
