"""Checks of the Slicer extension that need no Slicer: the .ui files against the code that uses them, the files
CMake lists, Python 3.9 compatibility of the module code, the extension metadata, and the Slicer-side helpers
that are plain Python (models, dependency installation)."""

import ast
import json
import os
import re
import struct
import sys
import xml.etree.ElementTree as ET

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MODULES = ("TCURSegment", "TCURFinetune")
LIB = os.path.join(REPO, "TCURLoRALib")
SLICER_SIDE_FILES = ([os.path.join(REPO, m, m + ".py") for m in MODULES]
                     + sorted(os.path.join(LIB, f) for f in os.listdir(LIB) if f.endswith(".py"))
                     + [os.path.join(REPO, "tcurlora", "jobs.py")])


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def ui_widgets(module):
    tree = ET.parse(os.path.join(REPO, module, "Resources", "UI", module + ".ui"))
    return tree, {w.get("name"): w for w in tree.iter("widget")}


def parameter_fields(module):
    """Annotated fields of the @parameterNodeWrapper class of a module script."""
    tree = ast.parse(read(os.path.join(REPO, module, module + ".py")))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {stmt.target.id for stmt in node.body if isinstance(stmt, ast.AnnAssign)}
    raise AssertionError(f"{module}.py has no @parameterNodeWrapper class")


# ----------------------------------------------------------------------------------------------------------
# .ui files <-> code


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_name_used_exists_in_the_ui_file(module):
    _, widgets = ui_widgets(module)
    code = read(os.path.join(REPO, module, module + ".py"))
    used = set(re.findall(r"(?<![\w.])(?:self\.)?ui\.(\w+)", code))  # self.ui.X, or X of a local ui = self.ui
    if "slicerapp.ModuleWidgetMixin" in code:  # the widgets both modules share
        used |= set(re.findall(r"\bself\.ui\.(\w+)", read(os.path.join(LIB, "slicerapp.py"))))
    assert used, "the widget uses no self.ui names?"
    missing = sorted(used - set(widgets))
    assert not missing, f"{module}.py uses self.ui.{missing} that {module}.ui does not define"


@pytest.mark.parametrize("module", MODULES)
def test_ui_file_structure(module):
    tree, widgets = ui_widgets(module)
    root = tree.getroot()
    top = root.find("widget")
    assert root.findtext("class") == module and top.get("name") == module and top.get("class") == "qMRMLWidget"
    names = [w.get("name") for w in tree.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    qt_classes = {"QWidget", "QLabel", "QPushButton", "QComboBox", "QCheckBox", "QSpinBox", "QDoubleSpinBox",
                  "QLineEdit", "QProgressBar", "QTableWidget", "QPlainTextEdit"}
    undeclared = {w.get("class") for w in tree.iter("widget")} - qt_classes - declared
    assert not undeclared, f"custom widget classes not declared in <customwidgets>: {undeclared}"
    for connection in root.iter("connection"):  # every qMRML widget gets the scene from the top widget
        assert connection.findtext("sender") == module
        assert connection.findtext("receiver") in widgets
    mrml = {n for n, w in widgets.items() if w.get("class", "").startswith("qMRML") and w is not top}
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml <= receivers, f"MRML widgets without a scene connection: {mrml - receivers}"


@pytest.mark.parametrize("module", MODULES)
def test_slicer_parameter_names_are_parameter_node_fields(module):
    _, widgets = ui_widgets(module)
    fields = parameter_fields(module)
    bound = {}
    for name, widget in widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.findtext("string")
    assert bound, "no widget is bound to the parameter node"
    unknown = {w: p for w, p in bound.items() if p not in fields}
    assert not unknown, f"SlicerParameterName values that are not parameter node fields: {unknown}"
    assert len(set(bound.values())) == len(bound), "two widgets bound to one parameter"


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_and_logic_method_called_exists(module):
    """``self.X(...)`` and callbacks ``self.X`` in the Widget and Logic classes name methods or attributes that
    the class (or its TCURLoRALib base) defines: the module scripts cannot be imported without Slicer, so a
    typo there would only show in the application."""
    tree = ast.parse(read(os.path.join(REPO, module, module + ".py")))
    bases_source = read(os.path.join(LIB, "logic.py")) + read(os.path.join(LIB, "slicerapp.py")) + read(
        os.path.join(REPO, "TCURSegment", "TCURSegment.py"))
    inherited = set(re.findall(r"def (\w+)\(", bases_source)) | set(
        re.findall(r"self\.(\w+)(?:: [^=]+)? = ", bases_source)) | {
        "layout", "parent", "resourcePath", "addObserver", "removeObserver", "removeObservers", "delayDisplay",
        "assertEqual", "assertTrue", "assertFalse", "assertIsNone", "assertIsNotNone", "assertIs", "assertIn",
        "assertLess", "assertGreater", "assertGreaterEqual", "assertRaises", "getParameterNode"}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        defined = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)} | inherited | {
            t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(cls):
            if isinstance(node, ast.Assign):
                defined |= {t.attr for t in node.targets if isinstance(t, ast.Attribute)}
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute):
                defined.add(node.target.attr)
        used = {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                and n.value.id == "self" and isinstance(n.ctx, ast.Load)}
        missing = sorted(used - defined)
        assert not missing, f"{cls.name} uses self.{missing}, which nothing defines"


