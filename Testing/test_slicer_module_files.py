"""The extension's files, its installed layout, and the checks Slicer's generic module test makes.

Building the extension needs a Slicer build tree, which this machine lacks; these tests check
what can be checked without one: every file CMakeLists.txt lists exists, the Extensions Index
entry (CTMLLMSlicer.json), the .s4ext and CMake agree, the shipped part of model_core is complete
and holds no training code, the module works from the layout CMake installs (files copied as
CMakeLists.txt says) as well as from this checkout, the batch entry point always exits with its
documented status, the .ui and the parameter node agree, the module's metadata is filled in, its
Logic and Widget instantiate, and its self-test passes with and without torch (on the
``slicer_compat`` stand-ins).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import slicer_compat

standIn = slicer_compat.install()

import slicer  # noqa: E402
from conftest import MODULE_DIR, REPO  # noqa: E402
from PySide6 import QtGui  # noqa: E402
from slicer_compat.scripted_module import ModuleParent  # noqa: E402

import CTMLLMSlicer as module  # noqa: E402
from CTMLLMSlicerLib import resources  # noqa: E402
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


MODEL_CORE_NOT_SHIPPED = ("model_core/train", "model_core/bench", "model_core/demo", "model_core/evaluate",
                          "model_core/metrics", "model_core/__main__")  # fmt: skip
"""Training, benchmarks, the demo pipeline and evaluation stay in the repository."""
INDEX_CATEGORIES = ("Informatics", "Segmentation", "Quantification", "Examples", "Developer Tools")
"""A few of the Extensions Index's accepted categories (scripts/check_description_files.py)."""
ENTRY_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
              "build_subdirectory", "enabled", "tier"}  # fmt: skip
"""Every property of slicer-extension-catalog-entry-schema-v1.0.1 (it allows no others)."""


def model_core_imports(path: Path) -> set[str]:
    """model_core modules ``path`` imports anywhere (top level or inside functions), as file paths."""
    files = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("model_core"):
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("model_core")]
        for name in names:
            parts = name.split(".")
            for end in range(1, len(parts) + 1):  # a package's __init__ runs first
                base = REPO.joinpath(*parts[:end])
                for candidate in (base / "__init__.py", base.with_suffix(".py")):
                    if candidate.is_file():
                        files.add(candidate.relative_to(REPO).as_posix())
    return files


def test_every_file_cmake_lists_exists():
    scripts = cmake_set("MODULE_PYTHON_SCRIPTS")
    assert scripts[0] == "CTMLLMSlicer.py" and (MODULE_DIR / "CTMLLMSlicer.py").is_file()
    assert "${MODULE_LIB_PYTHON_SCRIPTS}" in scripts
    for resource in cmake_set("MODULE_PYTHON_RESOURCES"):
        assert (REPO / resource).is_file(), f"CMakeLists.txt lists missing resource {resource}"
    for script in cmake_set("MODEL_CORE_PYTHON_SCRIPTS"):
        assert (REPO / script).is_file(), f"CMakeLists.txt lists missing model_core file {script}"

    globs = cmake_globs()
    assert set(globs) == {"MODULE_LIB_PYTHON_SCRIPTS", "MODEL_CORE_RESOURCES"}
    libBase, libPatterns = globs["MODULE_LIB_PYTHON_SCRIPTS"]
    libFiles = {
        Path(f).relative_to(libBase).as_posix() for p in libPatterns for f in Path("/").glob(p.lstrip("/"))
    }
    imported = lib_modules_imported_by(MODULE_DIR / "CTMLLMSlicer.py")
    assert imported and imported <= libFiles and "CTMLLMSlicerLib/__init__.py" in libFiles
    assert globs["MODEL_CORE_RESOURCES"][1] == [f"{REPO}/model_core/demo_model/*"]

    selfTest = (
        re.search(r"slicer_add_python_unittest\(SCRIPT (\S+)\)", CMAKE)
        .group(1)
        .replace("${MODULE_NAME}", "CTMLLMSlicer")
    )
    assert (REPO / selfTest).is_file() and "class CTMLLMSlicerTest(ScriptedLoadableModuleTest)" in (
        REPO / selfTest
    ).read_text(encoding="utf-8")
    assert "SlicerMacroConfigureGenericPythonModuleTests" in CMAKE


