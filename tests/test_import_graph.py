"""No import cycles between vlmq modules.

Every module under src/vlmq is parsed (ast, no import), and every `import vlmq...` / `from vlmq... import`
(and relative import) anywhere in it -- at module level, inside functions, under TYPE_CHECKING -- becomes an
edge to the vlmq module it names: the longest module path that exists, so `from vlmq.calib import load_rgb`
points at vlmq/calib/__init__.py and `from vlmq.runtime.kernels import triton_w8a8` at that submodule.
Imports made on demand by name count too: a string constant that is exactly a vlmq module's dotted name
(the registries: cli's COMMANDS, vlmq.export's FORMAT_MODULES, importlib.import_module("vlmq...")) is an
edge, except a module naming itself and a logger name (the argument of getLogger).
A package's own __init__ run implicitly on the way to a submodule is not an edge (Python's package
machinery, not a dependency anyone wrote). Any strongly connected component of two or more modules, or a
module importing itself, fails the test with one concrete cycle printed.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "vlmq"

# Cycles that remain in files this change could not touch, each named and explained. A listed cycle that
# is gone fails the test too, so this list only shrinks.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The longest existing vlmq module that `name` (a dotted path) starts with."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if _is_package(path) else module.rpartition(".")[0]
    found: set[str] = set()
    logger_names = {id(arg) for node in ast.walk(tree) if isinstance(node, ast.Call)
                    and getattr(node.func, "attr", getattr(node.func, "id", None)) == "getLogger"
                    for arg in node.args}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in logger_names:
            if node.value in modules and node.value.startswith(PACKAGE + ".") and node.value != module:
                found.add(node.value)  # a module named in a registry, imported on demand
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                     for alias in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _target(name, modules)
                if target is not None:
                    found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): components with a cycle in them (size > 1, or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                    if len(component) > 1 or node in graph[node]:
                        out.append(sorted(component))
    return out


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as a path a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return component


def test_graph_sees_known_edges() -> None:
    """The parser itself: a top-level import, a function-level import and `from pkg import submodule`."""
    graph = import_graph()
    assert "vlmq.runtime.linear" in graph["vlmq.runtime.loader"]  # top level
    assert "vlmq.export.manifest" in graph["vlmq.runtime.loader"]  # inside load_w8a8
    assert "vlmq.runtime.kernels.triton_w8a8" in graph["vlmq.runtime.linear"]  # inside a backend
    assert "vlmq.commands" in graph["vlmq.cli"]  # named in the COMMANDS registry
    assert "vlmq.export.modelopt_hf" in graph["vlmq.export"]  # FORMAT_MODULES, imported on demand
    assert "vlmq.pipeline" not in graph["vlmq.run_context"]  # a logger name is not an import
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"a"}}) == [["a"]]
    assert one_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_no_import_cycles_between_vlmq_modules() -> None:
    graph = import_graph()
    components = strongly_connected(graph)
    unexpected = [c for c in components if frozenset(c) not in KNOWN_CYCLES]
    stale = [sorted(k) for k in KNOWN_CYCLES if list(sorted(k)) not in components]
    lines = [" -> ".join(one_cycle(graph, c)) + (f"   (component: {', '.join(c)})" if len(c) > 3 else "")
             for c in unexpected]
    assert not unexpected, "import cycles between vlmq modules:\n  " + "\n  ".join(lines)
    assert not stale, f"KNOWN_CYCLES lists cycles that are gone; remove them: {stale}"