@pytest.mark.parametrize("module", MODULES)
def test_module_script_defines_the_four_classes(module):
    tree = ast.parse(read(os.path.join(REPO, module, module + ".py")))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for suffix, base in (("", "ScriptedLoadableModule"), ("Widget", "ScriptedLoadableModuleWidget"),
                         ("Logic", "ScriptedLoadableModuleLogic"), ("Test", "ScriptedLoadableModuleTest")):
        cls = classes.get(module + suffix)
        assert cls is not None, f"{module}{suffix} missing"
        assert base in {getattr(b, "id", getattr(b, "attr", None)) for b in cls.bases}
    logic_init = next(f for f in classes[module + "Logic"].body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    assert "launcher" in [a.arg for a in logic_init.args.args], "the Logic must take an injectable launcher"
    tests = [f.name for f in classes[module + "Test"].body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")]
    run_test = next(f for f in classes[module + "Test"].body if isinstance(f, ast.FunctionDef) and f.name == "runTest")
    called = {n.func.attr for n in ast.walk(run_test) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert set(tests) <= called, f"runTest does not run {set(tests) - called}"


# ----------------------------------------------------------------------------------------------------------
# CMake


def cmake_commands(path):
    text = re.sub(r"#[^\n]*", "", read(path))
    return re.findall(r"(\w+)\s*\(([^)]*)\)", text)


def cmake_glob(folder, pattern, recursive):
    import fnmatch

    directory, name = os.path.split(pattern)
    root = os.path.join(folder, directory)
    if not recursive:
        return fnmatch.filter(os.listdir(root), name) if os.path.isdir(root) else []
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in fnmatch.filter(files, name)]


def test_every_file_cmake_lists_exists():
    top = os.path.join(REPO, "CMakeLists.txt")
    commands = cmake_commands(top)
    subdirs = [args.strip() for name, args in commands if name == "add_subdirectory"]
    assert sorted(subdirs) == sorted(MODULES)
    for subdir in subdirs:
        assert os.path.isfile(os.path.join(REPO, subdir, "CMakeLists.txt"))
    checked = 0
    for cmake_file in [top] + [os.path.join(REPO, s, "CMakeLists.txt") for s in subdirs]:
        folder = os.path.dirname(cmake_file)
        variables = {}
        for name, args in cmake_commands(cmake_file):
            tokens = args.split()
            if name == "set" and len(tokens) == 2:
                variables[tokens[0]] = tokens[1]
            if name == "file" and tokens and tokens[0].startswith("GLOB"):
                patterns = [t for t in tokens if "*" in t]
                assert patterns
                for pattern in patterns:
                    matches = cmake_glob(folder, pattern, recursive=tokens[0] == "GLOB_RECURSE")
                    # resources (json) may legitimately be absent; the engine's code may not
                    assert matches or not pattern.endswith(".py"), f"{pattern} matches nothing"
                continue
            for token in tokens:
                token = re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), token).strip('"')
                if "$" in token or "://" in token or not re.search(r"\.(py|ui|png|json|txt)$", token):
                    continue
                assert os.path.isfile(os.path.join(folder, token)), f"{os.path.relpath(cmake_file, REPO)} lists " \
                                                                    f"missing file {token}"
                checked += 1
    assert checked >= 4 + 9