def test_only_the_inference_part_of_model_core_ships_and_it_is_complete():
    shipped = set(cmake_set("MODEL_CORE_PYTHON_SCRIPTS"))
    assert not [f for f in shipped if f.startswith(MODEL_CORE_NOT_SHIPPED)]
    users = [REPO / f for f in shipped] + sorted((MODULE_DIR / "CTMLLMSlicerLib").glob("*.py"))
    users += [MODULE_DIR / "CTMLLMSlicer.py", MODULE_DIR / "batch.py"]
    needed = set().union(*(model_core_imports(path) for path in users))
    assert needed <= shipped, f"imported but not shipped: {sorted(needed - shipped)}"


def test_the_extensions_index_entry_the_s4ext_and_cmake_agree():
    raw = (REPO / "CTMLLMSlicer.json").read_bytes()
    assert b"\r" not in raw  # the index wants LF line endings
    entry = json.loads(raw)
    assert entry["$schema"].startswith(
        "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json"
    )
    assert set(entry) <= ENTRY_KEYS and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["category"] in INDEX_CATEGORIES and entry["category"] == " ".join(
        cmake_set("EXTENSION_CATEGORY")
    )
    assert entry["build_dependencies"] == ["PyTorch"] == cmake_set("EXTENSION_DEPENDS")
    assert re.search(r"^project\(CTMLLMSlicer\)$", CMAKE, re.M)  # the entry's file name is the project name
    repository = entry["scm_url"].rstrip("/").split("/")[-1].removesuffix(".git")
    assert repository.startswith("Slicer") and not "CTMLLMSlicer".lower().startswith("slicer")
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5

    fields = {}
    for line in (REPO / "CTMLLMSlicer.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    assert set(S4EXT_FIELDS) <= set(fields), f"missing: {set(S4EXT_FIELDS) - set(fields)}"
    assert all(fields[key] for key in S4EXT_FIELDS)
    assert fields["scm"] == "git" and fields["enabled"] in ("0", "1")
    assert fields["scmurl"].removesuffix(".git") == entry["scm_url"] and fields["depends"] == "PyTorch"
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
    base = f"https://raw.githubusercontent.com/CTMLLMSlicer/{repository}/main/"
    for url, path in (
        (fields["iconurl"], "Resources/Icons/CTMLLMSlicer.png"),
        (fields["screenshoturls"], "docs/panel.png"),
    ):
        assert url == base + path and (REPO / path).is_file()  # the URL serves this file once published
    icon = QtGui.QImage(str(REPO / "Resources" / "Icons" / "CTMLLMSlicer.png"))
    assert (icon.width(), icon.height()) == (128, 128)


def test_the_license_file_is_apache_2_as_pyproject_says():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text(encoding="utf-8")


def test_the_sample_ct_is_the_phantom_the_script_makes(tmp_path):
    shipped = Path(resources.sampleCTPath())
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == resources.SAMPLE_CT_SHA256
    done = subprocess.run([sys.executable, str(REPO / "Testing" / "make_sample_ct.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes()
    truth = json.loads((tmp_path / "CTMLLMPhantomCT.truth.json").read_text(encoding="utf-8"))
    assert truth["findings"] and truth["report"]


def test_the_sample_ct_is_offered_by_sample_data(monkeypatch):
    registered = []
    sampleData = type(sys)("SampleData")
    sampleData.SampleDataLogic = type("SampleDataLogic", (), {
        "registerCustomSampleDataSource": staticmethod(lambda **kwargs: registered.append(kwargs))})  # fmt: skip
    monkeypatch.setitem(sys.modules, "SampleData", sampleData)
    module.CTMLLMSlicer(ModuleParent(str(MODULE_DIR / "CTMLLMSlicer.py")))
    slicer.app.startupCompleted.emit()  # Slicer registers sample data once started
    (source,) = {json.dumps(kwargs, sort_keys=True) for kwargs in registered}  # once per registration
    source = json.loads(source)
    assert source["category"] == "CT-MLLM" and source["nodeNames"] == resources.SAMPLE_CT_NAME
    assert source["checksums"] == f"SHA256:{resources.SAMPLE_CT_SHA256}"
    assert Path(source["uris"].removeprefix("file://")) == Path(resources.sampleCTPath())
    assert Path(source["thumbnailFileName"]).is_file()


def install_like_cmake(target: Path) -> Path:
    """Copy the files as CMakeLists.txt installs them; returns the qt-scripted-modules folder."""
    folder = target / "lib" / "Slicer-5.10" / "qt-scripted-modules"
    copies = [(MODULE_DIR / "CTMLLMSlicer.py", "CTMLLMSlicer.py")]
    copies += [(f, f"CTMLLMSlicerLib/{f.name}") for f in (MODULE_DIR / "CTMLLMSlicerLib").glob("*.py")]
    copies += [
        (REPO / f, f) for f in cmake_set("MODULE_PYTHON_RESOURCES") + cmake_set("MODEL_CORE_PYTHON_SCRIPTS")
    ]
    copies += [(f, f.relative_to(REPO).as_posix()) for f in (REPO / "model_core" / "demo_model").glob("*")]
    copies.append((MODULE_DIR / "batch.py", f"{resources.BATCH_FOLDER}/batch.py"))
    for source, relative in copies:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, folder / relative)
    return folder


def test_the_batch_entry_point_ships_in_its_own_folder():
    assert re.search(
        r"SCRIPTS batch\.py\s+SOURCE_DIR \$\{CMAKE_CURRENT_SOURCE_DIR\}/\$\{MODULE_NAME\}\s+"
        r"DESTINATION_DIR \$\{CMAKE_BINARY_DIR\}/\$\{Slicer_QTSCRIPTEDMODULES_LIB_DIR\}/\$\{MODULE_NAME\}Batch\s+"
        r"INSTALL_DIR \$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}/\$\{MODULE_NAME\}Batch",
        CMAKE,
    )
    assert resources.BATCH_FOLDER == "CTMLLMSlicerBatch"
    assert Path(resources.batchScriptPath()) == MODULE_DIR / "batch.py"  # in this checkout


BUILT_CHECK = """
import sys
sys.path[:0] = [{folder!r}, {testing!r}]
import CTMLLMSlicerLib.resources as resources, model_core  # from the installed copy
import slicer_compat
slicer_compat.install()
import importlib.util
spec = importlib.util.spec_from_file_location("CTMLLMSlicer", {folder!r} + "/CTMLLMSlicer.py")
module = importlib.util.module_from_spec(spec); sys.modules["CTMLLMSlicer"] = module; spec.loader.exec_module(module)
from slicer_compat.scripted_module import ModuleParent
parent = ModuleParent({folder!r} + "/CTMLLMSlicer.py")
module.CTMLLMSlicer(parent)
widget = module.CTMLLMSlicerWidget(); widget.setup()
volume = widget.logic.loadSampleVolume()
from model_core.hub import load_model
import CTMLLMSlicerLib.batch_run
model = load_model("demo", device="cpu")
print(resources.resourcesFolder(), model_core.__file__, resources.batchScriptPath(), parent.icon is not None,
      volume.GetImageData().GetDimensions(), model.model_id, sep="|")
widget.cleanup()
"""


def test_the_module_works_from_the_installed_layout(tmp_path):
    folder = install_like_cmake(tmp_path)
    assert (
        not (folder / "model_core" / "train.py").exists()
        and not (folder / "model_core" / "benchmark").exists()
    )
    done = subprocess.run(
        [sys.executable, "-c", BUILT_CHECK.format(folder=str(folder), testing=str(REPO / "Testing"))],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin",
        "QT_QPA_PLATFORM": "offscreen", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found, core, batch, icon, dimensions, modelId = done.stdout.strip().splitlines()[-1].split("|")
    assert found == str(folder / "Resources") and core == str(folder / "model_core" / "__init__.py")
    assert batch == str(folder / "CTMLLMSlicerBatch" / "batch.py") and icon == "True"
    assert dimensions == "(160, 160, 64)" and modelId == "demo_model"
    helpRun = subprocess.run([sys.executable, batch, "--help"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert helpRun.returncode == 0 and "--input" in helpRun.stdout, helpRun.stderr


FROM_A_CHECKOUT = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
sys.path[:0] = [{testing!r}, {module!r}]  # what Slicer's additional module path gives: the module folder
import slicer_compat
slicer_compat.install()
import CTMLLMSlicer, model_core
widget = CTMLLMSlicer.CTMLLMSlicerWidget(); widget.setup()
print(model_core.__file__, widget.ui.generateButton.text(), sep="|")
widget.cleanup()
"""


def test_the_module_works_from_a_source_checkout_with_only_its_folder_on_the_path(tmp_path):
    """The development set-up: CTMLLMSlicer/ as an additional module path, nothing installed."""
    code = FROM_A_CHECKOUT.format(testing=str(REPO / "Testing"), module=str(MODULE_DIR))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "QT_QPA_PLATFORM": "offscreen"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    core, button = done.stdout.strip().splitlines()[-1].split("|")
    assert core == str(REPO / "model_core" / "__init__.py") and button == "Generate Report"


IN_SLICER_WITHOUT_TORCH = """
import os, runpy, sys, types
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, NoTorch())
import slicer, slicer.util
slicer.app = types.SimpleNamespace()  # what the Slicer application adds
def exit(status):
    print(f"slicer.util.exit({{status}})", flush=True)
    os._exit(status)
slicer.util.exit = exit
sys.argv = ["batch.py", "--input", {input!r}, "--output", {output!r}]
try:
    runpy.run_path({batch!r}, run_name="__main__")
except BaseException as error:
    print(f"escaped: {{type(error).__name__}}: Slicer would now wait in its event loop forever", flush=True)
    os._exit(99)
print("returned without exiting: Slicer would keep running", flush=True)
os._exit(98)
"""


def test_the_batch_script_inside_slicer_without_torch_exits_with_status_2_and_says_how_to_install(tmp_path):
    code = IN_SLICER_WITHOUT_TORCH.format(input=resources.sampleCTPath(), output=str(tmp_path / "out"),
                                          batch=str(MODULE_DIR / "batch.py"))  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr[-3000:]
    assert "slicer.util.exit(2)" in done.stdout
    assert "run could not start" in done.stderr and "No module named 'torch'" in done.stderr
    assert "open the CT-MLLM module once and accept its install" in done.stderr


SELF_TEST_WITHOUT_TORCH = """
import logging, sys
logging.basicConfig(level=logging.INFO)  # delayDisplay logs its messages
sys.path.insert(0, {testing!r})
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, NoTorch())
import slicer_compat
slicer_compat.install()
from CTMLLMSlicerLib import dependencies
installed = dependencies.installedVersion
dependencies.installedVersion = lambda name: None if name in ("torch", "transformers") else installed(name)
import CTMLLMSlicer
CTMLLMSlicer.CTMLLMSlicerTest().runTest()
print("self-test passed;", "torch imported" if "torch" in sys.modules else "torch never imported")
"""


def test_the_self_test_passes_on_a_slicer_without_torch():
    done = subprocess.run([sys.executable, "-c", SELF_TEST_WITHOUT_TORCH.format(testing=str(REPO / "Testing"))],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "QT_QPA_PLATFORM": "offscreen"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "self-test passed; torch never imported" in done.stdout
    assert "Model part skipped" in done.stderr and "Traceback" not in done.stderr


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
    assert parent.icon is not None and not parent.icon.isNull()  # found one folder up in this checkout
    assert not Path(
        instance.resourcePath("Icons/CTMLLMSlicer.png")
    ).is_file()  # where Slicer alone would look
    assert str(resources.batchScriptPath()) in parent.helpText


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
    module.CTMLLMSlicerTest().runTest()  # with the model part: the demo model in a worker process
    volume = slicer.mrmlScene.GetFirstNodeByName(resources.SAMPLE_CT_NAME)
    assert volume is not None and "Q: Where?" in volume.GetNodeReference("CTMLLMResult").GetText()
