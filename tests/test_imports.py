"""The import graph of ``prag_vllm`` (and ``serving``) has no cycles, lazy imports included.

The graph is read from the source (every ``import``/``from ... import`` anywhere in a
module, function bodies included, since a function-level import that closes a cycle is
the same cycle deferred), and every module must import on its own.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prag_vllm", "serving")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (a package's submodule, or the nearest package)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in its source)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {_resolve(a.name, mods) for a in node.names if a.name.split(".")[0] in PACKAGES}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] in PACKAGES:
                    deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else _resolve(base, mods)
                             for a in node.names}
        graph[mod] = {d for d in deps if d is not None and d != mod}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "prag_vllm.cliargs" in graph["prag_vllm.evaluation.cli"]
    assert "prag_vllm.evaluation.report" in graph["prag_vllm.evaluation.run"]
    assert "prag_vllm.training.driver" in graph["prag_vllm.demo"]  # imported inside run_demo
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    graph = import_graph()
    detail = [{m: sorted(graph[m] & set(c)) for m in c} for c in cycles]
    assert not cycles, f"import cycles: {detail}"


def test_subcommand_modules_do_not_import_the_cli():
    """``prag_vllm.cli`` registers the subcommands; they share helpers through ``cliargs`` only."""
    graph = import_graph()
    for mod in ("prag_vllm.evaluation.cli", "prag_vllm.benchdata.cli", "prag_vllm.demo"):
        assert "prag_vllm.cli" not in graph[mod], mod


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports(package):
    pkg = importlib.import_module(package)
    failed = {}
    for info in pkgutil.walk_packages(pkg.__path__, f"{package}."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # noqa: BLE001 -- report every module that fails, not the first
            failed[info.name] = repr(exc)
    assert not failed
