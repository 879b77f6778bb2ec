"""The course package imports in one direction: no module imports (at top level or inside a function)
a module that imports it back. The recipe registry, the kind modules, the catalogue ``course.recipes``
and ``course.pretrained`` are the case this guards: kinds register themselves without a loop."""

import ast
from pathlib import Path

import course

ROOT = Path(course.__file__).parent


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in ROOT.rglob("*.py"):
        parts = ("course", *path.relative_to(ROOT).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = parts[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ((node.module,) if node.module else ()))
                deps.update(f"{base}.{a.name}" for a in node.names) if node.module is None else deps.add(base)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("course."):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("course."))
        graph[module] = deps
    return graph


def _cycles(graph):
    state, found = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph or dep == "course":  # outside the package, or the package's own namespace
                continue
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_the_finder_sees_imports_and_loops():
    graph = _imports()
    assert "course.recipe_registry" in graph["course.latent_recipes"]
    assert "course.recipes" in graph["course.pretrained"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles_in_the_package():
    cycles = _cycles(_imports())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
