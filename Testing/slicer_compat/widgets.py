"""PySide6 stand-ins for the Slicer and CTK widgets the module's .ui file uses.

QUiLoader creates these for the class names ``qMRMLWidget``, ``qMRMLNodeComboBox`` and
``ctkCollapsibleButton``. They keep the C++ classes' Python-visible API that the module calls
(``setMRMLScene``, ``currentNode``, ``setCurrentNode``, ``currentNodeChanged``, ``collapsed``) and
drive a real MRML scene; look and feel are approximations (a group box, a combo box).
"""

from __future__ import annotations

import functools
from typing import Any

from PySide6 import QtCore, QtWidgets


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801 (Slicer's class name, looked up by QUiLoader)
    """Base of Slicer's MRML-aware panels; ``setMRMLScene`` reaches every MRML child widget.

    In Slicer the .ui file's ``mrmlSceneChanged -> setMRMLScene`` connections do this; QUiLoader
    cannot connect those C++ signatures, so the stand-in walks its children instead.
    """

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._scene: Any = None

    def setMRMLScene(self, scene: Any) -> None:
        self._scene = scene
        for child in self.findChildren(qMRMLNodeComboBox):
            child.setMRMLScene(scene)

    def mrmlScene(self) -> Any:
        return self._scene


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
    """A node selector over a real scene: lists nodes of ``nodeTypes`` and follows additions/removals."""

    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._scene: Any = None
        self._observers: list[int] = []
        self._observed: list[Any] = [None]  # the observed scene, shared with the ``destroyed`` slot
        self._nodeIDs: list[str | None] = []
        self.currentIndexChanged.connect(self._emitCurrentNode)
        # as the C++ widget does: stop observing the scene when deleted (the slot must not hold self)
        self.destroyed.connect(functools.partial(_removeObservers, self._observers, self._observed))

    def nodeTypes(self) -> list[str]:
        return list(self.property("nodeTypes") or ["vtkMRMLNode"])

    def setMRMLScene(self, scene: Any) -> None:
        _removeObservers(self._observers, self._observed)
        self._scene = self._observed[0] = scene
        if scene is not None:
            for event in (
                scene.NodeAddedEvent,
                scene.NodeRemovedEvent,
                scene.EndCloseEvent,
                scene.EndImportEvent,
            ):
                self._observers.append(scene.AddObserver(event, lambda *args: self._refresh()))
        self._refresh()

    def _matchingNodes(self) -> list[Any]:
        if self._scene is None:
            return []
        nodes = []
        for index in range(self._scene.GetNumberOfNodes()):
            node = self._scene.GetNthNode(index)
            exact = node.GetClassName() in self.nodeTypes()
            child = self.property("showChildNodeTypes") is not False and any(
                node.IsA(t) for t in self.nodeTypes()
            )
            if (exact or child) and not node.GetHideFromEditors():
                nodes.append(node)
        return nodes

    def _refresh(self) -> None:
        previous = self.currentNodeID()
        nodes = self._matchingNodes()
        blocked = self.blockSignals(True)
        self.clear()
        self._nodeIDs = [None] if self.property("noneEnabled") else []
        if self._nodeIDs:
            self.addItem("None")
        for node in nodes:
            self._nodeIDs.append(node.GetID())
            self.addItem(node.GetName())
        keep = previous in self._nodeIDs
        index = self._nodeIDs.index(previous) if keep else (0 if self._nodeIDs else -1)
        self.setCurrentIndex(index)
        self.blockSignals(blocked)
        if self.currentNodeID() != previous:
            self._emitCurrentNode()

    def currentNodeID(self) -> str | None:
        index = self.currentIndex()
        return self._nodeIDs[index] if 0 <= index < len(self._nodeIDs) else None

    def currentNode(self) -> Any:
        nodeID = self.currentNodeID()
        return self._scene.GetNodeByID(nodeID) if (self._scene is not None and nodeID) else None

    def setCurrentNode(self, node: Any) -> None:
        nodeID = node.GetID() if node is not None else None
        if nodeID in self._nodeIDs:
            self.setCurrentIndex(self._nodeIDs.index(nodeID))

    def setCurrentNodeID(self, nodeID: str | None) -> None:
        self.setCurrentNode(self._scene.GetNodeByID(nodeID) if nodeID else None)

    def _emitCurrentNode(self, *args: Any) -> None:
        self.currentNodeChanged.emit(self.currentNode())


def _removeObservers(tags: list[int], scenes: list[Any], *args: Any) -> None:
    """Remove the observer ``tags`` from ``scenes[0]`` and empty the list (both shared, not copied)."""
    if scenes[0] is not None:
        for tag in tags:
            scenes[0].RemoveObserver(tag)
    tags.clear()


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801
    """A titled section that can be collapsed; QUiLoader sets its ``text`` and ``collapsed`` properties."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._collapsed = False
        self._hiddenByCollapse: list[QtWidgets.QWidget] = []

    def _getText(self) -> str:
        return self.title()

    def _setText(self, text: str) -> None:
        self.setTitle(text)

    def _getCollapsed(self) -> bool:
        return self._collapsed

    def _setCollapsed(self, collapsed: bool) -> None:
        self._collapsed = bool(collapsed)
        self._applyCollapsed()

    def _applyCollapsed(self) -> None:
        """Hide the visible children when collapsed; show again only those it hid."""
        if self._collapsed:
            for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindDirectChildrenOnly):
                if not child.isHidden():
                    self._hiddenByCollapse.append(child)
                    child.hide()
        else:
            for child in self._hiddenByCollapse:
                child.show()
            self._hiddenByCollapse = []

    def showEvent(self, event: Any) -> None:  # children are added after QUiLoader sets ``collapsed``
        self._applyCollapsed()
        super().showEvent(event)

    text = QtCore.Property(str, _getText, _setText)
    collapsed = QtCore.Property(bool, _getCollapsed, _setCollapsed)


CUSTOM_WIDGETS = (qMRMLWidget, qMRMLNodeComboBox, ctkCollapsibleButton)
