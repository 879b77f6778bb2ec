"""Run an exercise notebook in a sandbox and collect the verdict of every exercise.

``course check`` (students) and ``course grade`` (instructors) both come here, so a student
sees exactly the verdicts the grader records. Each notebook runs in a child process
(:mod:`course.exercises.sandbox`) that

- is started in a session of its own and killed, with everything it started in that session,
  when the whole notebook runs past ``Limits.notebook_timeout``;
- has its own scratch working directory (a copy of the notebook and nothing else), with HOME,
  TMPDIR and the Jupyter/Matplotlib config folders pointing inside it, which is deleted after;
- runs under resource limits where the platform has them (POSIX ``setrlimit``: address space
  ``memory_mb``, largest file written ``max_file_mb``, no core dumps);
- interrupts any single cell after ``cell_timeout`` and any single check after ``check_timeout``;
- discards what the notebook prints, noting in the report when it printed more than ``max_output``
  characters;
- runs the checks with fresh random inputs (``seed=None``), so values copied from a notebook's
  printed output do not pass.

What this does not protect against is documented in the README (instructor section): the child
runs with the grader's user rights, so a submission written to attack the grader (absolute
paths, patching the checks in memory) needs an OS-level sandbox around ``course grade``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .registry import CHAPTERS
from .verdict import CheckResult

__all__ = ["Limits", "NotebookReport", "check_notebook", "chapter_of", "STATUSES"]

STATUSES = ("graded", "timed out", "crashed", "invalid notebook", "missing")
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the ``course`` package


@dataclass(frozen=True)
class Limits:
    """Wall-clock, memory and output limits for running one notebook."""

    notebook_timeout: float = 600.0  # seconds for the whole notebook and its checks
    cell_timeout: float = 120.0  # seconds per code cell
    check_timeout: float = 60.0  # seconds per exercise check
    memory_mb: int | None = 8192  # address-space cap of the child process (None: no cap)
    max_file_mb: int = 256  # largest file the child may write
    max_output: int = 1_000_000  # printed characters above which the report notes a flood of output
    fast: bool = True  # run the notebook with COURSE_FAST=1 (points come only from the checks)

    def __post_init__(self):
        for name in ("notebook_timeout", "cell_timeout", "check_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"expected {name} > 0 seconds; got {getattr(self, name)}")
        if self.memory_mb is not None and self.memory_mb < 3072:
            raise ValueError("expected memory_mb >= 3072 (importing PyTorch alone maps about 3 GB of "
                             f"address space) or None; got {self.memory_mb}")


@dataclass(frozen=True)
class NotebookReport:
    """What happened when one notebook was executed and checked."""

    path: str
    chapter: str
    status: str  # one of STATUSES
    results: tuple[CheckResult, ...] = ()
    notes: tuple[str, ...] = field(default=())  # cells that raised, timeouts, output, crashes

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


def _read_notebook(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def _environment(work: Path, limits: Limits) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT") if k in os.environ}
    env.update(HOME=str(work), TMPDIR=str(work), IPYTHONDIR=str(work / ".ipython"),
               MPLCONFIGDIR=str(work / ".matplotlib"), MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=str(SOURCE_ROOT), COURSE_OFFLINE="1")
    if limits.fast:
        env["COURSE_FAST"] = "1"
    return env


def _limit_resources(limits: Limits) -> None:  # runs in the child between fork and exec
    import resource

    caps = [(resource.RLIMIT_FSIZE, limits.max_file_mb << 20), (resource.RLIMIT_CORE, 0)]
    if limits.memory_mb is not None:
        caps.append((resource.RLIMIT_AS, limits.memory_mb << 20))
    for what, value in caps:
        try:
            resource.setrlimit(what, (value, value))
        except (ValueError, OSError):  # not supported here (e.g. RLIMIT_AS on macOS)
            pass


def _kill(proc: subprocess.Popen) -> None:
    """Kill the child and everything it started in its session."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _events(path: Path) -> list[dict]:
    events = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short when the process was killed
                break
    return events


