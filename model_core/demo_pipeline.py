"""The demo model, end to end: ``python -m model_core.demo_pipeline --out runs/demo [--budget small]``.

Why one command: the shipped demo model, its scores (docs/RESULTS.md) and its ablations must come
from the project's own pipeline, repeatably. Steps, in order (each skipped when its output exists,
so an interrupted run continues):

1. ``bench/``: the lesion benchmark (``model_core.benchmark.build_benchmark``) on the budget's grid.
2. ``tokenizer/``: a byte-level BPE trained on the benchmark's training texts (no LLM can be
   trained or fine-tuned in this budget on 2 CPU cores: see docs/MODEL_CARD.md).
3. ``2d_checkpoint/``: a small InternVL-style 2D MLLM (tower, pixel-shuffle projector, Qwen2 LM),
   every part trained on 3-slice slabs (``model_core.benchmark.slabs``) as a CTMLLM with K=0 and
   no MoE, then exported as a Hugging Face 2D checkpoint (``map_ctmllm_state_dict_name``).
   When the budget has ``tower_steps``, the tower and projector are first pretrained on their
   own: a linear head on each visual token learns which lesion kinds and size buckets have their
   centre in its cell (``pretrain_tower``; the head is dropped). This is the demo's stand-in for
   the pretraining real towers get before their MLLM is trained (CLIP, InternViT): trained only
   through the caption loss, a random tower did not learn to see lesions in this budget
   (docs/MODEL_CARD.md). ``2d_random/`` is the same architecture untrained: the "from scratch"
   ablation's source.
4. ``3d/stage1``, ``3d/stage2``: the 3D transfer and both stages through ``python -m
   model_core.train`` with ``configs/demo_3d.yaml`` (``model.source`` = the 2D checkpoint).
5. ``eval/``: ``python -m model_core.evaluate`` (report; closed and open VQA) on the held-out test
   split and ``python -m model_core.benchmark score`` (finding-level P/R/F1, normals).
6. ``--ship``: the model in float16 to ``model_core/demo_model`` (at most 30 MB);
   ``--results FILE``: the results tables written from the JSON outputs.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from model_core.tiny import assemble_internvl, train_bpe_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_3D = REPO_ROOT / "configs" / "demo_3d.yaml"
MAX_SHIPPED_BYTES = 30 * 1024 * 1024
COST_FILE = "cost.json"
TOWER_FILE = "tower_pretraining.json"
TOWER_AUC_SLABS = 240
POSITIVE_WEIGHT = 10.0  # tower pretraining: weight of a lesion token label against the many empty ones


@dataclass(frozen=True)
class DemoBudget:
    """How big every step is. ``grid`` is the benchmark's ``(D, H, W)`` and the model's input; the
    tower reads ``H x W`` slabs in ``patch``-pixel patches (``H / patch`` must be even for InternVL's
    pixel shuffle)."""

    grid: tuple[int, int, int] = (24, 96, 96)
    train: int = 300
    val: int = 8
    test: int = 40
    vocab_size: int = 1024
    vision_hidden: int = 128
    vision_layers: int = 6
    patch: int = 16
    text_hidden: int = 256
    text_layers: int = 4
    slab_steps: int = 600
    slab_batch: int = 16
    slab_lr: float = 1e-3
    lesion_slab_share: float | None = None  # None: every slab (most hold no lesion)
    slab_caption_style: str = "report"  # or "findings_list" (model_core.benchmark.slabs)
    tower_steps: int = 0  # lesion-label pretraining of the tower before the captions (0: none)
    tower_batch: int = 32
    tower_lr: float = 1e-3
    window: str = "soft_tissue"  # the benchmark's HU window, a WINDOW_PRESETS name
    stage1_steps: int = 1200
    stage2_steps: int = 200
    batch_size: int = 8
    report_repeats: int = 6
    eval_max_new_tokens: int = 160

    def __post_init__(self) -> None:
        grid_side = self.grid[1] // self.patch
        if self.grid[1] != self.grid[2] or self.grid[1] % self.patch or grid_side % 2:
            raise ValueError(
                f"grid={self.grid}, patch={self.patch}: use square slices whose side is an even multiple "
                f"of the patch size (InternVL's pixel shuffle halves the patch grid)"
            )

    @property
    def visual_tokens(self) -> int:
        groups = math.ceil(self.grid[0] / 3)
        side = self.grid[1] // self.patch // 2
        return groups * side * side


# The shipped demo model: about an hour on a 2-core CPU. 36 slices (about 8 mm) rather than 24
# (12 mm), the body window and the tower's lesion pretraining: see docs/MODEL_CARD.md for what each
# changed.
SMALL = DemoBudget(
    grid=(36, 96, 96),
    train=2000,
    val=4,
    window="body",
    tower_steps=3000,
    slab_steps=1500,
    slab_caption_style="findings_list",
    lesion_slab_share=0.5,
)
BUDGETS: dict[str, DemoBudget] = {
    "small": SMALL,
    # Ablations: the demo's benchmark and 2D checkpoints, a fifth of the 3D steps, per seed.
    "ablation": replace(SMALL, stage1_steps=150, stage2_steps=30, test=16),
    # Tests: every step runs in seconds; the numbers mean nothing.
    "toy": replace(
        SMALL,
        grid=(12, 48, 48),
        train=4,
        val=1,
        test=4,
        vocab_size=400,
        vision_hidden=32,
        vision_layers=3,
        patch=8,
        text_hidden=64,
        text_layers=2,
        tower_steps=3,
        tower_batch=4,
        slab_steps=3,
        slab_batch=4,
        stage1_steps=3,
        stage2_steps=2,
        batch_size=2,
        report_repeats=1,
        eval_max_new_tokens=12,
    ),
}

ABLATIONS: dict[str, dict[str, Any]] = {
    # name -> (K, MoE mode, 2D source): one factor changed from the demo's recipe each time
    "K=2, TGH-MoE hard (demo recipe)": {"k": 2, "moe": "tgh_hard", "source": "2d_checkpoint"},
    "K=0 (2D only), TGH-MoE hard": {"k": 0, "moe": "tgh_hard", "source": "2d_checkpoint"},
    "K=2, no MoE": {"k": 2, "moe": "none", "source": "2d_checkpoint"},
    "K=2, token-level MoE": {"k": 2, "moe": "token", "source": "2d_checkpoint"},
    "K=2, TGH-MoE soft": {"k": 2, "moe": "tgh_soft", "source": "2d_checkpoint"},
    "K=2, TGH-MoE hard, from scratch": {"k": 2, "moe": "tgh_hard", "source": "2d_random"},
}


# ----------------------------------------------------------------------------------------------
# Steps 1-2: data and tokenizer


def build_data(bench_dir: Path, budget: DemoBudget, seed: int = 0) -> Path:
    """The lesion benchmark at the budget's grid and window (phantoms only)."""
    from model_core.benchmark import BenchmarkConfig, build_benchmark

    if not (bench_dir / "benchmark.json").is_file():
        counts = {"train": budget.train, "validation": budget.val, "test": budget.test}
        config = BenchmarkConfig(counts=counts, seed=seed, grid=budget.grid, window=budget.window)
        build_benchmark(bench_dir, config)
    return bench_dir


