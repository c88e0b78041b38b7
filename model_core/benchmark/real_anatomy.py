"""Real CT anatomy for the benchmark: the shared test volumes, read at run time, never committed.

Why: phantoms alone would let a model learn the generator's shapes. The same lesions are
inserted into real CT (``<repo>/../shared/data/ct``, or the folder named by ``$CTMLLM_CT_DIR``):
the abdomen volume has an organ label map (TotalSegmentator ids in ``organ_labels.json``); in the
cardiac CTA only the body and the lungs are found, by thresholds, so it receives lung lesions
only. The two volumes show two patients: train and validation use the abdomen, the test split the
cardiac CTA, so its real anatomy is unseen in training. The torso volume is left out: it is the
abdomen's patient again (the abdomen slab is its top 30 slices) and has no label map, so its liver,
spleen and kidneys could not take lesions and its lungs are the same lung bases.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from model_core.benchmark.anatomy import LABELS, LabelledVolume
from model_core.data.io import read_ct

CT_DIR_ENV = "CTMLLM_CT_DIR"
DEFAULT_CT_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct"

# Label-map organ names (organ_labels.json) -> benchmark label; names not listed become "body".
_ORGAN_NAME_TO_LABEL: dict[str, str] = {
    "liver": "liver",
    "spleen": "spleen",
    "kidney_right": "kidney_right",
    "kidney_cyst_right": "kidney_right",
    "kidney_left": "kidney_left",
    "kidney_cyst_left": "kidney_left",
    "lung_upper_lobe_left": "lung_left",
    "lung_lower_lobe_left": "lung_left",
    "lung_upper_lobe_right": "lung_right",
    "lung_middle_lobe_right": "lung_right",
    "lung_lower_lobe_right": "lung_right",
    "aorta": "aorta",
    "heart": "mediastinum",
    "stomach": "bowel",
    "small_bowel": "bowel",
    "duodenum": "bowel",
    "colon": "bowel",
}
_BONE_PREFIXES = (
    "vertebrae_",
    "rib_",
    "sacrum",
    "hip_",
    "femur_",
    "humerus_",
    "scapula_",
    "clavicula_",
    "sternum",
)
_MUSCLE_PREFIXES = ("gluteus_", "autochthon_", "iliopsoas_")

AIR_HU = -400.0  # below: air or lung
# Air components with a mean above this are lung (parenchyma with vessels, about -750 HU);
# gas in bowel and outside the body averages -880 HU or lower at these resolutions.
LUNG_MEAN_MIN_HU = -850.0
LUNG_MIN_ML = 20.0


@dataclass(frozen=True)
class RealVolumeSpec:
    """One shared CT file and how the benchmark uses it (``pool``: ``"train"`` or ``"test"``)."""

    name: str
    file: str
    label_file: str | None
    phase: str
    pool: str


REAL_VOLUMES: tuple[RealVolumeSpec, ...] = (
    RealVolumeSpec(
        "abdomen_ct_3mm", "abdomen_ct_3mm.nii.gz", "abdomen_ct_3mm_organs.nii.gz", "non-contrast", "train"
    ),
    RealVolumeSpec("cardiac_cta_1p5mm", "cardiac_cta_1p5mm.nii.gz", None, "arterial", "test"),
)


def ct_data_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder of the shared CT files: ``path``, else ``$CTMLLM_CT_DIR``, else ``<repo>/../shared/data/ct``."""
    folder = Path(path or os.environ.get(CT_DIR_ENV) or DEFAULT_CT_DIR)
    needed = [spec.file for spec in REAL_VOLUMES] + [s.label_file for s in REAL_VOLUMES if s.label_file]
    missing = [name for name in [*needed, "organ_labels.json"] if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"real-anatomy CT folder {folder} lacks {', '.join(missing)}; pass its location (--ct-dir or "
            f"${CT_DIR_ENV}), or build without --real-anatomy. The shared data lives at <repo>/../shared/data/ct."
        )
    return folder


def real_volume_specs(pool: str) -> list[RealVolumeSpec]:
    """The shared volumes that serve the ``"train"`` pool (train and validation) or the ``"test"`` pool."""
    specs = [spec for spec in REAL_VOLUMES if spec.pool == pool]
    if not specs:
        raise ValueError(f"pool={pool!r}: use 'train' or 'test'")
    return specs


def _labels_from_map(organ_map: np.ndarray, names: dict[int, str], hu: np.ndarray) -> np.ndarray:
    """Translate a TotalSegmentator-style label map into benchmark labels; ``(D, H, W)`` uint8."""
    lut = np.zeros(max(names) + 1, dtype=np.uint8)
    for index, name in names.items():
        if name in _ORGAN_NAME_TO_LABEL:
            lut[index] = LABELS[_ORGAN_NAME_TO_LABEL[name]]
        elif name.startswith(_BONE_PREFIXES):
            lut[index] = LABELS["bone"]
        elif name.startswith(_MUSCLE_PREFIXES):
            lut[index] = LABELS["muscle"]
        else:
            lut[index] = LABELS["body"]
    labels = lut[organ_map]
    labels[(organ_map == 0) & (hu > AIR_HU)] = LABELS["body"]
    return labels


