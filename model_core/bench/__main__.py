"""``python -m model_core.bench {encoder,train,gpu,compare,latency} [options]``."""

from __future__ import annotations

import sys
from importlib import import_module

BENCHMARKS = {
    "encoder": "model_core.bench.encoder",
    "train": "model_core.bench.train",
    "gpu": "model_core.bench.gpu",
    "compare": "model_core.bench.compare",
    "latency": "model_core.bench.latency",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m model_core.bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    return import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
