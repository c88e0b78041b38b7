"""Tokens per second through the panel against the CLI, in the same run (a benchmark, not a test).

    QT_QPA_PLATFORM=offscreen .venv/bin/python Testing/bench_panel.py [--models demo tiny] [--volume CT]
        [--repeats 5] [--max-new-tokens 200] [--thread-tokens 24] [--out bench_results/panel.json]

For each model (``demo``: the shipped demo model, real text of ~40 tokens; ``tiny``: the random
test model, which always writes ``--max-new-tokens`` tokens, a long stream), with the same CT
file, report prompt and greedy decoding:

- ``cli``: ``python -m model_core generate`` in a fresh process per repeat.
- ``panel``: the module's widget on the test stand-ins, its GUI thread idling while holding
  Python's lock as Slicer's does (``slicer_compat.idleHoldingGIL``), clicking Generate Report.
  The model runs in the worker process; the first click loads it and encodes, later clicks reuse
  both (the first click is not in the medians).
- ``thread (before)``: the Logic's in-process ``run`` in a Python thread of the panel's process
  while the GUI thread idles holding the lock, as the module ran before the worker process, with
  ``--thread-tokens`` new tokens at most (it crawls).

Two rates per row. ``streamed tok/s`` is what a reader of the stream sees, measured the same
way for the CLI (its stdout, read as it arrives) and the panel (text events as its QTimer
receives them): tokens after the first piece of text over the time from the first piece to the
last. ``model tok/s`` is what the code reports: the CLI prints new tokens over its ``generate``
call, which for the CLI includes encoding the volume and the first call's warm-up; for the panel
and the thread it is the generation alone. Medians over ``--repeats``; prints a Markdown table and
writes JSON.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))
DEFAULT_VOLUME = REPO.parent / "shared" / "data" / "ct" / "abdomen_ct_3mm.nii.gz"
CLI_LINE = re.compile(r"\[(\d+) tokens, ([\d.]+) tok/s")


class StreamClock:
    """Timestamps of the pieces of a text stream as a reader receives them."""

    def __init__(self, countTokens) -> None:
        self.countTokens = countTokens
        self.pieces: list[tuple[float, str]] = []

    def add(self, text: str) -> None:
        if text:
            self.pieces.append((time.perf_counter(), text))

    def rate(self) -> float:
        """Tokens after the first piece over the time from the first piece to the last."""
        if len(self.pieces) < 2:
            return float("nan")
        first, last = self.pieces[0][0], self.pieces[-1][0]
        total = self.countTokens("".join(text for _, text in self.pieces))
        return (total - self.countTokens(self.pieces[0][1])) / (last - first)


def cli_run(model: str, volume: Path, maxNewTokens: int, countTokens) -> dict[str, Any]:
    clock = StreamClock(countTokens)
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "model_core", "generate", "--model", model, "--volume", str(volume),
         "--device", "cpu", "--max-new-tokens", str(maxNewTokens)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.set_blocking(process.stdout.fileno(), False)
    while process.poll() is None:
        data = process.stdout.read()
        if data:
            clock.add(data.decode("utf-8", "replace"))
        time.sleep(0.001)
    clock.add((process.stdout.read() or b"").decode("utf-8", "replace").rstrip("\n"))
    stderr = process.stderr.read().decode("utf-8", "replace")
    match = CLI_LINE.search(stderr)
    if process.returncode != 0 or match is None:
        raise RuntimeError(f"the CLI failed: {stderr[-2000:]}")
    return {"tokens": int(match.group(1)), "model_tok_s": float(match.group(2)), "streamed_tok_s": clock.rate(),
            "wall_s": time.perf_counter() - start}  # fmt: skip


def panel_runs(
    model: str, volume: Path, maxNewTokens: int, repeats: int, countTokens
) -> list[dict[str, Any]]:
    """Generate Report ``repeats`` times in one panel (the first loads the model and encodes)."""
    import slicer
    from test_slicer_panel import Panel, standIn

    from CTMLLMSlicerLib import jobs

    slicer.mrmlScene.Clear(False)
    panel = Panel()
    clock = StreamClock(countTokens)
    poll = panel.widget.logic.pollJob

    def timedPoll() -> list:
        events = poll()
        clock.add("".join(event.text for event in events if event.kind == jobs.TEXT))
        return events

    panel.widget.logic.pollJob = timedPoll
    rows = []
    try:
        panel.ui.inputSelector.setCurrentNode(standIn.loadVolume(volume, "ct"))
        panel.useModel(Path(model), maxNewTokens)
        for _ in range(repeats):
            clock.pieces.clear()
            panel.beats.clear()
            clicked, cpu = time.perf_counter(), time.process_time()
            panel.ui.generateButton.click()
            panel.pump(lambda: not panel.busy(), timeout=900)
            cpu = time.process_time() - cpu
            turn = panel.widget.logic.conversation(panel.parameters.inputVolume).turns[-1]
            rows.append({"tokens": turn.newTokens, "model_tok_s": turn.newTokens / turn.seconds,
                         "streamed_tok_s": clock.rate(), "wall_s": time.perf_counter() - clicked,
                         "gui_stall_ms": 1000 * panel.longestStall(), "gui_cpu_s": cpu})  # fmt: skip
            panel.ui.newConversationButton.click()
    finally:
        panel.close()
    return rows


def thread_run(model: str, volume: Path, maxNewTokens: int, countTokens) -> dict[str, Any]:
    """The Logic's in-process run in a Python thread while the GUI thread idles holding the lock."""
    import slicer
    import slicer_compat
    from test_slicer_panel import module, standIn

    from CTMLLMSlicerLib.logic import ModelRequest

    slicer.mrmlScene.Clear(False)
    logic = module.CTMLLMSlicerLogic()
    request = ModelRequest(model, device="cpu")
    logic.loadModel(request)  # loading is not what is compared
    snapshot = logic.volumeSnapshot(standIn.loadVolume(volume, "ct"), "", "report", request)
    clock = StreamClock(countTokens)
    results: list[Any] = []
    start = time.perf_counter()

    def work() -> None:
        results.append(
            logic.run(snapshot, "report", None, request, maxNewTokens=maxNewTokens, onText=clock.add)
        )

    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        slicer_compat.application().processEvents()
        slicer_compat.idleHoldingGIL(0.03)  # between two ticks of the panel's 30 ms timer
    turn = results[0].turn
    return {"tokens": turn.newTokens, "model_tok_s": turn.newTokens / turn.seconds,
            "streamed_tok_s": clock.rate(), "wall_s": time.perf_counter() - start}  # fmt: skip


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def summary(name: str, path: str, runs: list[dict[str, Any]], cliRate: float) -> dict[str, Any]:
    row = {"model": name, "path": path, "tokens": median(runs, "tokens"),
           "streamed tok/s": median(runs, "streamed_tok_s"), "model tok/s": median(runs, "model_tok_s"),
           "wall s": median(runs, "wall_s")}  # fmt: skip
    row["cli / this (streamed)"] = cliRate / row["streamed tok/s"]
    if "gui_stall_ms" in runs[0]:
        row["longest GUI stall ms"] = max(r["gui_stall_ms"] for r in runs)
        row["GUI process CPU s"] = median(runs, "gui_cpu_s")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo", "tiny"], choices=("demo", "tiny"))
    parser.add_argument("--volume", type=Path, default=DEFAULT_VOLUME)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--thread-tokens", type=int, default=24, help="budget of the in-process thread rows")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "panel.json")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from model_core.bench.common import write_report
    from model_core.hub import DEMO_MODEL_DIR
    from model_core.tiny import build_tiny_ctmllm

    rows, runs = [], {}
    for name in args.models:
        folder = DEMO_MODEL_DIR if name == "demo" else Path(tempfile.mkdtemp()) / "tiny"
        if name == "tiny":
            build_tiny_ctmllm("internvl").save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)

        def countTokens(text: str, tokenizer=tokenizer) -> int:
            return len(tokenizer(text, add_special_tokens=False).input_ids)

        cli = [
            cli_run(str(folder), args.volume, args.max_new_tokens, countTokens) for _ in range(args.repeats)
        ]
        panel = panel_runs(str(folder), args.volume, args.max_new_tokens, args.repeats + 1, countTokens)
        thread = [thread_run(str(folder), args.volume, args.thread_tokens, countTokens) for _ in range(2)]
        cliRate = median(cli, "streamed_tok_s")
        rows += [summary(name, "cli", cli, cliRate), summary(name, "panel (worker process)", panel[1:], cliRate),
                 summary(name, "panel, first click (loads and encodes)", panel[:1], cliRate),
                 summary(name, "thread in the panel process (before)", thread, cliRate)]  # fmt: skip
        runs[name] = {"cli": cli, "panel": panel, "thread": thread}
    settings = {"volume": str(args.volume), "repeats": args.repeats, "max_new_tokens": args.max_new_tokens,
                "thread_tokens": args.thread_tokens, "load_average": os.getloadavg(), "runs": runs}  # fmt: skip
    columns = ["model", "path", "tokens", "streamed tok/s", "cli / this (streamed)", "model tok/s", "wall s",
               "longest GUI stall ms", "GUI process CPU s"]  # fmt: skip
    write_report(args.out, "panel", rows, columns, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
