"""The package's import graph: no cycles (function-level imports included) and no module
importing another module's private (`_name`) objects.

Read from the source with `ast`, so an import inside a function counts the same as one at the
top: hiding a cycle in a function body does not pass.
"""

from __future__ import annotations

import ast
from pathlib import Path

import megatron_revisual

PACKAGE_DIR = Path(megatron_revisual.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ("megatron_revisual",) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(imported module, imported object or None, line) for every import in the file that names
    one of the package's modules."""
    out = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name in mods]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                if f"{module}.{a.name}" in mods:
                    out.append((f"{module}.{a.name}", None, node.lineno))
                elif module in mods:
                    out.append((module, a.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {dep for dep, _, _ in _imports(m, p, mods) if dep != m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 100  # the walk found the package
    assert _cycles(graph) == []


def test_no_module_imports_another_modules_private_names() -> None:
    mods = _modules()
    private = [
        f"{m}:{line} imports {obj} from {dep}"
        for m, p in mods.items()
        for dep, obj, line in _imports(m, p, mods)
        if obj is not None and obj.startswith("_") and not obj.startswith("__") and dep != m
    ]
    assert private == []


def test_outside_models_a_model_family_is_reached_only_through_the_registry() -> None:
    """train/, convert/, data/, config/ (and every other package) import no family package:
    a second family touches `models/` and the registry's table only."""
    mods = _modules()
    families = {m for m in mods if m.startswith("megatron_revisual.models.") and m.count(".") >= 3}
    assert "megatron_revisual.models.qwen25_vl.family" in families
    reaching = sorted(
        f"{m}:{line} imports {dep}"
        for m, p in mods.items()
        if not m.startswith("megatron_revisual.models")
        for dep, _, line in _imports(m, p, mods)
        if dep in families
    )
    assert reaching == []
