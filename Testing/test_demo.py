"""`make demo`'s job: a phantom CT written and read back, the model's report and answers streamed
beside the ground truth, and an honest notice while no trained demo model is installed."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import run_model_core_cli

from model_core.hub import DEMO_MODEL_DIR


def test_demo_runs_and_prints_ground_truth(tmp_path: Path) -> None:
    done = run_model_core_cli("demo", "--out", str(tmp_path / "out"), cache=tmp_path / "cache", timeout=600)
    assert done.returncode == 0, done.stderr
    truth = json.loads((tmp_path / "out" / "ground_truth.json").read_text(encoding="utf-8"))
    assert truth["findings"], "the demo study has findings to show"
    assert (tmp_path / "out" / "phantom_ct.nii.gz").stat().st_size > 10_000
    for heading in ("== Report", "== Question (closed)", "== Question (open)", "-- ground truth report:"):
        assert heading in done.stdout
    assert truth["report"] in done.stdout
    if not (DEMO_MODEL_DIR / "ctmllm_config.json").is_file():
        assert "NOTE: The trained demo model is not installed" in done.stdout
        return
    named = re.search(r"-- (\d+) of (\d+) finding\(s\) named correctly", done.stdout)
    assert named and int(named[2]) == len(truth["findings"]), (
        "the demo says how many findings the model named"
    )
