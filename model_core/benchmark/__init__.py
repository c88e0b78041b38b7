"""The lesion benchmark: procedural and real CT with inserted lesions, reports, questions, scoring.

See docs/BENCHMARK_TASK.md. ``python -m model_core.benchmark build --out DIR`` writes it in the
M3D-Cap / M3D-VQA formats; ``python -m model_core.benchmark score`` scores generated reports
finding by finding.
"""

from model_core.benchmark.build import (
    BenchmarkConfig,
    build_benchmark,
    make_study,
    read_findings,
    score_reports,
)
from model_core.benchmark.findings import Finding, score_findings, size_bucket
from model_core.benchmark.text import make_questions, parse_report, write_report

__all__ = [
    "BenchmarkConfig",
    "Finding",
    "build_benchmark",
    "make_questions",
    "make_study",
    "parse_report",
    "read_findings",
    "score_findings",
    "score_reports",
    "size_bucket",
    "write_report",
]
