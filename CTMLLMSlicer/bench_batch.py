"""Batch benchmark: cases per minute and peak memory of ``run_batch`` over 10 CT studies.

``python CTMLLMSlicer/bench_batch.py [--models tiny demo] [--cases 10] [--out bench_results/batch.json]``

The cases are the shared CT volumes (``../shared/data/ct``: abdomen, torso, cardiac CTA) copied
round-robin into a temporary input folder, so each run reads real files of three sizes. Each
model runs in its own process (peak memory is that run's); cases per minute excludes model
loading, as ``BatchSummary.cases_per_minute`` defines it. Report task, at most
``--max-new-tokens`` tokens per report.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

from model_core.bench.common import case_main, peak_rss_mib, run_cases_in_subprocesses, write_report  # noqa: E402

SHARED_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"
VOLUMES = ("abdomen_ct_3mm.nii.gz", "torso_ct_3mm.nii.gz", "cardiac_cta_1p5mm.nii.gz")


def model_spec(name: str, work: Path) -> str:
    """``tiny``: a tiny random model saved into ``work``; ``demo``: the bundled demo model."""
    if name == "tiny":
        from model_core.tiny import build_tiny_ctmllm

        return str(build_tiny_ctmllm("internvl").save_pretrained(work / "tiny-model"))
    return name


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    from CTMLLMSlicerLib.batch_run import BatchOptions, run_batch
    from CTMLLMSlicerLib.batch_summary import FAILED, OK

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as folder:
        work = Path(folder)
        inputs = work / "input"
        inputs.mkdir()
        for index in range(case["cases"]):
            source = SHARED_CT / VOLUMES[index % len(VOLUMES)]
            shutil.copyfile(source, inputs / f"case{index:02d}_{source.name}")
        options = BatchOptions(
            input=inputs,
            output=work / "output",
            model=model_spec(case["model"], work),
            device="cpu",
            max_new_tokens=case["max_new_tokens"],
        )
        summary = run_batch(options, progress_stream=sys.stderr)
        return {
            **case,
            "model_id": summary.model_id,
            "succeeded": summary.count(OK),
            "failed": summary.count(FAILED),
            "model_load_s": round(summary.model_load_seconds, 2),
            "run_s": round(summary.seconds, 2),
            "cases_per_minute": round(summary.cases_per_minute, 2),
            "peak_mib": round(peak_rss_mib(), 1),
        }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if case_main(argv, run_case):
        return 0
    parser = argparse.ArgumentParser(prog="bench_batch.py", description=__doc__)
    parser.add_argument("--models", nargs="+", default=["tiny", "demo"])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=Path("bench_results/batch.json"))
    args = parser.parse_args(argv)
    if not all((SHARED_CT / name).is_file() for name in VOLUMES):
        print(f"error: the shared CT volumes are not in {SHARED_CT}", file=sys.stderr)
        return 2
    cases = [
        {"model": name, "cases": args.cases, "max_new_tokens": args.max_new_tokens} for name in args.models
    ]
    rows = run_cases_in_subprocesses([sys.executable, str(Path(__file__).resolve())], cases, args.timeout)
    columns = [
        "model",
        "model_id",
        "cases",
        "succeeded",
        "failed",
        "model_load_s",
        "run_s",
        "cases_per_minute",
        "peak_mib",
    ]
    write_report(args.out, "batch", rows, columns, vars(args) | {"out": str(args.out)})
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
