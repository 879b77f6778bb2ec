"""Which notebooks of a submissions folder ``course grade`` grades, as whose, for which chapter.

Layout of the submissions folder (both may be mixed)::

    submissions/alice/01_forward_sdes.ipynb        one sub-folder per student, or
    submissions/bob_01_forward_sdes.ipynb          <student><separator><chapter>.ipynb

A notebook belongs to the chapter whose name (``01_forward_sdes``, ...) its file name contains,
else to the chapter in its ``course.chapter`` metadata. The chapters graded are those given,
else every chapter some student submitted; a student without a notebook for one of them gets
"missing" and zero for its exercises. Nothing here runs student code: files are listed, never
executed, and links are not followed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .registry import CHAPTERS
from .runner import read_notebook

__all__ = ["Submission", "discover", "shown"]

_SEPARATORS = "_-. "


@dataclass(frozen=True)
class Submission:
    """One notebook of one student (``path`` is None when the chapter is missing)."""

    student: str
    chapter: str
    path: Path | None
    ignored: tuple[Path, ...] = ()  # further notebooks for the same chapter, not graded


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
