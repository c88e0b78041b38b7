"""Stand-in for ``slicer.parameterNodeWrapper``: typed fields over a vtkMRMLScriptedModuleNode.

It covers what the module declares, no more: ``str``/``int``/``float``/``bool`` fields stored as
parameters, MRML node fields stored as node references (so both survive a scene save), defaults
by assignment, the ``Choice`` and ``WithinRange`` annotations, and ``connectGui``/``disconnectGui``
binding widgets whose ``SlicerParameterName`` property names a field: qMRMLNodeComboBox (node),
QComboBox (Choice), QLineEdit (str), QSpinBox (int), QCheckBox (bool). Not covered: parameter
packs, lists, enums, ``Default``, other validators.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

import shiboken6
import slicer
import vtk
from PySide6 import QtWidgets

from slicer_compat.widgets import qMRMLNodeComboBox

SlicerParameterNamePropertyName = "SlicerParameterName"


@dataclass(frozen=True)
class Choice:
    choices: list


@dataclass(frozen=True)
class WithinRange:
    minimum: float
    maximum: float


_EMPTY = {str: "", int: 0, float: 0.0, bool: False}


@dataclass
class _Field:
    name: str
    type: type
    choice: Choice | None
    within: WithinRange | None
    default: Any

    @property
    def isNode(self) -> bool:
        return isinstance(self.type, type) and issubclass(self.type, slicer.vtkMRMLNode)

    def validate(self, value: Any) -> Any:
        if self.isNode:
            if value is not None and not value.IsA(self.type.__name__):
                raise TypeError(f"{self.name}: expected {self.type.__name__}, got {value.GetClassName()}")
            return value
        value = self.type(value)
        if self.choice is not None and value not in self.choice.choices:
            raise ValueError(f"{self.name}={value!r}: choose one of {self.choice.choices}")
        if self.within is not None and not self.within.minimum <= value <= self.within.maximum:
            raise ValueError(f"{self.name}={value!r}: outside [{self.within.minimum}, {self.within.maximum}]")
        return value

    def isIn(self, node: Any) -> bool:
        return bool(node.GetNodeReferenceID(self.name)) if self.isNode else node.GetParameter(self.name) != ""

    def read(self, node: Any) -> Any:
        if self.isNode:
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if self.type is bool:
            return text == "true"
        return self.type(text) if text != "" or self.type is str else self.default

    def write(self, node: Any, value: Any) -> None:
        value = self.validate(value)
        if self.isNode:
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif self.type is bool:
            node.SetParameter(self.name, "true" if value else "false")
        else:
            node.SetParameter(self.name, str(value))


def _fields(cls: type) -> dict[str, _Field]:
    fields = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        base, extras = hint, ()
        if typing.get_origin(hint) is typing.Annotated:
            base, *extras = typing.get_args(hint)
        choice = next((e for e in extras if isinstance(e, Choice)), None)
        within = next((e for e in extras if isinstance(e, WithinRange)), None)
        default = getattr(cls, name) if hasattr(cls, name) else _EMPTY.get(base)
        fields[name] = _Field(name, base, choice, within, default)
    return fields


class _Connector:
    """Reads and writes one widget as a field value and reports user edits."""

    def __init__(self, widget: QtWidgets.QWidget, field: _Field) -> None:
        self.widget, self.field = widget, field
        if isinstance(widget, qMRMLNodeComboBox):
            self.signal, self.read, self.write = (
                widget.currentNodeChanged,
                widget.currentNode,
                widget.setCurrentNode,
            )
        elif isinstance(widget, QtWidgets.QComboBox):
            if field.choice is None:
                raise RuntimeError(f"{field.name}: a QComboBox needs a Choice annotation")
            choices = field.choice.choices
            widget.clear()
            widget.addItems([str(c) for c in choices])
            self.signal = widget.currentIndexChanged
            self.read = lambda: choices[widget.currentIndex()]
            self.write = lambda value: widget.setCurrentIndex(choices.index(value))
        elif isinstance(widget, QtWidgets.QLineEdit):
            self.signal, self.read = widget.textChanged, widget.text
            self.write = lambda value: widget.text() != value and widget.setText(value)
        elif isinstance(widget, QtWidgets.QSpinBox):
            if field.within is not None:
                widget.setRange(int(field.within.minimum), int(field.within.maximum))
            self.signal, self.read, self.write = widget.valueChanged, widget.value, widget.setValue
        elif isinstance(widget, QtWidgets.QCheckBox):
            self.signal, self.read, self.write = widget.toggled, widget.isChecked, widget.setChecked
        else:
            raise RuntimeError(f"{field.name}: no stand-in connector for {type(widget).__name__}")


def _connectGui(self: Any, gui: Any) -> int:
    widgets = (
        gui.findChildren(QtWidgets.QWidget) if isinstance(gui, QtWidgets.QWidget) else gui.__dict__.values()
    )
    connectors = []
    for widget in widgets:
        name = (
            widget.property(SlicerParameterNamePropertyName)
            if isinstance(widget, QtWidgets.QWidget)
            else None
        )
        if name:
            if name not in self.allParameters:
                raise ValueError(f"widget {widget.objectName()} names unknown parameter {name!r}")
            connectors.append(_Connector(widget, self.allParameters[name]))

    def guiToNode(connector: _Connector) -> None:
        if not self._updatingGui:
            setattr(self, connector.field.name, connector.read())

    def nodeToGui(*args: Any) -> None:
        self._updatingGui = True
        try:
            for connector in connectors:
                if shiboken6.isValid(connector.widget):  # a widget deleted without disconnectGui
                    connector.write(getattr(self, connector.field.name))
        finally:
            self._updatingGui = False

    nodeToGui()
    slots = []
    for connector in connectors:
        slot = (lambda c: lambda *args: guiToNode(c))(connector)
        connector.signal.connect(slot)
        slots.append((connector.signal, slot))
    observer = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, nodeToGui)
    self._nextGuiTag += 1
    self._guis[self._nextGuiTag] = (slots, observer)
    return self._nextGuiTag


def _disconnectGui(self: Any, tag: int | None) -> None:
    if tag not in self._guis:
        return
    slots, observer = self._guis.pop(tag)
    for signal, slot in slots:
        signal.disconnect(slot)
    self.parameterNode.RemoveObserver(observer)


def parameterNodeWrapper(cls: type) -> type:
    """Class decorator: annotated fields become properties stored in the wrapped parameter node."""
    fields = _fields(cls)

    def init(self: Any, parameterNode: Any) -> None:
        self.parameterNode = parameterNode
        self._guis, self._nextGuiTag, self._updatingGui = {}, 0, False
        for field in fields.values():
            if not field.isIn(parameterNode) and not field.isNode:
                field.write(parameterNode, field.default)

    for name, field in fields.items():
        setattr(
            cls,
            name,
            property(
                (lambda f: lambda self: f.read(self.parameterNode))(field),
                (lambda f: lambda self, value: f.write(self.parameterNode, value))(field),
            ),
        )
    cls.__init__ = init
    cls.allParameters = fields
    cls.connectGui = _connectGui
    cls.disconnectGui = _disconnectGui
    cls.getValue = lambda self, name: getattr(self, name)
    cls.setValue = lambda self, name, value: setattr(self, name, value)
    cls.StartModify = lambda self: self.parameterNode.StartModify()
    cls.EndModify = lambda self, wasModifying: self.parameterNode.EndModify(wasModifying)
    cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
        event, callback, priority
    )
    cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    cls.Modified = lambda self: self.parameterNode.Modified()
    return cls
