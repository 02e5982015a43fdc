"""Which version of its code made an artifact: one version number per stage kind, in the key.

A stage's key hashes its spec and its inputs' keys (:func:`nbutils.core.store.stage_key`) and
:data:`CODE_VERSIONS` of its kind, so when a fix changes what a step computes, bumping that
kind's version recomputes exactly its stages and the stages that read them; artifacts of the
other kinds are reused.

A forgotten bump is caught by the tests: :func:`code_digest` hashes the code a kind runs (its
notebook's code cells and every function, class and constant of the package that they use,
transitively; docstrings and comments left out), and ``tests/code_digests.json`` records the digest for each version. When a
kind's code changes, the test fails and names the kind: bump its version here if its results
change (a refactoring that computes the same numbers needs no bump), then record the new digests
with ``python -m nbutils code-digests --write``.
"""
from __future__ import annotations

import ast
import copy
import hashlib
import importlib.util
import json
from pathlib import Path

PACKAGE = "nbutils"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
PROJECT_ROOT = PACKAGE_DIR.parent
NOTEBOOKS = PROJECT_ROOT / "notebooks"

#: bump a kind's number when a change alters what its stages compute
CODE_VERSIONS: dict[str, int] = {
    "surrogate": 1,
    "poison": 4,   # 4: the fast supernet's convolutions of one state fused (mixed_convs): sums in another order
    "defend": 1,
    "search": 4,   # 4: as poison's 4
    "retrain": 3,
    "sensitivity": 1,
    "gallery": 2,
    "report": 9,   # 8: one cell's statistics worked by hand (issue 26), where each stage ran (issue 27); 9: the per-step retraining schedule among the departures
}

#: the notebook of each kind of stage; its code, and every function, class and constant of the
#: package that it uses (transitively), is the code of the kind
NOTEBOOK_OF: dict[str, str] = {
    "surrogate": "00_surrogate.ipynb",
    "poison": "01_craft_poisons.ipynb",
    "search": "03_search.ipynb",
    "retrain": "04_retrain.ipynb",
    "sensitivity": "05_metric_sensitivity.ipynb",
    "defend": "02_defend.ipynb",
    "gallery": "06_genotype_gallery.ipynb",
    "report": "99_report.ipynb",
}
#: used only when a notebook is run by hand (to find an example stage), never by a run
BY_HAND_ONLY = ("pipeline.examples:example_stage", "pipeline.examples:example_trials")


def module_path(module: str) -> Path:
    folder = PACKAGE_DIR.joinpath(*module.split("."))
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


def _is_module(module: str) -> bool:
    return module_path(module).is_file()


class _Module:
    """One package module's top-level definitions and what its imports bind."""

    def __init__(self, module: str):
        path = module_path(module)
        self.tree = ast.parse(path.read_text())
        package = f"{PACKAGE}.{module}" if path.name == "__init__.py" else f"{PACKAGE}.{module}".rpartition(".")[0]
        self.definitions: dict[str, list[ast.stmt]] = {}
        for node in self.tree.body:
            for name in _defined_names(node):
                self.definitions.setdefault(name, []).append(node)
        #: name -> unit it refers to: a module ("x") or a name in a module ("x:name")
        self.bindings: dict[str, str] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                    else node.module or ""
                for alias in node.names:
                    target = f"{base}.{alias.name}".removeprefix(PACKAGE + ".")
                    inner = base.removeprefix(PACKAGE + ".") if base != PACKAGE else ""
                    if base.startswith(PACKAGE) and _is_module(target):
                        self.bindings[alias.asname or alias.name] = target
                    elif base.startswith(PACKAGE + ".") and _is_module(inner):
                        self.bindings[alias.asname or alias.name] = f"{inner}:{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    name = alias.name.removeprefix(PACKAGE + ".")
                    if alias.name.startswith(PACKAGE + ".") and _is_module(name):
                        self.bindings[alias.asname or alias.name] = name


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def code_units(kind: str) -> list[str]:
    """The code the stages of ``kind`` run, as units ``module`` or ``module:name``: what their
    notebook uses of the package and every package definition that uses, transitively."""
    modules: dict[str, _Module] = {}
    seen: set[str] = set()
    todo = [unit for unit in _used_by_notebook(NOTEBOOK_OF[kind]) if unit not in BY_HAND_ONLY]
    while todo:
        unit = todo.pop()
        if unit in seen:
            continue
        seen.add(unit)
        module, _, name = unit.partition(":")
        if module not in modules:
            modules[module] = _Module(module)
        info = modules[module]
        nodes = [info.tree] if not name else info.definitions.get(name, [])
        used = {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}
        for word in used:
            if word in info.bindings:
                if ":" in info.bindings[word]:   # a module's names are followed below, as used
                    todo.append(info.bindings[word])
            elif name and word in info.definitions and word != name:
                todo.append(f"{module}:{word}")
        # attribute access on an imported module (``params.DataParams``): that name of the module
        for node in nodes:
            for n in ast.walk(node):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in info.bindings \
                        and ":" not in info.bindings[n.value.id]:
                    todo.append(f"{info.bindings[n.value.id]}:{n.attr}")
    # a whole module covers its names
    return sorted(u for u in seen if ":" not in u or u.partition(":")[0] not in seen)


def _used_by_notebook(notebook: str) -> list[str]:
    """The package names a notebook's code uses as ``module.name`` after ``from nbutils.x import module``."""
    tree = ast.parse("\n".join(_code_cells(notebook)))
    modules = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE:
            for alias in node.names:
                module = f"{node.module}.{alias.name}".removeprefix(PACKAGE + ".")
                if _is_module(module):
                    modules[alias.asname or alias.name] = module
    return sorted({f"{modules[n.value.id]}:{n.attr}" for n in ast.walk(tree)
                   if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules})


def _code_cells(notebook: str) -> list[str]:
    cells = json.loads((NOTEBOOKS / notebook).read_text())["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]


def _without_docstrings(tree: ast.AST) -> str:
    """A syntax tree as text, without docstrings (and so without comments)."""
    tree = copy.deepcopy(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False)


def code_digest(kind: str) -> str:
    """A hash of the code the stages of ``kind`` run: their notebook's code cells, the units of
    :func:`code_units` without docstrings, and the C sources beside a module that is used
    (``module.c``, ``module.h`` and ``module_*.[ch]``)."""
    digest = hashlib.sha256()
    for source in _code_cells(NOTEBOOK_OF[kind]):
        digest.update(source.encode())
    natives: set[Path] = set()
    modules: dict[str, _Module] = {}
    for unit in code_units(kind):
        module, _, name = unit.partition(":")
        if module not in modules:
            modules[module] = _Module(module)
        info = modules[module]
        nodes = [info.tree] if not name else info.definitions.get(name, [])
        digest.update(unit.encode())
        for node in nodes:
            digest.update(_without_docstrings(node).encode())
        path = module_path(module)
        natives.update(path.parent.glob(path.stem + ".[ch]"))
        natives.update(path.parent.glob(path.stem + "_*.[ch]"))   # the headers it includes
    for native in sorted(natives):
        digest.update(native.name.encode() + native.read_bytes())
    return digest.hexdigest()[:16]


def current_digests() -> dict[str, dict]:
    """Per kind: its version and the digest of its code, as ``tests/code_digests.json`` records them."""
    return {kind: {"version": CODE_VERSIONS[kind], "digest": code_digest(kind)} for kind in CODE_VERSIONS}
