"""Reading volumes larger than memory allows: slabs of slices, block-averaged while they are read.

Above ``max_voxels`` a volume is not loaded whole: slabs of slices are read (SimpleITK's
streaming extract for files, subsets of the file list for DICOM), each is block-averaged with
integer factors chosen so that the finest axis coarsens first, and the slabs are stacked. The
result equals ``BinShrink`` of the whole volume; memory holds about one slab plus the result.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk

MIN_SLAB_VOXELS = 1 << 22
"""Slabs hold at least this many voxels (16 MiB as float32), so that few reads cover a volume."""


def itk_reason(error: Exception) -> str:
    """The informative line(s) of an ITK exception, without source paths and object addresses."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    picked = [line for line in lines if "ITK ERROR" in line or line.startswith("[")]
    text = " ".join(picked or lines[-1:])
    text = re.sub(r"ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", text)
    return text[:400]


def shrink_factors(
    size_xyz: Sequence[int], spacing_xyz: Sequence[float], max_voxels: int
) -> tuple[int, int, int]:
    """Integer block sizes (x, y, z) that bring ``size_xyz`` within ``max_voxels``.

    The finest axis (smallest spacing times factor) grows first, so the result tends to isotropic
    voxels; no axis drops below 3 voxels.
    """
    factors = [1, 1, 1]

    def voxels() -> int:
        return math.prod(n // f for n, f in zip(size_xyz, factors, strict=True))

    while voxels() > max_voxels:
        growable = [a for a in range(3) if size_xyz[a] // (factors[a] + 1) >= 3]
        if not growable:
            break
        axis = min(growable, key=lambda a: (spacing_xyz[a] * factors[a], a))
        factors[axis] += 1
    return tuple(factors)  # type: ignore[return-value]


def read_bounded(
    size_xyz: Sequence[int],
    spacing_xyz: Sequence[float],
    read_slab: Callable[[int, int], sitk.Image],
    max_voxels: int,
    source: str,
) -> tuple[sitk.Image, list[str]]:
    """Read slabs of slices and average blocks of voxels in each, holding about one slab at a time.

    The result equals ``sitk.BinShrink`` of the whole volume (as float32) with ``shrink_factors``.
    """
    factors = shrink_factors(size_xyz, spacing_xyz, max_voxels)
    fx, fy, fz = factors
    used_slices = (size_xyz[2] // fz) * fz
    slab_voxels = max(max_voxels // 4, MIN_SLAB_VOXELS, size_xyz[0] * size_xyz[1] * fz)
    slab = max(2, fz * max(1, slab_voxels // (size_xyz[0] * size_xyz[1] * fz)))
    slab = slab + (-slab) % fz
    pieces, first = [], None
    for k0 in range(0, used_slices, slab):
        shrunk = sitk.BinShrink(
            sitk.Cast(read_slab(k0, min(k0 + slab, used_slices)), sitk.sitkFloat32), factors
        )
        first = shrunk if first is None else first
        pieces.append(sitk.GetArrayFromImage(shrunk))
    image = sitk.GetImageFromArray(np.concatenate(pieces, axis=0))
    image.SetOrigin(first.GetOrigin())
    image.SetDirection(first.GetDirection())
    image.SetSpacing(first.GetSpacing())
    warning = (
        f"{source}: has {'x'.join(map(str, size_xyz))} = {math.prod(size_xyz):,} voxels, more than max_voxels="
        f"{max_voxels:,}; read in slabs and averaged over blocks of {fx}x{fy}x{fz} voxels (x, y, z), "
        f"giving {'x'.join(map(str, image.GetSize()))} voxels of {image.GetSpacing()[0]:.3g}x"
        f"{image.GetSpacing()[1]:.3g}x{image.GetSpacing()[2]:.3g} mm."
    )
    return image, [warning]
