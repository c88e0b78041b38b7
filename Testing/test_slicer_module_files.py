"""The extension's files and the checks Slicer's generic module test makes.

Building the extension needs a Slicer build tree, which this machine lacks; these tests check
what can be checked without one: every file CMakeLists.txt lists exists, the .s4ext has every
field the extensions index reads and agrees with CMake, the .ui and the parameter node agree,
the module's metadata is filled in, its Logic and Widget instantiate, and its self-test passes
(on the ``slicer_compat`` stand-ins).
"""

from __future__ import annotations

import ast
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import slicer_compat

standIn = slicer_compat.install()

import slicer  # noqa: E402
from conftest import MODULE_DIR, REPO  # noqa: E402
from PySide6 import QtGui  # noqa: E402
from slicer_compat.scripted_module import ModuleParent  # noqa: E402

import CTMLLMSlicer as module  # noqa: E402
from CTMLLMSlicerLib.logic import CTMLLMLogicCore  # noqa: E402

CMAKE = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
S4EXT_FIELDS = (
    "scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
    "category", "iconurl", "status", "description", "screenshoturls", "enabled",
)  # fmt: skip


def cmake_set(name: str) -> list[str]:
    """The values of ``set(NAME ...)`` in CMakeLists.txt, with ${MODULE_NAME} expanded."""
    start = CMAKE.find(f"set({name}")
    assert start >= 0, f"CMakeLists.txt has no set({name} ...)"
    body, quoted = "", False
    for char in CMAKE[start + len(f"set({name}") :]:
        if char == ")" and not quoted:
            break
        quoted ^= char == '"'
        body += char
    return [value.replace("${MODULE_NAME}", "CTMLLMSlicer") for value in shlex.split(body, comments=True)]


def cmake_expand(text: str) -> str:
    return text.replace("${CMAKE_CURRENT_SOURCE_DIR}", str(REPO)).replace("${MODULE_NAME}", "CTMLLMSlicer")


def cmake_globs() -> dict[str, tuple[str, list[str]]]:
    """``file(GLOB[_RECURSE] VAR RELATIVE base CONFIGURE_DEPENDS patterns)``: VAR -> (base, patterns)."""
    pattern = r"file\(GLOB(?:_RECURSE)? (\w+) RELATIVE (\S+) CONFIGURE_DEPENDS(.*?)\)"
    return {
        var: (cmake_expand(base), [cmake_expand(p) for p in patterns.split()])
        for var, base, patterns in re.findall(pattern, CMAKE, re.S)
    }