def test_cmake_installs_every_library_module_and_the_engine():
    text = read(os.path.join(REPO, "CMakeLists.txt"))
    listed = set(re.findall(r"TCURLoRALib/(\w+\.py)", text))
    present = {f for f in os.listdir(LIB) if f.endswith(".py")}
    assert listed == present, f"TCURLoRALib files not installed: {present - listed}; stale: {listed - present}"
    assert "tcurlora/*.py" in text and "ctkMacroCompilePythonScript" in text
    # the engine's catalog must travel with it (tcurlora.catalog looks in <parent of tcurlora>/Resources/Catalog)
    assert "Resources/Catalog/*.json" in text
    assert cmake_glob(REPO, "Resources/Catalog/*.json", recursive=False), "no catalog entry to install"
    assert "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in text and "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in text
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"?PyTorch"?\)', text)
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL"):
        assert re.search(rf"set\(EXTENSION_{key}\s+\S", text), f"EXTENSION_{key} missing"
    for module in MODULES:
        module_cmake = read(os.path.join(REPO, module, "CMakeLists.txt"))
        assert "WITH_GENERIC_TESTS" in module_cmake and "slicer_add_python_unittest" in module_cmake


def test_extension_index_entry_and_icon():
    entry = json.loads(read(os.path.join(REPO, "TCURLoRA.json")))
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert set(entry) <= {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                          "build_subdirectory", "enabled", "tier"}
    assert entry["build_dependencies"] == ["PyTorch"]
    for path in [os.path.join(REPO, "Resources", "Icons", "TCURLoRA.png")] + [
            os.path.join(REPO, m, "Resources", "Icons", m + ".png") for m in MODULES]:
        with open(path, "rb") as f:
            head = f.read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n", path
        assert struct.unpack(">II", head[16:24]) == (128, 128), path


def test_docs_exist():
    text = read(os.path.join(REPO, "docs", "slicer.md"))
    for needle in ("TCURLORA_WHEELHOUSE", "Additional module paths", "ctest", "PyTorch", "Add as training case",
                   "## Troubleshooting", "No GPU", "proxy", "Out of memory", "tcurlora/requirements.txt"):
        assert needle in text, needle
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(pictures) >= 2
    for picture in pictures:
        assert os.path.isfile(os.path.join(REPO, "docs", picture)), picture


# ----------------------------------------------------------------------------------------------------------
# Python 3.9 (Slicer 5.8) compatibility and import boundaries


def _future_annotations(tree):
    return any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
               for n in tree.body)


@pytest.mark.parametrize("path", SLICER_SIDE_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_python39_compatible(path):
    source = read(path)
    tree = ast.parse(source, feature_version=(3, 9))
    if not _future_annotations(tree):
        for node in ast.walk(tree):
            annotations = []
            if isinstance(node, ast.AnnAssign):
                annotations.append(node.annotation)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                annotations += [a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation]
                if node.returns:
                    annotations.append(node.returns)
            for annotation in annotations:
                for sub in ast.walk(annotation):
                    assert not (isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr)), \
                        f"line {sub.lineno}: 'X | Y' annotation is evaluated at runtime (Python 3.10+)"
    for node in ast.walk(tree):
        assert not type(node).__name__ in ("Match", "TryStar"), f"line {node.lineno}: Python 3.10+ syntax"
        if isinstance(node, ast.Import):
            assert "imp" not in [a.name for a in node.names], "the imp module is gone in Python 3.12"
        if isinstance(node, ast.With) and len(node.items) > 1:
            pass  # multi-item with is fine; parenthesised forms fail feature_version parsing above


