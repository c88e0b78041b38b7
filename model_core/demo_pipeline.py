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
   When the budget has ``tower_steps``, the tower is first pretrained on its own
   (``tower_rounds/<n>/``, then ``2d_tower/``): a linear head on every patch learns which lesion
   kinds touch it (``demo_training.pretrain_tower``; the head is dropped), in rounds that each
   resume the last and are scored on the held-out studies. This is the demo's stand-in for the
   pretraining real towers get before their MLLM is trained (CLIP, InternViT): trained only
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
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from model_core.demo_budget import BUDGETS, DemoBudget, ablation_variants
from model_core.demo_evaluation import (
    evaluate_model,
    router_accuracy,
    run_module,
    slab_lesion_check,
)
from model_core.tiny import assemble_internvl, train_bpe_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_3D = REPO_ROOT / "configs" / "demo_3d.yaml"
MAX_SHIPPED_BYTES = 30 * 1024 * 1024
COST_FILE = "cost.json"
TOWER_FILE = "tower_pretraining.json"
LESION_HEAD_FILE = "tower_lesion_head.safetensors"
TOWER_ROUNDS_DIR = "tower_rounds"


# ----------------------------------------------------------------------------------------------
# Steps 1-2: data and tokenizer


def build_data(bench_dir: Path, budget: DemoBudget, seed: int = 0) -> Path:
    """The lesion benchmark at the budget's grid, window, real-CT share and framing."""
    from model_core.benchmark import BenchmarkConfig, build_benchmark

    if not (bench_dir / "benchmark.json").is_file():
        counts = {"train": budget.train, "validation": budget.val, "test": budget.test}
        config = BenchmarkConfig(
            counts=counts,
            seed=seed,
            grid=budget.grid,
            window=budget.window,
            real_anatomy=budget.real_fraction > 0,
            real_fraction=budget.real_fraction,
            fov_shift_share=budget.fov_shift_share,
        )
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
        " ".join(f"Frame{index}:" for index in range(1, 41)),  # InternVL's slice-group labels
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
        max_position_embeddings=2048,  # 768 visual tokens, their framing, prompt and report
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


def export_2d_checkpoint(model, folder: Path) -> Path:
    """Write a K=0, MoE-free CTMLLM as a Hugging Face 2D checkpoint folder that
    ``CTMLLM.from_2d_pretrained`` converts (weights, tokenizer, ``preprocessor_config.json``)."""
    from transformers import AutoModelForImageTextToText

    from model_core.families import map_ctmllm_state_dict_name
    from model_core.model_files import mllm_config_from_dict

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
    out: Path,
    bench: Path,
    budget: DemoBudget,
    seed: int,
    log: Callable[[str], None],
    device: str = "cpu",
    stop_after_tower: bool = False,
) -> None:
    """``tokenizer/``, ``2d_random/`` (untrained), ``2d_tower/`` (the tower after its lesion
    pretraining, when the budget has one) and ``2d_checkpoint/`` (captioned on slabs), each trained
    on ``device`` and skipped when it exists, so a long run continues where it stopped."""
    from transformers import AutoTokenizer

    from model_core.benchmark.slabs import SlabDataset, slab_items
    from model_core.demo_training import pretrain_2d

    if not (out / "tokenizer" / "tokenizer.json").is_file():
        train_bpe_tokenizer(tokenizer_corpus(bench), budget.vocab_size).save_pretrained(out / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    if not (out / "2d_random" / "config.json").is_file():
        export_2d_checkpoint(
            as_2d_ctmllm(build_2d_mllm(tokenizer, budget, seed), tokenizer, budget), out / "2d_random"
        )
    start_from = out / "2d_tower"
    if budget.tower_steps and not (start_from / TOWER_FILE).is_file():
        train_tower_rounds(out, bench, budget, tokenizer, seed, log, device)
    if stop_after_tower or (out / "2d_checkpoint" / "config.json").is_file():
        return
    model = as_2d_ctmllm(build_2d_mllm(tokenizer, budget, seed), tokenizer, budget)
    if budget.tower_steps:  # only the tower comes from the tower step: the tokenizer may be newer
        load_tower(model, start_from)
    model = model.to(device)
    items = slab_items(
        bench,
        "train",
        questions_per_slab=1,
        seed=seed,
        min_lesion_share=budget.lesion_slab_share,
        caption_style=budget.slab_caption_style,
    )
    dataset = SlabDataset(items)
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
        bf16=budget.bf16,
    )
    export_2d_checkpoint(model.to("cpu").eval(), out / "2d_checkpoint")
    record_cost(out, "2d_pretraining", started, {"steps": budget.slab_steps, "samples": len(dataset)}, device)
    (out / "2d_checkpoint" / "pretraining_log.json").write_text(
        json.dumps(history, indent=1), encoding="utf-8"
    )
    if budget.tower_steps:
        shutil.copy(start_from / TOWER_FILE, out / "2d_checkpoint" / TOWER_FILE)


