"""The import graph of kdplug/, plugins/ and the example plugin: no cycles, lazy imports included,
and the core never imports a plugin.

The graph is read from the source, not from what happens to be imported at run time: every
``import`` and ``from … import`` statement counts wherever it stands (a function-level import is
a lazy import, still an edge), and so do the PEP 562 tables (``_LAZY_EXPORTS``) that packages
load names from on first use. Parent packages that Python runs first are not edges (every package
would otherwise be in a cycle with its own modules).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
#: where each top-level package's source lives (as pyproject.toml maps them)
SOURCES = {"kdplug": ROOT / "kdplug", "kdplug_cifar": ROOT / "plugins" / "kdplug_cifar",
           "kdplug_transformer": ROOT / "plugins" / "kdplug_transformer",
           "kdplug_example_plugin": ROOT / "examples" / "kdplug-example-plugin"
                                    / "kdplug_example_plugin.py"}
PLUGIN_PACKAGES = ("kdplug_cifar", "kdplug_transformer", "kdplug_example_plugin")
#: the one module that imports computed names: those in the packages' _LAZY_EXPORTS tables
LAZY_LOADER = "kdplug._lazy"

Edge = Tuple[str, str, int]  # importer, imported, line


def _modules() -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    for top, path in SOURCES.items():
        if path.is_file():
            found[top] = path
            continue
        for file in sorted(path.rglob("*.py")):
            parts = list(file.relative_to(path).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([top] + parts)] = file
    return found


def _bound_names(tree: ast.Module) -> Set[str]:
    """Names a module binds at its top level (including under if/try), and its lazy exports."""
    names: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names | set(_lazy_table(tree))


def _lazy_table(tree: ast.Module) -> Dict[str, str]:
    for node in tree.body:
        if (isinstance(node, (ast.Assign, ast.AnnAssign))
                and any(isinstance(t, ast.Name) and t.id == "_LAZY_EXPORTS"
                        for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))):
            return ast.literal_eval(node.value)
    return {}


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve(base: str, level: int, name: Optional[str]) -> str:
    parts = base.split(".")
    if level > 1:
        parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def import_graph() -> Tuple[Dict[str, Path], List[Edge], List[str]]:
    """(modules, edges, problems): problems are dynamic imports this reading cannot follow."""
    modules = _modules()
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in modules.items()}
    bound = {m: _bound_names(t) for m, t in trees.items()}
    edges: List[Edge] = []
    problems: List[str] = []

    def add(importer: str, target: str, line: int) -> None:
        # `import a.b.c` names a.b.c; an out-of-tree name (torch, kdplug._C) is not a node
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != importer:
            edges.append((importer, target, line))

    for module, tree in trees.items():
        package = _package_of(module, modules[module])
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(module, alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                source = (_resolve(package, node.level, node.module) if node.level
                          else node.module or "")
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in modules:
                        add(module, submodule, node.lineno)
                    elif source in modules and alias.name in bound[source]:
                        add(module, source, node.lineno)
                    elif source not in modules:
                        add(module, source, node.lineno)
                    # else: a compiled submodule of an in-tree package (kdplug._C): not a node
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr",
                                                         getattr(node.func, "id", None))
                  == "import_module"):
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    target = arg.value
                    if target.startswith("."):
                        level = len(target) - len(target.lstrip("."))
                        target = _resolve(package, level, target.lstrip(".") or None)
                    add(module, target, node.lineno)
                elif module != LAZY_LOADER:
                    problems.append(f"{module}:{node.lineno}: import_module with a computed "
                                    "name (list the targets in a _LAZY_EXPORTS table)")
        for name, target in _lazy_table(tree).items():
            level = len(target) - len(target.lstrip("."))
            resolved = _resolve(package, level, target.lstrip(".")) if level else target
            if resolved not in modules:
                problems.append(f"{module}: _LAZY_EXPORTS[{name!r}] names {target!r}, "
                                "which is not a module here")
            add(module, resolved, 0)
    return modules, edges, problems


def cycles(nodes: List[str], edges: List[Edge]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    graph: Dict[str, Set[str]] = {n: set() for n in nodes}
    for a, b, _ in edges:
        graph[a].add(b)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_the_imports_it_must():
    modules, edges, problems = import_graph()
    assert not problems, problems
    pairs = {(a, b) for a, b, _ in edges}
    assert {"kdplug", "kdplug.engine.run", "kdplug_cifar", "kdplug_transformer.hf",
            "kdplug_example_plugin"} <= set(modules)
    assert ("kdplug", "kdplug.engine") in pairs  # a _LAZY_EXPORTS entry
    assert ("kdplug.cli", "kdplug.engine.run") in pairs  # a function-level (lazy) import
    assert ("kdplug_cifar", "kdplug_cifar.models") in pairs  # lazy, inside a hook


def test_the_cycle_finder_finds_cycles():
    edges = [("a", "b", 1), ("b", "c", 1), ("c", "a", 1), ("c", "d", 1)]
    assert cycles(["a", "b", "c", "d"], edges) == [["a", "b", "c"]]
    assert cycles(["a", "b"], [("a", "b", 1)]) == []


def test_no_import_cycles():
    modules, edges, _ = import_graph()
    found = cycles(sorted(modules), edges)
    shown = []
    for component in found:
        inside = sorted({f"{a} -> {b} (line {line})" for a, b, line in edges
                         if a in component and b in component})
        shown.append("; ".join(inside))
    assert not found, "import cycles:\n" + "\n".join(shown)


def test_the_core_never_imports_a_plugin():
    _, edges, _ = import_graph()
    wrong = [f"{a} -> {b} (line {line})" for a, b, line in edges
             if a.split(".")[0] == "kdplug" and b.split(".")[0] in PLUGIN_PACKAGES]
    assert not wrong, wrong
