"""Is a student's answer the course's own reference implementation? Read from the notebook's code.

A check compares outputs; a function that calls the course's reference (imported under another
name, wrapped in a one-line function or a lambda, fetched with ``getattr`` or ``importlib``)
returns the right outputs without being a solution. :func:`reference_use` reads the notebook's
cells with :mod:`ast` (in the grader: nothing of the student's code runs for it) and follows the
student's function, and every function or alias of the notebook that it uses, to the names it
reaches. A name that resolves, through the notebook's imports and assignments, to one of the
exercise's references (``Exercise.reference``: dotted paths of functions, classes or modules of
the ``course`` package) is reported; so is a dynamic lookup inside ``course`` (``getattr`` with a
computed name, ``importlib.import_module``/``__import__``/``sys.modules`` with a ``course`` string),
whose target cannot be read from the code.

What a solution may use: anything outside ``course``, ``course.utils`` helpers such as
``expand_like``, and the objects the check passes in (an SDE, a path, a model).
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterable

__all__ = ["reference_use", "resolve_reference"]

_DYNAMIC = {"getattr", "__import__", "eval", "exec"}


def resolve_reference(dotted: str):
    """The object a dotted path of the ``course`` package names (a module, class or function)."""
    if dotted != "course" and not dotted.startswith("course."):
        raise ValueError(f"expected a dotted path inside the course package; got {dotted!r}")
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ValueError(f"{dotted!r} names nothing in the course package")


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``a.b.c`` with ``a`` replaced by what the notebook bound it to (None if not a course path)."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
        base = _dotted(node.args[0], aliases)
        return None if base is None else ".".join([base, node.args[1].value, *reversed(attrs)])
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    return ".".join([aliases[node.id], *reversed(attrs)])


class _Notebook:
    """The module-level bindings of a notebook's cells: imports, assignments and definitions."""

    def __init__(self, sources: Iterable[str]):
        self.aliases: dict[str, str] = {}  # name -> dotted course path it was bound to (last binding)
        self.defs: dict[str, ast.AST] = {}  # name -> last def / lambda assignment
        for source in sources:
            try:
                tree = ast.parse(_without_magics(source))
            except SyntaxError:
                continue
            for node in tree.body:
                self._bind(node)

    def _bind(self, node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for name, target in _imports(node):
                self._set_alias(name, target)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.aliases.pop(node.name, None)
            self.defs[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.aliases.pop(target.id, None)
                    self.defs.pop(target.id, None)
                    dotted = _dotted(node.value, self.aliases)
                    if dotted is not None:
                        self.aliases[target.id] = dotted
                    else:
                        self.defs[target.id] = node.value  # a lambda, a partial, a call: read what it uses
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    self._bind(child)

    def _set_alias(self, name: str, target: str) -> None:
        self.defs.pop(name, None)
        if target == "course" or target.startswith("course."):
            self.aliases[name] = target
        else:
            self.aliases.pop(name, None)


def _without_magics(source: str) -> str:
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def _imports(node: ast.Import | ast.ImportFrom) -> list[tuple[str, str]]:
    if isinstance(node, ast.Import):
        return [(a.asname or a.name.split(".")[0], a.name if a.asname else a.name.split(".")[0]) for a in node.names]
    module = node.module or ""
    if node.level:  # a relative import cannot name the installed package
        return []
    return [(a.asname or a.name, f"{module}.{a.name}") for a in node.names if a.name != "*"]


def _matches(dotted: str, forbidden: list[tuple[str, object]]) -> str | None:
    try:
        obj = resolve_reference(dotted)
    except (ValueError, AttributeError, ImportError):
        obj = None
    for path, ref in forbidden:
        if dotted == path or dotted.startswith(path + ".") or (obj is not None and obj is ref):
            return path
    return None


def reference_use(sources: Iterable[str], name: str, references: Iterable[str]) -> str | None:
    """How the notebook's function ``name`` reaches one of ``references`` (None when it does not):
    e.g. ``"it uses course.samplers.reverse_em_step through helper"``."""
    references = list(references)
    if not references:
        return None
    forbidden = [(path, resolve_reference(path)) for path in references]
    nb = _Notebook(list(sources))
    if name in nb.aliases:  # ``name = course....`` or ``from course... import x as name``
        hit = _matches(nb.aliases[name], forbidden)
        return f"{name} is {nb.aliases[name]}" if hit else None
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen or current not in nb.defs:
            continue
        seen.add(current)
        local = dict(nb.aliases)
        node = nb.defs[current]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            params = node.args
            for arg in [*params.posonlyargs, *params.args, *params.kwonlyargs, params.vararg, params.kwarg]:
                if arg is not None:
                    local.pop(arg.arg, None)  # a parameter named like a module is the caller's object
        for inner in ast.walk(node):  # imports inside the function bind names too
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                for alias, target in _imports(inner):
                    if target == "course" or target.startswith("course."):
                        local[alias] = target
        for inner in ast.walk(node):
            if isinstance(inner, (ast.Name, ast.Attribute)) or (
                    isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id == "getattr"):
                dotted = _dotted(inner, local)
                if dotted is not None:
                    hit = _matches(dotted, forbidden)
                    if hit:
                        via = "" if current == name else f" through {current}"
                        return f"it uses {hit}{via}"
            if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name):
                dynamic = _dynamic_lookup(inner, local)
                if dynamic:
                    return dynamic + ("" if current == name else f" in {current}")
        dynamic = _dynamic_course_string(node)
        if dynamic:
            return dynamic + ("" if current == name else f" in {current}")
        shadowed = _parameters(node)  # a parameter named like a notebook def is the caller's object, not that def
        todo += [inner.id for inner in ast.walk(node)
                 if isinstance(inner, ast.Name) and inner.id in nb.defs and inner.id not in shadowed]
    return None


def _parameters(node: ast.AST) -> set[str]:
    """The parameter names of a function or lambda (nothing for any other node)."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        return set()
    params = node.args
    return {a.arg for a in [*params.posonlyargs, *params.args, *params.kwonlyargs, params.vararg, params.kwarg]
            if a is not None}


def _dynamic_lookup(call: ast.Call, aliases: dict[str, str]) -> str | None:
    if call.func.id == "getattr" and call.args and _dotted(call.args[0], aliases) is not None and not (
            len(call.args) >= 2 and isinstance(call.args[1], ast.Constant)):
        return "it looks up a name of the course package with getattr, which the checker cannot follow"
    return None


def _dynamic_course_string(node: ast.AST) -> str | None:
    """A ``"course..."`` string beside getattr, __import__, import_module, eval, exec or sys.modules."""
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
    strings = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    used = sorted(names & (_DYNAMIC | {"import_module", "modules"}))
    if used and any(s == "course" or s.startswith("course.") for s in strings):
        return f"it reaches the course package through {used[0]}, which the checker cannot follow"
    return None
