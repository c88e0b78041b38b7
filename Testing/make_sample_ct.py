"""Make the module's sample CT (``Resources/SampleData``) with the project's phantom code.

    .venv/bin/python Testing/make_sample_ct.py [--out Resources/SampleData]

The volume is held-out study 1 of the lesion benchmark's phantom generator
(``model_core.benchmark.build.make_study``) on a 64 x 160 x 160 grid, in Hounsfield units, written
as NIfTI like the demo's phantom (``model_core.demo.write_phantom_nifti``). Beside it: a 128 x 128
thumbnail for SampleData's list and the phantom's true findings and report (JSON), which the
model's text can be compared with. The script prints the file's SHA-256, which
``CTMLLMSlicerLib.resources.SAMPLE_CT_SHA256`` must hold (SampleData verifies it; a test too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STUDY = ("test", 1)
GRID = (64, 160, 160)


def make_study():
    """The phantom study: ``Study`` with ``hu`` ``(D, H, W)``, spacing, findings and report."""
    from model_core.benchmark.build import BenchmarkConfig, make_study

    return make_study(*STUDY, BenchmarkConfig(grid=GRID, window="body"))


def write_thumbnail(hu: np.ndarray, path: Path, size: int = 128) -> None:
    """The middle axial slice in a soft-tissue window, ``size`` x ``size`` pixels, as PNG."""
    from matplotlib.image import imsave

    from model_core.data.preprocess import WINDOW_PRESETS

    low, high = WINDOW_PRESETS["soft_tissue"]
    axial = np.clip((hu[hu.shape[0] // 2] - low) / (high - low), 0.0, 1.0)
    rows = np.linspace(0, axial.shape[0] - 1, size).round().astype(int)
    columns = np.linspace(0, axial.shape[1] - 1, size).round().astype(int)
    imsave(path, axial[np.ix_(rows, columns)], cmap="gray", vmin=0.0, vmax=1.0)


def main(argv: list[str] | None = None) -> int:
    from CTMLLMSlicerLib import resources
    from model_core.demo import write_phantom_nifti

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "Resources" / "SampleData")
    args = parser.parse_args(argv)
    study = make_study()
    volume = write_phantom_nifti(args.out / Path(resources.SAMPLE_CT_FILE).name, study.hu, study.spacing_mm)
    write_thumbnail(study.hu, args.out / Path(resources.SAMPLE_CT_THUMBNAIL).name)
    truth = {
        "source": f"model_core.benchmark.build.make_study{STUDY} on a {'x'.join(map(str, GRID))} grid",
        "report": study.report,
        "findings": [finding.to_dict() for finding in study.findings],
    }
    (args.out / "CTMLLMPhantomCT.truth.json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    digest = hashlib.sha256(volume.read_bytes()).hexdigest()
    print(f"wrote {volume} ({volume.stat().st_size} bytes), sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "CTMLLMSlicer"))
    sys.exit(main())
