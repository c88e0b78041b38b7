"""Procedural CT phantoms: a body slab from the lung bases to below the kidneys, in HU.

Why: no public 3D CT report set can be downloaded here, so the benchmark draws its own anatomy.
Every structure is an ellipsoid or elliptic cylinder in millimetres, evaluated on the whole grid
with numpy broadcasting (no voxel loops), so a 32x128x128 study takes well under a second. Shape,
size and position vary per study through two latent variables (body habitus, organ scale) and
independent jitter; the test pool draws the latents from bands the train pool never uses.

Geometry (millimetres, voxel centres): z from 0 (inferior) up, y from anterior (negative) to
posterior, x from the patient's right (negative) to the patient's left; arrays are ``(D, H, W)``
in the canonical orientation of ``model_core.benchmark.anatomy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from model_core.benchmark.anatomy import LABELS, PHASES, LabelledVolume

ANATOMY_POOLS: tuple[str, ...] = ("train", "test")
# Latent values (habitus, organ scale) in these bands are only drawn for the test pool.
HELD_OUT_BANDS: tuple[tuple[float, float], ...] = ((0.3, 0.4), (0.7, 0.8))

AIR_HU = -1000.0
FAT_HU = -100.0
GAS_HU = -950.0
LUNG_HU = -850.0
# Mean HU of each tissue per contrast phase (jittered by a few HU per study).
TISSUE_HU: dict[str, dict[str, float]] = {
    "non-contrast": {
        "muscle": 48,
        "liver": 60,
        "spleen": 50,
        "kidney": 33,
        "aorta": 42,
        "bowel": 30,
        "heart": 42,
    },
    "arterial": {
        "muscle": 55,
        "liver": 75,
        "spleen": 110,
        "kidney": 170,
        "aorta": 300,
        "bowel": 45,
        "heart": 260,
    },
    "portal venous": {
        "muscle": 58,
        "liver": 105,
        "spleen": 115,
        "kidney": 155,
        "aorta": 165,
        "bowel": 55,
        "heart": 150,
    },
}
BONE_CORTEX_HU = (700.0, 1000.0)
BONE_MARROW_HU = (200.0, 320.0)


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in mm: centre ``(z, y, x)``, semi-axes ``(rz, ry, rx)``, turned by ``yaw`` (rad) in-plane."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    yaw: float = 0.0

    def level(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Normalised squared radius, ``< 1`` inside; broadcasts ``(D,1,1)``, ``(1,H,1)``, ``(1,1,W)`` to ``(D, H, W)``."""
        cz, cy, cx = self.center
        rz, ry, rx = self.radii
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        u = c * (x - cx) + s * (y - cy)
        v = -s * (x - cx) + c * (y - cy)
        return (u / rx) ** 2 + (v / ry) ** 2 + ((z - cz) / rz) ** 2


