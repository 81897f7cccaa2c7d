"""The house rules of docs/architecture.md that a program can check: layers import downwards
only (no import cycle, lazy imports included), inner modules never read names from the package
``__init__``, and no function grows past ~100 lines or (outside the CLI) 20 parameters."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "onnxopt"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


MODS = _modules()


def _targets(module: str, node) -> list[str]:
    """Modules an import statement loads (``from . import x`` is the submodule x when there is one,
    else a name from the package ``__init__``)."""
    pkg = module if MODS[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODS else mod for a in node.names]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODS}
    for m, f in MODS.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[m] |= {t for t in _targets(m, node) if t in MODS and t != m}
    return graph


def test_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(u, path):
        state[u] = "open"
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(" -> ".join(path[path.index(v):] + [v]))
            elif v not in state:
                visit(v, path + [v])
        state[u] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_inner_modules_do_not_import_the_package_init():
    graph = _graph()
    offenders = sorted(m for m, deps in graph.items() if "onnxopt" in deps and m != "onnxopt")
    assert not offenders, offenders
    assert "__version__ =" in (PKG / "_version.py").read_text()


def test_functions_stay_short_and_take_few_parameters():
    long, wide = [], []
    for m, f in MODS.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                a = node.args
                params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                if lines > 100:
                    long.append(f"{m}.{node.name}: {lines} lines")
                if params > 20 and "cli" not in m:
                    wide.append(f"{m}.{node.name}: {params} parameters")
    assert not long and not wide, long + wide
