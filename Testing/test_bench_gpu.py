"""``python -m model_core.bench gpu`` (issue 12): the CPU path runs the same cases end to end, and
without CUDA the GPU path says so. The GPU numbers themselves come from a GPU machine, not CI."""

from __future__ import annotations

import json

import torch

from model_core.bench import gpu


def test_cpu_path_runs_every_phase_and_writes_the_table_and_json(tmp_path, capsys) -> None:
    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--models", "tiny", "--dtypes", "float32", "--max-new-tokens", "4"]
    assert gpu.main([*args, "--same-process", "--out", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    (row,) = report["results"]
    assert report["benchmark"] == "gpu" and "error" not in row
    for column in gpu.COLUMNS:
        assert row[column] is not None, column
    assert row["new_tokens"] >= 1 and row["tokens_per_s"] > 0 and row["visual_tokens"] == 44
    assert row["expert"] in ("report", "vqa")  # the task router ran
    assert row["stage1_loss"] > 0 and row["stage2_loss"] > 0
    assert "| tiny | float32 | 44 |" in capsys.readouterr().out


def test_without_cuda_the_gpu_path_says_what_to_do(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path / "gpu.json")]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()
