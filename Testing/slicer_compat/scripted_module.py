"""Stand-ins for ``slicer.ScriptedLoadableModule``'s four base classes.

They keep the behaviour the module relies on: the module object fills a ``parent`` with its
metadata; the widget gets ``parent``/``layout`` and ``resourcePath``; the logic finds or creates
its singleton ``vtkMRMLScriptedModuleNode`` (tagged with the module name, as Slicer does); the
test class is a ``unittest.TestCase`` with ``delayDisplay``. The developer section (Reload &
Test buttons) and the module manager are left out.

``resourcePath`` is Slicer's: ``<folder of the module file>/Resources/<filename>`` and nothing
else, so that a module which only works built (Resources next to it) fails here too; the module
finds its files through ``CTMLLMSlicerLib.resources`` instead.
"""

from __future__ import annotations

import logging
import os
import sys
import unittest
from typing import Any

import slicer
from PySide6 import QtWidgets


class ModuleParent:
    """What Slicer's C++ ``qSlicerScriptedLoadableModule`` exposes to the Python module class."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.title = ""
        self.categories: list[str] = []
        self.dependencies: list[str] = []
        self.contributors: list[str] = []
        self.helpText = ""
        self.acknowledgementText = ""
        self.icon: Any = None
        self.isEntered = True


def resourcePathFor(modulePath: str, filename: str) -> str:
    """Slicer's rule (ScriptedLoadableModule.resourcePath): Resources/ beside the module file."""
    return os.path.join(os.path.dirname(os.path.abspath(modulePath)), "Resources", filename)


class ScriptedLoadableModule:
    def __init__(self, parent: ModuleParent) -> None:
        super().__init__()
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title, parent.categories, parent.dependencies = "", [], []
        parent.contributors, parent.helpText, parent.acknowledgementText = [], "", ""

    def resourcePath(self, filename: str) -> str:
        return resourcePathFor(self.parent.path, filename)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__()
        self.moduleName = self.__class__.__name__.removesuffix("Widget")
        if parent is None:
            parent = slicer.qMRMLWidget()
            parent.setLayout(QtWidgets.QVBoxLayout())
            parent.setMRMLScene(slicer.mrmlScene)
        parent.isEntered = True
        self.parent = parent
        self.layout = parent.layout()
        self.developerMode = False

    def resourcePath(self, filename: str) -> str:
        return resourcePathFor(sys.modules[type(self).__module__].__file__, filename)

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent: Any = None) -> None:
        super().__init__()
        self.moduleName = self.__class__.__name__.removesuffix("Logic")
        self.isSingletonParameterNode = True

    def getParameterNode(self) -> Any:
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, requestedDelay: int | None = None, msec: int | None = None) -> None:
        logging.info(message)
