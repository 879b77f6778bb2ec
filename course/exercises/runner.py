"""Execute an exercise notebook headless and collect the verdict of every exercise.

The notebook runs top to bottom in a fresh kernel (cells that raise do not stop the run; a
cell that runs past ``cell_timeout`` is interrupted). Then one extra cell runs every check of
the notebook's chapter on the functions the notebook defined, with fresh random inputs.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .registry import CHAPTERS
from .verdict import CheckResult

__all__ = ["NotebookReport", "check_notebook", "chapter_of"]

MARKER = "<<course-verdicts>>"


@dataclass(frozen=True)
class NotebookReport:
    """What happened when one notebook was executed and checked."""

    path: str
    chapter: str
    status: str  # "graded", "timed out", "crashed", "invalid notebook"
    results: tuple[CheckResult, ...] = ()
    notes: tuple[str, ...] = field(default=())  # cells that raised, timeouts, ...

    @property
    def score(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def max_score(self) -> int:
        return len(CHAPTERS.get(self.chapter, ()))

    def summary(self) -> str:
        lines = [f"{self.path} (chapter {self.chapter}): {self.status}"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [str(r) for r in self.results]
        lines.append(f"Score: {self.score}/{self.max_score}")
        return "\n".join(lines)


def chapter_of(nb: nbformat.NotebookNode, path: Path) -> str:
    """The chapter a notebook belongs to: its ``course.chapter`` metadata, else its file name."""
    chapter = nb.metadata.get("course", {}).get("chapter") or path.stem
    if chapter not in CHAPTERS:
        raise ValueError(f"{path}: unknown chapter {chapter!r}; expected one of {', '.join(CHAPTERS)}")
    return chapter


def _verdict_cell(chapter: str, seed: int | None) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(
        "import json as _course_json\n"
        "from course.exercises import run_checks as _course_run_checks\n"
        f"print({MARKER!r} + _course_json.dumps([r.to_dict() for r in "
        f"_course_run_checks({chapter!r}, globals(), seed={seed!r})]))"
    )


def _cell_errors(nb: nbformat.NotebookNode) -> list[str]:
    notes = []
    for i, cell in enumerate(nb.cells[:-1]):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error" and out.get("ename") != "NotImplementedError":
                notes.append(f"cell {i} raised {out['ename']}: {out.get('evalue', '')}".strip())
    return notes


def check_notebook(path: str | Path, *, cell_timeout: float = 300, seed: int | None = None,
                   kernel_name: str = "python3") -> NotebookReport:
    """Run ``path`` headless and check its exercises; never raises for a bad student notebook."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    path = Path(path)
    try:
        nb = nbformat.read(path, as_version=4)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupted JSON, wrong format, ...
        return NotebookReport(str(path), path.stem, "invalid notebook",
                              notes=(f"could not read the notebook: {type(exc).__name__}: {exc}",))
    chapter = chapter_of(nb, path)
    nb.cells.append(_verdict_cell(chapter, seed))
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name=kernel_name, allow_errors=True,
                            interrupt_on_timeout=True,
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    try:
        # The kernel process's own stderr carries only Jupyter's transport chatter; everything
        # the notebook prints arrives through the cell outputs.
        client.execute(stderr=subprocess.DEVNULL)
    except CellTimeoutError as exc:
        return NotebookReport(str(path), chapter, "timed out", notes=(str(exc).splitlines()[0],))
    except DeadKernelError as exc:
        return NotebookReport(str(path), chapter, "crashed", notes=(f"the kernel died: {exc}",))
    notes = _cell_errors(nb)
    for out in nb.cells[-1].get("outputs", []):
        text = out.get("text", "") if out.get("output_type") == "stream" else ""
        for line in text.splitlines():
            if line.startswith(MARKER):
                results = tuple(CheckResult(**d) for d in json.loads(line[len(MARKER):]))
                return NotebookReport(str(path), chapter, "graded", results, tuple(notes))
    if any(o.get("ename") == "KeyboardInterrupt" for o in nb.cells[-1].get("outputs", [])):
        return NotebookReport(str(path), chapter, "timed out",
                              tuple(notes + [f"the checks ran past {cell_timeout:g} s (an endless loop?)"]))
    return NotebookReport(str(path), chapter, "crashed",
                          tuple(notes + ["the checks produced no verdicts"]))