def tokenizer_corpus(bench_dir: Path) -> list[str]:
    """Training-split texts only: reports, questions, choices, answers and the prompts."""
    from model_core.benchmark.slabs import (
        FINDINGS_LIST_PROMPT,
        NO_FINDINGS_LIST,
        NORMAL_SLAB_TEXT,
        SLAB_PROMPT,
    )
    from model_core.data.formats import read_m3d_vqa
    from model_core.prompts import DEFAULT_REPORT_PROMPT

    cap = json.loads((bench_dir / "M3D_Cap.json").read_text(encoding="utf-8"))
    texts = [(bench_dir / entry["text"]).read_text(encoding="utf-8") for entry in cap["train"]]
    for record in read_m3d_vqa(bench_dir / "M3D_VQA_train.csv"):
        texts.append(
            f"{record.question} Choices: " + " ".join(f"{k}. {v}" for k, v in record.choices.items())
        )
        texts.append(f"{record.answer_choice}. {record.answer}")
    return [
        *texts,
        DEFAULT_REPORT_PROMPT,
        SLAB_PROMPT,
        NORMAL_SLAB_TEXT,
        FINDINGS_LIST_PROMPT,
        NO_FINDINGS_LIST,
    ]


# ----------------------------------------------------------------------------------------------
# Step 3: the 2D model


