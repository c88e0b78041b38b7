"""Stand-in for PythonQt's ``qt`` module: PySide6's QtCore, QtGui, QtWidgets and QUiLoader.

PythonQt puts every Qt class in one ``qt`` namespace; this module does the same with PySide6's
classes, so ``qt.QTimer``, ``qt.QTextCursor.End`` or ``qt.QFileDialog`` resolve as in Slicer.
What it does not emulate: PythonQt's property-as-attribute access (``widget.text``) and string
signal connections (``widget.connect("clicked()", slot)``); code under test avoids both.
"""

from __future__ import annotations

import types

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets


def build_qt_module() -> types.ModuleType:
    """A module object holding every public Qt name of the four PySide6 modules."""
    module = types.ModuleType("qt", "PySide6 classes under PythonQt's single 'qt' namespace (test stand-in)")
    for source in (QtCore, QtGui, QtWidgets, QtUiTools):
        for name in dir(source):
            if not name.startswith("_"):
                setattr(module, name, getattr(source, name))
    return module
