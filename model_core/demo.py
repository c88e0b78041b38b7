"""What ``make demo`` runs: a phantom CT with known findings, and the model's report and answers.

The phantom comes from the lesion benchmark (held-out anatomy), is written as NIfTI in HU and
read back through the same reader and preprocessing as any CT, so the demo exercises the real
path. The ground truth is printed beside what the model says.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DEMO_STUDY = ("test", 1)
"""The demo's phantom: study 1 of the benchmark's test split (seed 0, held-out anatomy, phantoms
only, at the model's grid and window); study 0 of a split is normal."""


def findings_table(truth: list, reported: list) -> tuple[list[str], int]:
    """Lines setting the study's true findings beside those parsed from the model's report, one
    to one on the benchmark's match (organ and side, kind, size bucket); and how many matched."""
    from model_core.benchmark.slabs import findings_list

    unmatched = list(reported)
    lines = [f"{'ground truth':<44} model"]
    matched = 0
    for finding in truth:
        twin = next((f for f in unmatched if f.key() == finding.key()), None)
        shown = f"{findings_list([finding])} ({finding.size_mm:g} mm)"
        if twin is None:
            lines.append(f"{shown:<44} -  (missed)")
            continue
        unmatched.remove(twin)
        matched += 1
        lines.append(f"{shown:<44} {findings_list([twin])}  (named correctly)")
    lines += [
        f"{'-':<44} {findings_list([f]) if f.size_mm else f'{f.site} {f.kind}'}  (not in the study)"
        for f in unmatched
    ]
    return lines, matched


def write_phantom_nifti(path: Path, hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> Path:
    """Save ``hu`` ``(D, H, W)``, in the pipeline's LPS layout, as a NIfTI file."""
    import SimpleITK as sitk

    from model_core.data import CTImage

    ct = CTImage.from_array(
        np.rint(hu).astype(np.int16), spacing_mm[::-1], (0.0, 0.0, 0.0), np.eye(3), source="phantom"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(ct.to_sitk(), str(path), useCompression=True)
    return path


def pick_questions(rows: list[dict]) -> list[dict]:
    """One closed multiple-choice and one open question, preferring organ and location types."""
    ordered = sorted(
        rows, key=lambda row: (int(row["Question Type"]) not in (3, 5), int(row["Question Type"]))
    )
    return ordered[:2]


def run_demo(out_dir: Path, model_spec: str = "demo", say: Callable[[str], None] = print) -> int:
    from model_core.benchmark.build import BenchmarkConfig, make_study
    from model_core.benchmark.text import parse_report
    from model_core.data import load_volume
    from model_core.generation import expert_note
    from model_core.hub import load_model
    from model_core.prompts import closed_target, format_closed_question

    start = time.perf_counter()
    model = load_model(model_spec, device="auto", notice=lambda text: say(f"NOTE: {text}"))
    settings = model.preprocess_config()
    say(
        f"model: {model.model_id} ({model.config.family}, K={model.config.volume.num_3d_blocks}, MoE {model.config.moe.mode})"
    )

    grid = tuple(settings.target_shape)
    study = make_study(
        *DEMO_STUDY,
        BenchmarkConfig(
            grid=grid, window=settings.window if isinstance(settings.window, str) else "soft_tissue"
        ),
    )
    nifti = write_phantom_nifti(out_dir / "phantom_ct.nii.gz", study.hu, study.spacing_mm)
    truth = {
        "findings": [f.to_dict() for f in study.findings],
        "report": study.report,
        "questions": study.questions,
    }
    (out_dir / "ground_truth.json").write_text(json.dumps(truth, indent=2), encoding="utf-8")
    say(
        f"phantom CT: {nifti} ({'x'.join(map(str, study.hu.shape))} voxels, {len(study.findings)} finding(s))"
    )

    volume, _ = load_volume(nifti, settings)

    def stream(title: str, prompt: str) -> str:
        """Generate as in use: the task router picks the expert from the prompt, and says which."""
        say(f"\n== {title}\n> {prompt}")
        result = model.generate(volume, prompt, on_text=lambda chunk: print(chunk, end="", flush=True))
        note = expert_note(result.expert)
        print(f"\n[{note}; {result.new_tokens} tokens, {result.tokens_per_second:.1f} tok/s]", flush=True)
        return result.text

    report = stream("Report", model.default_prompt("report"))
    say(f"-- ground truth report:\n{study.report}")
    lines, matched = findings_table(study.findings, parse_report(report))
    say("-- findings (organ and side, kind, size bucket):\n" + "\n".join(lines))
    say(f"-- {matched} of {len(study.findings)} finding(s) named correctly")

    closed, open_ = pick_questions(study.questions)
    choices = {letter: closed[f"Choice {letter}"] for letter in "ABCD"}
    stream("Question (closed)", format_closed_question(closed["Question"], choices))
    say(f"-- ground truth: {closed_target(closed['Answer Choice'], closed['Answer'])}")
    stream("Question (open)", open_["Question"])
    say(f"-- ground truth: {open_['Answer']}")
    say(f"\ndone in {time.perf_counter() - start:.1f} s; outputs in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out")))
