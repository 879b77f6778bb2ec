"""Generate ``exercises/`` from ``solutions/``: the single source of every exercise notebook.

In a solution notebook, each answer sits between marker lines inside a code cell::

    ### BEGIN SOLUTION Exercise 1.2: one Euler-Maruyama step x + f dt + g sqrt(dt) z
    ...the reference answer...
    ### END SOLUTION

(the markers nbgrader uses, followed by the exercise id and what to write). The exercise
notebook gets ``raise NotImplementedError("Exercise 1.2: ...")`` in place of each region, at
the region's indentation, with all outputs cleared. Cells tagged ``solution-only`` are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

__all__ = ["strip_solutions", "build_exercise_notebook", "build_exercises", "ExerciseBuildError"]

BEGIN = re.compile(r"^(?P<indent>\s*)###\s*BEGIN SOLUTION\b(?P<text>.*)$")
END = re.compile(r"^\s*###\s*END SOLUTION\b")
PROMPT = re.compile(r"^\s*(?P<prompt>Exercise \d+\.\d+: \S.*?)\s*$")
SOLUTION_ONLY_TAG = "solution-only"


class ExerciseBuildError(ValueError):
    """A solution notebook whose markers cannot be turned into an exercise."""


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace every marked solution region of ``source`` with a ``NotImplementedError`` stub."""
    out, inside, prompt = [], False, ""
    for lineno, line in enumerate(source.splitlines(), start=1):
        begin = BEGIN.match(line)
        if begin:
            if inside:
                raise ExerciseBuildError(f"{where}, line {lineno}: BEGIN SOLUTION inside another region")
            match = PROMPT.match(begin["text"])
            if not match:
                raise ExerciseBuildError(
                    f"{where}, line {lineno}: expected '### BEGIN SOLUTION Exercise N.M: <what to "
                    f"write>'; got {line.strip()!r}")
            inside, prompt = True, match["prompt"]
            out.append(f"{begin['indent']}raise NotImplementedError({prompt!r})")
        elif END.match(line):
            if not inside:
                raise ExerciseBuildError(f"{where}, line {lineno}: END SOLUTION without BEGIN")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ExerciseBuildError(f"{where}: BEGIN SOLUTION for {prompt!r} is never closed")
    return "\n".join(out)


def build_exercise_notebook(solution: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The exercise version of one solution notebook (a new object; the input is unchanged)."""
    nb = nbformat.v4.new_notebook()
    # Only the kernel is copied: language_info records the Python that last ran the solutions.
    nb.metadata = {"language_info": {"name": "python"}}
    if "kernelspec" in solution.metadata:
        nb.metadata["kernelspec"] = solution.metadata["kernelspec"]
    nb.metadata["course"] = {"chapter": Path(name).stem, "generated_from": f"solutions/{name}"}
    n_regions = 0
    for i, cell in enumerate(solution.cells):
        if SOLUTION_ONLY_TAG in cell.get("metadata", {}).get("tags", []):
            continue
        if cell.cell_type == "code":
            src = strip_solutions(cell.source, where=f"solutions/{name}, cell {i}")
            n_regions += sum(1 for line in cell.source.splitlines() if BEGIN.match(line))
            new = nbformat.v4.new_code_cell(src)
        elif cell.cell_type == "markdown":
            new = nbformat.v4.new_markdown_cell(cell.source)
        else:
            new = nbformat.v4.new_raw_cell(cell.source)
        tags = list(cell.get("metadata", {}).get("tags", []))
        if tags:
            new.metadata["tags"] = tags
        new["id"] = cell.get("id") or f"cell-{i}"  # stable ids keep the output reproducible
        nb.cells.append(new)
    if n_regions == 0:
        raise ExerciseBuildError(f"solutions/{name} has no '### BEGIN SOLUTION' region")
    return nb


def _render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb, version=4) + "\n"


def build_exercises(solutions_dir: Path | str = "solutions", exercises_dir: Path | str = "exercises",
                    *, check: bool = False) -> list[Path]:
    """Write (or with ``check=True`` only compare) every exercise notebook.

    Returns the exercise files that were written, or that are stale when checking (missing,
    different from what the solutions generate, or left over without a solution).
    """
    solutions_dir, exercises_dir = Path(solutions_dir), Path(exercises_dir)
    sources = sorted(solutions_dir.glob("*.ipynb"))
    if not sources:
        raise ExerciseBuildError(f"no solution notebooks found in {solutions_dir}/")
    changed: list[Path] = []
    expected_names = set()
    for src in sources:
        solution = nbformat.read(src, as_version=4)
        text = _render(build_exercise_notebook(solution, src.name))
        target = exercises_dir / src.name
        expected_names.add(src.name)
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        changed.append(target)
        if not check:
            exercises_dir.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    if check:
        changed += [p for p in sorted(exercises_dir.glob("*.ipynb")) if p.name not in expected_names]
    return changed
