"""Test-only stand-ins for what exists only inside the 3D Slicer application.

The module ``CTMLLMSlicer/CTMLLMSlicer.py`` imports PythonQt's ``qt``, ``ctk`` and parts of
``slicer`` that the slicer-core wheel lacks. ``install()`` maps them, explicitly and only these:

- ``qt`` -> PySide6 classes in one namespace (``qt_shim``);
- ``ctk.ctkCollapsibleButton``, ``slicer.qMRMLWidget``, ``slicer.qMRMLNodeComboBox`` -> PySide6
  widgets driving the real scene (``widgets``);
- ``slicer.ScriptedLoadableModule`` -> base classes (``scripted_module``);
- ``slicer.parameterNodeWrapper`` -> typed parameter node (``parameter_node``);
- ``slicer.i18n.tr`` -> returns the text unchanged;
- ``slicer.mrmlScene``, ``slicer.app``, ``slicer.modules.volumerendering`` and ``.volumes`` ->
  a real slicer-core scene with the application, colors, volumes, volume rendering and subject
  hierarchy logics, a layout node, one 3D view node and the Red/Yellow/Green slice composite nodes
  (what Slicer's layout would create); ``slicer.app`` reports version 5.10, a temporary folder,
  a ``startupCompleted`` signal, and a layout manager with one 3D view whose camera resets are
  recorded;
- ``slicer.util`` GUI helpers: ``loadUI`` (QUiLoader with the stand-in widgets),
  ``childWidgetVariables`` (by objectName), ``confirmOkCancelDisplay`` (answers from
  ``StandIn.confirmAnswers``, records the question), ``pip_install`` (records, installs nothing),
  ``errorDisplay`` (records).

``idleHoldingGIL`` idles the way Slicer's GUI thread does: holding Python's global interpreter
lock (PythonQt never releases it), unlike PySide6's event loop, which does. The panel tests pump
the event loop with it, so a Python thread in the panel would crawl there as it does in Slicer.

It lives in ``Testing/`` and is never part of the module that Slicer loads.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import types
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import slicer  # noqa: E402  (the slicer-core wheel)
import slicer.util  # noqa: E402
from PySide6 import QtCore, QtUiTools, QtWidgets  # noqa: E402

from slicer_compat import parameter_node, qt_shim, scripted_module, widgets  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE_DIR = os.path.join(REPO_ROOT, "CTMLLMSlicer")


@dataclass
class StandIn:
    """Handles on the stand-ins, and what the module asked the user or tried to install."""

    scene: Any
    appLogic: Any
    logics: dict[str, Any]
    confirmAnswers: list[bool] = field(default_factory=list)
    confirmations: list[str] = field(default_factory=list)
    pipInstalls: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def loadVolume(self, path: str | os.PathLike, name: str | None = None) -> Any:
        """What ``slicer.util.loadVolume`` does in Slicer: read a file through the volumes logic
        (here through the module Logic's ``loadVolumeFile``, the project's one loader)."""
        from CTMLLMSlicerLib.logic import CTMLLMLogicCore

        return CTMLLMLogicCore(self.scene, volumesLogic=self.logics["Volumes"]).loadVolumeFile(path, name)


_installed: StandIn | None = None


def build_scene() -> tuple[Any, Any, dict[str, Any]]:
    """The application's scene: the logics volume loading and rendering need, and the view nodes.

    The logics are returned so that the caller keeps them alive: the application logic does not.
    """
    from CTMLLMSlicerLib.batch_scene import slicer_core_scene

    scene, appLogic, logics = slicer_core_scene(("Colors", "Volumes", "VolumeRendering"))
    subjectHierarchy = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    subjectHierarchy.SetMRMLApplicationLogic(appLogic)
    subjectHierarchy.SetMRMLScene(scene)  # as in Slicer: every data node gets a hierarchy item
    logics["SubjectHierarchy"] = subjectHierarchy
    for node in build_view_nodes():
        scene.AddNode(node)
    return scene, appLogic, logics


CONVENTIONAL_LAYOUT = 2
"""``vtkMRMLLayoutNode.SlicerLayoutConventionalView``, Slicer's default."""


