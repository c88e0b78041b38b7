"""The inference benchmarks of issue 14 run end to end at their quick shapes (not timed tests: they
check what each row holds, never how fast)."""

from __future__ import annotations

import json

import pytest
from conftest import TORSO_CT, needs_shared_ct

pytestmark = needs_shared_ct


def test_compare_puts_the_adapted_encoder_beside_m3d_vit(tmp_path) -> None:
    pytest.importorskip("monai")
    from model_core.bench import compare

    out = tmp_path / "compare.json"
    args = ["--quick", "--repeats", "1", "--precisions", "float32", "--ks", "0", "2", "--sizes", "28"]
    args += ["--skip-background", "0.02"]
    assert compare.main([*args, "--volume", str(TORSO_CT), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    peer, k0, k2, skipping = rows
    assert skipping["k"] == 2 and 0 <= skipping["skipped_share"] < 1 and skipping["max_abs_change"] >= 0
    assert peer["model"] == compare.PEER and peer["x_peer"] == 1.0 and peer["tokens"] == 32
    assert (k0["k"], k2["k"]) == (0, 2) and k0["tokens"] == k2["tokens"]
    assert k2["flops"] > k0["flops"] > 0  # joint attention over all groups is counted on the CPU too
    assert k0["x_peer"] == pytest.approx(k0["median_s"] / peer["median_s"], rel=0.05)
    assert "skipped_share" not in k2  # skipping is measured only where asked for


def test_latency_reports_first_tokens_and_the_follow_up_reuses_the_prefix(tmp_path) -> None:
    from model_core.bench import latency

    out = tmp_path / "latency.json"
    args = ["--quick", "--models", "internvl3-1b", "--precisions", "float32", "int8", "--repeats", "1"]
    assert latency.main([*args, "--new-tokens", "4", "--volume", str(TORSO_CT), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [row["precision"] for row in rows] == ["float32", "int8"]
    for row in rows:
        assert row["report_ttft_s"] > 0 and row["tok_s"] > 0 and row["follow_up_ttft_s"] > 0
        assert row["reused_tokens"] > row["visual_tokens"]  # the visual tokens and the first turn
