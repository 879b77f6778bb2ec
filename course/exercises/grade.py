"""``course grade``: grade a folder of submitted exercise notebooks.

Which notebook is whose, and for which chapter, is :mod:`course.exercises.discover`'s job (it
also writes the notes about every file that was not graded). Every notebook runs in the sandbox of :mod:`course.exercises.runner` with fresh random check
inputs. Outputs: ``gradebook.csv`` (a row per student: points per exercise, total, out of, and a
status) and ``feedback/<student>.md`` (every verdict in the words ``course check`` prints).
Points come from ``Exercise.points`` in :mod:`course.exercises.registry`, the one place they live.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .discover import Submission, discover, shown
from .registry import CHAPTERS, Exercise
from .runner import Limits, NotebookReport, check_notebook
from .verdict import CheckResult

__all__ = ["Submission", "StudentGrade", "PartialGradebook", "discover", "grade_submissions", "gradebook_csv",
           "feedback_markdown", "summary_table", "write_results"]

@dataclass(frozen=True)
class StudentGrade:
    student: str
    reports: tuple[NotebookReport, ...]  # one per graded chapter, in chapter order
    ignored: tuple[str, ...] = ()  # notes about files that were not graded

    def points(self) -> dict[str, float]:
        """Points earned per exercise id."""
        earned = {r.exercise: r.passed for rep in self.reports for r in rep.results}
        return {ex.id: ex.points * earned.get(ex.id, False) for ex in _exercises(self.reports)}

    @property
    def total(self) -> float:
        return sum(self.points().values())

    @property
    def status(self) -> str:
        """"graded" when every notebook was graded; else "<chapter>: <status>" for each one that
        was not (just the status when one chapter is graded)."""
        bad = [rep for rep in self.reports if rep.status != "graded"]
        if not bad:
            return "graded"
        if len(self.reports) == 1:
            return bad[0].status
        return "; ".join(f"{rep.chapter}: {rep.status}" for rep in bad)


def _exercises(reports: Iterable[NotebookReport]) -> list[Exercise]:
    return [ex for rep in reports for ex in CHAPTERS[rep.chapter]]


def _grade_one(sub: Submission, limits: Limits, seed: int | None) -> NotebookReport:
    if sub.path is None:
        why = f"no notebook for chapter {sub.chapter} was submitted"
        return NotebookReport("-", sub.chapter, "missing",
                              tuple(CheckResult(ex.id, ex.title, "missing", why) for ex in CHAPTERS[sub.chapter]),
                              (why,))
    return check_notebook(sub.path, seed=seed, limits=limits, chapter=sub.chapter)


def grade_submissions(subs: list[Submission], *, limits: Limits | None = None, seed: int | None = None,
                      jobs: int = 1, progress: Callable[[Submission, NotebookReport], None] | None = None
                      ) -> list[StudentGrade]:
    """Run every submission (``jobs`` at a time, each in its own sandboxed process)."""
    limits = limits or Limits()
    if jobs < 1:
        raise ValueError(f"expected jobs >= 1; got {jobs}")
    reports: dict[Submission, NotebookReport] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_grade_one, sub, limits, seed): sub for sub in subs}
        for future in futures:  # in submission order; each waits for its own child process
            sub = futures[future]
            reports[sub] = future.result()
            if progress is not None:
                progress(sub, reports[sub])
    grades = []
    for student in dict.fromkeys(s.student for s in subs):
        mine = [s for s in subs if s.student == student]
        ignored = tuple(f"{shown(p)}: another notebook for chapter {s.chapter}; {shown(s.path.name)} was graded"
                        for s in mine for p in s.ignored if s.path is not None)
        grades.append(StudentGrade(student, tuple(reports[s] for s in mine), ignored))
    return grades


def _fmt(points: float) -> str:
    return f"{points:g}"


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: str) -> str:
    """A CSV cell a spreadsheet shows as text: a leading =, +, -, @, tab or CR would start a
    formula (CSV injection), so such a cell is prefixed with an apostrophe."""
    value = str(value)
    return "'" + value if value.startswith(_FORMULA_START) else value


def gradebook_csv(grades: list[StudentGrade]) -> str:
    """One row per student: points per exercise, total, out of, status."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    exercises = _exercises(grades[0].reports) if grades else []
    writer.writerow(["student", *(f"ex {ex.id}" for ex in exercises), "total", "out of", "status"])
    out_of = sum(ex.points for ex in exercises)
    for g in grades:
        pts = g.points()
        writer.writerow([_cell(g.student), *(_fmt(pts[ex.id]) for ex in exercises), _fmt(g.total), _fmt(out_of),
                         _cell(g.status)])
    return out.getvalue()