def build_2d_mllm(tokenizer, budget: DemoBudget, seed: int):
    """A random InternVL 2D MLLM sized by ``budget`` (tower on ``H x W`` slabs, Qwen2 LM)."""
    from transformers import InternVLVisionConfig, Qwen2Config

    torch.manual_seed(seed)
    vision = InternVLVisionConfig(
        hidden_size=budget.vision_hidden,
        num_hidden_layers=budget.vision_layers,
        num_attention_heads=4,
        intermediate_size=budget.vision_hidden * 4,
        image_size=budget.grid[1],
        patch_size=budget.patch,
        use_qk_norm=True,
        layer_scale_init_value=0.1,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=budget.text_hidden,
        intermediate_size=budget.text_hidden * 3,
        num_hidden_layers=budget.text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return assemble_internvl(vision, text, tokenizer)


def as_2d_ctmllm(mllm, tokenizer, budget: DemoBudget):
    """The 2D model as a CTMLLM with K=0 and no MoE: a 3-slice volume is its one image."""
    from model_core.config import GenerationConfig, MoEConfig, VolumeAdapterConfig
    from model_core.families import InternVLFamily
    from model_core.model import CTMLLM

    return CTMLLM.from_2d_model(
        mllm,
        tokenizer,
        volume=VolumeAdapterConfig(num_3d_blocks=0, max_visual_tokens=budget.visual_tokens),
        moe=MoEConfig(mode="none"),
        generation=GenerationConfig(max_new_tokens=budget.eval_max_new_tokens),
        image_mean=InternVLFamily.image_mean,
        image_std=InternVLFamily.image_std,
        source="demo-2d-slab-pretraining",
    )


def _optimise(
    parameters: list[torch.nn.Parameter],
    batches: Iterator[Any],
    loss_of: Callable[[Any], torch.Tensor],
    steps: int,
    lr: float,
    name: str,
    log: Callable[[str], None],
) -> list[dict[str, float]]:
    """AdamW with linear warm-up and cosine decay over ``steps`` batches; returns the logged losses."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=max(1, steps // 20), num_training_steps=steps
    )
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        loss = loss_of(next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            value = float(loss.detach())
            history.append({"step": step, "loss": value, "seconds": time.perf_counter() - started})
            log(f"{name} step {step}/{steps}: loss {value:.4f}")
    return history


def pretrain_2d(
    model,
    dataset,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Callable[[str], None],
    train_tower: bool = True,
) -> list[dict[str, float]]:
    """Train the K=0 CTMLLM on slab samples: every part, or (``train_tower`` False, for a tower
    that was pretrained) the projector and language model only, which keeps what the tower learned."""
    from model_core.training.data import make_loader

    torch.manual_seed(seed)
    model.train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(train_tower or not name.startswith("vision_tower."))
    loader = make_loader(dataset, batch_size, seed)

    def batches() -> Iterator[dict[str, Any]]:
        for epoch in itertools.count():
            loader.sampler.set_epoch(epoch)
            yield from loader

    def loss_of(batch: dict[str, Any]) -> torch.Tensor:
        volumes = batch["volumes"].to(model.device)
        return model.compute_loss(volumes, batch["prompts"], batch["answers"], batch["tasks"]).loss

    trained = [p for p in model.parameters() if p.requires_grad]
    return _optimise(trained, batches(), loss_of, steps, lr, "2D", log)


def _token_grid(model, dataset) -> tuple[int, int]:
    """The side of the square grid of visual tokens one slab gives, and their width."""
    with torch.no_grad():
        tokens = model.encode_volumes(torch.from_numpy(np.asarray(dataset[0].volume))[None].to(model.device))
    return math.isqrt(tokens.shape[1]), tokens.shape[2]


def _slab_batch(dataset, indices: Sequence[int], cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Volumes ``(B, 3, H, W)`` and token lesion targets ``(B, cells², labels)`` of slab samples."""
    from model_core.benchmark.findings import Finding
    from model_core.benchmark.slabs import token_lesion_targets

    samples = [dataset[int(i)] for i in indices]
    volumes = torch.stack([torch.from_numpy(np.asarray(s.volume, dtype=np.float32)) for s in samples])
    targets = [
        token_lesion_targets([Finding.from_dict(f) for f in s.meta["findings"]], volumes.shape[-2:], cells)
        for s in samples
    ]
    return volumes, torch.from_numpy(np.stack(targets))


def pretrain_tower(
    model, dataset, steps: int, batch_size: int, lr: float, seed: int, log: Callable[[str], None]
) -> tuple[list[dict[str, float]], torch.nn.Linear]:
    """Teach the tower and projector where lesions are, before any caption (module docstring,
    step 3): a linear head on each visual token predicts ``TOKEN_LESION_LABELS`` of its cell.

    Positives are rare (a few tokens of a few slabs), so they weigh ``POSITIVE_WEIGHT`` in the loss.
    Returns the logged losses and the head (for ``tower_lesion_auc``; the checkpoint drops it).
    """
    from model_core.benchmark.slabs import TOKEN_LESION_LABELS

    torch.manual_seed(seed)
    cells, hidden = _token_grid(model, dataset)
    model.train()
    head = torch.nn.Linear(hidden, len(TOKEN_LESION_LABELS)).to(model.device)
    visual = [p for name, p in model.named_parameters() if not name.startswith("language_model.")]
    rng = np.random.default_rng(seed)
    weight = torch.tensor(POSITIVE_WEIGHT, device=model.device)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield _slab_batch(dataset, rng.integers(0, len(dataset), batch_size), cells)

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        volumes, targets = (tensor.to(model.device) for tensor in batch)
        logits = head(model.encode_volumes(volumes))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)

    history = _optimise([*visual, *head.parameters()], batches(), loss_of, steps, lr, "tower", log)
    return history, head


def tower_lesion_auc(model, head: torch.nn.Linear, dataset, batch_size: int = 32) -> dict[str, float | None]:
    """Slab-level ROC AUC of each ``TOKEN_LESION_LABELS`` (highest token score against presence)
    and of ``any`` lesion, on held-out slabs: does the pretrained tower see lesions?"""
    from model_core.benchmark.findings import KINDS
    from model_core.benchmark.slabs import TOKEN_LESION_LABELS

    model.eval()
    cells, _ = _token_grid(model, dataset)
    scores, truth = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            volumes, targets = _slab_batch(dataset, indices, cells)
            scores.append(torch.sigmoid(head(model.encode_volumes(volumes.to(model.device)))).amax(1).cpu())
            truth.append(targets.amax(1))
    score, present = torch.cat(scores), torch.cat(truth).bool()
    result = {label: roc_auc(score[:, i], present[:, i]) for i, label in enumerate(TOKEN_LESION_LABELS)}
    kinds = [TOKEN_LESION_LABELS.index(kind) for kind in KINDS]
    result["any"] = roc_auc(score[:, kinds].amax(1), present.any(1))
    return result


