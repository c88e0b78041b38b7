"""Two-stage training: config, data, what each stage trains, exact resume, a tiny end-to-end run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from model_core.config import ConfigError
from model_core.data.sample import Sample
from model_core.data.synthetic import SyntheticCTDataset
from model_core.model import CTMLLM
from model_core.train import main, train
from model_core.training.checkpoint import ADAPTERS_FILE, list_checkpoints, load_adapters
from model_core.training.config import TrainingConfig
from model_core.training.data import SampleCollator, build_dataset, make_loader
from model_core.training.stages import build_stage_model, export_merged, set_trainable

SHAPE = [6, 32, 32]


def tiny_config(
    out_dir: Path, moe_mode: str = "tgh_hard", lm_dropout: float = 0.0, **train_settings
) -> TrainingConfig:
    return TrainingConfig.from_dict(
        {
            "out_dir": str(out_dir),
            "seed": 0,
            "device": "cpu",
            "model": {
                "source": "tiny",
                "num_3d_blocks": 1,
                "max_visual_tokens": 16,
                "tiny": {"vision_layers": 2},
            },
            "moe": {"mode": moe_mode, "num_experts": 2, "top_k": 1, "rank": 2, "alpha": 4.0},
            "lm": {"mode": "lora", "rank": 4, "alpha": 8.0, "dropout": lm_dropout},
            "data": {"train": {"kind": "synthetic", "num_samples": 8, "shape": SHAPE}},
            "train": {"batch_size": 2, "lr": 1e-2, "max_steps": 6, "warmup_steps": 1, **train_settings},
        }
    )


def fixed_batch(count: int = 4) -> dict:
    dataset = SyntheticCTDataset(num_samples=count, shape=tuple(SHAPE), seed=7)
    return SampleCollator()([dataset[i] for i in range(count)])


def batch_loss(model: CTMLLM, batch: dict) -> float:
    with torch.no_grad():
        return model.compute_loss(
            batch["volumes"], batch["prompts"], batch["answers"], batch["tasks"]
        ).lm_loss.item()


# -- config and data ---------------------------------------------------------------------------
def test_config_names_unknown_keys_and_applies_stage_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "train: {lr: 0.001, max_steps: 9}\nstage2: {max_steps: 3}\nmoe: {mode: tgh_soft}\n", encoding="utf-8"
    )
    config = TrainingConfig.load(path)
    assert config.stage_settings(1).max_steps == 9 and config.stage_settings(2).max_steps == 3
    assert config.stage_settings(2).lr == 0.001 and config.moe.mode == "tgh_soft"
    path.write_text("train: {learning_rate: 0.001}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) \['learning_rate'\]"):
        TrainingConfig.load(path)
    with pytest.raises(ConfigError, match="stage2.*warmup"):
        TrainingConfig.from_dict({"stage2": {"warmup": 3}})
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainingConfig.from_dict({"train": {"mixed_precision": "fp8"}})


def test_shipped_configs_load() -> None:
    configs = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        TrainingConfig.load(path)


def test_synthetic_dataset_is_deterministic_and_mixes_tasks() -> None:
    first, second = SyntheticCTDataset(32, seed=3), SyntheticCTDataset(32, seed=3)
    for index in (0, 5, 31):
        a, b = first[index], second[index]
        assert (a.task, a.prompt, a.answer) == (b.task, b.prompt, b.answer)
        assert np.array_equal(a.volume, b.volume)
        assert a.volume.shape == (9, 32, 32) and a.volume.dtype == np.float32
        assert 0.0 <= a.volume.min() and a.volume.max() <= 1.0
    tasks = {first[i].task for i in range(32)}
    assert tasks == {"report", "vqa"}
    closed = [first[i] for i in range(32) if first[i].meta.get("closed")]
    assert closed and all(s.answer.startswith(s.meta["answer_choice"] + ". ") for s in closed)


def test_dataset_factory_and_collator_refuse_what_they_cannot_use() -> None:
    assert (
        len(build_dataset([{"kind": "synthetic", "num_samples": 3}, {"kind": "synthetic", "num_samples": 2}]))
        == 5
    )
    with pytest.raises(ValueError, match="kind='nifti_folder'"):
        build_dataset({"kind": "nifti_folder"})
    with pytest.raises(ValueError, match="does not take"):
        build_dataset({"kind": "synthetic", "size": 3})
    samples = [
        Sample("report", "p", "a", volume=np.zeros((6, 32, 32), np.float32)),
        Sample("vqa", "q", "b", volume=np.zeros((9, 16, 16), np.float32)),
    ]
    with pytest.raises(ValueError, match="set data.volume_shape"):
        SampleCollator()(samples)
    batch = SampleCollator((6, 24, 24))(samples)
    assert batch["volumes"].shape == (2, 6, 24, 24) and batch["tasks"] == ["report", "vqa"]


def test_loader_order_depends_only_on_seed_and_epoch() -> None:
    def order(epoch: int) -> list[int]:
        loader = make_loader(SyntheticCTDataset(8, shape=(3, 8, 8)), 2, seed=5)
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(epoch + 100)  # the global RNG must not matter
        return list(loader.sampler)

    assert order(0) == order(0) and order(0) != order(1) and sorted(order(1)) == list(range(8))


# -- what each stage trains ----------------------------------------------------------------------
def test_stage2_changes_only_task_experts_and_router(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    export_merged(build_stage_model(config, 1, None), tmp_path / "stage1")
    model = build_stage_model(config, 2, tmp_path / "stage1").train()
    trained = set_trainable(model, 2, config, config.stage_settings(2))
    assert all(name.startswith("volume_adapter.moe.") for name in trained)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = fixed_batch()
    assert set(batch["tasks"]) == {"report", "vqa"}
    model.compute_loss(batch["volumes"], batch["prompts"], batch["answers"], batch["tasks"]).loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    for name in before:
        if name.startswith(("language_model.", "vision_tower.", "projector.")):
            assert torch.equal(before[name], after[name]), name
    assert changed and all(
        name.startswith(
            (
                "volume_adapter.moe.experts.report.",
                "volume_adapter.moe.experts.vqa.",
                "volume_adapter.moe.task_router.",
            )
        )
        for name in changed
    )
    assert any("task_router" in n for n in changed)
    assert any(".experts.report." in n for n in changed) and any(".experts.vqa." in n for n in changed)


def test_stage1_trains_moe_projector_and_lm_lora_only(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    model = build_stage_model(config, 1, None)
    trained = set_trainable(model, 1, config, config.stage_settings(1))
    groups = {name.split(".")[0] for name in trained}
    assert groups == {"volume_adapter", "projector", "language_model"}
    assert all("lora_" in name for name in trained if name.startswith("language_model."))
    assert all(".experts.token." in name for name in trained if name.startswith("volume_adapter."))


def test_stage1_trains_the_3d_blocks_only_when_asked(tmp_path: Path) -> None:
    """``train_3d_blocks``: the tower's top K blocks (K=1 here, block 1 of 2) learn; its 2D block,
    patch and position embeddings stay as the 2D checkpoint gave them."""
    config = tiny_config(tmp_path, train_3d_blocks=True)
    model = build_stage_model(config, 1, None).train()
    trained = set_trainable(model, 1, config, config.stage_settings(1))
    tower = {name for name in trained if name.startswith("vision_tower.")}
    assert tower and all(name.startswith("vision_tower.encoder.layer.1.") for name in tower)
    before = {name: value.clone() for name, value in model.vision_tower.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = fixed_batch()
    model.compute_loss(batch["volumes"], batch["prompts"], batch["answers"], batch["tasks"]).loss.backward()
    optimizer.step()
    changed = {n for n, v in model.vision_tower.state_dict().items() if not torch.equal(before[n], v)}
    assert changed and all(name.startswith("encoder.layer.1.") for name in changed)
    frozen = tiny_config(tmp_path / "frozen")
    assert not any(
        n.startswith("vision_tower.")
        for n in set_trainable(build_stage_model(frozen, 1, None), 1, frozen, frozen.stage_settings(1))
    )
    flat = TrainingConfig.from_dict(
        {**config.to_dict(), "model": {**config.to_dict()["model"], "num_3d_blocks": 0}}
    )
    with pytest.raises(ValueError, match="no 3D blocks"):
        set_trainable(build_stage_model(flat, 1, None), 1, flat, flat.stage_settings(1))


def test_stage2_needs_a_task_level_moe(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stage 2 trains task experts"):
        train(tiny_config(tmp_path, moe_mode="token"), 2, init=tmp_path, show_progress=False)


# -- checkpoints and resume ---------------------------------------------------------------------
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    # LoRA dropout draws from the torch RNG, so the restored random state matters too
    straight = train(tiny_config(tmp_path / "a", lm_dropout=0.2, max_steps=20), 1, show_progress=False)
    config = tiny_config(tmp_path / "b", lm_dropout=0.2, max_steps=20)
    stopped = train(config, 1, until_step=10, show_progress=False)
    assert stopped.step == 10 and stopped.final_dir is None
    assert [step for step, _ in list_checkpoints(stopped.run_dir)] == [10]
    resumed = train(config, 1, resume=True, show_progress=False)
    assert resumed.step == 20
    expected = load_file(str(straight.final_dir / ADAPTERS_FILE))
    got = load_file(str(resumed.final_dir / ADAPTERS_FILE))
    assert expected.keys() == got.keys() and len(expected) > 0
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    lines = [
        json.loads(line)
        for line in (resumed.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    reference = [
        json.loads(line)
        for line in (straight.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [r["step"] for r in lines] == list(range(1, 21))
    assert [r["loss"] for r in lines] == [r["loss"] for r in reference]
    assert (resumed.run_dir / "loss.png").stat().st_size > 0


def test_a_run_folder_is_not_overwritten_and_resume_checks_the_config(tmp_path: Path) -> None:
    train(tiny_config(tmp_path, max_steps=2), 1, show_progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(tmp_path, max_steps=2), 1, show_progress=False)
    with pytest.raises(ValueError, match=r"differs .* \['train'\]"):
        train(tiny_config(tmp_path, max_steps=2, lr=0.5), 1, resume=True, show_progress=False)


def test_mixed_precision_checkpointing_and_accumulation_run(tmp_path: Path) -> None:
    # its own process: accelerate fixes the precision once per process, as a launched run does
    config = tiny_config(
        tmp_path,
        moe_mode="tgh_soft",
        max_steps=2,
        mixed_precision="bf16",
        gradient_checkpointing=True,
        grad_accum_steps=2,
    )
    config_path = tmp_path / "bf16.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "model_core.train",
        "--config",
        str(config_path),
        "--stage",
        "1",
        "--no-progress",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [
        json.loads(line)
        for line in (tmp_path / "stage1" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    assert records[0]["samples_per_second"] > 0
    assert CTMLLM.from_pretrained(tmp_path / "stage1" / "final").config.moe.mode == "token"


# -- end to end ---------------------------------------------------------------------------------
def test_two_stage_run_lowers_the_loss_and_its_model_loads_and_generates(tmp_path: Path) -> None:
    config_path = tmp_path / "run.yaml"
    config = tiny_config(tmp_path / "out", max_steps=16, save_every=8, eval_every=8)
    config.data.eval = [{"kind": "synthetic", "num_samples": 4, "shape": SHAPE, "seed": 7}]
    config.stage2 = {"max_steps": 8, "lr": 5e-3}
    config.preprocessing = {"window": "soft_tissue", "target_shape": SHAPE}
    config_path.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    batch = fixed_batch()
    torch.manual_seed(0)
    initial = batch_loss(build_stage_model(config, 1, None), batch)

    assert main(["--config", str(config_path), "--stage", "1", "--no-progress"]) == 0
    stage1_dir = tmp_path / "out" / "stage1" / "final"
    stage1 = CTMLLM.from_pretrained(stage1_dir)
    assert stage1.config.moe.mode == "token"
    after_stage1 = batch_loss(stage1, batch)
    assert after_stage1 < initial - 0.1

    # the merged export computes what the training model (LoRA unmerged) computed
    rebuilt = build_stage_model(config, 1, None)
    load_adapters(
        rebuilt, stage1_dir, json.loads((stage1_dir / "adapters.json").read_text(encoding="utf-8"))["tensors"]
    )
    assert batch_loss(rebuilt, batch) == pytest.approx(after_stage1, abs=1e-4)

    assert main(["--config", str(config_path), "--stage", "2", "--no-progress"]) == 0
    stage2 = CTMLLM.from_pretrained(tmp_path / "out" / "stage2" / "final")
    assert stage2.config.moe.mode == "tgh_hard"
    assert stage2.preprocess_config().target_shape == tuple(SHAPE)  # recorded by stage 1, kept by stage 2
    assert batch_loss(stage2, batch) < initial - 0.1
    lm1, lm2 = stage1.language_model.state_dict(), stage2.language_model.state_dict()
    assert all(torch.equal(lm1[name], lm2[name]) for name in lm1)  # stage 2 kept the LM frozen

    # the one-process export of a checkpoint rebuilds the same model
    checkpoint = list_checkpoints(tmp_path / "out" / "stage2")[-1][1]
    shutil.rmtree(checkpoint / "model")
    assert main(["--config", str(config_path), "--stage", "2", "--export", str(checkpoint)]) == 0
    assert batch_loss(CTMLLM.from_pretrained(checkpoint / "model"), batch) == pytest.approx(
        batch_loss(stage2, batch), abs=1e-6
    )

    volume = batch["volumes"][0]
    features = stage2.encode_volume(volume, prompt="Where is the lesion located?")
    assert features.task in ("report", "vqa")
    result = stage2.generate(volume, "Where is the lesion located?", max_new_tokens=6)
    assert result.new_tokens >= 1 and isinstance(result.text, str)
    assert (tmp_path / "out" / "stage2" / "loss.png").is_file()


@pytest.mark.slow
def test_two_process_ddp_on_cpu_trains_resumes_and_runs_stage2(tmp_path: Path) -> None:
    """DDP over gloo with two CPU processes (torchrun; accelerate reads its environment)."""
    config = tiny_config(tmp_path, max_steps=4, save_every=2)
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "model_core.train",
    ]
    base = ["--config", str(config_path), "--no-progress"]
    root = Path(__file__).resolve().parents[1]
    for extra in (["--stage", "1", "--until-step", "2"], ["--stage", "1", "--resume"], ["--stage", "2"]):
        done = subprocess.run(
            launch + base + extra, capture_output=True, text=True, encoding="utf-8", timeout=600, cwd=root
        )
        assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = list_checkpoints(tmp_path / "stage1")[-1][1]
    assert (checkpoint / "random_states_1.pkl").is_file()  # really two processes
    records = [
        json.loads(line)
        for line in (tmp_path / "stage1" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert CTMLLM.from_pretrained(tmp_path / "stage2" / "final").config.moe.mode == "tgh_hard"