def _module_level_nodes(tree):
    """Nodes executed at import time (function bodies are skipped: lazy imports there are fine)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _imported_roots(path):
    roots = set()
    for node in _module_level_nodes(ast.parse(read(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_import_boundaries():
    assert not _imported_roots(os.path.join(REPO, "tcurlora", "jobs.py")) & {"slicer", "qt", "vtk", "ctk", "torch"}
    for name in os.listdir(LIB):
        if not name.endswith(".py"):
            continue
        roots = _imported_roots(os.path.join(LIB, name))
        if name != "slicerapp.py":
            assert "qt" not in roots and "ctk" not in roots, f"TCURLoRALib/{name} must not need Qt"
        if name in ("models.py", "dependencies.py", "engine.py"):
            assert not roots & {"slicer", "vtk"}, f"TCURLoRALib/{name} must be plain Python"
    standin = os.path.join(REPO, "Testing", "standin_worker.py")
    assert _imported_roots(standin) <= {"gzip", "json", "os", "sys", "time"}


def test_the_slicer_side_never_imports_torch():
    """Slicer's own process must never load torch (it belongs to the worker process): no module of the Slicer
    side imports it, or MONAI, even inside a function; and importing the whole Lib loads neither."""
    for path in SLICER_SIDE_FILES:
        for node in ast.walk(ast.parse(read(path))):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & {"torch", "monai"}, f"{os.path.relpath(path, REPO)}:{node.lineno} imports {roots}"
    pytest.importorskip("slicer")
    code = ("import sys; from TCURLoRALib import caselibrary, dependencies, engine, finetune, logic, models, "
            "nodeio, plots, selftests, tasks; import tcurlora.manifest; "
            "print(sorted(m for m in ('torch', 'monai', 'SimpleITK') if m in sys.modules))")
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ----------------------------------------------------------------------------------------------------------
# plain-Python helpers of the Slicer side

from TCURLoRALib import dependencies, engine, models  # noqa: E402

BASE = [{"value": 1, "name": "Brain", "color": [0.9, 0.7, 0.6]}]


def test_label_mapping_defaults_and_new_head():
    rows = models.defaultLabelMapping(["brain", "Lesion", "Edema"], BASE, {"Lesion": [1, 0, 0]})
    assert [(r["segment"], r["label"], r["value"]) for r in rows] == [("brain", "Brain", 1), ("Lesion", "Lesion", 2),
                                                                      ("Edema", "Edema", 3)]
    assert rows[1]["color"] == [1, 0, 0]
    job_labels, table, seg_to_value = models.labelsFromMapping(rows[:1], BASE)
    assert job_labels is None and table == [{"value": 1, "name": "Brain", "color": BASE[0]["color"]}]
    job_labels, table, seg_to_value = models.labelsFromMapping(rows, BASE)
    assert [e["name"] for e in job_labels] == ["Brain", "Lesion", "Edema"]
    assert seg_to_value == {"brain": 1, "Lesion": 2, "Edema": 3}
    # two segments into one label; unticked rows ignored
    merged = [dict(rows[1], label="Tumour", value=2), dict(rows[2], label="tumour", value=2),
              dict(rows[0], include=False)]
    job_labels, table, seg_to_value = models.labelsFromMapping(merged, BASE)
    assert table == [{"value": 2, "name": "Tumour", "color": [1.0, 0.0, 0.0]}] and job_labels == table
    # a base value reused under another name is a new head
    assert models.labelsFromMapping([dict(rows[1], value=1)], BASE)[0] is not None


@pytest.mark.parametrize("rows,message", [
    ([], "No segment"),
    ([{"segment": "a", "label": "", "value": 1}], "empty"),
    ([{"segment": "a", "label": "A", "value": "x"}], "whole number"),
    ([{"segment": "a", "label": "A", "value": 0}], "between 1"),
    ([{"segment": "a", "label": "A", "value": 1}, {"segment": "b", "label": "B", "value": 1}], "used for both"),
    ([{"segment": "a", "label": "A", "value": 1}, {"segment": "b", "label": "a", "value": 2}], "two values"),
])
def test_label_mapping_errors(rows, message):
    with pytest.raises(ValueError, match=message):
        models.labelsFromMapping(rows, BASE)


def test_merge_label_mapping_keeps_user_choices():
    previous = [{"segment": "Seg1", "include": True, "label": "Brain", "value": 1, "color": [1, 1, 1]}]
    rows = models.mergeLabelMapping(previous, ["Seg1", "Other"], BASE)
    assert rows[0] == previous[0] and (rows[1]["label"], rows[1]["value"]) == ("Other", 2)
    assert models.mergeLabelMapping(previous, [], BASE) == []


def test_model_registry(tmp_path):
    registry = models.ModelRegistry(catalog=[{"name": "deepbet", "title": "deepbet", "labels": BASE,
                                              "fingerprint": None, "cached": False}])
    assert registry.names() == ["deepbet"] and models.ModelRegistry.jobBase(registry.entry("deepbet")) == "deepbet"
    bundle = tmp_path / "spleen_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {"outputs": {"pred": {
        "channel_def": {"0": "background", "1": "spleen"}}}}}))
    entry = registry.addBundle(str(bundle))
    assert entry["labels"] == [{"value": 1, "name": "spleen", "color": models.defaultColor(1)}]
    assert models.ModelRegistry.jobBase(entry) == str(bundle)
    spec, weights = tmp_path / "net.json", tmp_path / "net.pt"
    spec.write_text(json.dumps({"labels": [{"value": 3, "name": "Liver"}]}))
    weights.write_bytes(b"w")
    entry = registry.addSpec(str(spec), str(weights))
    assert models.ModelRegistry.jobBase(entry) == {"spec": str(spec), "weights": str(weights)}
    assert entry["labels"] == [{"value": 3, "name": "Liver"}]
    # a saved scene stores only the name: the entry is rebuilt from it in a fresh registry
    fresh = models.ModelRegistry(catalog=[])
    assert fresh.ensure(entry["name"])["weights"] == str(weights)
    assert fresh.ensure("bundle:" + str(bundle))["kind"] == "bundle"
    assert fresh.ensure("bundle:/nonexistent") is None and fresh.ensure("unknown") is None
    restored = models.ModelRegistry(catalog=[], custom=registry.customEntries() + [{"kind": "weird", "name": "x"}])
    assert [e["kind"] for e in restored.entries()] == ["bundle", "spec"]
    with pytest.raises(ValueError):
        registry.addBundle(str(tmp_path))  # no configs/ folder
    with pytest.raises(ValueError):
        registry.addSpec(str(spec), str(tmp_path / "missing.pt"))


def test_catalog_models_from_the_engine():
    entries = models.catalogModels()  # [] (logged) while tcurlora.catalog does not exist
    for entry in entries:
        assert entry["kind"] == "catalog" and "name" in entry and "labels" in entry


MANIFEST = {
    "format_version": "1.0",
    "method": {"name": "tcurlora", "config": {"rank": 8},
               "stacks": [{"name": "conv", "members": [{"module": "down0.conv", "rows": None}], "I": [0], "J": [0]}]},
    "base": {"name": "deepbet", "fingerprint": "sha256:" + "ab" * 32},
    "labels": [{"value": 1, "name": "Brain", "color": [0.9, 0.7, 0.6]}],
    "preprocessing": {},
    "provenance": {"software": "tcurlora 0.1.0", "date": "2026-01-01", "cases": 3, "steps": 300,
                   "validation_dice": 0.912},
}


def test_adapter_summary_and_base_check(tmp_path):
    manifest = MANIFEST  # the manifest layout of tcurlora.manifest (read from real files in the
    text = models.adapterSummary(manifest)  # module self-tests and by the lead's real-worker test)
    assert "Labels: 1 Brain" in text and "rank 8" in text and "3 training cases" in text
    assert "validation Dice 0.912" in text and "abababababab" in text
    same = {"name": "deepbet", "kind": "catalog", "fingerprint": "sha256:" + "ab" * 32}
    assert models.checkAdapterCompatibility(manifest, same)[0]
    other = dict(same, fingerprint="sha256:" + "cd" * 32)
    ok, message = models.checkAdapterCompatibility(manifest, other)
    assert not ok and "deepbet" in message and "cdcdcdcdcdcd" in message
    assert models.checkAdapterCompatibility(manifest, dict(same, fingerprint=None))[0]  # unknown: worker checks
    ok, message = models.checkAdapterCompatibility(manifest, {"name": "unetr", "kind": "catalog", "fingerprint": None})
    assert not ok and "unetr" in message
    assert models.checkAdapterCompatibility(manifest, {"name": "bundle:/x", "kind": "bundle"})[0]
    assert not models.checkAdapterCompatibility(manifest, None)[0]
    assert "no validation Dice" in models.adapterSummary(dict(manifest, provenance={"validation_dice": None}))


def test_a_bad_adapter_file_gives_one_line_for_the_gui(tmp_path):
    manifest_module = pytest.importorskip("tcurlora.manifest")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04 a pickle, never unpickled")
    with pytest.raises(Exception) as info:
        manifest_module.read_manifest(str(bad))
    assert "\n" not in str(info.value) and "bad.safetensors" in str(info.value)


REQS = dependencies.readRequirements()


class FakeEnvironment:
    """Installed distributions as {name: version}; pip and PyTorchUtils calls recorded."""

    def __init__(self, installed, pipResult=None):
        self.installed = dict(installed)
        self.calls, self.questions, self.constraints = [], [], []
        self.pipResult = pipResult

    def versionOf(self, name):
        return self.installed.get(name)

    def pip(self, args):
        self.calls.append(("pip", list(args)))
        if "-c" in args:
            self.constraints.append(open(args[args.index("-c") + 1]).read())
        for req in args:
            if ">=" in req:
                name, minimum = req.split(">=")
                if name == "torch" or "-c" not in args or "torch==" not in self.constraints[-1]:
                    self.installed[name] = minimum + ".0"
                else:  # pip would have to keep the pinned torch
                    self.installed.setdefault(name, minimum + ".0")

    def torch(self, requirement):
        self.calls.append(("torch", requirement))
        self.installed["torch"] = "2.13.0"
        return object()

    def installer(self, **kwargs):
        args = dict(confirm=lambda text: self.questions.append(text) or True, pipInstall=self.pip,
                    installTorch=self.torch, versionOf=self.versionOf, log=lambda s: None, environ={})
        args.update(kwargs)
        return dependencies.DependencyInstaller(**args)


def test_the_installer_reads_the_engines_requirements_file_which_pyproject_uses():
    names = [r.text for r in REQS]
    assert "torch>=2.1" in names and "monai>=1.3" in names and "pynrrd>=1.0" in names
    pyproject = read(os.path.join(REPO, "pyproject.toml"))
    assert 'dynamic = ["dependencies"]' in pyproject
    assert 'dependencies = { file = ["tcurlora/requirements.txt"] }' in pyproject
    assert "monai>=" not in pyproject.split("[project.optional-dependencies]")[0]  # no second copy
    assert os.path.samefile(dependencies.requirementsFile(), os.path.join(REPO, "tcurlora", "requirements.txt"))


def test_a_bad_requirements_line_names_the_file_and_line(tmp_path):
    bad = tmp_path / "requirements.txt"
    bad.write_text("# comment\ntorch>=2.1\nmonai @ https://x\n")
    with pytest.raises(ValueError, match=r"requirements.txt:3: 'monai @ https://x'"):
        dependencies.readRequirements(str(bad))


@pytest.mark.parametrize("installed,minimum,ok", [("2.13.0+cpu", "2.1", True), ("2.0.1", "2.1", False),
                                                  ("2.1", "2.1.0", True), ("1.10.0", "1.9", True),
                                                  (None, "1.0", False), ("0.4.0rc1", None, True)])
def test_version_minimum(installed, minimum, ok):
    assert dependencies.satisfies(installed, minimum) is ok


def test_dependency_installer_asks_once_installs_torch_first_and_pins_it():
    env = FakeEnvironment({"scipy": "1.14.0", "SimpleITK": "2.4.0", "numpy": "1.26.4"})
    steps = []
    installer = env.installer(progress=lambda done, total, text: steps.append((done, total, text)))
    missing = [m.requirement.name for m in installer.missing()]
    assert missing[0] == "torch" and "monai" in missing and "scipy" not in missing
    assert installer.ensure() is True
    assert len(env.questions) == 1 and "torch>=2.1" in env.questions[0]
    assert env.calls[0] == ("torch", ">=2.1")  # PyTorchUtils with our minimum, no question of its own
    kind, args = env.calls[1]
    assert kind == "pip" and "monai>=1.3" in args and "scipy>=1.9" not in args
    # the torch PyTorchUtils just installed, and Slicer's own SimpleITK/numpy, cannot be swapped by pip
    assert set(env.constraints[0].split()) == {"torch==2.13.0", "SimpleITK==2.4.0", "numpy==1.26.4"}
    assert not any(a.lower().startswith(("simpleitk", "numpy")) for a in args)
    # the progress bar shows each installation step
    assert [s[:2] for s in steps] == [(0, 2), (1, 2), (2, 2)]
    assert "PyTorch" in steps[0][2] and "monai>=1.3" in steps[1][2]
    assert installer.ensure() is True and len(env.questions) == 1  # nothing missing: no question


def test_an_old_torch_is_upgraded_through_pytorchutils():
    everything = {r.name: "99.0" for r in REQS}
    env = FakeEnvironment(dict(everything, torch="2.0.1"))
    installer = env.installer()
    assert [m.describe() for m in installer.missing()] == ["torch>=2.1 (installed: 2.0.1)"]
    assert installer.ensure() is True
    assert env.calls == [("torch", ">=2.1")] and "installed: 2.0.1" in env.questions[0]


def test_slicer_installer_never_lets_pytorchutils_ask_again():
    source = read(os.path.join(LIB, "dependencies.py"))
    assert "askConfirmation=False" in source and "askConfirmation=True" not in source


def test_dependency_installer_declined_offline_and_failing(tmp_path):
    env = FakeEnvironment({})
    assert env.installer(confirm=lambda text: False).ensure() is False and not env.calls
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    offline = FakeEnvironment({"SimpleITK": "2.4.0"})
    installer = offline.installer(installTorch=None, environ={dependencies.WHEELHOUSE_ENV: str(wheels)})
    assert installer.ensure() is True and str(wheels) in offline.questions[0]
    first = offline.calls[0][1]
    assert first[:3] == ["--no-index", "--find-links", str(wheels)] and first[-1] == "torch>=2.1"
    assert all(call[1][:3] == ["--no-index", "--find-links", str(wheels)] for call in offline.calls)
    with pytest.raises(ValueError, match="not a folder"):
        dependencies.wheelhouse({dependencies.WHEELHOUSE_ENV: str(tmp_path / "missing")})
    failing = FakeEnvironment({})
    with pytest.raises(RuntimeError, match="PyTorch was not installed"):
        failing.installer(installTorch=lambda requirement: None).ensure()
    stuck = FakeEnvironment({})
    stuck.pip = lambda args: None  # pip "succeeds" but installs nothing
    with pytest.raises(RuntimeError, match="could not be installed: monai>=1.3"):
        stuck.installer().ensure()


def test_engine_paths(tmp_path):
    assert os.path.samefile(engine.engineRoot(), REPO)
    module_file = os.path.join(REPO, "TCURSegment", "TCURSegment.py")
    assert engine.candidateRoots(module_file) == [os.path.join(REPO, "TCURSegment"), REPO]
    installed = tmp_path / "qt-scripted-modules"
    installed.mkdir()
    fake_module = installed / "TCURSegment.py"
    fake_module.write_text("")
    job = engine.defaultLauncher(pythonExecutable="/x/PythonSlicer")({"command": "segment"}, str(tmp_path / "w"))
    assert job.command_line[:3] == ["/x/PythonSlicer", "-m", "tcurlora.worker"]
    assert job.environment()["PYTHONPATH"].split(os.pathsep)[0] == engine.engineRoot()
    job.cleanup()
    assert engine.testingFile(module_file, "standin_worker.py") == os.path.join(REPO, "Testing", "standin_worker.py")
    with pytest.raises(FileNotFoundError, match="TCURLORA_TESTING_DIR"):
        engine.testingFile(str(fake_module), "standin_worker.py", environ={})
    assert engine.testingFile(str(fake_module), "standin_worker.py",
                              environ={engine.TESTING_DIR_ENV: os.path.join(REPO, "Testing")}).startswith(REPO)