def roc_auc(score: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve (ties count half); None when one class is missing."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return round(float(greater + 0.5 * ties), 4)


def export_2d_checkpoint(model, folder: Path) -> Path:
    """Write a K=0, MoE-free CTMLLM as a Hugging Face 2D checkpoint folder that
    ``CTMLLM.from_2d_pretrained`` converts (weights, tokenizer, ``preprocessor_config.json``)."""
    from transformers import AutoModelForImageTextToText

    from model_core.families import map_ctmllm_state_dict_name
    from model_core.model import mllm_config_from_dict

    if model.config.moe.enabled or model.config.volume.num_3d_blocks:
        raise ValueError("only a 2D CTMLLM (num_3d_blocks 0, moe.mode 'none') exports as a 2D checkpoint")
    mllm = AutoModelForImageTextToText.from_config(mllm_config_from_dict(model.config.mllm_config))
    state = {map_ctmllm_state_dict_name(name): value for name, value in model.state_dict().items()}
    mllm.load_state_dict(state, strict=True)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    mllm.save_pretrained(staging, safe_serialization=True)
    model.tokenizer.save_pretrained(staging)
    normalisation = {"image_mean": list(model.config.image_mean), "image_std": list(model.config.image_std)}
    (staging / "preprocessor_config.json").write_text(json.dumps(normalisation), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def make_2d_checkpoints(
    out: Path, bench: Path, budget: DemoBudget, seed: int, log: Callable[[str], None], device: str = "cpu"
) -> None:
    """``tokenizer/``, ``2d_random/`` (untrained) and ``2d_checkpoint/`` (slab-pretrained, trained on
    ``device``)."""
    from transformers import AutoTokenizer

    from model_core.benchmark.slabs import SlabDataset, slab_items

    if not (out / "tokenizer" / "tokenizer.json").is_file():
        train_bpe_tokenizer(tokenizer_corpus(bench), budget.vocab_size).save_pretrained(out / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    if not (out / "2d_random" / "config.json").is_file():
        export_2d_checkpoint(
            as_2d_ctmllm(build_2d_mllm(tokenizer, budget, seed), tokenizer, budget), out / "2d_random"
        )
    if (out / "2d_checkpoint" / "config.json").is_file():
        return
    model = as_2d_ctmllm(build_2d_mllm(tokenizer, budget, seed), tokenizer, budget).to(device)
    items = slab_items(
        bench,
        "train",
        questions_per_slab=1,
        seed=seed,
        min_lesion_share=budget.lesion_slab_share,
        caption_style=budget.slab_caption_style,
    )
    dataset = SlabDataset(items)
    tower_record = None
    if budget.tower_steps:
        started = time.perf_counter()
        tower_record = _tower_step(model, dataset, bench, budget, seed, log)
        record_cost(out, "tower_pretraining", started, {"steps": budget.tower_steps}, device)
    log(f"2D pretraining on {len(dataset)} slab samples, {budget.slab_steps} steps")
    started = time.perf_counter()
    history = pretrain_2d(
        model,
        dataset,
        budget.slab_steps,
        budget.slab_batch,
        budget.slab_lr,
        seed,
        log,
        train_tower=not budget.tower_steps,
    )
    export_2d_checkpoint(model.to("cpu").eval(), out / "2d_checkpoint")
    record_cost(out, "2d_pretraining", started, {"steps": budget.slab_steps, "samples": len(dataset)}, device)
    (out / "2d_checkpoint" / "pretraining_log.json").write_text(
        json.dumps(history, indent=1), encoding="utf-8"
    )
    if tower_record is not None:
        (out / "2d_checkpoint" / TOWER_FILE).write_text(json.dumps(tower_record, indent=1), encoding="utf-8")


def _tower_step(
    model, dataset, bench: Path, budget: DemoBudget, seed: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Tower pretraining on the training slabs' captions (one sample per slab), then its lesion
    AUC on held-out test slabs (half with a lesion)."""
    from model_core.benchmark.slabs import SlabDataset, slab_items

    slabs = SlabDataset([item for item in dataset.items if item.task == "report"])
    log(f"tower pretraining on {len(slabs)} slabs, {budget.tower_steps} steps")
    history, head = pretrain_tower(
        model, slabs, budget.tower_steps, budget.tower_batch, budget.tower_lr, seed, log
    )
    held_out = slab_items(bench, "test", questions_per_slab=0, seed=seed, min_lesion_share=0.5)
    auc = tower_lesion_auc(model, head, SlabDataset(held_out[:TOWER_AUC_SLABS]))
    log(f"tower lesion AUC on held-out slabs: {auc}")
    return {
        "history": history,
        "held_out_slabs": min(len(held_out), TOWER_AUC_SLABS),
        "auc": auc,
    }


# ----------------------------------------------------------------------------------------------
# Step 4: 3D transfer and the two stages, through the training CLI


def write_3d_config(
    path: Path,
    bench: Path,
    source: Path,
    run_dir: Path,
    budget: DemoBudget,
    seed: int,
    num_3d_blocks: int = 2,
    moe_mode: str = "tgh_hard",
    device: str = "cpu",
) -> Path:
    """``configs/demo_3d.yaml`` with this run's data, source, seed, K, MoE, step counts and device.

    Modes without task experts have no stage 2, so stage 1 gets both stages' steps (equal budget).
    """
    config = yaml.safe_load(TEMPLATE_3D.read_text(encoding="utf-8"))
    task_level = moe_mode in ("tgh_hard", "tgh_soft")
    config.update(
        out_dir=str(run_dir),
        seed=seed,
        device=device,
        preprocessing={"window": budget.window, "target_shape": list(budget.grid)},
        data={
            # a study has one report but about 12 question samples: repeat the reports so both tasks
            # get a comparable share of the steps
            "train": [
                *[{"kind": "m3d_cap", "json_path": str(bench / "M3D_Cap.json"), "split": "train"}]
                * budget.report_repeats,
                {"kind": "m3d_vqa", "csv_path": str(bench / "M3D_VQA_train.csv"), "mode": "both"},
            ],
            "eval": None,
        },
    )
    config["model"].update(
        source=str(source), num_3d_blocks=num_3d_blocks, max_visual_tokens=budget.visual_tokens
    )
    config["moe"]["mode"] = moe_mode
    config["train"]["batch_size"] = budget.batch_size
    config["train"]["warmup_steps"] = min(config["train"]["warmup_steps"], max(1, budget.stage1_steps // 10))
    stage1 = budget.stage1_steps + (0 if task_level else budget.stage2_steps)
    config["stage1"]["max_steps"] = stage1
    config["stage2"]["max_steps"] = budget.stage2_steps
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run_module(args: Sequence[str], log: Callable[[str], None]) -> None:
    """Run ``python -m <args>`` in the repository root; a failure raises with the command's tail."""
    command = [sys.executable, "-m", *map(str, args)]
    log("$ " + " ".join(command[2:]))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same threads as here
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, encoding="utf-8", env=env)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"`{' '.join(command[2:])}` failed with exit {done.returncode}:\n{tail}")


def train_3d(
    config_path: Path, run_dir: Path, moe_mode: str, log: Callable[[str], None], device: str = "cpu"
) -> Path:
    """Stage 1 (and stage 2 for task-level MoE); returns the final merged model folder."""
    started, trained = time.perf_counter(), False
    if not (run_dir / "stage1" / "final" / "ctmllm_config.json").is_file():
        shutil.rmtree(run_dir / "stage1", ignore_errors=True)
        run_module(["model_core.train", "--config", config_path, "--stage", 1, "--no-progress"], log)
        trained = True
    final = run_dir / "stage1" / "final"
    if moe_mode in ("tgh_hard", "tgh_soft"):
        if not (run_dir / "stage2" / "final" / "ctmllm_config.json").is_file():
            shutil.rmtree(run_dir / "stage2", ignore_errors=True)
            run_module(["model_core.train", "--config", config_path, "--stage", 2, "--no-progress"], log)
            trained = True
        final = run_dir / "stage2" / "final"
    if trained:  # a continued run that trained nothing keeps the recorded cost
        record_cost(run_dir, "3d_training", started, device=device)
    return final


# ----------------------------------------------------------------------------------------------
# Step 5: evaluation on the held-out split


def evaluate_model(
    model_dir: Path,
    bench: Path,
    eval_dir: Path,
    budget: DemoBudget,
    log: Callable[[str], None],
    full: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Report and VQA evaluation plus finding-level scores; returns the collected numbers.

    ``full`` False (ablations) runs closed VQA and the report without METEOR/BERTScore.
    """
    text_metrics = [] if full else ["--no-bertscore", "--no-meteor"]
    common = ["--model", model_dir, "--device", device, "--no-progress", *text_metrics]
    runs = {
        "report": ["--data", f"{bench / 'M3D_Cap.json'}:test", "--task", "report"],
        "vqa": [
            "--data",
            bench / "M3D_VQA_test.csv",
            "--task",
            "vqa",
            "--vqa-mode",
            "both" if full else "closed",
        ],
    }
    for name, args in runs.items():
        if not (eval_dir / name / "summary.json").is_file():
            tokens = budget.eval_max_new_tokens if name == "report" else 24
            run_module(
                ["model_core.evaluate", *args, *common, "--max-new-tokens", tokens, "--out", eval_dir / name],
                log,
            )
    scores = eval_dir / "findings.json"
    if not scores.is_file():
        run_module(
            [
                "model_core.benchmark",
                "score",
                "--benchmark",
                bench,
                "--samples",
                eval_dir / "report" / "samples.csv",
                "--out",
                scores,
            ],
            log,
        )
    return collect_scores(eval_dir)


def collect_scores(eval_dir: Path) -> dict[str, Any]:
    """The headline numbers of one evaluation folder (report, vqa, findings.json)."""
    report = json.loads((eval_dir / "report" / "summary.json").read_text(encoding="utf-8"))
    vqa = json.loads((eval_dir / "vqa" / "summary.json").read_text(encoding="utf-8"))
    findings = json.loads((eval_dir / "findings.json").read_text(encoding="utf-8"))
    closed = vqa.get("closed_accuracy") or {}
    return {
        "report_metrics": report["metrics"],
        "bertscore_model": report.get("bertscore_model"),
        "closed_accuracy": closed,
        "by_question_type": vqa["by_question_type"],
        "open_metrics": vqa["metrics"],
        "findings": findings,
        "counts": {"report": report["counts"], "vqa": vqa["counts"]},
    }


def slab_lesion_check(
    checkpoint: Path, bench: Path, per_group: int = 30, caption_style: str = "report"
) -> dict[str, int]:
    """Does the 2D checkpoint see lesions? Captions it writes (in the ``caption_style`` it was
    trained on) for held-out test slabs with and without a lesion: where a 3D failure to report
    lesions starts."""
    from model_core.benchmark.slabs import SlabDataset, caption_names_lesion, slab_items
    from model_core.config import VolumeAdapterConfig
    from model_core.model import CTMLLM

    model = CTMLLM.from_2d_pretrained(checkpoint, volume=VolumeAdapterConfig(num_3d_blocks=0)).eval()
    captions = slab_items(bench, "test", questions_per_slab=0, caption_style=caption_style)
    with_lesion = [item for item in captions if item.meta["findings"]][:per_group]
    without = [item for item in captions if not item.meta["findings"]][:per_group]
    texts = [
        model.generate(sample.load_volume(), sample.prompt, task="report", max_new_tokens=48).text
        for sample in SlabDataset(with_lesion + without)
    ]
    reported = [caption_names_lesion(text, caption_style) for text in texts]
    return {
        "slabs_with_lesion": len(with_lesion),
        "reported_on_lesion_slabs": sum(reported[: len(with_lesion)]),
        "slabs_without": len(without),
        "reported_on_normal_slabs": sum(reported[len(with_lesion) :]),
        "distinct_captions": len(set(texts)),
    }


# ----------------------------------------------------------------------------------------------
# Step 6: cost, shipping


def record_cost(
    folder: Path, step: str, started: float, extra: dict[str, Any] | None = None, device: str = "cpu"
) -> None:
    """Add one step's wall-clock minutes and device to ``folder/cost.json``."""
    path = folder / COST_FILE
    cost = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    on_gpu = torch.device(device).type == "cuda"
    cost[step] = {
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "device": f"GPU ({torch.cuda.get_device_name(device)})"
        if on_gpu
        else f"CPU ({torch.get_num_threads()} threads)",
        **(extra or {}),
    }
    path.write_text(json.dumps(cost, indent=1), encoding="utf-8")


def ship_model(model_dir: Path, target: Path) -> Path:
    """Copy a CTMLLM folder with float16 weights (``from_pretrained`` casts them back on load);
    refuses a result over 30 MB, the limit for files in the repository."""
    from model_core.model import CTMLLM

    model = CTMLLM.from_pretrained(model_dir).to(torch.float16)
    staging = model.save_pretrained(target.with_name(target.name + ".partial"))
    size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
    if size > MAX_SHIPPED_BYTES:
        shutil.rmtree(staging)
        raise ValueError(f"the model is {size / 2**20:.1f} MB in float16; the repository takes at most 30 MB")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


# ----------------------------------------------------------------------------------------------
# The whole run


def run_pipeline(
    out: Path,
    budget_name: str = "small",
    seed: int = 0,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> dict[str, Any]:
    """Steps 1-5 for the demo recipe, training and evaluating on ``device``; returns the scores
    (also in ``out/scores.json``)."""
    budget = BUDGETS[budget_name]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not (out / "bench" / "benchmark.json").is_file():  # a continued run keeps the first build's cost
        build_data(out / "bench", budget)
        record_cost(out, "benchmark_build", started)
    bench = out / "bench"
    make_2d_checkpoints(out, bench, budget, seed, log, device)
    config = write_3d_config(
        out / "3d" / "config.yaml", bench, out / "2d_checkpoint", out / "3d", budget, seed, device=device
    )
    final = train_3d(config, out / "3d", "tgh_hard", log, device)
    scores = evaluate_model(final, bench, out / "eval", budget, log, device=device)
    scores.update(budget=budget_name, budget_settings=asdict(budget), model_dir=str(final))
    scores["slab_check_2d"] = slab_lesion_check(
        out / "2d_checkpoint",
        bench,
        per_group=4 if budget_name == "toy" else 30,
        caption_style=budget.slab_caption_style,
    )
    tower = out / "2d_checkpoint" / TOWER_FILE
    if tower.is_file():
        scores["tower_auc"] = json.loads(tower.read_text(encoding="utf-8"))["auc"]
    (out / "scores.json").write_text(json.dumps(scores, indent=1), encoding="utf-8")
    return scores


def run_ablations(
    out: Path,
    seeds: Sequence[int],
    names: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> dict[str, list[dict[str, Any]]]:
    """Each ablation variant at the ``ablation`` budget for each seed, sharing the demo run's
    benchmark and 2D checkpoints (``out`` is the demo run folder); results in ``out/ablations.json``."""
    budget = BUDGETS["ablation"]
    bench = out / "bench"
    # held-out studies of another seed: not the demo model's test studies
    test_bench = build_data(out / "ablation_bench", replace(budget, train=0, val=0), seed=1)
    results: dict[str, list[dict[str, Any]]] = {}
    path = out / "ablations.json"
    if path.is_file():
        results = json.loads(path.read_text(encoding="utf-8"))
    for name in names or list(ABLATIONS):
        variant = ABLATIONS[name]
        for seed in seeds:
            if any(r["seed"] == seed for r in results.get(name, [])):
                continue
            slug = f"{variant['moe']}_k{variant['k']}_{variant['source']}_s{seed}"
            run_dir = out / "ablations" / slug
            config = write_3d_config(
                run_dir / "config.yaml",
                bench,
                out / variant["source"],
                run_dir,
                budget,
                seed,
                variant["k"],
                variant["moe"],
                device,
            )
            started = time.perf_counter()
            final = train_3d(config, run_dir, variant["moe"], log, device)
            minutes = (time.perf_counter() - started) / 60
            scores = evaluate_model(
                final, test_bench, run_dir / "eval", budget, log, full=False, device=device
            )
            scores["router_accuracy"] = (
                router_accuracy(final, test_bench) if variant["moe"].startswith("tgh") else None
            )
            results.setdefault(name, []).append({"seed": seed, "train_minutes": round(minutes, 2), **scores})
            path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


def router_accuracy(model_dir: Path, bench: Path, limit: int = 200) -> float:
    """How often the task router picks the sample's own task from its prompt alone (test prompts:
    the report prompt and every test question)."""
    from model_core.data.formats import read_m3d_vqa
    from model_core.model import CTMLLM
    from model_core.prompts import DEFAULT_REPORT_PROMPT, format_closed_question

    model = CTMLLM.from_pretrained(model_dir)
    prompts = [(DEFAULT_REPORT_PROMPT, "report")]
    for record in read_m3d_vqa(bench / "M3D_VQA_test.csv")[:limit]:
        prompts += [
            (record.question, "vqa"),
            (format_closed_question(record.question, record.choices), "vqa"),
        ]
    moe = model.volume_adapter.moe
    router, tasks = moe.task_router, moe.set_names
    with torch.no_grad():
        logits = router(model.pooled_prompt_embeddings([p for p, _ in prompts]))
    picked = [tasks[i] for i in logits.argmax(dim=-1).tolist()]
    return float(np.mean([p == t for p, (_, t) in zip(picked, prompts, strict=True)]))


# ----------------------------------------------------------------------------------------------
# The results page, from the JSON outputs only


def _fmt(value: Any, digits: int = 3) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
    )


def _mean_spread(values: Sequence[float | None]) -> str:
    """``mean ± sd (n)`` over seeds; the spread is the sample standard deviation."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return "n/a"
    spread = float(np.std(present, ddof=1)) if len(present) > 1 else float("nan")
    return f"{np.mean(present):.3f} ± {_fmt(spread)} (n={len(present)})"


def results_markdown(
    scores: dict[str, Any], cost: dict[str, Any], ablations: dict[str, list[dict]], run_dir: str = "runs/demo"
) -> str:
    """docs/RESULTS.md: the demo model's held-out scores, training cost and the ablation table."""
    findings, closed = scores["findings"], scores["closed_accuracy"]
    report, open_m = scores["report_metrics"], scores["open_metrics"]
    b = scores["budget_settings"]
    lines = [
        "# Results: the demo model on the lesion benchmark's held-out split",
        "",
        f"Written by `python -m model_core.demo_pipeline --out {run_dir} --budget small --ship "
        "--ablations --results docs/RESULTS.md` from the JSON that `python -m model_core.evaluate` and "
        "`python -m model_core.benchmark score` wrote; no number here is typed by hand. Greedy decoding.",
        "",
        f"Benchmark: grid {b['grid'][0]}x{b['grid'][1]}x{b['grid'][2]}, window `{b.get('window', 'soft_tissue')}`, "
        f"{b['train']} training studies, "
        f"{b['test']} held-out test studies (held-out body/organ-size bands; every 4th study normal).",
        "",
        "## Demo model (K=2, TGH-MoE hard, transferred from the slab-pretrained 2D model)",
        "",
        "| metric | value | target |",
        "| --- | --- | --- |",
        f"| finding-level F1 (organ+side, kind, size bucket) | {_fmt(findings['f1'])} | >= 0.80 |",
        f"| finding precision / recall | {_fmt(findings['precision'])} / {_fmt(findings['recall'])} | |",
        f"| organ-only F1 / organ+kind F1 | {_fmt(findings['organ_f1'])} / {_fmt(findings['organ_kind_f1'])} | |",
        f"| false findings on normal studies (share with any) | {_fmt(findings['false_finding_rate_on_normals'])} "
        f"of {int(findings['n_normal_studies'])} | <= 0.05 |",
        f"| closed-VQA accuracy | {_fmt(closed.get('accuracy'))} (n={closed.get('n')}) | >= 0.90 |",
        "",
        "Closed-VQA accuracy per question type:",
        "",
        "| type | accuracy | n |",
        "| --- | --- | --- |",
    ]
    for kind, entry in sorted(closed.get("per_type", {}).items()):
        lines.append(f"| {kind} | {_fmt(entry['accuracy'])} | {entry['n']} |")
    lines += [
        "",
        f"Text metrics (means over samples; BERTScore on {scores.get('bertscore_model')}):",
        "",
        "| | BLEU-1 | ROUGE-1 | METEOR | BERTScore F1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, values in (("report", report), ("open VQA", open_m)):
        cells = [_fmt(values.get(name)) for name in ("bleu1", "rouge1", "meteor", "bertscore_f1")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "distinct_reports" in scores:
        lines += [
            "",
            f"Distinct generated reports: {scores['distinct_reports']} for {scores['counts']['report']['samples']} "
            "test studies (a model that reads the image writes different reports for different studies).",
        ]
    check = scores.get("slab_check_2d")
    if check:
        lines += [
            "",
            f"The 2D checkpoint on held-out test slabs: a finding reported on {check['reported_on_lesion_slabs']} of "
            f"{check['slabs_with_lesion']} slabs with a lesion and on {check['reported_on_normal_slabs']} of "
            f"{check['slabs_without']} without; {check['distinct_captions']} distinct caption(s).",
        ]
    tower_auc = scores.get("tower_auc")
    if tower_auc:
        lines += [
            "",
            "The tower after its lesion pretraining (step 3), on held-out test slabs: ROC AUC of its "
            "highest token score for each label against the label's presence in the slab.",
            "",
            "| " + " | ".join(tower_auc) + " |",
            "| " + " | ".join("---" for _ in tower_auc) + " |",
            "| " + " | ".join(_fmt(value) for value in tower_auc.values()) + " |",
        ]
    lines += ["", "## Training cost", "", "| step | minutes | device |", "| --- | --- | --- |"]
    for step, entry in cost.items():
        lines.append(f"| {step} | {entry['minutes']} | {entry['device']} |")
    lines += ["", "## Ablations (ablation budget, equal steps per variant; mean ± sd over seeds)", ""]
    if not ablations:
        lines.append("Not run.")
    else:
        ab = BUDGETS["ablation"]
        lines += [
            f"Each variant: {ab.stage1_steps} stage-1 + {ab.stage2_steps} stage-2 steps (variants without task "
            f"experts: {ab.stage1_steps + ab.stage2_steps} stage-1 steps), batch {ab.batch_size}, from the same "
            f"benchmark and 2D checkpoints; evaluated on {ab.test} other held-out studies (benchmark seed 1; closed VQA, reports). "
            "Train minutes are wall-clock time on a shared CPU where other jobs ran at the same time.",
            "",
            "| variant | closed-VQA acc. | finding F1 | organ F1 | false findings on normals | task-router acc. "
            "| train minutes |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name in ABLATIONS:
            runs = ablations.get(name, [])
            if not runs:
                lines.append(f"| {name} |" + " not run |" * 6)
                continue
            cells = [
                _mean_spread([r["closed_accuracy"].get("accuracy") for r in runs]),
                _mean_spread([r["findings"]["f1"] for r in runs]),
                _mean_spread([r["findings"]["organ_f1"] for r in runs]),
                _mean_spread([r["findings"]["false_finding_rate_on_normals"] for r in runs]),
                _mean_spread([r.get("router_accuracy") for r in runs]),
                _mean_spread([r.get("train_minutes") for r in runs]),
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        f1s = [r["findings"]["f1"] for runs in ablations.values() for r in runs]
        if f1s and max(f1s) == 0:
            lines += [
                "",
                "No variant reports any lesion (finding F1 0 in every run), so the closed-VQA differences "
                "come from the language prior, not the image: at this budget the ablation does not yet "
                "tell the variants apart. The task-router accuracy is measured on the test prompts alone.",
            ]
    return "\n".join(lines) + "\n"


def write_results(out: Path, target: Path) -> Path:
    """Render ``out/scores.json``, ``out/cost.json`` (+ the 3D run's) and ``out/ablations.json``."""
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    with open(out / "eval" / "report" / "samples.csv", newline="", encoding="utf-8") as stream:
        scores["distinct_reports"] = len({row["prediction"] for row in csv.DictReader(stream)})
    cost = json.loads((out / COST_FILE).read_text(encoding="utf-8"))
    three_d = out / "3d" / COST_FILE
    if three_d.is_file():
        cost.update(json.loads(three_d.read_text(encoding="utf-8")))
    ablations = (
        json.loads((out / "ablations.json").read_text(encoding="utf-8"))
        if (out / "ablations.json").is_file()
        else {}
    )
    target.write_text(results_markdown(scores, cost, ablations, str(out)), encoding="utf-8")
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_core.demo_pipeline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="runs/demo", help="run folder (every step's output)")
    parser.add_argument("--budget", default="small", choices=sorted(BUDGETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy shared CPU)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "auto"),
        help="where every step trains and evaluates",
    )
    parser.add_argument(
        "--ship", action="store_true", help="copy the model to model_core/demo_model (float16)"
    )
    parser.add_argument(
        "--ship-to", default=None, help="ship to this folder instead of model_core/demo_model"
    )
    parser.add_argument("--ablations", action="store_true", help="also run the ablations (ablation budget)")
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--results", default=None, help="write the results tables (Markdown) to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from model_core.hub import pick_device

        device = str(pick_device(args.device))
        scores = run_pipeline(out, args.budget, args.seed, device=device)
        if args.ship or args.ship_to:
            from model_core.hub import DEMO_MODEL_DIR

            target = ship_model(
                Path(scores["model_dir"]), Path(args.ship_to) if args.ship_to else DEMO_MODEL_DIR
            )
            print(f"shipped {target}")
        if args.ablations:
            run_ablations(out, args.ablation_seeds, device=device)
        if args.results:
            print(f"wrote {write_results(out, Path(args.results))}")
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {"closed_accuracy": scores["closed_accuracy"].get("accuracy"), "f1": scores["findings"]["f1"]}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