def load_tower(model, folder: Path) -> None:
    """Put the vision tower of the 2D checkpoint in ``folder`` into ``model`` (a 2D CTMLLM)."""
    from transformers import AutoModelForImageTextToText

    pretrained = AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True)
    model.vision_tower.load_state_dict(model.family.split(pretrained).vision_tower.state_dict())


def train_tower_rounds(
    out: Path,
    bench: Path,
    budget: DemoBudget,
    tokenizer,
    seed: int,
    log: Callable[[str], None],
    device: str = "cpu",
) -> Path:
    """The tower's dense lesion pretraining (``model_core.demo_training``) in ``budget.tower_rounds``
    rounds of ``budget.tower_steps`` steps; returns ``2d_tower/``, the last round.

    Each round continues the previous round's tower and lesion head with a fresh warm-up and
    cosine decay (warm restarts) and its own draw of crops (``seed`` + round), then scores the
    held-out test studies (organ-matched AUC and site readout). A round is kept in
    ``tower_rounds/<n>/`` (checkpoint, ``LESION_HEAD_FILE`` for diagnostics, ``TOWER_FILE``), so
    a long run resumes round by round and the results page shows what each round bought.
    """
    from safetensors.torch import load_file, save_file

    from model_core.benchmark.slabs import PATCH_LESION_LABELS
    from model_core.demo_training import held_out_detection, pretrain_tower

    rounds = []
    for number in range(1, budget.tower_rounds + 1):
        folder = out / TOWER_ROUNDS_DIR / str(number)
        if not (folder / TOWER_FILE).is_file():
            started = time.perf_counter()
            model = as_2d_ctmllm(build_2d_mllm(tokenizer, budget, seed), tokenizer, budget)
            head = torch.nn.Linear(model.family.vision_config.hidden_size, len(PATCH_LESION_LABELS))
            if number > 1:
                previous = out / TOWER_ROUNDS_DIR / str(number - 1)
                load_tower(model, previous)
                head.load_state_dict(load_file(previous / LESION_HEAD_FILE))
            model = model.to(device)
            log(f"tower pretraining round {number} of {budget.tower_rounds}")
            history, head = pretrain_tower(
                model,
                bench,
                budget.tower_steps,
                budget.tower_batch,
                budget.tower_lr,
                seed + number - 1,
                log,
                budget.bf16,
                head,
            )
            detection = held_out_detection(model, head, bench, "test")
            log(f"the tower after round {number} on held-out studies: {json.dumps(detection)}")
            export_2d_checkpoint(model.to("cpu").eval(), folder)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                folder / LESION_HEAD_FILE,
            )
            record = {"round": number, "steps": budget.tower_steps, "seed": seed + number - 1}
            record.update(history=history, **detection)
            (folder / TOWER_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
            record_cost(
                out, f"tower_pretraining_round_{number}", started, {"steps": budget.tower_steps}, device
            )
        rounds.append(json.loads((folder / TOWER_FILE).read_text(encoding="utf-8")))
    target = out / "2d_tower"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(out / TOWER_ROUNDS_DIR / str(budget.tower_rounds), target)
    last = rounds[-1]
    summary = {
        "organ_matched_auc": last["organ_matched_auc"],
        "site_readout": last["site_readout"],
        "rounds": [{k: v for k, v in r.items() if k != "history"} for r in rounds],
        "history": [entry for r in rounds for entry in r["history"]],
    }
    (target / TOWER_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return target


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
    train_3d_blocks: bool | None = None,
) -> Path:
    """``configs/demo_3d.yaml`` with this run's data, source, seed, K, MoE, step counts and device.

    Modes without task experts have no stage 2, so stage 1 gets both stages' steps (equal budget).
    ``train_3d_blocks`` None: as the budget says.
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
    blocks = budget.train_3d_blocks if train_3d_blocks is None else train_3d_blocks
    config["stage1"]["train_3d_blocks"] = bool(blocks and num_3d_blocks)
    config["train"]["mixed_precision"] = "bf16" if budget.bf16 else "no"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


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


PIPELINE_STEPS: tuple[str, ...] = ("benchmark", "tower", "2d", "3d", "eval")
"""What ``--stop-after`` takes: a long budget can be spread over several runs (each resumes)."""


def run_pipeline(
    out: Path,
    budget_name: str = "small",
    seed: int = 0,
    log: Callable[[str], None] = print,
    device: str = "cpu",
    stop_after: str = "eval",
) -> dict[str, Any] | None:
    """Steps 1-5 for the demo recipe, training and evaluating on ``device``; returns the scores
    (also in ``out/scores.json``), or None when told to stop after an earlier step."""
    if stop_after not in PIPELINE_STEPS:
        raise ValueError(f"stop_after={stop_after!r}: use one of {', '.join(PIPELINE_STEPS)}")
    budget = BUDGETS[budget_name]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not (out / "bench" / "benchmark.json").is_file():  # a continued run keeps the first build's cost
        build_data(out / "bench", budget)
        record_cost(out, "benchmark_build", started)
    bench = out / "bench"
    if stop_after == "benchmark":
        return None
    make_2d_checkpoints(out, bench, budget, seed, log, device, stop_after_tower=stop_after == "tower")
    if stop_after in ("tower", "2d"):
        return None
    config = write_3d_config(
        out / "3d" / "config.yaml", bench, out / "2d_checkpoint", out / "3d", budget, seed, device=device
    )
    final = train_3d(config, out / "3d", "tgh_hard", log, device)
    if stop_after == "3d":
        return None
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
        record = json.loads(tower.read_text(encoding="utf-8"))
        scores["tower_detection"] = record["organ_matched_auc"]
        scores["tower_site_readout"] = record.get("site_readout")  # runs before 2026-12 lack them
        scores["tower_rounds"] = record.get("rounds")
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
    variants = ablation_variants(budget)
    for name in names or list(variants):
        variant = variants[name]
        for seed in seeds:
            if any(r["seed"] == seed for r in results.get(name, [])):
                continue
            blocks = "trained" if variant["train_3d_blocks"] else "frozen"
            slug = f"{variant['moe']}_k{variant['k']}_{variant['source']}_{blocks}_s{seed}"
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
                train_3d_blocks=variant["train_3d_blocks"],
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_core.demo_pipeline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="runs/demo", help="run folder (every step's output)")
    parser.add_argument("--budget", default="small", choices=sorted(BUDGETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stop-after",
        default="eval",
        choices=PIPELINE_STEPS,
        help="stop after this step (a later run continues from there)",
    )
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
    parser.add_argument(
        "--model-card", default=None, help="write the model card of the (shipped) model to this file"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from model_core.hub import pick_device

        device = str(pick_device(args.device))
        scores = run_pipeline(out, args.budget, args.seed, device=device, stop_after=args.stop_after)
        if scores is None:
            print(f"stopped after step {args.stop_after!r}; run again without --stop-after to continue")
            return 0
        model_dir = Path(scores["model_dir"])
        if args.ship or args.ship_to:
            from model_core.hub import DEMO_MODEL_DIR

            model_dir = ship_model(model_dir, Path(args.ship_to) if args.ship_to else DEMO_MODEL_DIR)
            print(f"shipped {model_dir}")
        if args.ablations:
            run_ablations(out, args.ablation_seeds, device=device)
        if args.results:
            from model_core.demo_results import write_results

            shipped = bool(args.ship or args.ship_to)
            print(f"wrote {write_results(out, Path(args.results), shipped)}")
        if args.model_card:
            from model_core.demo_card import write_model_card

            print(f"wrote {write_model_card(out, model_dir, Path(args.model_card))}")
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from model_core.demo_results import headline

    print(json.dumps(headline(scores)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
