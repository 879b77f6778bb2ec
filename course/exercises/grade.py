"""``course grade``: grade a folder of submitted exercise notebooks.

Layout of the submissions folder (both may be mixed)::

    submissions/alice/01_forward_sdes.ipynb        one sub-folder per student, or
    submissions/bob_01_forward_sdes.ipynb          <student><separator><chapter>.ipynb

A notebook belongs to the chapter whose name (``01_forward_sdes``, ...) its file name contains,
else to the chapter in its ``course.chapter`` metadata. The chapters graded are those given,
else every chapter some student submitted; a student without a notebook for one of them gets
"missing" and zero for its exercises.

Every notebook runs in the sandbox of :mod:`course.exercises.runner` with fresh random check
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

from .registry import CHAPTERS, Exercise
from .runner import Limits, NotebookReport, check_notebook, read_notebook
from .verdict import CheckResult

__all__ = ["Submission", "StudentGrade", "PartialGradebook", "discover", "grade_submissions", "gradebook_csv",
           "feedback_markdown", "summary_table", "write_results"]

_SEPARATORS = "_-. "


@dataclass(frozen=True)
class Submission:
    """One notebook of one student (``path`` is None when the chapter is missing)."""

    student: str
    chapter: str
    path: Path | None
    ignored: tuple[Path, ...] = ()  # further notebooks for the same chapter, not graded


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


def _chapter_in_name(stem: str) -> str | None:
    low = stem.lower()
    found = [ch for ch in CHAPTERS if ch in low]
    return max(found, key=len) if found else None


def _chapter_in_metadata(path: Path) -> str | None:
    try:
        chapter = read_notebook(path).metadata.get("course", {}).get("chapter")
    except Exception:  # noqa: BLE001 - unreadable: the runner reports it as an invalid notebook
        return None
    return chapter if chapter in CHAPTERS else None


def _student_from_name(stem: str, chapter: str | None) -> str:
    """"bob_01_forward_sdes (1)" -> "bob": the text before the chapter name (else after it)."""
    if chapter and chapter in stem.lower():
        at = stem.lower().index(chapter)
        before, after = stem[:at], stem[at + len(chapter):]
        return before.strip(_SEPARATORS) or after.strip(_SEPARATORS) or stem
    return stem


def shown(path: Path | str) -> str:
    """A path as text that can always be printed and written: bytes of a name that are not UTF-8
    (allowed on Linux) become U+FFFD."""
    return os.fsencode(str(path)).decode("utf-8", errors="replace")


def _odd(entry: Path) -> str | None:
    """Why ``entry`` is not a notebook to grade (None when it is a regular ``.ipynb`` file)."""
    if entry.is_symlink():
        return "a symbolic link; not followed, not graded"
    if entry.is_dir():
        return "a folder named like a notebook; not graded" if entry.suffix.lower() == ".ipynb" else None
    if not entry.is_file():
        return "not a regular file (a FIFO, socket or device); not graded"
    if entry.suffix.lower() == ".zip":
        return "a zip archive; unpack it into the submissions folder to grade what it holds"
    if entry.suffix.lower() != ".ipynb":
        return "not a notebook (.ipynb); not graded"
    return None


def _notebooks_in(folder: Path, notes: list[str]) -> list[Path]:
    """The ``.ipynb`` files under a student's folder, without following links; odd entries noted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        here = Path(root)
        keep = []
        for d in sorted(dirs):
            if d.startswith(".") or d == "__pycache__":
                continue
            why = _odd(here / d)
            if why:
                notes.append(f"{shown(here / d)}: {why}")
            else:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            if name.startswith("."):
                continue
            why = _odd(here / name)
            if why is None:
                found.append(here / name)
            elif not why.startswith("not a notebook"):  # a student's other files are theirs to keep
                notes.append(f"{shown(here / name)}: {why}")
    return found


def _chapter_of_file(path: Path, notes: list[str]) -> str | None:
    named, tagged = _chapter_in_name(path.stem), _chapter_in_metadata(path)
    if named and tagged and named != tagged:
        notes.append(f"{shown(path)}: named for chapter {named} but its metadata says {tagged}; graded as {named}")
    return named or tagged