def lib_modules_imported_by(path: Path) -> set[str]:
    """Files of CTMLLMSlicerLib that ``path`` imports (``from CTMLLMSlicerLib[.x] import ...``)."""
    files = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "CTMLLMSlicerLib":
            files |= {f"CTMLLMSlicerLib/{alias.name}.py" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("CTMLLMSlicerLib."):
            files.add(node.module.replace(".", "/") + ".py")
    return files


def test_every_file_cmake_lists_exists():
    scripts = cmake_set("MODULE_PYTHON_SCRIPTS")
    assert scripts[0] == "CTMLLMSlicer.py" and (MODULE_DIR / "CTMLLMSlicer.py").is_file()
    assert "${MODULE_LIB_PYTHON_SCRIPTS}" in scripts
    for resource in cmake_set("MODULE_PYTHON_RESOURCES"):
        assert (REPO / resource).is_file(), f"CMakeLists.txt lists missing resource {resource}"

    globs = cmake_globs()
    assert set(globs) == {"MODULE_LIB_PYTHON_SCRIPTS", "MODEL_CORE_PYTHON_SCRIPTS", "MODEL_CORE_RESOURCES"}
    libBase, libPatterns = globs["MODULE_LIB_PYTHON_SCRIPTS"]
    libFiles = {
        Path(f).relative_to(libBase).as_posix() for p in libPatterns for f in Path("/").glob(p.lstrip("/"))
    }
    imported = lib_modules_imported_by(MODULE_DIR / "CTMLLMSlicer.py")
    assert imported and imported <= libFiles and "CTMLLMSlicerLib/__init__.py" in libFiles
    coreBase, corePatterns = globs["MODEL_CORE_PYTHON_SCRIPTS"]
    coreFiles = {Path(f).relative_to(coreBase).as_posix() for f in Path(coreBase).glob("model_core/**/*.py")}
    assert corePatterns == [f"{REPO}/model_core/*.py"]
    assert {
        "model_core/__init__.py",
        "model_core/hub.py",
        "model_core/model.py",
        "model_core/data/__init__.py",
    } <= coreFiles

    selfTest = (
        re.search(r"slicer_add_python_unittest\(SCRIPT (\S+)\)", CMAKE)
        .group(1)
        .replace("${MODULE_NAME}", "CTMLLMSlicer")
    )
    assert (REPO / selfTest).is_file() and "class CTMLLMSlicerTest(ScriptedLoadableModuleTest)" in (
        REPO / selfTest
    ).read_text(encoding="utf-8")
    assert "SlicerMacroConfigureGenericPythonModuleTests" in CMAKE


def test_the_s4ext_has_every_index_field_and_agrees_with_cmake():
    fields = {}
    for line in (REPO / "CTMLLMSlicer.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    assert set(S4EXT_FIELDS) <= set(fields), f"missing: {set(S4EXT_FIELDS) - set(fields)}"
    assert all(fields[key] for key in S4EXT_FIELDS)
    assert fields["scm"] == "git" and fields["enabled"] in ("0", "1")
    for key in (
        "homepage",
        "category",
        "contributors",
        "description",
        "iconurl",
        "screenshoturls",
        "depends",
    ):
        assert " ".join(cmake_set(f"EXTENSION_{key.upper()}")) == fields[key], key
    assert fields["iconurl"].endswith("Resources/Icons/CTMLLMSlicer.png") and fields[
        "screenshoturls"
    ].endswith("docs/panel.png")
    assert (REPO / "docs" / "panel.png").is_file()
    icon = QtGui.QImage(str(REPO / "Resources" / "Icons" / "CTMLLMSlicer.png"))
    assert (icon.width(), icon.height()) == (128, 128)


def test_ui_widgets_and_parameter_node_agree():
    tree = ET.parse(REPO / "Resources" / "UI" / "CTMLLMSlicer.ui")
    names = {w.get("name") for w in tree.iter("widget")}
    bound = {
        w.get("name"): w.find("property[@name='SlicerParameterName']/string").text
        for w in tree.iter("widget")
        if w.find("property[@name='SlicerParameterName']") is not None
    }
    assert set(bound.values()) == set(module.CTMLLMSlicerParameterNode.allParameters)
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE_DIR / "CTMLLMSlicer.py").read_text(encoding="utf-8")))
    assert used <= names, f"the widget uses {used - names}, which the .ui lacks"
    classes = {w.get("class") for w in tree.iter("widget")}
    assert {"qMRMLWidget", "qMRMLNodeComboBox", "ctkCollapsibleButton"} <= classes


def test_module_metadata_as_slicers_generic_test_checks():
    parent = ModuleParent(str(MODULE_DIR / "CTMLLMSlicer.py"))
    instance = module.CTMLLMSlicer(parent)
    assert instance.moduleName == "CTMLLMSlicer"
    for attribute in ("title", "helpText", "acknowledgementText"):
        assert getattr(parent, attribute).strip(), f"empty {attribute}"
    assert parent.categories == ["Informatics"] and parent.contributors and all(parent.contributors)
    assert Path(instance.resourcePath("Icons/CTMLLMSlicer.png")).is_file()


def test_one_logic_and_one_widget_instantiate():
    slicer.mrmlScene.Clear(False)
    logic = module.CTMLLMSlicerLogic()
    assert isinstance(logic, slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic)
    assert isinstance(logic, CTMLLMLogicCore) and logic.scene is slicer.mrmlScene
    assert logic.volumeRenderingLogic is standIn.logics["VolumeRendering"]
    parameters = logic.getParameterNode()
    assert parameters.parameterNode is logic.getParameterNode().parameterNode  # one per scene
    assert (parameters.mode, parameters.windowPreset, parameters.modelSource) == (
        "Report",
        "model default",
        "Demo model",
    )

    widget = module.CTMLLMSlicerWidget()  # no parent: it makes its own, as in Slicer
    widget.setup()
    try:
        assert widget.ui.generateButton.text() == "Generate Report"
        assert widget._parameterNode.parameterNode is parameters.parameterNode
    finally:
        widget.cleanup()


def test_the_module_ships_no_test_stand_ins_and_no_pyside_only_code():
    for path in MODULE_DIR.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        imports = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                imports |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imports.add(node.module.split(".")[0])
        assert not imports & {"slicer_compat", "PySide6", "PyQt5", "PyQt6"}, path
        assert not re.search(r"\.connect\(\s*[\"']", text), (
            f"{path}: string signal connections are PythonQt-only"
        )


def test_the_in_slicer_self_test_passes_on_the_stand_ins():
    module.CTMLLMSlicerTest().runTest()
    volume = slicer.mrmlScene.GetFirstNodeByName("SyntheticCT")
    assert volume is not None and volume.GetNodeReference("CTMLLMResult") is not None