def feedback_markdown(grade: StudentGrade) -> str:
    """The feedback file of one student: every verdict, and what happened to each notebook."""
    exercises = _exercises(grade.reports)
    lines = [f"# Feedback for {grade.student}", "",
             f"Total: {_fmt(grade.total)} / {_fmt(sum(ex.points for ex in exercises))} points "
             f"(status: {grade.status})", ""]
    pts = grade.points()
    for rep in grade.reports:
        chapter_pts = sum(pts[ex.id] for ex in CHAPTERS[rep.chapter])
        chapter_max = sum(ex.points for ex in CHAPTERS[rep.chapter])
        lines += [f"## {rep.chapter}: {_fmt(chapter_pts)} / {_fmt(chapter_max)}", "",
                  f"Notebook: `{Path(rep.path).name if rep.path != '-' else 'none'}` — {rep.status}", ""]
        if rep.notes:
            lines += ["What happened while it ran:", ""] + [f"- {n}" for n in rep.notes] + [""]
        by_id = {r.exercise: r for r in rep.results}
        for ex in CHAPTERS[rep.chapter]:
            lines.append(f"- {by_id[ex.id]} ({_fmt(pts[ex.id])} / {_fmt(ex.points)})")
        lines.append("")
    if grade.ignored:
        lines += ["## Not graded", ""] + [f"- {n}" for n in grade.ignored] + [""]
    return "\n".join(lines)


def summary_table(grades: list[StudentGrade]) -> str:
    """A plain-text table for the terminal: student, points per chapter, total, status."""
    if not grades:
        return "no submissions found"
    chapters = [rep.chapter for rep in grades[0].reports]
    head = ["student", *chapters, "total", "status"]
    rows = []
    for g in grades:
        pts = g.points()
        per = [f"{_fmt(sum(pts[ex.id] for ex in CHAPTERS[ch]))}/{_fmt(sum(ex.points for ex in CHAPTERS[ch]))}"
               for ch in chapters]
        rows.append([g.student, *per, _fmt(g.total), g.status])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]+")


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a reader
    (or a grader killed midway) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


PARTIAL = "gradebook.partial.csv"


class PartialGradebook:
    """``<out>/gradebook.partial.csv``: one line per notebook as soon as it is graded (student,
    chapter, points, out of, status), so that a grader killed midway leaves the grades it had.
    :func:`write_results` removes it once the full gradebook is written."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / PARTIAL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows = [["student", "chapter", "points", "out of", "status"]]
        self._write()

    def add(self, sub: Submission, report: NotebookReport) -> None:
        pts = {r.exercise for r in report.results if r.passed}
        earned = sum(ex.points for ex in CHAPTERS[report.chapter] if ex.id in pts)
        self._rows.append([_cell(sub.student), sub.chapter, _fmt(earned),
                           _fmt(sum(ex.points for ex in CHAPTERS[report.chapter])), _cell(report.status)])
        self._write()

    def _write(self) -> None:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(self._rows)
        _atomic_write(self.path, out.getvalue())


def write_results(grades: list[StudentGrade], out: str | Path, notes: Iterable[str] = (),
                  report: Iterable[str] = ()) -> Path:
    """Write ``gradebook.csv`` and ``feedback/<student>.md`` under ``out`` (each file written
    whole, then renamed into place), ``grading.txt`` with the lines of ``report`` (how the run
    was made: the isolation, the limits) when given, remove the partial gradebook; return the
    gradebook path."""
    out = Path(out)
    (out / "feedback").mkdir(parents=True, exist_ok=True)
    book = out / "gradebook.csv"
    used: set[str] = set()
    index, renamed = [["student", "feedback"]], []
    for g in grades:
        name = base = _UNSAFE.sub("_", g.student).strip("._") or "student"
        k = 1
        while name in used:  # two names that differ only in unsafe characters
            k += 1
            name = f"{base}-{k}"
        used.add(name)
        _atomic_write(out / "feedback" / f"{name}.md", feedback_markdown(g))
        index.append([_cell(g.student), f"feedback/{name}.md"])
        if name != g.student:
            renamed.append(f"  {g.student!r} -> feedback/{name}.md")
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows(index)
    _atomic_write(out / "feedback" / "index.csv", table.getvalue())
    notes, report = list(notes), list(report)
    if renamed:
        report += ["feedback files named differently from their student (the full list: feedback/index.csv):",
                   *renamed]
    if notes:
        _atomic_write(out / "unattributed.txt", "\n".join(notes) + "\n")
    if report:
        _atomic_write(out / "grading.txt", "\n".join(report) + "\n")
    _atomic_write(book, gradebook_csv(grades))  # last: its presence means every file above is complete
    (out / PARTIAL).unlink(missing_ok=True)
    return book
