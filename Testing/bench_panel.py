"""Tokens per second through the panel against the CLI, in the same run (a benchmark, not a test).

    QT_QPA_PLATFORM=offscreen .venv/bin/python Testing/bench_panel.py [--models demo tiny] [--volume CT]
        [--repeats 5] [--max-new-tokens 200] [--thread-tokens 24] [--torch-threads 1] [--out bench_results/panel.json]

For each model (``demo``: the shipped demo model, real text of ~40 tokens; ``tiny``: the random
test model, which always writes ``--max-new-tokens`` tokens, a long stream), with the same CT
file, report prompt and greedy decoding, the task router picking the expert in every path but the
last (the CLI's ``--task auto``, the panel's checkbox, ``task=None``):

- ``cli``: ``python -m model_core generate`` in a fresh process per repeat.
- ``panel``: the module's widget on the test stand-ins, its GUI thread idling while holding
  Python's lock as Slicer's does (``slicer_compat.idleHoldingGIL``), clicking Generate Report.
  The model runs in the worker process; the first click loads it and encodes, later clicks reuse
  both (the first click is not in the medians). CLI runs and clicks alternate, so that on a
  shared machine both meet the same load.
- ``Logic in-process``: the same report through the Logic's ``run`` in this process (the batch
  script's path), warm, after each click; its stream is timed by the text callback.
- ``thread (before)``: the Logic's in-process ``run`` in a Python thread of the panel's process
  while the GUI thread idles holding the lock, as the module ran before the worker process, with
  ``--thread-tokens`` new tokens at most (it crawls).

Two rates per row. ``streamed tok/s`` is what a reader of the stream sees, measured the same
way for the CLI (its stdout, read as it arrives) and the panel (text events as its QTimer
receives them): tokens after the first piece of text over the time from the first piece to the
last. ``model tok/s`` is what the code reports: the CLI prints new tokens over its ``generate``
call, which for the CLI includes encoding the volume and the first call's warm-up; for the panel
and the thread it is the generation alone. Medians over ``--repeats``; prints a Markdown table and
writes JSON. ``paired cli / panel`` is the median over the repeats of one CLI run's streamed rate
over the next click's, ``paired in-process / panel`` the same with the in-process run after the
click: comparisons less exposed to the load of a shared machine drifting.

``--torch-threads`` (default 1) sets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for every process of
the run (CLI, worker, this one). On a shared, oversubscribed 2-core machine two OpenMP threads
spend most of their time waiting for each other at barriers: the demo model generated about 15
tokens/s with two threads and 130 with one in the same minute (load average 7), which would
measure the machine's scheduler, not the panel. Pass 0 to keep torch's default.
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
CLI_LINE = re.compile(r"(\d+) tokens, ([\d.]+) tok/s")
"""The CLI's closing line on stderr: ``[expert report (chosen by the task router); 42 tokens, 196.3 tok/s, ...]``."""


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


def interleaved_runs(
    model: str, volume: Path, maxNewTokens: int, repeats: int, countTokens
) -> tuple[list, list]:
    """One panel kept open; ``repeats`` times a CLI run then a Generate Report click, alternating so
    that both meet the same load on a shared machine. Panel runs: one more first (the cold click)."""
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

    def click() -> dict[str, Any]:
        clock.pieces.clear()
        panel.beats.clear()
        clicked, cpu = time.perf_counter(), time.process_time()
        panel.ui.generateButton.click()
        panel.pump(lambda: not panel.busy(), timeout=900)
        cpu = time.process_time() - cpu
        turn = panel.widget.logic.conversation(panel.parameters.inputVolume).turns[-1]
        panel.ui.newConversationButton.click()
        return {"tokens": turn.newTokens, "model_tok_s": turn.newTokens / turn.seconds,
                "streamed_tok_s": clock.rate(), "wall_s": time.perf_counter() - clicked,
                "gui_stall_ms": 1000 * panel.longestStall(), "gui_cpu_s": cpu}  # fmt: skip

    from CTMLLMSlicerLib.logic import CTMLLMLogicCore, ModelRequest

    inProcess = CTMLLMLogicCore(slicer.mrmlScene)
    request = ModelRequest(model, device="cpu")

    def libraryRun(node: Any) -> dict[str, Any]:
        """The same report through the Logic in this process (the batch script's path), warm."""
        libraryClock = StreamClock(countTokens)
        start = time.perf_counter()
        result = inProcess.run(  # task None: the task router picks the expert, as in the CLI and the panel
            node, None, None, request, maxNewTokens=maxNewTokens, onText=libraryClock.add
        )
        inProcess.clearConversation(node)
        return {"tokens": result.turn.newTokens, "model_tok_s": result.turn.newTokens / result.turn.seconds,
                "streamed_tok_s": libraryClock.rate(), "wall_s": time.perf_counter() - start}  # fmt: skip

    panel.widget.logic.pollJob = timedPoll
    cli, clicks, library = [], [], []
    try:
        node = standIn.loadVolume(volume, "ct")
        panel.ui.inputSelector.setCurrentNode(node)
        panel.useModel(Path(model), maxNewTokens)
        clicks.append(click())  # loads the model and encodes the volume
        libraryRun(node)  # the same, in this process
        for _ in range(repeats):
            cli.append(cli_run(model, volume, maxNewTokens, countTokens))
            clicks.append(click())
            library.append(libraryRun(node))
    finally:
        panel.close()
    return cli, clicks, library


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
        slicer_compat.idleHoldingGIL(module.POLL_INTERVAL_MS / 1000)  # between two ticks of the panel's timer
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
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per process (0: default)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_results" / "panel.json")
    args = parser.parse_args(argv)
    if args.torch_threads:  # before torch is imported here; the CLI and the worker inherit it
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.torch_threads)

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

        cli, panel, library = interleaved_runs(
            str(folder), args.volume, args.max_new_tokens, args.repeats, countTokens
        )
        thread = [thread_run(str(folder), args.volume, args.thread_tokens, countTokens) for _ in range(2)]
        cliRate = median(cli, "streamed_tok_s")
        warm = summary(name, "panel (worker process)", panel[1:], cliRate)
        # each click follows one CLI run: their ratio is less exposed to the machine's load drifting
        warm["paired cli / panel"] = statistics.median(
            c["streamed_tok_s"] / p["streamed_tok_s"] for c, p in zip(cli, panel[1:], strict=True)
        )
        warm["paired in-process / panel"] = statistics.median(
            i["streamed_tok_s"] / p["streamed_tok_s"] for i, p in zip(library, panel[1:], strict=True)
        )
        rows += [summary(name, "cli", cli, cliRate), warm,
                 summary(name, "panel, first click (loads and encodes)", panel[:1], cliRate),
                 summary(name, "Logic in-process, warm (the batch path)", library, cliRate),
                 summary(name, "thread in the panel process (before)", thread, cliRate)]  # fmt: skip
        runs[name] = {"cli": cli, "panel": panel, "in_process": library, "thread": thread}
    settings = {"volume": str(args.volume), "repeats": args.repeats, "max_new_tokens": args.max_new_tokens,
                "torch_threads": args.torch_threads or "default",
                "thread_tokens": args.thread_tokens, "load_average": os.getloadavg(), "runs": runs}  # fmt: skip
    columns = ["model", "path", "tokens", "streamed tok/s", "cli / this (streamed)", "paired cli / panel",
               "paired in-process / panel", "model tok/s", "wall s",
               "longest GUI stall ms", "GUI process CPU s"]  # fmt: skip
    write_report(args.out, "panel", rows, columns, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