def _why_it_ended(returncode: int, limits: Limits, stderr: str) -> str:
    if returncode < 0:
        sig = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        if sig == "SIGKILL" and limits.memory_mb is not None:
            return f"the notebook's process was killed (SIGKILL; more memory than the {limits.memory_mb} MB cap?)"
        if sig == "SIGXFSZ":
            return f"the notebook's process was stopped for writing a file larger than {limits.max_file_mb} MB"
        return f"the notebook's process was killed by {sig}"
    tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
    what = f"exited with status {returncode}" + (f" ({tail[0][:300]})" if tail else "")
    return f"the notebook's process {what} before grading finished (os._exit or a crash?)"


def _report(path: Path, chapter: str, events: list[dict], returncode: int | None, limits: Limits,
            stderr: str) -> NotebookReport:
    results = [CheckResult(**{k: e[k] for k in ("exercise", "title", "status", "message")})
               for e in events if e.get("event") == "check"]
    notes = [e["detail"] for e in events if e.get("event") == "cell"]
    done = next((e for e in events if e.get("event") == "done"), None)
    internal = [e["detail"] for e in events if e.get("event") == "internal error"]
    if returncode is None:
        status = "timed out"
        why = f"not checked: the notebook ran past its {limits.notebook_timeout:g} s limit and was stopped"
        notes.append(f"the notebook ran past its {limits.notebook_timeout:g} s limit and was stopped")
    elif done is None or internal:
        status = "crashed"
        reason = (f"grading failed inside the sandbox: {internal[0].strip().splitlines()[-1]}" if internal
                  else _why_it_ended(returncode, limits, stderr))
        why = f"not checked: {reason}"
        notes.append(reason)
    else:
        timed = any(e.get("status") == "timed out" for e in events if e.get("event") in ("cell", "check"))
        status, why = ("timed out" if timed else "graded"), ""
    if done is not None and done.get("output_chars", 0) > limits.max_output:
        notes.append(f"the notebook printed {done['output_chars']:,} characters, more than the "
                     f"{limits.max_output:,} expected (printed output is not kept)")
    seen = {r.exercise for r in results}
    results += [CheckResult(ex.id, ex.title, status if status != "graded" else "error", why)
                for ex in CHAPTERS[chapter] if ex.id not in seen]
    return NotebookReport(str(path), chapter, status, tuple(results), tuple(notes))


def check_notebook(path: str | Path, *, seed: int | None = None, limits: Limits | None = None,
                   chapter: str | None = None) -> NotebookReport:
    """Run ``path`` in the sandbox and check its exercises (those of ``chapter``, by default the
    chapter the notebook names). Never raises for a bad submission: every outcome is a report.
    Raises ``FileNotFoundError`` when there is no file at ``path``."""
    limits = limits or Limits()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no notebook at {path}")
    try:
        nb = _read_notebook(path)
        chapter = chapter or chapter_of(nb, path)
    except Exception as exc:  # noqa: BLE001 - corrupted JSON, not a notebook, unknown chapter
        why = f"could not read the notebook: {type(exc).__name__}: {exc}"[:500]
        return NotebookReport(str(path), chapter or path.stem, "invalid notebook", tuple(
            CheckResult(ex.id, ex.title, "error", "not checked: the notebook could not be read")
            for ex in CHAPTERS.get(chapter, ())), notes=(why,))
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}; expected one of {', '.join(CHAPTERS)}")
    # The working folder and the event log live in separate temporary folders, so that nothing
    # the notebook reaches through relative paths ("..") is the grader's.
    scratch, log = Path(tempfile.mkdtemp(prefix="course-sandbox-")), Path(tempfile.mkdtemp(prefix="course-log-"))
    try:
        work = scratch / "work"
        work.mkdir()
        copy = work / "submission.ipynb"
        shutil.copyfile(path, copy)
        cmd = [sys.executable, "-m", "course.exercises.sandbox", str(copy), chapter, str(log / "events.jsonl"),
               "--cell-timeout", str(limits.cell_timeout), "--check-timeout", str(limits.check_timeout)]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        posix = os.name == "posix"
        with open(log / "stderr.txt", "wb") as stderr:
            proc = subprocess.Popen(cmd, cwd=work, env=_environment(work, limits), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=posix,
                                    preexec_fn=(lambda: _limit_resources(limits)) if posix else None)
            try:
                returncode = proc.wait(timeout=limits.notebook_timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill(proc)
        err = (log / "stderr.txt").read_bytes()[-4000:].decode("utf-8", errors="replace")
        return _report(path, chapter, _events(log / "events.jsonl"), returncode, limits, err)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(log, ignore_errors=True)