def build_view_nodes() -> list[Any]:
    """What Slicer's default layout adds: the layout node, a 3D view node and the Red/Yellow/Green
    slice composites."""
    layout = slicer.vtkMRMLLayoutNode()
    layout.SetSingletonTag("vtkMRMLLayoutNode")
    layout.SetViewArrangement(CONVENTIONAL_LAYOUT)
    view = slicer.vtkMRMLViewNode()
    view.SetSingletonTag("1")
    view.SetLayoutName("1")
    nodes = [layout, view]
    for layoutName in ("Red", "Yellow", "Green"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetSingletonTag(layoutName)
        composite.SetLayoutName(layoutName)
        nodes.append(composite)
    return nodes


class _Signal:
    """A signal without Qt: ``connect`` records the slot, ``emit`` calls every slot."""

    def __init__(self) -> None:
        self.slots: list[Any] = []

    def connect(self, slot: Any) -> None:
        self.slots.append(slot)

    def emit(self) -> None:
        for slot in list(self.slots):
            slot()


class _ThreeDView:
    """``qMRMLThreeDView``: counts camera resets."""

    def __init__(self) -> None:
        self.cameraResets = 0

    def resetCamera(
        self, resetRotation: bool = True, resetTranslation: bool = True, resetDistance: bool = True
    ) -> None:
        self.cameraResets += 1


class _LayoutManager:
    """``qSlicerLayoutManager`` with one 3D view and no slice widgets (nothing is drawn)."""

    def __init__(self) -> None:
        self.view = _ThreeDView()

    def threeDViewCount(self) -> int:
        return 1

    def threeDWidget(self, index: int) -> Any:
        return types.SimpleNamespace(threeDView=lambda: self.view)

    def mrmlSliceLogics(self) -> Any:
        import vtk

        return vtk.vtkCollection()


class _App:
    """``slicer.app``: Slicer 5.10 in testing mode, no main window, a stand-in layout manager."""

    applicationName = "Slicer (test stand-in)"
    majorVersion = 5
    minorVersion = 10

    def __init__(self) -> None:
        self.temporaryPath = tempfile.mkdtemp(prefix="slicer-temp-")
        self.startupCompleted = _Signal()
        self._layoutManager = _LayoutManager()

    def testingEnabled(self) -> bool:
        return True

    def layoutManager(self) -> _LayoutManager:
        return self._layoutManager

    def processEvents(self) -> None:
        QtWidgets.QApplication.processEvents()


_usleep = ctypes.PyDLL(None).usleep
"""libc's usleep called through ``PyDLL``, which keeps the GIL during the call (``CDLL`` would release it)."""
_usleep.argtypes = [ctypes.c_uint]


def idleHoldingGIL(seconds: float) -> None:
    """Idle like Slicer's GUI thread between events: sleep without releasing Python's lock, so
    other Python threads of this process cannot run meanwhile (they can in other processes)."""
    _usleep(int(seconds * 1_000_000))


class _UiLoader(QtUiTools.QUiLoader):
    """QUiLoader that knows the stand-in ctk/qMRML widgets."""

    def __init__(self) -> None:
        super().__init__()
        for cls in widgets.CUSTOM_WIDGETS:
            self.registerCustomWidget(cls)


def _loadUI(path: str) -> QtWidgets.QWidget:
    qfile = QtCore.QFile(path)
    if not qfile.exists():
        raise RuntimeError(f"Could not load UI file: file not found {path}")
    qfile.open(QtCore.QFile.ReadOnly)
    widget = _UiLoader().load(qfile)
    qfile.close()
    if widget is None:
        raise RuntimeError(f"Could not load UI file: {path}")
    return widget


def _childWidgetVariables(widget: QtWidgets.QWidget) -> Any:
    ui = types.SimpleNamespace()
    for child in widget.findChildren(QtWidgets.QWidget):
        if child.objectName():
            setattr(ui, child.objectName(), child)
    return ui


def pad_singleton_refcounts() -> None:
    """Work around a PySide6 6.12.0 reference-count bug that aborts long GUI tests.

    With CPython 3.11, every signal delivered to a Python slot drops one reference to ``None``
    and every ``Signal.emit`` one to ``True``; after a few thousand deliveries (a 10 ms timer
    for a minute) CPython aborts with "deallocating None". These singletons are never freed,
    so adding 2**40 references up front keeps the count from reaching zero. CPython 3.12+
    makes them immortal; PythonQt in Slicer is not affected. Test-only, like this package.
    """
    if sys.version_info >= (3, 12):
        return
    for singleton in (None, True, False):
        ctypes.c_ssize_t.from_address(id(singleton)).value += 1 << 40


def application() -> QtWidgets.QApplication:
    """The QApplication; its QSettings go to a temporary folder, never the user's own settings."""
    pad_singleton_refcounts_once()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    app.setOrganizationName("CTMLLMSlicerTests")
    app.setApplicationName("slicer_compat")
    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
    QtCore.QSettings.setPath(
        QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope, tempfile.mkdtemp(prefix="qsettings-")
    )
    return app


_padded = False


def pad_singleton_refcounts_once() -> None:
    global _padded
    if not _padded:
        pad_singleton_refcounts()
        _padded = True


def install() -> StandIn:
    """Install the stand-ins (once per process) and return their handles; safe to call again."""
    global _installed
    if _installed is not None:
        return _installed
    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)
    application()
    scene, appLogic, logics = build_scene()
    standIn = StandIn(scene, appLogic, logics)
    vrLogic = logics["VolumeRendering"]

    qt = qt_shim.build_qt_module()
    ctk = types.ModuleType("ctk", "ctk widgets (test stand-ins)")
    ctk.ctkCollapsibleButton = widgets.ctkCollapsibleButton
    scripted = types.ModuleType("slicer.ScriptedLoadableModule", scripted_module.__doc__)
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):  # fmt: skip
        setattr(scripted, name, getattr(scripted_module, name))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper", parameter_node.__doc__)
    for name in ("parameterNodeWrapper", "Choice", "WithinRange", "SlicerParameterNamePropertyName"):
        setattr(wrapper, name, getattr(parameter_node, name))
    i18n = types.ModuleType("slicer.i18n", "translation (test stand-in: identity)")
    i18n.tr = lambda text: text
    sys.modules.update({
        "qt": qt, "ctk": ctk, "slicer.ScriptedLoadableModule": scripted,
        "slicer.parameterNodeWrapper": wrapper, "slicer.i18n": i18n,
    })  # fmt: skip

    slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper, slicer.i18n = scripted, wrapper, i18n
    slicer.qMRMLWidget, slicer.qMRMLNodeComboBox = widgets.qMRMLWidget, widgets.qMRMLNodeComboBox
    slicer.mrmlScene, slicer.app = scene, _App()
    slicer.modules = types.SimpleNamespace(
        volumerendering=types.SimpleNamespace(logic=lambda: vrLogic),
        volumes=types.SimpleNamespace(logic=lambda: logics["Volumes"]),
    )

    def confirm(text: str, windowTitle: str | None = None, parent: Any = None, **kwargs: Any) -> bool:
        standIn.confirmations.append(text)
        return standIn.confirmAnswers.pop(0) if standIn.confirmAnswers else False

    slicer.util.loadUI = _loadUI
    slicer.util.childWidgetVariables = _childWidgetVariables
    slicer.util.confirmOkCancelDisplay = confirm
    slicer.util.pip_install = standIn.pipInstalls.append
    slicer.util.errorDisplay = lambda text, *args, **kwargs: standIn.errors.append(text)
    _installed = standIn
    return standIn
