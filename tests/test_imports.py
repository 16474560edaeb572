"""The package's modules form a stack: their import graph has no cycle.

Every module of ``src/arraymlp`` is parsed (not imported) and each ``import`` and
``from ... import`` in it, at any depth (function-level imports included), becomes an
edge to the module of the package it names: relative imports are resolved against the
importing module, ``from . import x`` is an edge to the submodule ``x`` when there is
one (and to the package otherwise), and ``from .pkg.mod import name`` an edge to
``pkg.mod`` (and to ``pkg.mod.name`` when that is a submodule). Running a submodule's
import also runs its parents' ``__init__``; those implicit edges are not in the graph,
which records what each module's own code asks for.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import arraymlp

PACKAGE = "arraymlp"
ROOT = Path(arraymlp.__file__).resolve().parent


def _module_names(root: Path) -> dict[str, Path]:
    """Dotted name of every module under ``root`` (a package ``__init__`` is the package)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _imports(name: str, tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that the module ``name`` (parsed as ``tree``) imports."""
    out: set[str] = set()

    def add(target: str) -> None:
        # the longest prefix that is a module: "arraymlp.io.models.save" -> "arraymlp.io.models"
        parts = target.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            out.add(".".join(parts))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if _is_package(name, modules) else name.split(".")[:-1]
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
                target = ".".join(parts)
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:  # "from . import x" with x a submodule
                    out.add(sub)
                else:
                    add(target)
    out.discard(name)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` for every module under ``root``."""
    modules = _module_names(root)
    return {name: _imports(name, ast.parse(path.read_text(encoding="utf-8"), str(path)), modules)
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes whose first and last are the same, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def _edges(graph):
    return "\n".join(f"  {m} -> {', '.join(sorted(d)) or '(none)'}" for m, d in sorted(graph.items()))


# ----------------------------------------------------------------------------- the finder
def test_find_cycle_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None
    assert find_cycle({}) is None


def test_graph_parser_resolves_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n__version__ = '1'\n")
    (pkg / "a.py").write_text("def f():\n    from . import b, __version__\n    from .sub.c import g\n")
    (pkg / "b.py").write_text("import arraymlp.sub\nfrom arraymlp.sub import c\nimport os\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import a\nfrom . import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\nfrom .. import b as B\n")
    assert import_graph(pkg) == {
        PACKAGE: {f"{PACKAGE}.a"},
        f"{PACKAGE}.a": {PACKAGE, f"{PACKAGE}.b", f"{PACKAGE}.sub.c"},
        f"{PACKAGE}.b": {f"{PACKAGE}.sub", f"{PACKAGE}.sub.c"},
        f"{PACKAGE}.sub": {f"{PACKAGE}.a", f"{PACKAGE}.sub.c"},
        f"{PACKAGE}.sub.c": {f"{PACKAGE}.a", f"{PACKAGE}.b"},
    }
    assert find_cycle(import_graph(pkg)) == [PACKAGE, f"{PACKAGE}.a", PACKAGE]


# ----------------------------------------------------------------------------- the package
def test_the_import_graph_has_no_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}\nthe graph:\n{_edges(graph)}"


def test_the_graph_sees_the_package(graph):
    assert {"arraymlp", "arraymlp.io", "arraymlp.io.checkpoints", "arraymlp.callbacks",
            "arraymlp.training", "arraymlp.model", "arraymlp._version"} <= set(graph)
    # function-level imports are edges: model.fit imports training inside the method
    assert "arraymlp.training" in graph["arraymlp.model"]
    assert "arraymlp.io.checkpoints" in graph["arraymlp.training"]
    assert "arraymlp.distributed" in graph["arraymlp.training"]


def test_callbacks_is_a_leaf(graph):
    assert graph["arraymlp.callbacks"] <= {"arraymlp._backend"}


def test_checkpoints_do_not_reach_the_model(graph):
    below = reaches(graph, "arraymlp.io.checkpoints")
    assert "arraymlp.model" not in below
    assert "arraymlp.io.models" not in below
    assert "arraymlp.io" not in below
    assert "arraymlp.training" not in below
    assert {"arraymlp.callbacks", "arraymlp.io.container", "arraymlp.io.layout"} <= below


def test_io_modules_import_the_model_only_in_models(graph):
    io_modules = [m for m in graph if m.startswith("arraymlp.io.")]
    assert sorted(io_modules) == ["arraymlp.io.checkpoints", "arraymlp.io.container", "arraymlp.io.layout",
                                  "arraymlp.io.models", "arraymlp.io.onnx"]
    assert [m for m in io_modules if "arraymlp.model" in graph[m]] == ["arraymlp.io.models"]
    assert {d for d in graph["arraymlp.io.container"] if d.startswith("arraymlp")} == set()


def test_training_and_distributed_imports(graph):
    assert graph["arraymlp.training"] == {"arraymlp._backend", "arraymlp.callbacks", "arraymlp.losses",
                                          "arraymlp.optim", "arraymlp.io.checkpoints", "arraymlp.distributed",
                                          "arraymlp.functional", "arraymlp.fusion", "arraymlp.precision",
                                          "arraymlp.metrics", "arraymlp.ensemble", "arraymlp._staging"}
    # an ensemble model is handed to the ensemble's own loop, which does not import training back
    assert "arraymlp.training" not in reaches(graph, "arraymlp.ensemble")
    # metrics know arrays and their kernels, not models
    assert graph["arraymlp.metrics"] == {"arraymlp._backend", "arraymlp.kernels"}
    assert "arraymlp.model" not in reaches(graph, "arraymlp.training")
    assert not {"arraymlp.io", "arraymlp.io.checkpoints", "arraymlp.training"} & graph["arraymlp.distributed"]
    assert "arraymlp.callbacks" in graph["arraymlp.distributed"]


def test_the_package_root_is_imported_only_by_the_entry_points(graph):
    importers = {m for m, deps in graph.items() if "arraymlp" in deps}
    assert all(m.startswith("arraymlp.bench") or m == "arraymlp.demo" for m in importers), importers
    assert not importers & reaches(graph, "arraymlp")
    for name in ("arraymlp", "arraymlp.io.layout", "arraymlp.io.onnx", "arraymlp.__main__", "arraymlp.bench.machine"):
        assert "arraymlp._version" in graph[name], name


# ----------------------------------------------------------------------------- at run time
_LOADED = """
import importlib, importlib.machinery, importlib.util, json, sys

root, bare, target = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
for name in bare:  # a package whose __init__ does not run: only what target asks for loads
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [root + name[len("arraymlp"):].replace(".", "/")]
    sys.modules[name] = importlib.util.module_from_spec(spec)
importlib.import_module(target)
print(json.dumps(sorted(m for m in sys.modules if m == "arraymlp" or m.startswith("arraymlp."))))
"""


def _loaded(target: str, bare: list[str]) -> set[str]:
    """The arraymlp modules a fresh interpreter loads to import ``target``, with the
    packages ``bare`` in place but their ``__init__`` not run."""
    out = subprocess.run([sys.executable, "-c", _LOADED, str(ROOT), json.dumps(bare), target],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_callbacks_alone_loads_nothing_else():
    assert _loaded("arraymlp.callbacks", ["arraymlp"]) <= {"arraymlp", "arraymlp.callbacks", "arraymlp._backend"}


def test_checkpoints_load_neither_training_nor_the_model():
    loaded = _loaded("arraymlp.io.checkpoints", ["arraymlp", "arraymlp.io"])
    assert {"arraymlp.io.checkpoints", "arraymlp.io.layout", "arraymlp.io.container", "arraymlp.callbacks"} <= loaded
    assert not {"arraymlp.model", "arraymlp.io.models", "arraymlp.training"} & loaded
    # through the io package (which loads io.models and with it the model), still no training
    loaded = _loaded("arraymlp.io.checkpoints", ["arraymlp"])
    assert {"arraymlp.io.models", "arraymlp.model"} <= loaded
    assert "arraymlp.training" not in loaded
