"""The package's import graph keeps the layout of the README's map.

Every ``import`` in ``dmc/`` counts, at module level or inside a function: a function-local import
that hides a cycle is still a cycle.

- ``dmc.core`` (the DMC math) depends on nothing else of dmc;
- ``dmc.kernels`` (Triton kernels and their twins) depends only on ``dmc.core`` (and torch/triton);
- ``dmc.hf`` imports nothing from ``dmc.engine``;
- the subpackages import each other without cycles (``dmc/__init__.py``, the public facade, aside).
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dmc"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Absolute names of everything ``name`` imports (``from pkg import submodule`` resolves to the
    submodule when it is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in known else target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _is_stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_core_depends_on_no_other_part_of_dmc():
    bad = {imp for imp in _graph()["dmc.core"] if _within(imp, "dmc")}
    assert not bad, f"dmc.core imports {sorted(bad)}"


def test_kernels_depend_only_on_core():
    for name, imports in _graph().items():
        if not _within(name, "dmc.kernels"):
            continue
        for imp in imports:
            allowed = (_within(imp, "dmc.core") or _within(imp, "dmc.kernels") or _is_stdlib(imp)
                       or imp.split(".")[0] in ("torch", "triton", "__future__"))
            assert allowed, f"{name} imports {imp}: kernels and their twins may import only dmc.core, torch, triton"


def test_hf_does_not_import_the_engine():
    for name, imports in _graph().items():
        if _within(name, "dmc.hf"):
            bad = sorted(imp for imp in imports if _within(imp, "dmc.engine"))
            assert not bad, f"{name} imports {bad}"


def _part(name: str) -> str:
    """The layout unit of a module: its top-level subpackage or module under dmc."""
    return ".".join(name.split(".")[:2])


def test_no_cycles_between_parts():
    edges: dict[str, set[str]] = {}
    for name, imports in _graph().items():
        if name == "dmc":  # the facade re-exports every part
            continue
        for imp in imports:
            if _within(imp, "dmc") and imp != "dmc" and _part(imp) != _part(name):
                edges.setdefault(_part(name), set()).add(_part(imp))
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle between parts of dmc: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_graph_sees_function_local_imports():
    """The checks above read imports inside functions too (this module's own parser)."""
    graph = _graph()
    assert "dmc.kernels.triton_kernels" in graph["dmc.hf.attention"]  # imported on demand, inside a method
    assert "dmc.core" in graph["dmc.kernels.reference"]
