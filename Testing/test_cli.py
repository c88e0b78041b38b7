"""The command line (python -m model_core ...) and where models come from (model_core.hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ABDOMEN_CT, NOT_CT_MR, needs_shared_ct, run_model_core_cli

from model_core.hub import ModelNotFoundError, resolve_model_dir
from model_core.tiny import save_tiny_2d_checkpoint


def test_generate_streams_an_answer_for_an_m3d_volume(tiny_model_dir: Path, tmp_path: Path) -> None:
    volume = tmp_path / "case.npy"
    np.save(volume, np.random.default_rng(0).random((1, 9, 32, 32), dtype=np.float32))
    done = run_model_core_cli(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--volume",
        str(volume),
        "--prompt",
        "Where is the lesion?",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        cache=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "[no task experts; 6 tokens" in done.stderr and "model tiny" in done.stderr


@pytest.mark.parametrize(
    ("prompt", "task", "note"),
    [
        (
            "Write a radiology report of the findings in this CT volume.",
            None,
            "expert report (chosen by the task router)",
        ),
        ("Where is the lesion located?", None, "expert vqa (chosen by the task router)"),
        (None, None, "expert report (chosen by the task router)"),
        (
            "Write a radiology report of the findings in this CT volume.",
            "vqa",
            "expert vqa (forced by --task)",
        ),
    ],
)
def test_generate_lets_the_task_router_pick_the_expert_by_default(
    routed_model_dir: Path, tmp_path: Path, prompt: str | None, task: str | None, note: str
) -> None:
    volume = tmp_path / "case.npy"
    np.save(volume, np.random.default_rng(0).random((1, 9, 32, 32), dtype=np.float32))
    args = ["generate", "--model", str(routed_model_dir), "--volume", str(volume), "--max-new-tokens", "3"]
    args += ["--prompt", prompt] if prompt else []
    args += ["--task", task] if task else []
    done = run_model_core_cli(*args, "--device", "cpu", cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"[{note}; 3 tokens" in done.stderr


def test_info_describes_the_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    done = run_model_core_cli("info", str(tiny_model_dir), cache=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "family:           internvl" in done.stdout
    assert "3D blocks (K):    2 of 4" in done.stdout
    assert "at most 512 per volume" in done.stdout


def test_convert_turns_a_2d_folder_into_a_ctmllm_folder(tmp_path: Path) -> None:
    source = save_tiny_2d_checkpoint(tmp_path / "2d", "llava")
    done = run_model_core_cli(
        "convert", str(source), "--out", str(tmp_path / "3d"), "--num-3d-blocks", "3", cache=tmp_path
    )
    assert done.returncode == 0, done.stderr
    info = run_model_core_cli("info", str(tmp_path / "3d"), cache=tmp_path)
    assert "family:           llava" in info.stdout and "3D blocks (K):    3 of 4" in info.stdout


def test_bad_model_and_volume_get_clear_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    missing = run_model_core_cli(
        "generate", "--model", str(tmp_path / "nope"), "--volume", "x.npy", cache=tmp_path
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((32, 32), dtype=np.float32))
    done = run_model_core_cli(
        "generate", "--model", str(tiny_model_dir), "--volume", str(flat), cache=tmp_path
    )
    assert done.returncode == 2 and "holds shape (32, 32)" in done.stderr


def test_hub_spec_resolution(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_dir(tiny_model_dir) == tiny_model_dir
    with pytest.raises(ModelNotFoundError, match="needs your agreement"):
        resolve_model_dir("someone/some-ct-model")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ModelNotFoundError, match="not a CTMLLM model folder"):
        resolve_model_dir(not_a_model)


@needs_shared_ct
def test_generate_reads_a_real_nifti_and_refuses_mr(tiny_model_dir: Path, tmp_path: Path) -> None:
    done = run_model_core_cli(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--volume",
        str(ABDOMEN_CT),
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        cache=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "; 4 tokens" in done.stderr
    mr = run_model_core_cli(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--volume",
        str(NOT_CT_MR),
        cache=tmp_path,
    )
    assert mr.returncode == 2 and "pass --allow-non-ct" in mr.stderr  # the flag this user has


def test_a_repo_in_the_local_cache_loads_without_asking(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, local_files_only=False, **kwargs):
        calls.append((repo_id, local_files_only))
        if not local_files_only:
            raise AssertionError("no network download may be attempted without consent")
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_dir("owner/cached-model", cache_dir=tmp_path) == tiny_model_dir
    assert calls == [("owner/cached-model", True)]


def test_demo_spec_falls_back_to_the_tiny_model_and_says_so(tmp_path: Path, monkeypatch) -> None:
    import model_core.hub as hub

    monkeypatch.setattr(hub, "DEMO_MODEL_DIR", tmp_path / "no-demo-model")
    notices: list[str] = []
    folder = resolve_model_dir("demo", cache_dir=tmp_path / "cache", notice=notices.append)
    assert (folder / "ctmllm_config.json").is_file()
    assert notices and "tiny random test model" in notices[0]
