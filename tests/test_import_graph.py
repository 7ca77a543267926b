"""The package's import graph has no cycle, and every folder that holds modules ships as a package.

Every module of every package that ``pyproject.toml`` installs is parsed with ``ast``; each
``import idforge...`` / ``from idforge... import`` / ``from . import`` / ``from .x import`` statement,
at module level or inside a function, is an edge to the idforge module it names. A cycle means two
modules that cannot be understood (or imported at module level) one without the other.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _declared_packages() -> list[str]:
    toml = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return list(toml.load(f)["tool"]["setuptools"]["packages"])


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name}: not importable as a package"
    return Path(next(iter(spec.submodule_search_locations)))


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (source file, is a package ``__init__``) for every installed module."""
    out = {}
    for pkg in _declared_packages():
        for path in sorted(_package_dir(pkg).glob("*.py")):
            is_init = path.stem == "__init__"
            out[pkg if is_init else f"{pkg}.{path.stem}"] = (path, is_init)
    return out


def _target(name: str, known: set[str]) -> str | None:
    """The idforge module that importing ``name`` executes last (``a.b.c`` where ``c`` is a function
    resolves to module ``a.b``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, (path, is_init) in modules.items():
        package = mod if is_init else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "idforge"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                elif (node.module or "").split(".")[0] == "idforge":
                    base = node.module
                else:
                    continue
                # ``from pkg import name``: the submodule pkg.name if there is one, else pkg itself
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for name in names:
                target = _target(name, known)
                if target is not None and target != mod:
                    graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_finder_sees_relative_absolute_and_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    import idforge.pkg.c\n")
    (pkg / "c.py").write_text("def g():\n    from idforge.pkg import a\n")
    mods = {
        "idforge.pkg": (pkg / "__init__.py", True),
        **{f"idforge.pkg.{m}": (pkg / f"{m}.py", False) for m in "abc"},
    }
    graph = import_graph(mods)
    assert graph["idforge.pkg.a"] == {"idforge.pkg.b"}
    assert graph["idforge.pkg.b"] == {"idforge.pkg.c"}
    assert graph["idforge.pkg.c"] == {"idforge.pkg.a"}
    assert find_cycle(graph) == ["idforge.pkg.a", "idforge.pkg.b", "idforge.pkg.c", "idforge.pkg.a"]
    (pkg / "c.py").write_text("")
    assert find_cycle(import_graph(mods)) is None


def test_the_package_import_graph_has_no_cycle():
    modules = _modules()
    graph = import_graph(modules)
    assert sum(map(len, graph.values())) > 20  # the parser does see the package's imports
    cycle = find_cycle(graph)
    assert cycle is None, (
        f"import cycle {' -> '.join(cycle)}: move the shared code into a module both can import, or "
        "move the caller out of the package"
    )


def test_every_folder_with_modules_is_an_installed_package():
    declared = _declared_packages()
    for pkg in declared:
        for sub in _package_dir(pkg).iterdir():
            if (sub / "__init__.py").is_file():
                assert f"{pkg}.{sub.name}" in declared, (
                    f"{sub}: a subpackage missing from pyproject.toml's [tool.setuptools] packages; add "
                    f"'{pkg}.{sub.name}' there or a wheel will not ship it"
                )


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_library_module_or_real_command_reaches_the_demo():
    """The demo is one client of the library; ``idforge eval`` and the rest never run its code."""
    graph = import_graph(_modules())
    demo = {"idforge.launch.demo", "idforge.launch.demo_data", "idforge.launch.demo_train"}
    for mod in sorted(set(graph) - demo - {"idforge.launch.cli", "idforge.launch.demo_cmd"}):
        assert not _reachable(graph, mod) & demo, f"{mod} imports the demo's {_reachable(graph, mod) & demo}"


def test_the_face_subpackage_stands_alone():
    """``idforge.models.face`` needs nothing else of idforge: curation and face-encoder training use it
    without pulling in the generator."""
    graph = import_graph(_modules())
    face = "idforge.models.face"
    for mod in sorted(m for m in graph if m == face or m.startswith(face + ".")):
        outside = {t for t in _reachable(graph, mod) if not t.startswith(face)}
        assert not outside, f"{mod} imports {outside}, outside {face}"
