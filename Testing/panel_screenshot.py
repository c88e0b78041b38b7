"""Regenerate the panel screenshot (docs/panel.png) with a real model: a streamed report and a question.

    QT_QPA_PLATFORM=offscreen .venv/bin/python Testing/panel_screenshot.py [--model demo|DIR] [--out PNG]

The panel is the module's widget on the test stand-ins (``slicer_compat``, the same ``Panel`` the
panel tests drive), the volume is the shared abdomen CT, and the model is the shipped demo model
(``model_core/demo_model``) or a model folder. The tiny random test model only writes blank lines,
so "demo" without a shipped demo model is refused instead of falling back to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

QUESTION = "Is the liver enlarged?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' (the shipped demo model) or a model folder")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "panel.png"
    )
    parser.add_argument("--max-new-tokens", type=int, default=120, help="length of the report and the answer")
    args = parser.parse_args(argv)

    from model_core.hub import DEMO_MODEL_DIR
    from model_core.model import CONFIG_FILE

    if args.model == "demo" and not (DEMO_MODEL_DIR / CONFIG_FILE).is_file():
        print(
            f"no demo model at {DEMO_MODEL_DIR} ({CONFIG_FILE} missing): ship one "
            "(python -m model_core.demo_pipeline ... --ship) or pass --model DIR",
            file=sys.stderr,
        )
        return 2

    import slicer
    from test_slicer_panel import ABDOMEN_CT, Panel, module, standIn

    slicer.mrmlScene.Clear(False)
    panel = Panel()
    try:
        panel.ui.inputSelector.setCurrentNode(standIn.loadVolume(ABDOMEN_CT, "abdomen"))
        if args.model == "demo":
            panel.ui.modelSourceComboBox.setCurrentText(module.SOURCE_DEMO)
            panel.ui.deviceComboBox.setCurrentText("cpu")
            panel.ui.maxNewTokensSpinBox.setValue(args.max_new_tokens)
        else:
            panel.useModel(Path(args.model), args.max_new_tokens)
        panel.ui.generateButton.click()
        panel.pump(lambda: not panel.busy(), timeout=900)
        panel.ui.modeComboBox.setCurrentText(module.MODE_QUESTION)
        panel.ui.questionLineEdit.setText(QUESTION)
        panel.ui.askButton.click()
        panel.pump(lambda: not panel.busy(), timeout=900)
        print(panel.ui.statusLabel.text())
        panel.ui.historyView.verticalScrollBar().setValue(0)  # the report's start, not the last answer
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if not panel.window.grab().save(str(args.out)):
            print(f"could not write {args.out}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}")
        return 0
    finally:
        panel.close()


if __name__ == "__main__":
    sys.exit(main())