def _inside(folder: Path, path: str | Path) -> Path:
    """The absolute path of ``path``: a relative one is read inside ``folder``, unless only the
    current folder has it; it must lie inside ``folder``."""
    path = Path(path)
    if not path.is_absolute() and (os.path.lexists(folder / path) or not os.path.lexists(path)):
        path = folder / path
    path = Path(os.path.abspath(path))
    if not path.is_relative_to(os.path.abspath(folder)):
        raise ValueError(f"--choose {path}: not inside the submissions folder {folder}")
    return path


def discover(folder: str | Path, chapters: Iterable[str] | None = None, choose: Iterable[str | Path] = ()
             ) -> tuple[list[Submission], list[str]]:
    """The submissions in ``folder`` (one per student and chapter, missing ones included, sorted
    by student then chapter) and notes about every entry that was not graded or was graded with a
    caveat. Links are not followed; odd entries (FIFOs, zip files, folders named like notebooks,
    notebooks of no chapter) are noted, never fatal. A student's folder whose notebooks are named
    for several students (``alice_01_....ipynb``, ``bob_01_....ipynb``) is a section folder: each
    name is graded as its own student. Several notebooks for one chapter: the newest is graded,
    unless ``choose`` names one of them (a path inside ``folder``, relative to it or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no submissions folder at {folder}")
    chosen = {_inside(folder, c) for c in choose}
    found: dict[tuple[str, str], list[Path]] = {}
    students: set[str] = set()
    notes: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        why = _odd(entry)
        if why:
            notes.append(f"{shown(entry)}: {why}")
            continue
        if entry.is_dir():
            files = [(p, _chapter_of_file(p, notes)) for p in _notebooks_in(entry, notes)]
            prefixes = {_student_from_name(p.stem, ch) for p, ch in files if ch and ch in p.stem.lower()}
            prefixes.discard("")
            section = len(prefixes) > 1 and all(ch and p.stem.lower() != ch for p, ch in files)
            if not section:
                students.add(shown(entry.name))  # a folder with no notebook: every chapter "missing"
            if section:
                notes.append(f"{shown(entry)}: holds notebooks of {len(prefixes)} students "
                             f"({', '.join(sorted(shown(x) for x in prefixes))}); each graded as their own")
            for p, chapter in files:
                if chapter is None:
                    notes.append(f"{shown(p)}: no chapter in its name or metadata; not graded")
                    continue
                student = shown(_student_from_name(p.stem, chapter) if section else entry.name)
                students.add(student)
                found.setdefault((student, chapter), []).append(p)
        else:
            chapter = _chapter_of_file(entry, notes)
            if chapter is None:
                notes.append(f"{shown(entry)}: no chapter in its name or metadata; not graded")
                continue
            student = shown(_student_from_name(entry.stem, chapter))
            students.add(student)
            found.setdefault((student, chapter), []).append(entry)
    if chapters is None:
        wanted = sorted({ch for _, ch in found}, key=list(CHAPTERS).index)
    else:
        wanted = list(chapters)
        unknown = [ch for ch in wanted if ch not in CHAPTERS]
        if unknown:
            raise ValueError(f"unknown chapter(s) {', '.join(unknown)}; expected some of {', '.join(CHAPTERS)}")
    unknown = chosen - {Path(os.path.abspath(p)) for (_, ch), paths in found.items() if ch in wanted for p in paths}
    if unknown:
        raise ValueError(f"--choose {', '.join(sorted(shown(p) for p in unknown))}: not a "
                         f"notebook that was found for a chapter being graded; expected a path under {folder} "
                         "such as one named in a note about several notebooks for one chapter")
    subs = []
    for student in sorted(students):
        for chapter in wanted:
            paths = found.get((student, chapter), [])
            # several notebooks for one chapter: the chosen one, else the newest (then the one named
            # exactly after the chapter)
            picked = [p for p in paths if Path(os.path.abspath(p)) in chosen]
            if len(picked) > 1:
                raise ValueError(f"--choose names {len(picked)} notebooks for {student}, {chapter}; expected one")
            paths = sorted(paths, key=lambda p: (p not in picked, -p.stat().st_mtime_ns,
                                                 p.stem.lower() != chapter, str(p)))
            if len(paths) > 1:
                which = "the chosen one" if picked else "the newest"
                notes.append(f"{student}, {chapter}: {len(paths)} notebooks; graded {which}, {shown(paths[0])}; "
                             f"not graded: {', '.join(shown(p) for p in paths[1:])}")
            subs.append(Submission(student, chapter, paths[0] if paths else None, tuple(paths[1:])))
    return subs, notes


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