def _cylinder(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """In-plane elliptic cross-section, ``(1, H, W)``, True inside; the same on every slice."""
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1.0


def _banded_uniform(rng: np.random.Generator, pool: str) -> float:
    """A latent in [0, 1): inside ``HELD_OUT_BANDS`` for the test pool, outside them for train."""
    if pool not in ANATOMY_POOLS:
        raise ValueError(f"pool={pool!r}: use one of {ANATOMY_POOLS}")
    held = sum(high - low for low, high in HELD_OUT_BANDS)
    if pool == "test":
        u = rng.uniform(0.0, held)
        for low, high in HELD_OUT_BANDS:
            if u < high - low:
                return low + u
            u -= high - low
        return HELD_OUT_BANDS[-1][1] - 1e-9
    u = rng.uniform(0.0, 1.0 - held)
    for low, high in HELD_OUT_BANDS:  # walk the gaps left of each band
        if u < low:
            return u
        u += high - low
    return u


def sample_anatomy_latents(rng: np.random.Generator, pool: str = "train") -> tuple[float, float]:
    """``(habitus, organ_scale)`` in [0, 1): body size and fat vs organ size; pools never overlap."""
    return _banded_uniform(rng, pool), _banded_uniform(rng, pool)


def _voxel_axes(
    grid: tuple[int, int, int], spacing: tuple[float, float, float], z_start_mm: float = 0.0
) -> tuple[np.ndarray, ...]:
    """Voxel-centre coordinates in mm as broadcastable ``(D,1,1)``, ``(1,H,1)``, ``(1,1,W)`` arrays;
    the first slice starts ``z_start_mm`` above the body slab's lower end."""
    d, h, w = grid
    dz, dy, dx = spacing
    z = (z_start_mm + (np.arange(d, dtype=np.float32) + 0.5) * dz).reshape(d, 1, 1)
    y = ((np.arange(h, dtype=np.float32) + 0.5) * dy - h * dy / 2).reshape(1, h, 1)
    x = ((np.arange(w, dtype=np.float32) + 0.5) * dx - w * dx / 2).reshape(1, 1, w)
    return z, y, x


@dataclass(frozen=True)
class _Frame:
    """One phantom's coordinates and body layout (mm), shared by the drawing steps.

    ``z, y, x`` broadcast to the grid ``(D, H, W)``; ``(cy, cx)`` is the body centre; ``cav_ry,
    cav_rx`` the semi-axes of the cavity inside fat and muscle wall; ``scale`` the organ scale.
    """

    grid: tuple[int, int, int]
    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    cy: float
    cx: float
    cav_ry: float
    cav_rx: float
    spine_cy: float
    dome_right: float
    dome_left: float
    scale: float

    def inside(self, shape: Ellipsoid) -> np.ndarray:
        return shape.level(self.z, self.y, self.x) < 1.0

    def cylinder(self, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        """A cylinder along z through the whole slab, ``(D, H, W)`` (a read-only broadcast view)."""
        return np.broadcast_to(_cylinder(self.y, self.x, cy, cx, ry, rx), self.grid)


def field_of_view_shift(rng: np.random.Generator, share: float) -> float:
    """Where the scan's field of view starts, as a fraction of the body slab's height.

    Why: real scans are not all framed alike (a chest CT shows no kidneys, a pelvic one no lungs),
    and a model that only ever saw one framing describes organs that are not imaged. With
    probability ``share`` the field is moved towards the chest (up by 45-70% of the slab: often no
    kidney in view) or the pelvis (down by 30-50%: often no lung); otherwise it shows the whole slab (0.0). ``share`` 0 draws nothing,
    so the studies of earlier builds stay as they were.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"fov_shift_share={share}: use a share between 0 and 1")
    if share == 0.0 or rng.random() >= share:
        return 0.0
    return float(rng.uniform(0.45, 0.7) if rng.random() < 0.5 else -rng.uniform(0.3, 0.5))


def phantom_anatomy(
    grid: tuple[int, int, int],
    rng: np.random.Generator,
    pool: str = "train",
    phase: str | None = None,
    fov_shift_share: float = 0.0,
) -> LabelledVolume:
    """A sharp, noise-free phantom on ``grid`` ``(D, H, W)``: HU and tissue labels.

    ``fov_shift_share``: share of phantoms whose field of view is moved towards the chest or the
    pelvis (``field_of_view_shift``). Lesions go in before ``simulate_acquisition`` so that they
    get the same blur and noise.
    """
    if len(grid) != 3 or min(grid) < 4:
        raise ValueError(f"grid={grid}: give (D, H, W) with every size at least 4")
    phase = phase if phase is not None else PHASES[int(rng.integers(len(PHASES)))]
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}: use one of {PHASES}")
    habitus, organ_scale = sample_anatomy_latents(rng, pool)

    # Body outline and field of view: the body fills 75-90% of the in-plane field.
    body_rx = 130.0 + 50.0 * habitus + rng.uniform(-8, 8)
    body_ry = body_rx * rng.uniform(0.62, 0.78)
    d, h, w = grid
    fill = rng.uniform(0.75, 0.9)
    pixel = max(2 * body_rx / (fill * w), 2 * body_ry / (fill * h))
    spacing = (rng.uniform(250.0, 320.0) / d, pixel, pixel)
    z, y, x = _voxel_axes(grid, spacing, field_of_view_shift(rng, fov_shift_share) * d * spacing[0])
    cy, cx = rng.uniform(-0.05, 0.05) * h * pixel, rng.uniform(-0.05, 0.05) * w * pixel
    fat = 8.0 + 30.0 * habitus + rng.uniform(-4, 4)
    wall = rng.uniform(8.0, 14.0)
    dome_right = d * spacing[0] * rng.uniform(0.66, 0.76)
    frame = _Frame(
        grid=grid,
        z=z,
        y=y,
        x=x,
        cy=cy,
        cx=cx,
        cav_ry=body_ry - fat - wall,
        cav_rx=body_rx - fat - wall,
        spine_cy=cy + 0.5 * (body_ry - fat - wall),
        dome_right=dome_right,
        dome_left=dome_right - rng.uniform(5.0, 20.0),
        scale=0.85 + 0.3 * organ_scale,
    )
    labels = np.zeros(grid, dtype=np.uint8)
    labels[frame.cylinder(cy, cx, body_ry, body_rx)] = LABELS["body"]
    labels[frame.cylinder(cy, cx, body_ry - fat, body_rx - fat)] = LABELS["muscle"]
    cavity = frame.cylinder(cy, cx, frame.cav_ry, frame.cav_rx)
    labels[cavity] = LABELS["body"]  # visceral fat
    below_right, below_left = _draw_thorax(frame, rng, labels, cavity)
    _draw_abdomen(frame, rng, labels, cavity & below_right, cavity & below_left)
    vertebra, marrow = _draw_spine_and_aorta(frame, rng, labels, body_inside=labels > 0)
    hu = _tissue_hu(labels, phase, rng)
    _add_bone_and_gas(frame, rng, labels, hu, vertebra, marrow)
    return LabelledVolume(hu=hu, labels=labels, spacing_mm=spacing, phase=phase, source="phantom")


def _draw_thorax(
    frame: _Frame, rng: np.random.Generator, labels: np.ndarray, cavity: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lungs above the diaphragm domes (deepest at the back and sides) and the heart between them.

    Returns the ``(D, H, W)`` masks below the right and the left dome.
    """
    depth = rng.uniform(25.0, 45.0)
    f = frame

    def dome(z_peak: float, side: float) -> np.ndarray:
        r2 = ((f.x - (f.cx + side * 0.45 * f.cav_rx)) / f.cav_rx) ** 2 + (
            (f.y - (f.cy - 0.1 * f.cav_ry)) / f.cav_ry
        ) ** 2
        return z_peak - depth * r2  # (1, H, W)

    below_right, below_left = f.z < dome(f.dome_right, -1.0), f.z < dome(f.dome_left, 1.0)
    lungs = cavity & (((f.x < f.cx) & ~below_right) | ((f.x >= f.cx) & ~below_left))
    labels[lungs & (f.x < f.cx)] = LABELS["lung_right"]
    labels[lungs & (f.x >= f.cx)] = LABELS["lung_left"]
    heart = Ellipsoid(
        (f.z.max() + rng.uniform(10, 40), f.cy - 0.25 * f.cav_ry, f.cx + 0.12 * f.cav_rx),
        (rng.uniform(90, 120), 0.5 * f.cav_ry, rng.uniform(0.28, 0.36) * f.cav_rx),
        rng.uniform(-0.4, -0.1),
    )
    labels[lungs & f.inside(heart)] = LABELS["mediastinum"]
    return below_right, below_left


def _draw_abdomen(
    frame: _Frame,
    rng: np.random.Generator,
    labels: np.ndarray,
    under_right: np.ndarray,
    under_left: np.ndarray,
) -> None:
    """Bowel loops, liver (two lobes), spleen and kidneys (with sinus fat), in the cavity under the domes."""
    f, s = frame, frame.scale
    bowel_zone = under_right & under_left & (f.z < f.dome_left - 60.0)
    for _ in range(int(rng.integers(8, 15))):
        loop = Ellipsoid(
            (
                rng.uniform(0.0, f.dome_left - 60.0),
                f.cy + rng.uniform(-0.7, 0.2) * f.cav_ry,
                f.cx + rng.uniform(-0.7, 0.7) * f.cav_rx,
            ),
            tuple(rng.uniform(12.0, 28.0, size=3)),
            rng.uniform(0, np.pi),
        )
        labels[bowel_zone & f.inside(loop)] = LABELS["bowel"]
    liver_right = Ellipsoid(
        (f.dome_right - 75.0 * s, f.cy - 0.05 * f.cav_ry, f.cx - 0.45 * f.cav_rx),
        (rng.uniform(70, 90) * s, rng.uniform(0.6, 0.75) * f.cav_ry, rng.uniform(0.42, 0.52) * f.cav_rx),
        rng.uniform(-0.2, 0.2),
    )
    liver_left = Ellipsoid(
        (f.dome_right - 50.0 * s, f.cy - 0.4 * f.cav_ry, f.cx + rng.uniform(0.0, 0.15) * f.cav_rx),
        (rng.uniform(35, 50) * s, rng.uniform(0.2, 0.3) * f.cav_ry, rng.uniform(0.3, 0.4) * f.cav_rx),
        rng.uniform(-0.3, 0.3),
    )
    labels[under_right & (f.inside(liver_right) | f.inside(liver_left))] = LABELS["liver"]
    spleen = Ellipsoid(
        (f.dome_left - 50.0 * s, f.cy + 0.3 * f.cav_ry, f.cx + 0.65 * f.cav_rx),
        (rng.uniform(45, 60) * s, rng.uniform(45, 60) * s, rng.uniform(22, 32) * s),
        rng.uniform(0.2, 0.8),
    )
    labels[under_left & f.inside(spleen)] = LABELS["spleen"]
    kidney_left_z = f.dome_left - rng.uniform(95.0, 115.0) * s
    for side, z_c in ((-1.0, kidney_left_z - rng.uniform(10.0, 25.0)), (1.0, kidney_left_z)):
        kidney = Ellipsoid(
            (z_c, f.spine_cy + rng.uniform(-8, 4), f.cx + side * rng.uniform(55.0, 72.0) * s),
            (rng.uniform(48, 60) * s, rng.uniform(22, 27) * s, rng.uniform(24, 30) * s),
            side * rng.uniform(0.2, 0.5),
        )
        sinus = Ellipsoid(
            (z_c, kidney.center[1] - 5.0, kidney.center[2] - side * 0.5 * kidney.radii[2]),
            (0.45 * kidney.radii[0], 0.35 * kidney.radii[1], 0.35 * kidney.radii[2]),
        )
        inside = (under_right | under_left) & f.inside(kidney)
        labels[inside] = LABELS["kidney_right" if side < 0 else "kidney_left"]
        labels[inside & f.inside(sinus)] = LABELS["body"]  # renal sinus fat


def _draw_spine_and_aorta(
    frame: _Frame, rng: np.random.Generator, labels: np.ndarray, body_inside: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Aorta, paraspinal muscles, vertebral body and arch; returns the vertebral body and its marrow (3 mm in)."""
    f = frame
    aorta_r = rng.uniform(10.0, 13.0)
    labels[f.cylinder(f.spine_cy - 32.0, f.cx + 12.0, aorta_r, aorta_r)] = LABELS["aorta"]
    for side in (-1.0, 1.0):
        labels[f.cylinder(f.spine_cy + 38.0, f.cx + side * 35.0, 24.0, 28.0) & body_inside] = LABELS["muscle"]
    radius = rng.uniform(17.0, 22.0)
    vertebra = f.cylinder(f.spine_cy, f.cx, radius, radius * 1.1)
    labels[vertebra | f.cylinder(f.spine_cy + radius + 12.0, f.cx, 12.0, 9.0)] = LABELS["bone"]
    return vertebra, f.cylinder(f.spine_cy, f.cx, radius - 3.0, radius * 1.1 - 3.0)


def _add_bone_and_gas(
    frame: _Frame,
    rng: np.random.Generator,
    labels: np.ndarray,
    hu: np.ndarray,
    vertebra: np.ndarray,
    marrow: np.ndarray,
) -> None:
    """Bone texture (dense cortex around a marrow core, discs every ~30 mm) and gas in bowel loops."""
    f = frame
    hu[labels == LABELS["bone"]] = rng.uniform(*BONE_CORTEX_HU)
    hu[marrow] = rng.uniform(*BONE_MARROW_HU)
    period = rng.uniform(28.0, 34.0)
    discs = np.broadcast_to(((f.z + rng.uniform(0, period)) % period) < 6.0, f.grid) & vertebra
    hu[discs] = 85.0
    bowel = labels == LABELS["bowel"]
    for _ in range(int(rng.integers(0, 4))):
        pocket = Ellipsoid(
            (
                rng.uniform(0.0, f.dome_left - 60.0),
                f.cy + rng.uniform(-0.6, 0.0) * f.cav_ry,
                f.cx + rng.uniform(-0.6, 0.6) * f.cav_rx,
            ),
            tuple(rng.uniform(5.0, 12.0, size=3)),
        )
        hu[bowel & f.inside(pocket)] = GAS_HU


def _tissue_hu(labels: np.ndarray, phase: str, rng: np.random.Generator) -> np.ndarray:
    """Look up each voxel's HU from its label, the phase table jittered by a few HU; ``(D, H, W)`` float32."""
    table = {name: value + rng.uniform(-6, 6) for name, value in TISSUE_HU[phase].items()}
    lut = np.full(max(LABELS.values()) + 1, AIR_HU, dtype=np.float32)
    lut[LABELS["body"]] = FAT_HU + rng.uniform(-15, 15)
    lut[LABELS["lung_right"]] = lut[LABELS["lung_left"]] = LUNG_HU + rng.uniform(-40, 40)
    lut[LABELS["kidney_right"]] = lut[LABELS["kidney_left"]] = table["kidney"]
    lut[LABELS["mediastinum"]] = table["heart"]
    for name in ("muscle", "liver", "spleen", "aorta", "bowel"):
        lut[LABELS[name]] = table[name]
    return lut[labels]


def gaussian_blur(
    volume: np.ndarray, spacing_mm: tuple[float, float, float], sigma_mm: tuple[float, float, float]
) -> np.ndarray:
    """Separable Gaussian smoothing of a ``(D, H, W)`` array with per-axis sigma in mm (``(sz, sy, sx)``)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_mm)))
    variance = [float(s) ** 2 for s in reversed(sigma_mm)]
    smoothed = sitk.DiscreteGaussian(image, variance=variance, maximumKernelWidth=32, useImageSpacing=True)
    return sitk.GetArrayFromImage(smoothed)


def simulate_acquisition(
    volume: LabelledVolume, rng: np.random.Generator, noise_hu: float | None = None
) -> LabelledVolume:
    """Partial-volume blur (about one voxel FWHM per axis) then Gaussian noise (10-20 HU unless given).

    Labels stay sharp: they are the anatomy, the HU are what the scanner shows.
    """
    sigma = tuple(0.45 * s for s in volume.spacing_mm)
    blurred = gaussian_blur(volume.hu, volume.spacing_mm, sigma)
    noise = noise_hu if noise_hu is not None else rng.uniform(10.0, 20.0)
    noisy = blurred + rng.normal(0.0, noise, size=blurred.shape).astype(np.float32)
    return LabelledVolume(
        hu=noisy.astype(np.float32),
        labels=volume.labels,
        spacing_mm=volume.spacing_mm,
        phase=volume.phase,
        source=volume.source,
    )


def make_phantom(
    grid: tuple[int, int, int], rng: np.random.Generator, pool: str = "train", phase: str | None = None
) -> LabelledVolume:
    """A finished lesion-free phantom: anatomy, then blur and noise."""
    return simulate_acquisition(phantom_anatomy(grid, rng, pool, phase), rng)
