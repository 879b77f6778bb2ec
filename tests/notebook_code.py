"""Helpers to load the functions a notebook defines, without running the whole notebook."""

import ast
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def notebook_functions(path, names=None) -> dict:
    """Exec the imports and the top-level ``def``s of a notebook's code cells into a namespace."""
    nb = nbformat.read(ROOT / path, as_version=4)
    namespace: dict = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(cell.source)
        keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
        if keep:
            exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
    if names is not None:
        return {n: namespace[n] for n in names}
    return namespace
