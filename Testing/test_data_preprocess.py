"""Preprocessing: each named step on tiny arrays with known answers, then the chain on real CT."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import SHARED_CT, needs_shared_ct

from model_core.config import ConfigError
from model_core.data import (
    WINDOW_PRESETS,
    CTImage,
    NotCTError,
    PreprocessConfig,
    load_volume,
    preprocess,
    read_ct,
)
from model_core.data.preprocess import (
    crop_foreground,
    normalise,
    orient,
    resample,
    resize_to_grid,
    window,
    window_from_width_level,
)


def body_phantom() -> CTImage:
    """Air (-1000) with a soft-tissue box (z 2..5, y 3..8, x 4..11) and a separate 1-voxel speck."""
    array = np.full((8, 12, 16), -1000, np.int16)
    array[2:6, 3:9, 4:12] = 40
    array[6, 10, 14] = 200
    return CTImage.from_array(array, (0.5, 0.75, 2.0), (10.0, 20.0, 30.0), np.eye(3), source="phantom")


def test_window_presets_are_the_radiological_windows():
    assert WINDOW_PRESETS["soft_tissue"] == (-160.0, 240.0)  # W400 / L40
    assert WINDOW_PRESETS["lung"] == (-1350.0, 150.0)  # W1500 / L-600
    assert WINDOW_PRESETS["bone"] == (-500.0, 1300.0)  # W1800 / L400
    assert WINDOW_PRESETS["wide"] == (-1000.0, 1000.0)
    assert WINDOW_PRESETS["body"] == (-400.0, 300.0)  # W700 / L-50
    assert window_from_width_level(80, 40) == (0.0, 80.0)
    assert (
        next(iter(WINDOW_PRESETS)) == PreprocessConfig().window == "wide"
    )  # callers take the first as default


def test_config_validates_and_round_trips():
    with pytest.raises(ConfigError, match="wide, soft_tissue, lung, bone, body, percentile"):
        PreprocessConfig(window="brain")
    with pytest.raises(ConfigError, match="low < high"):
        PreprocessConfig(window=(100, -100))
    with pytest.raises(ConfigError, match="target_shape"):
        PreprocessConfig(target_shape=(0, 256, 256))
    with pytest.raises(ConfigError, match="spacing"):
        PreprocessConfig(spacing=(1.0, -1.0, 1.0))
    config = PreprocessConfig(
        window=(-200, 300), target_shape=(8, 32, 32), spacing=(2, 1, 1), crop_foreground=True
    )
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["window"] == [-200.0, 300.0] and stored["target_shape"] == [8, 32, 32]
    assert PreprocessConfig.from_dict(stored) == config
    with pytest.raises(ConfigError, match="unknown keys"):
        PreprocessConfig.from_dict({**stored, "colour": "red"})


def test_window_then_normalise_maps_the_window_onto_0_1_exactly():
    hu = np.array([-3000, -1000, 0, 500, 1000, 3000], np.int16)
    clipped = window(hu, -1000, 1000)
    np.testing.assert_array_equal(clipped, [-1000, -1000, 0, 500, 1000, 1000])
    scaled = normalise(clipped, -1000, 1000)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [0, 0, 0.5, 0.75, 1, 1])
    assert normalise(np.array([-5.0, 5.0]), -1, 1).tolist() == [0.0, 1.0]


def test_resize_averages_blocks_when_shrinking_and_interpolates_when_growing():
    volume = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    shrunk = resize_to_grid(volume, (2, 2, 2))
    expected = volume.reshape(2, 2, 2, 2, 2, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(shrunk, expected)
    grown = resize_to_grid(np.array([[[0.0, 1.0]]] * 3, np.float32), (3, 1, 4))
    np.testing.assert_allclose(grown[0, 0], [0.0, 0.25, 0.75, 1.0])
    assert resize_to_grid(volume, (6, 2, 5)).shape == (6, 2, 5)


def test_resample_keeps_the_extent_and_origin():
    ct = body_phantom()
    fine = resample(ct, (1.0, 0.75, 0.5))
    assert fine.shape == (16, 12, 16) and fine.spacing == (1.0, 0.75, 0.5)
    assert fine.origin == ct.origin and fine.array.dtype == np.float32
    assert fine.array[0, 0, 0] == -1000 and fine.array[6, 5, 6] == 40  # z 3 mm: inside the box


def test_crop_foreground_keeps_the_body_and_moves_the_origin():
    ct = body_phantom()
    cropped = crop_foreground(ct)
    assert cropped.shape == (4, 6, 8)  # the speck is a separate, smaller region
    assert (cropped.array == 40).all()
    np.testing.assert_allclose(cropped.origin, (10.0 + 4 * 0.5, 20.0 + 3 * 0.75, 30.0 + 2 * 2.0))
    blank = dataclasses.replace(ct, array=np.full(ct.shape, -1000, np.int16))
    assert crop_foreground(blank).shape == ct.shape and "skipped" in crop_foreground(blank).warnings[-1]


def test_orient_fixes_a_ct_built_in_another_orientation():
    ct = body_phantom()
    flipped = dataclasses.replace(
        ct, array=ct.array[:, :, ::-1].copy(), direction=np.diag([-1.0, 1.0, 1.0]), origin=(17.5, 20.0, 30.0)
    )
    assert flipped.orientation == "RPS"
    fixed = orient(flipped)
    assert fixed.orientation == "LPS"
    np.testing.assert_array_equal(fixed.array, ct.array)
    np.testing.assert_allclose(fixed.origin, ct.origin)


def test_preprocess_small_grid_and_soft_tissue_window():
    volume = preprocess(body_phantom(), PreprocessConfig(window="soft_tissue", target_shape=(4, 6, 8)))
    assert volume.shape == (4, 6, 8) and volume.dtype == np.float32
    assert volume.min() == 0.0 and volume.max() <= 1.0
    assert volume[2, 3, 4] == pytest.approx((40 + 160) / 400)  # the body box centre: W400/L40


def test_preprocess_checks_in_memory_volumes_too():
    ct = body_phantom()
    with pytest.raises(NotCTError):
        preprocess(dataclasses.replace(ct, array=(ct.array + 1000).astype(np.float32) / 2000))


@needs_shared_ct
@pytest.mark.parametrize("name", ["abdomen_ct_3mm.nii.gz", "cardiac_cta_1p5mm.nii.gz"])
def test_real_ct_becomes_the_m3d_grid(name):
    volume, ct = load_volume(SHARED_CT / name)
    assert volume.shape == (32, 256, 256) and volume.dtype == np.float32
    assert volume.min() == 0.0 and volume.max() <= 1.0  # air is below -1000 HU
    assert ct.orientation == "LPS" and ct.array.dtype == np.int16  # the CT read is still in HU
    lung = preprocess(ct, PreprocessConfig(window="lung", crop_foreground=True, spacing=(3.0, 3.0, 3.0)))
    assert lung.shape == (32, 256, 256) and 0.0 <= lung.min() and lung.max() == 1.0


@needs_shared_ct
def test_mr_needs_the_override_in_preprocessing_as_well():
    path = SHARED_CT / "not_ct_mr_3mm.nii.gz"
    with pytest.raises(NotCTError, match="allow_non_ct=True"):
        load_volume(path, PreprocessConfig(target_shape=(4, 16, 16)))
    mr = read_ct(path, allow_non_ct=True)
    with pytest.raises(NotCTError):
        preprocess(mr, PreprocessConfig(target_shape=(4, 16, 16)))
    config = PreprocessConfig(
        window="percentile", target_shape=(20, 91, 117), allow_non_ct=True
    )  # native grid
    volume, mr = load_volume(path, config)
    low, high = np.percentile(mr.array, [0.5, 99.5])  # scaled by its own 0.5-99.5th percentiles
    np.testing.assert_allclose(volume, np.clip((mr.array - low) / (high - low), 0, 1), atol=1e-6)
