"""Regenerate the documentation screenshot (docs/panel.png): the panel beside the rendered volume.

    QT_QPA_PLATFORM=offscreen .venv/bin/python Testing/panel_screenshot.py [--model demo|DIR]
        [--volume CT] [--out PNG]

The panel is the module's widget on the test stand-ins (``slicer_compat``, the same ``Panel`` the
panel tests drive), the model runs in its worker process as in Slicer, the volume is the torso CT
of ``../shared/data`` (or ``--volume``), and the model is the shipped demo model
(``model_core/demo_model``) or a model folder. The script selects the volume (the module sets up
the CT volume rendering), clicks Generate Report, asks one question, grabs the panel, renders the
scene's 3D view offscreen with slicer-core's own displayable managers (camera, view, volume
rendering; EGL without a display) and puts the two side by side. The tiny random test model only
writes blank lines, so "demo" without a shipped demo model is refused instead of falling back to it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Is the liver enlarged?"
DEFAULT_VOLUME = REPO.parent / "shared" / "data" / "ct" / "torso_ct_3mm.nii.gz"
THREE_D_MANAGERS = (
    "vtkMRMLCameraDisplayableManager",
    "vtkMRMLViewDisplayableManager",
    "vtkMRMLVolumeRenderingDisplayableManager",
)


def render3DView(scene: Any, appLogic: Any, width: int, height: int, path: Path) -> Path:
    """Render the scene's first 3D view node as Slicer draws it, offscreen, into a PNG."""
    import slicer
    import vtk

    renderer = vtk.vtkRenderer()
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width, height)
    window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()  # the displayable managers need one
    interactor.SetRenderWindow(window)
    interactor.Initialize()
    factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(appLogic)
    for name in THREE_D_MANAGERS:
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    managers = factory.InstantiateDisplayableManagers(renderer)
    managers.SetMRMLDisplayableNode(scene.GetFirstNodeByClass("vtkMRMLViewNode"))
    camera = renderer.GetActiveCamera()
    renderer.ResetCamera()  # what the panel's camera reset does in Slicer, then a three-quarter view
    camera.Elevation(-20)
    camera.Azimuth(30)
    camera.OrthogonalizeViewUp()
    renderer.ResetCamera()
    camera.Zoom(1.4)
    window.Render()
    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grabber.GetOutputPort())
    writer.Write()
    return path


def sideBySide(left: Any, rightPath: Path, out: Path) -> bool:
    """The panel image ``left`` (a QImage) and the rendering at ``rightPath``, side by side."""
    from PySide6 import QtGui

    right = QtGui.QImage(str(rightPath))
    image = QtGui.QImage(left.width() + right.width(), max(left.height(), right.height()), left.format())
    image.fill(QtGui.QColor("white"))
    painter = QtGui.QPainter(image)
    painter.drawImage(0, 0, left)
    painter.drawImage(left.width(), 0, right)
    painter.end()
    return image.save(str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' (the shipped demo model) or a model folder")
    parser.add_argument("--volume", type=Path, default=DEFAULT_VOLUME, help="the CT to describe")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "panel.png")
    parser.add_argument("--max-new-tokens", type=int, default=120, help="length of the report and the answer")
    args = parser.parse_args(argv)

    from model_core.hub import CONFIG_FILE, DEMO_MODEL_DIR

    if args.model == "demo" and not (DEMO_MODEL_DIR / CONFIG_FILE).is_file():
        print(
            f"no demo model at {DEMO_MODEL_DIR} ({CONFIG_FILE} missing): ship one "
            "(python -m model_core.demo_pipeline ... --ship) or pass --model DIR",
            file=sys.stderr,
        )
        return 2

    import slicer
    from test_slicer_panel import Panel, module, standIn

    slicer.mrmlScene.Clear(False)
    panel = Panel()
    try:
        panel.ui.inputSelector.setCurrentNode(standIn.loadVolume(args.volume, args.volume.name.split(".")[0]))
        if args.model == "demo":
            panel.ui.modelSourceComboBox.setCurrentText(module.SOURCE_DEMO)
            panel.ui.deviceComboBox.setCurrentText("cpu")
            panel.ui.maxNewTokensSpinBox.setValue(args.max_new_tokens)
        else:
            panel.useModel(Path(args.model), args.max_new_tokens)
        panel.ui.generateButton.click()
        panel.pump(lambda: not panel.busy(), timeout=900)
        print(panel.ui.statusLabel.text())
        panel.ui.modeComboBox.setCurrentText(module.MODE_QUESTION)
        panel.ui.questionLineEdit.setText(QUESTION)
        panel.ui.askButton.click()
        panel.pump(lambda: not panel.busy(), timeout=900)
        print(panel.ui.statusLabel.text())
        panel.ui.historyView.verticalScrollBar().setValue(0)  # the report's start, not the last answer
        shot = panel.window.grab().toImage()
        rendering = render3DView(
            slicer.mrmlScene, standIn.appLogic, 720, shot.height(), Path(tempfile.mkdtemp()) / "3d.png"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if not sideBySide(shot, rendering, args.out):
            print(f"could not write {args.out}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}")
        return 0
    finally:
        panel.close()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "Testing"))
    sys.exit(main())