def threshold_lungs(hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Lung mask by thresholds: air components (< -400 HU) of at least 20 ml whose mean is above -850 HU.

    Why the mean: lung parenchyma holds vessels and averages about -750 HU, while gas outside
    the body or in bowel averages -880 HU or lower, and lungs may touch the field of view's edge.
    """
    components = sitk.GetArrayFromImage(
        sitk.ConnectedComponent(sitk.GetImageFromArray((hu < AIR_HU).astype(np.uint8)))
    )
    count = int(components.max())
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sums = np.bincount(components.ravel(), weights=hu.ravel().astype(np.float64), minlength=count + 1)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    means = sums / np.maximum(sizes, 1)
    keep = (sizes * voxel_ml >= LUNG_MIN_ML) & (means > LUNG_MEAN_MIN_HU)
    keep[0] = False
    return keep[components]


def split_lungs(lungs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(right, left)`` lung masks, cut at the emptiest column (the mediastinum) of the middle half.

    Columns run from the patient's right to left, so the right lung lies at low column indices.
    """
    columns = lungs.sum(axis=(0, 1))
    filled = np.flatnonzero(columns)
    if filled.size == 0:
        return lungs.copy(), lungs.copy()
    low, high = filled[0], filled[-1]
    quarter = (high - low) // 4
    middle = np.arange(low + quarter, high - quarter + 1)
    cut = int(middle[np.argmin(columns[middle])])
    right = lungs.copy()
    right[:, :, cut:] = False
    return right, lungs & ~right


def _labels_by_threshold(hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Body and lungs only: everything above -400 HU is body; lungs from ``threshold_lungs``."""
    labels = np.where(hu > AIR_HU, LABELS["body"], LABELS["background"]).astype(np.uint8)
    right, left = split_lungs(threshold_lungs(hu, spacing_mm))
    labels[right] = LABELS["lung_right"]
    labels[left] = LABELS["lung_left"]
    return labels


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, folder: str) -> LabelledVolume:
    spec = next(s for s in REAL_VOLUMES if s.name == name)
    ct = read_ct(Path(folder) / spec.file)
    hu = ct.array.astype(np.float32)
    spacing = tuple(float(s) for s in ct.spacing)
    if spec.label_file is not None:
        organ_map = read_ct(Path(folder) / spec.label_file, allow_non_ct=True).array.astype(np.int64)
        names = {
            int(k): v
            for k, v in json.loads((Path(folder) / "organ_labels.json").read_text(encoding="utf-8")).items()
        }
        labels = _labels_from_map(organ_map, names, hu)
    else:
        labels = _labels_by_threshold(hu, spacing)
    hu.flags.writeable = False
    labels.flags.writeable = False
    return LabelledVolume(
        hu=hu, labels=labels, spacing_mm=spacing, phase=spec.phase, source=f"real:{spec.name}"
    )


def load_real_volume(name: str, ct_dir: str | os.PathLike | None = None) -> LabelledVolume:
    """One shared CT in the canonical orientation with benchmark labels (cached; arrays read-only)."""
    if name not in {spec.name for spec in REAL_VOLUMES}:
        raise ValueError(f"real volume {name!r} is unknown; use one of {[s.name for s in REAL_VOLUMES]}")
    return _load_cached(name, str(ct_data_dir(ct_dir).resolve()))


def estimate_noise_hu(volume: LabelledVolume) -> float:
    """Image noise (HU) from neighbouring-voxel differences in soft tissue (-100..200 HU), robust to edges."""
    hu = volume.hu
    soft = (hu > -100) & (hu < 200)
    pairs = soft[:, :, 1:] & soft[:, :, :-1]
    differences = np.abs(np.diff(hu, axis=2))[pairs]
    if differences.size == 0:
        return 15.0
    return float(np.median(differences) / 0.6745 / np.sqrt(2.0))


def random_crop(
    volume: LabelledVolume, rng: np.random.Generator, keep: tuple[float, float] = (0.85, 1.0)
) -> LabelledVolume:
    """A random sub-box keeping 85-100% of each axis, so real studies differ in field of view."""
    slices = []
    for size in volume.hu.shape:
        length = max(3, int(round(size * rng.uniform(*keep))))
        start = int(rng.integers(0, size - length + 1))
        slices.append(slice(start, start + length))
    box = tuple(slices)
    return replace(volume, hu=volume.hu[box].copy(), labels=volume.labels[box].copy())


def resize_to_grid(volume: LabelledVolume, grid: tuple[int, int, int]) -> LabelledVolume:
    """Resample to ``grid`` ``(D, H, W)`` over the same extent (linear HU, nearest labels); spacing follows.

    Like M3D's preprocessing, the field of view is kept and the voxels change shape.
    """
    spacing = tuple(s * n / g for s, n, g in zip(volume.spacing_mm, volume.hu.shape, grid, strict=True))

    def resample(array: np.ndarray, interpolator: int) -> np.ndarray:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(tuple(float(s) for s in reversed(volume.spacing_mm)))
        image.SetOrigin(tuple(0.5 * s for s in reversed(volume.spacing_mm)))  # extent starts at 0
        reference = sitk.Image([int(g) for g in reversed(grid)], image.GetPixelID())
        reference.SetSpacing(tuple(float(s) for s in reversed(spacing)))
        reference.SetOrigin(tuple(0.5 * s for s in reversed(spacing)))
        return sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), interpolator))

    return replace(
        volume,
        hu=resample(volume.hu.astype(np.float32), sitk.sitkLinear),
        labels=resample(volume.labels, sitk.sitkNearestNeighbor).astype(np.uint8),
        spacing_mm=spacing,
    )


def real_anatomy(
    name: str, grid: tuple[int, int, int], rng: np.random.Generator, ct_dir: str | os.PathLike | None = None
) -> LabelledVolume:
    """A lesion-free real study on ``grid``: the shared volume ``name``, randomly cropped, then resized."""
    return resize_to_grid(random_crop(load_real_volume(name, ct_dir), rng), grid)
