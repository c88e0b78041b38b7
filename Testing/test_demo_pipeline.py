"""The demo pipeline at toy scale: every step runs and writes its artifacts; its pieces behave.

One module-scoped run of ``run_pipeline(..., "toy")`` (about a minute on 2 CPU cores) feeds the
artifact tests; the other tests use tiny inputs of their own.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from model_core import demo_pipeline as dp
from model_core import demo_results
from model_core.benchmark.findings import Finding
from model_core.benchmark.slabs import (
    FINDINGS_LIST_PROMPT,
    NO_FINDINGS_LIST,
    NORMAL_SLAB_TEXT,
    SLAB_PROMPT,
    SlabDataset,
    caption_names_lesion,
    findings_in_slab,
    findings_list,
    slab_items,
)
from model_core.benchmark.text import write_report
from model_core.demo_budget import ABLATIONS, BUDGETS, DemoBudget, ablation_variants
from model_core.demo_card import write_model_card
from model_core.demo_training import TowerBatches, benchmark_studies, crop_features, pretrain_2d
from model_core.families import STATE_DICT_PREFIXES, map_2d_state_dict_name, map_ctmllm_state_dict_name
from model_core.model import CTMLLM
from model_core.tiny import train_bpe_tokenizer

TOY = BUDGETS["toy"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_toy")
    torch.set_num_threads(1)
    scores = dp.run_pipeline(out, "toy", seed=0, log=lambda _line: None)
    return out, scores


def test_pipeline_writes_every_artifact(toy_run: tuple[Path, dict]) -> None:
    out, scores = toy_run
    expected = [
        "bench/benchmark.json",
        "bench/findings.jsonl",
        "tokenizer/tokenizer.json",
        "2d_random/config.json",
        "2d_tower/config.json",
        "2d_tower/tower_pretraining.json",
        "tower_rounds/1/tower_pretraining.json",
        "tower_rounds/2/tower_lesion_head.safetensors",
        "2d_checkpoint/config.json",
        "2d_checkpoint/model.safetensors",
        "2d_checkpoint/preprocessor_config.json",
        "2d_checkpoint/pretraining_log.json",
        "2d_checkpoint/tower_pretraining.json",
        "3d/config.yaml",
        "3d/stage1/final/ctmllm_config.json",
        "3d/stage2/final/ctmllm_config.json",
        "eval/report/summary.json",
        "eval/vqa/summary.json",
        "eval/findings.json",
        "scores.json",
        "cost.json",
        "3d/cost.json",
    ]
    assert [name for name in expected if not (out / name).is_file()] == []
    assert scores["model_dir"] == str(out / "3d" / "stage2" / "final")
    assert set(json.loads((out / "cost.json").read_text(encoding="utf-8"))) == {
        "benchmark_build",
        "tower_pretraining_round_1",
        "tower_pretraining_round_2",
        "2d_pretraining",
    }
    tower = json.loads((out / "2d_checkpoint" / "tower_pretraining.json").read_text(encoding="utf-8"))
    # two rounds of tower steps, each scored; the second resumes the first
    assert [entry["step"] for entry in tower["history"]] == [TOY.tower_steps] * TOY.tower_rounds == [3, 3]
    assert [r["round"] for r in tower["rounds"]] == [1, 2] and scores["tower_rounds"] == tower["rounds"]
    assert tower["rounds"][-1]["organ_matched_auc"] == tower["organ_matched_auc"]
    assert tower["site_readout"]["sites"] > 0 and scores["tower_site_readout"] == tower["site_readout"]
    assert tower["organ_matched_auc"]["all"]["lesions"] > 0
    assert scores["tower_detection"] == tower["organ_matched_auc"]
    assert 0.0 <= scores["findings"]["f1"] <= 1.0
    assert scores["closed_accuracy"]["n"] > 0


def test_final_model_is_the_3d_transfer_of_the_2d_checkpoint(toy_run: tuple[Path, dict]) -> None:
    out, scores = toy_run
    model = CTMLLM.from_pretrained(scores["model_dir"])
    assert model.config.source == str(out / "2d_checkpoint")
    assert model.config.volume.num_3d_blocks == 2
    assert model.config.moe.mode == "tgh_hard"
    assert model.preprocess_config().target_shape == TOY.grid
    assert model.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(out / "tokenizer").get_vocab()


def test_ship_model_stores_float16_that_loads_back(toy_run: tuple[Path, dict], tmp_path: Path) -> None:
    _, scores = toy_run
    shipped = dp.ship_model(Path(scores["model_dir"]), tmp_path / "demo_model")
    original = CTMLLM.from_pretrained(scores["model_dir"])
    loaded = CTMLLM.from_pretrained(shipped)
    assert loaded.dtype == torch.float32  # stored as float16, cast back on load
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a.half().float(), b.float()), name
    weights = (shipped / "model.safetensors").stat().st_size
    assert weights < 0.6 * (Path(scores["model_dir"]) / "model.safetensors").stat().st_size


def test_results_page_from_the_json(toy_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, scores = toy_run
    page = demo_results.write_results(out, tmp_path / "RESULTS.md").read_text(encoding="utf-8")
    ten = scores["findings"]["from_10mm"]["f1"]
    verdict = demo_results.verdict("finding_f1_10mm", ten)
    assert (
        f"| finding F1, lesions of 10 mm and up (organ+side, kind, size bucket) | {ten:.3f} | ≥ 0.80 | {verdict} |"
        in page
    )
    assert f"| finding F1, all sizes | {scores['findings']['f1']:.3f} |" in page
    assert (
        f"| closed-VQA accuracy, the task router picks the expert | {scores['closed_accuracy']['accuracy']:.3f} |"
        in page
    )
    assert (
        "| 3d_training |" in page and "| 2d_pretraining |" in page and "| tower_pretraining_round_2 |" in page
    )
    assert "| " + " | ".join(scores["tower_detection"]) + " |" in page
    assert "Round by round" in page and f"| 2 | {2 * TOY.tower_steps} |" in page
    assert ("Every target is met." in page) != ("Next lever:" in page)
    # no ablations in this run: the page says so and how to run them, and does not claim them
    assert (
        "## Ablations" in page and "Not run for this model" in page and "--ablations --ablation-seeds" in page
    )
    assert f"--ship --results {tmp_path / 'RESULTS.md'}`" in page
    not_shipped = demo_results.write_results(out, tmp_path / "tried.md", shipped=False).read_text(
        encoding="utf-8"
    )
    assert "whose model was not shipped" in not_shipped and "--ship" not in not_shipped
    with open(out / "eval" / "report" / "samples.csv", newline="", encoding="utf-8") as stream:
        distinct = len({row["prediction"] for row in csv.DictReader(stream)})
    assert f"Distinct generated reports: {distinct} for {TOY.test} test studies" in page
    check = scores["slab_check_2d"]
    assert check["slabs_with_lesion"] + check["slabs_without"] > 0
    assert f"on {check['reported_on_normal_slabs']} of {check['slabs_without']} without" in page


def test_model_card_describes_the_model_and_its_scores(toy_run: tuple[Path, dict], tmp_path: Path) -> None:
    out, scores = toy_run
    card = write_model_card(out, Path(scores["model_dir"]), tmp_path / "CARD.md").read_text(encoding="utf-8")
    model = CTMLLM.from_pretrained(scores["model_dir"])
    assert f"{model.family.patch_size}-pixel patches on {TOY.grid[1]}-pixel slices" in card
    assert f"the top **K = {model.config.volume.num_3d_blocks}** blocks" in card
    rounds = f"{2 * TOY.tower_steps} steps (2 rounds of {TOY.tower_steps}, each a warm restart)"
    assert f"{rounds} of {TOY.tower_batch} crops" in card
    ten = scores["findings"]["from_10mm"]["f1"]
    assert f"| finding F1, lesions of 10 mm and up | {ten:.3f} | ≥ 0.80 |" in card
    assert "| tower_pretraining_round_1 |" in card and "## History" in card


def test_slab_dataset_reads_aligned_slabs_with_their_findings(toy_run: tuple[Path, dict]) -> None:
    out, _ = toy_run
    items = slab_items(out / "bench", "train", questions_per_slab=1)
    groups = TOY.grid[0] // 3
    captions = [item for item in items if item.task == "report"]
    assert len(captions) == TOY.train * groups
    assert {item.start for item in captions} == set(range(0, TOY.grid[0], 3))
    for item in captions:
        assert item.prompt == SLAB_PROMPT
        assert (item.answer == NORMAL_SLAB_TEXT) == (not item.meta["findings"])
    sample = SlabDataset(items)[0]
    assert sample.load_volume().shape == (3, TOY.grid[1], TOY.grid[2])


def test_findings_list_captions_name_each_slab_finding_by_label(toy_run: tuple[Path, dict]) -> None:
    out, _ = toy_run
    listed = [
        i for i in slab_items(out / "bench", "train", caption_style="findings_list") if i.task == "report"
    ]
    written = [i for i in slab_items(out / "bench", "train") if i.task == "report"]
    assert [(i.meta["study"], i.start) for i in listed] == [(i.meta["study"], i.start) for i in written]
    for item in listed:
        findings = [Finding.from_dict(f) for f in item.meta["findings"]]
        assert item.prompt == FINDINGS_LIST_PROMPT and item.answer == findings_list(findings)
        assert caption_names_lesion(item.answer, "findings_list") == bool(findings)
    with pytest.raises(ValueError, match="caption_style"):
        slab_items(out / "bench", "train", caption_style="free text")


def test_findings_list_text_and_its_lesion_test() -> None:
    cyst = Finding("kidney", "cyst", 6.0, side="left")
    mass = Finding("liver", "solid mass", 25.0, level="upper")
    assert findings_list([cyst, mass]) == "left kidney cyst, small; liver solid mass, large"
    assert findings_list([]) == NO_FINDINGS_LIST
    assert not caption_names_lesion(" None ", "findings_list")
    assert caption_names_lesion(write_report([mass], np.random.default_rng(0), [("liver", None)]), "report")
    assert not caption_names_lesion(NORMAL_SLAB_TEXT, "report")


def test_budget_window_and_device_reach_the_benchmark_and_the_3d_config(tmp_path: Path) -> None:
    budget = replace(TOY, train=1, val=0, test=0, window="body")
    bench = dp.build_data(tmp_path / "bench", budget)
    assert json.loads((bench / "benchmark.json").read_text(encoding="utf-8"))["window_hu"] == [-400.0, 300.0]
    config = dp.write_3d_config(tmp_path / "3d.yaml", bench, tmp_path / "2d", tmp_path / "run", budget, 0)
    written = yaml.safe_load(config.read_text(encoding="utf-8"))
    assert written["preprocessing"]["window"] == "body" and written["device"] == "cpu"
    on_gpu = dp.write_3d_config(
        tmp_path / "gpu.yaml", bench, tmp_path / "2d", tmp_path / "run", budget, 0, device="cuda"
    )
    assert yaml.safe_load(on_gpu.read_text(encoding="utf-8"))["device"] == "cuda"


def test_a_continued_run_keeps_the_recorded_training_costs(toy_run: tuple[Path, dict]) -> None:
    out, _ = toy_run
    costs = {name: (out / name).read_text(encoding="utf-8") for name in ("cost.json", "3d/cost.json")}
    dp.run_pipeline(out, "toy", seed=0, log=lambda _line: None)  # every step's output exists
    assert {name: (out / name).read_text(encoding="utf-8") for name in costs} == costs


def test_captioning_after_tower_pretraining_keeps_the_tower(toy_run: tuple[Path, dict]) -> None:
    out, _ = toy_run
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    model = dp.as_2d_ctmllm(dp.build_2d_mllm(tokenizer, TOY, seed=0), tokenizer, TOY)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = SlabDataset(slab_items(out / "bench", "train", caption_style="findings_list"))
    pretrain_2d(model, dataset, 2, 2, 1e-2, 0, lambda _line: None, train_tower=False)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and not any(name.startswith("vision_tower.") for name in changed)
    assert any(name.startswith("projector.") for name in changed)
    assert any(name.startswith("language_model.") for name in changed)


def test_lesion_share_keeps_every_lesion_slab_and_drops_normal_ones(toy_run: tuple[Path, dict]) -> None:
    out, _ = toy_run

    def slabs(items: list) -> tuple[set, set]:
        keys = {(i.meta["study"], i.start): bool(i.meta["findings"]) for i in items}
        return {k for k, v in keys.items() if v}, {k for k, v in keys.items() if not v}

    lesion_all, normal_all = slabs(slab_items(out / "bench", "train"))
    lesion_kept, normal_kept = slabs(slab_items(out / "bench", "train", min_lesion_share=0.5))
    assert lesion_all and lesion_kept == lesion_all
    assert normal_kept <= normal_all and len(normal_kept) == min(len(normal_all), len(lesion_all))
    assert slabs(slab_items(out / "bench", "train", min_lesion_share=1.0))[1] == set()
    with pytest.raises(ValueError, match="min_lesion_share"):
        slab_items(out / "bench", "train", min_lesion_share=0.0)


def test_tower_crops_are_balanced_and_a_whole_grid_crop_is_the_full_slab(toy_run: tuple[Path, dict]) -> None:
    out, _ = toy_run
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    model = dp.as_2d_ctmllm(dp.build_2d_mllm(tokenizer, TOY, seed=0), tokenizer, TOY).eval()
    batches = TowerBatches(out / "bench", benchmark_studies(out / "bench", "train"), TOY.patch, seed=0)
    batch = batches.draw(6)
    cells = (TOY.grid[1] // TOY.patch) ** 2
    assert batch.slabs.shape == (6, 3, *TOY.grid[1:]) and batch.patches.shape[1] <= cells
    assert batch.targets[0::3, :, 0].sum(1).min() > 0  # every first-of-three crop holds a lesion patch
    assert batch.weights.max() == 10.0 and batch.weights.min() == 1.0
    whole = torch.arange(cells).expand(2, -1)
    with torch.no_grad():
        cropped = crop_features(model, batch.slabs[:2], whole)
        full = model.volume_adapter(model.vision_tower, batch.slabs[:2])[0].flatten(1, 3)
    assert torch.allclose(cropped, full, atol=1e-5)


def test_findings_in_slab_uses_the_sphere_and_the_slice_spacing() -> None:
    lesion = Finding("liver", "cyst", 20.0, center_voxel=(10, 5, 5))  # radius 10 mm
    spacing = (10.0, 3.0, 3.0)
    assert findings_in_slab([lesion], spacing, 9) == [lesion]
    assert findings_in_slab([lesion], spacing, 6) == []  # nearest slice 8: 20 mm away
    assert findings_in_slab([lesion], spacing, 11) == [lesion]  # slice 11: 10 mm away, on the edge
    assert findings_in_slab([lesion], (4.0, 3.0, 3.0), 6) == [lesion]  # thinner slices: 8 mm away
    with pytest.raises(ValueError, match="ground-truth"):
        findings_in_slab([Finding("liver", "cyst", 20.0)], spacing, 0)


def test_reverse_state_dict_names_invert_the_2d_mapping() -> None:
    for old, _new in STATE_DICT_PREFIXES:
        name = old + "layer.0.weight"
        assert map_ctmllm_state_dict_name(map_2d_state_dict_name(name)) == name
    with pytest.raises(KeyError, match="moe.mode 'none'"):
        map_ctmllm_state_dict_name("volume_adapter.moe.experts.token.routers.0.weight")


def test_exported_2d_checkpoint_converts_back_to_the_same_model(tmp_path: Path) -> None:
    texts = ["There is a 12 mm cyst in the liver.", "No focal lesion in this section.", "A. liver"]
    tokenizer = train_bpe_tokenizer(texts * 3, 300)
    model = dp.as_2d_ctmllm(dp.build_2d_mllm(tokenizer, TOY, seed=3), tokenizer, TOY).eval()
    folder = dp.export_2d_checkpoint(model, tmp_path / "2d")
    assert json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))[
        "image_mean"
    ] == list(model.config.image_mean)
    converted = CTMLLM.from_2d_pretrained(folder, volume=model.config.volume).eval()
    slab = torch.rand(1, 3, TOY.grid[1], TOY.grid[2])
    with torch.no_grad():
        assert torch.allclose(model.encode_volumes(slab), converted.encode_volumes(slab), atol=1e-6)
        ids = torch.tensor([[1, 5, 9, 12]])
        assert torch.allclose(
            model.language_model(ids).logits, converted.language_model(ids).logits, atol=1e-6
        )


def test_export_refuses_a_3d_model() -> None:
    tokenizer = train_bpe_tokenizer(["a b c"] * 3, 280)
    model = dp.as_2d_ctmllm(dp.build_2d_mllm(tokenizer, TOY, seed=0), tokenizer, TOY)
    model.config.volume.num_3d_blocks = 1
    with pytest.raises(ValueError, match="num_3d_blocks 0"):
        dp.export_2d_checkpoint(model, Path("unused"))


def test_ablation_table_gives_mean_and_spread_and_names_unrun_variants() -> None:
    def run(seed: int, accuracy: float, f1: float) -> dict:
        findings = {"f1": f1, "organ_f1": f1, "false_finding_rate_on_normals": 0.0}
        return {"seed": seed, "closed_accuracy": {"accuracy": accuracy}, "findings": findings}

    variants = ablation_variants(BUDGETS["ablation"])
    assert len(variants) == len(ABLATIONS) + 1
    name = next(iter(variants))
    ablations = {name: [run(0, 0.5, 0.2), run(1, 0.7, 0.4)]}
    row = demo_results.mean_spread([0.5, 0.7])
    assert row == f"0.600 ± {math.sqrt(0.02):.3f} (n=2)"
    table = demo_results.results_markdown(_minimal_scores(), {}, ablations)
    assert f"| {name} | {row} |" in table
    unrun = [line for line in table.splitlines() if line.endswith("| not run | not run |")]
    assert len(unrun) == len(variants) - 1
    assert "does not yet tell the variants apart" not in table  # one run has F1 above 0
    blind = demo_results.results_markdown(_minimal_scores(), {}, {name: [run(0, 0.5, 0.0), run(1, 0.6, 0.0)]})
    assert "does not yet tell the variants apart" in blind


def test_budget_refuses_a_grid_the_pixel_shuffle_cannot_take() -> None:
    with pytest.raises(ValueError, match="even multiple"):
        DemoBudget(grid=(12, 48, 48), patch=16)


def _minimal_scores() -> dict:
    zero = {"f1": 0.0, "precision": 0.0, "recall": 0.0, "organ_f1": 0.0, "organ_kind_f1": 0.0}
    return {
        "findings": {**zero, "false_finding_rate_on_normals": 0.0, "n_normal_studies": 1.0, "n_studies": 2.0},
        "closed_accuracy": {"accuracy": 0.0, "n": 1, "per_type": {}},
        "report_metrics": {},
        "open_metrics": {},
        "budget_settings": {**vars(TOY), "grid": list(TOY.grid)},
    }


def test_the_finding_lever_follows_where_the_evidence_is_lost() -> None:
    """Reports far below what the tower's evidence allows point at the reading side; reports near
    a tower bound under the target point at the tower."""

    def scores(reached: float, bound: float) -> dict:
        return {
            "findings": {
                "from_10mm": {"f1": reached},
                "false_finding_rate_on_normals": 0.0,
                "recall_by_kind": {"cyst": {"recall": reached, "n": 5}},
            },
            "closed_accuracy": {"accuracy": 0.95},
            "tower_detection": {"10 mm and up": {"auc": 0.93, "lesions": 40}},
            "tower_site_readout": {"auc": 0.85, "best_f1": bound, "sites": 200, "with_lesion": 40},
            "slab_check_2d": {
                "slabs_with_lesion": 30,
                "reported_on_lesion_slabs": 9,
                "slabs_without": 30,
                "reported_on_normal_slabs": 20,
            },
        }

    (blind_reader,) = demo_results.next_levers(scores(0.0, 0.667))
    assert (
        "reading the features" in blind_reader and "up to 0.667, but the reports reach 0.000" in blind_reader
    )
    assert "9 of 30 held-out slabs with a lesion and on 20 of 30 without" in blind_reader
    (weak_tower,) = demo_results.next_levers(scores(0.55, 0.667))
    assert weak_tower.count("Next lever: the tower") == 1 and "could reach is 0.667" in weak_tower
