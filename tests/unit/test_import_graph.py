"""The package's import graph: no circles, and DESIGN.md's dependency direction for the leaf packages.

The graph is read from the source with `ast`, not by importing: every `import` / `from ... import`
anywhere in a file counts (function-local and TYPE_CHECKING imports too: a lazy import still ties
the two modules together), and so do `__import__("...")` / `importlib.import_module("...")` calls
with a literal name. `from pkg import name` is an edge to the module `pkg.name` when there is one,
else to `pkg` (its __init__). Importing a submodule is not counted as an edge to its parent
packages' __init__ files: Python runs them, but that is how packages work, not a dependency.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("rae_scale", "data_pipeline", "launchers")

# DESIGN.md: models, diffusion, data and checkpoint import none of the other sub-packages
# (seeding, storage and config excepted).
LEAF_PACKAGES = ("models", "diffusion", "data", "checkpoint")
ALWAYS_ALLOWED = ("seeding", "storage", "config")

# (importing module, imported module) -> why this break of the leaf rule is tolerated for now.
# Every entry must still match an import (a stale entry fails the test).
LEAF_RULE_ALLOWED: dict[tuple[str, str], str] = {}


@lru_cache(maxsize=1)
def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the roots (a package is its __init__)."""
    out = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _literal_import_call(node: ast.AST) -> str | None:
    """The name in `__import__("x")` or `importlib.import_module("x")`, when it is a literal."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    arg = node.args[0]
    if name in ("__import__", "import_module") and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def _from_source(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` statement reads from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(module: str, path: Path) -> list[str]:
    """Every absolute dotted name `module` imports, anywhere in its file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _from_source(module, path, node)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                names.append(sub if sub in module_files() else source)
        else:
            literal = _literal_import_call(node)
            if literal:
                names.append(literal)
    return names


@lru_cache(maxsize=1)
def import_graph() -> dict[str, frozenset[str]]:
    """module -> the package modules it imports (the longest known prefix of each imported name)."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        targets = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            while parts and ".".join(parts) not in files:
                parts.pop()
            if parts and ".".join(parts) != module:
                targets.add(".".join(parts))
        graph[module] = frozenset(targets)
    return graph


def strongly_connected_components(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    for start in sorted(graph):
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
                    work.append((child, iter(sorted(graph[child]))))
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
                    out.append(sorted(component))
    return sorted(out)


def a_cycle(component: list[str], graph: dict[str, frozenset[str]]) -> list[str]:
    """One concrete circle through the component's first module (shortest, by breadth-first search)."""
    members = set(component)
    start = component[0]
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"{component} is not strongly connected")


def leaf_rule_violations(graph: dict[str, frozenset[str]]) -> list[tuple[str, str]]:
    """(module, import) pairs where a leaf package imports another rae_scale sub-package or module."""
    out = []
    for module, targets in sorted(graph.items()):
        parts = module.split(".")
        if parts[0] != "rae_scale" or len(parts) < 2 or parts[1] not in LEAF_PACKAGES:
            continue
        for target in sorted(targets):
            tparts = target.split(".")
            if tparts[0] != "rae_scale":
                out.append((module, target))  # data_pipeline / launchers
            elif len(tparts) > 1 and tparts[1] not in (parts[1], *ALWAYS_ALLOWED):
                out.append((module, target))
            elif len(tparts) == 1:
                out.append((module, target))  # the package's __init__ pulls in everything it exports
    return out


def test_graph_sees_function_local_and_relative_imports():
    graph = import_graph()
    # relative, module level
    assert "rae_scale.checkpoint.storage" in graph["rae_scale.checkpoint.manager"]
    # absolute, inside a function
    assert "rae_scale.models.encoders" in graph["rae_scale.builders"]


def test_no_import_cycles():
    graph = import_graph()
    cycles = [" -> ".join(a_cycle(c, graph)) + f"   (component: {', '.join(c)})"
              for c in strongly_connected_components(graph)]
    assert not cycles, "import circles among the package's modules:\n  " + "\n  ".join(cycles)


def test_leaf_packages_import_no_other_subpackage():
    graph = import_graph()
    found = leaf_rule_violations(graph)
    stale = sorted(set(LEAF_RULE_ALLOWED) - set(found))
    bad = [f"{m} imports {t}" for m, t in found if (m, t) not in LEAF_RULE_ALLOWED]
    assert not bad and not stale, (
        "DESIGN.md: models/, diffusion/, data/ and checkpoint/ import no other sub-package "
        f"(except {', '.join(ALWAYS_ALLOWED)}):\n  " + "\n  ".join(bad)
        + ("\nallow-list entries that match no import any more: " + repr(stale) if stale else ""))
