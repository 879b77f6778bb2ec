"""Run an exercise notebook in a sandbox and check every exercise from outside it.

``course check`` (students) and ``course grade`` (instructors) both come here, so a student
sees exactly the verdicts the grader records. Each notebook runs in a child process
(:mod:`course.exercises.sandbox`, the *student side*) that

- is started in a session of its own and killed, with everything it started in that session,
  when the whole notebook runs past ``Limits.notebook_timeout``;
- has its own scratch working directory (a copy of the notebook and nothing else), with HOME,
  TMPDIR and the Jupyter/Matplotlib config folders pointing inside it, which is deleted after;
- runs under resource limits (POSIX ``setrlimit``: address space ``memory_mb``, largest file
  written ``max_file_mb``, no core dumps);
- interrupts any single cell after ``cell_timeout``;
- discards what the notebook prints, noting in the report when it printed more than ``max_output``
  characters.

The checks run here, in the grader, with fresh random inputs (``seed=None``): they call the
student's functions through :class:`~course.exercises.remote.RemoteFunction` proxies, so nothing
the notebook patches in its own process reaches a verdict (:mod:`course.exercises.remote`). A
check that runs past ``check_timeout`` is interrupted in the student process.

Around the child, ``Limits.isolation`` puts an OS sandbox (:mod:`course.exercises.isolation`:
bubblewrap, ``unshare`` or none): with bubblewrap it sees a read-only file system without the
folders ``Limits.hide`` names, its own processes only, and no network.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from .isolation import ISOLATIONS, resolve, wrap
from .registry import CHAPTERS, run_checks
from .remote import (
    CheckTimedOut,
    RemoteFunction,
    Session,
    SessionLost,
    decode,
    receive,
    register_session,
    send,
    unregister_session,
)
from .verdict import CheckResult
from .wire import UNREADABLE

__all__ = ["Limits", "NotebookReport", "check_notebook", "chapter_of", "read_notebook", "student_process",
           "STATUSES"]

STATUSES = ("graded", "timed out", "crashed", "invalid notebook", "missing")
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the ``course`` package


@dataclass(frozen=True)
class Limits:
    """Wall-clock, memory and output limits, and the OS sandbox, for running one notebook."""

    notebook_timeout: float = 600.0  # seconds for the whole notebook and its checks
    cell_timeout: float = 120.0  # seconds per code cell
    check_timeout: float = 60.0  # seconds per exercise check
    memory_mb: int | None = 8192  # address-space cap of the child process (None: no cap)
    max_file_mb: int = 256  # largest file the child may write
    max_output: int = 1_000_000  # printed characters above which the report notes a flood of output
    fast: bool = True  # run the notebook with COURSE_FAST=1 (points come only from the checks)
    isolation: str = "auto"  # the OS sandbox (course.exercises.isolation): auto, bwrap, unshare or none
    hide: tuple[str, ...] = ()  # folders the student process must not see (the submissions, --out)

    def __post_init__(self):
        for name in ("notebook_timeout", "cell_timeout", "check_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"expected {name} > 0 seconds; got {getattr(self, name)}")
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"unknown isolation {self.isolation!r}; expected one of {', '.join(ISOLATIONS)}")
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


def read_notebook(path: Path) -> nbformat.NotebookNode:
    """The notebook at ``path``, validated; ``ValueError`` naming what is wrong with the file (empty,
    not UTF-8, not JSON, not a notebook). A UTF-8 byte-order mark is accepted."""
    data = Path(path).read_bytes()
    if not data.strip():
        raise ValueError("the file is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"the file is not UTF-8 text (byte {exc.start})") from None
    nb = nbformat.reads(text, as_version=4)
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
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _why_it_ended(returncode: int, limits: Limits, stderr: str) -> str:
    if 128 < returncode < 128 + 65 and resolve(limits.isolation) != "none":
        returncode = 128 - returncode  # the sandbox's init reports a signal as 128 + its number
    if returncode < 0:
        sig = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        if sig == "SIGKILL":  # the memory cap makes allocations fail (MemoryError); it sends no signal
            return ("the notebook's process was killed (SIGKILL) from outside the notebook: by the system's "
                    "out-of-memory killer or by another process, not by the grader's limits")
        if sig == "SIGXFSZ":
            return f"the notebook's process was stopped for writing a file larger than {limits.max_file_mb} MB"
        return f"the notebook's process was killed by {sig}"
    tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
    what = f"exited with status {returncode}" + (f" ({tail[0][:300]})" if tail else "")
    return f"the notebook's process {what} before grading finished (os._exit or a crash?)"


def _report(path: Path, chapter: str, events: list[dict], returncode: int | None, limits: Limits,
            stderr: str) -> NotebookReport:
    results = [e["result"] for e in events if e.get("kind") == "check"]
    notes = [e["detail"] for e in events if e.get("kind") == "cell"]
    done = next((e for e in events if e.get("kind") == "done"), None)
    internal = [e["detail"] for e in events if e.get("kind") == "internal error"]
    lost = [e["detail"] for e in events if e.get("kind") == "lost"]
    if returncode is None:
        status = "timed out"
        why = f"not checked: the notebook ran past its {limits.notebook_timeout:g} s limit and was stopped"
        notes.append(f"the notebook ran past its {limits.notebook_timeout:g} s limit and was stopped")
    elif done is None or internal:
        status = "timed out" if any(e.get("timed_out") for e in events if e.get("kind") == "lost") else "crashed"
        reason = (f"grading failed inside the sandbox: {internal[0].strip().splitlines()[-1]}" if internal
                  else lost[0] if lost and returncode == 0 else _why_it_ended(returncode, limits, stderr))
        why = f"not checked: {reason}"
        notes.append(reason)
    else:
        timed = any(e.get("status") == "timed out" for e in events if e.get("kind") == "cell") or any(
            r.status == "timed out" for r in results)
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
        nb = read_notebook(path)
        chapter = chapter or chapter_of(nb, path)
    except Exception as exc:  # noqa: BLE001 - corrupted JSON, not a notebook, unknown chapter
        why = f"could not read the notebook: {type(exc).__name__}: {exc}"[:500]
        return NotebookReport(str(path), chapter or path.stem, "invalid notebook", tuple(
            CheckResult(ex.id, ex.title, "error", "not checked: the notebook could not be read")
            for ex in CHAPTERS.get(chapter, ())), notes=(why,))
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}; expected one of {', '.join(CHAPTERS)}")
    if os.name != "posix":
        raise OSError("running a notebook for grading needs a POSIX system (Linux or macOS); on Windows use WSL "
                      "or a Linux container")
    with student_process(path, chapter, limits, notebook=nb) as (proc, session, log):
        sources = [c.source for c in nb.cells if c.cell_type == "code"]
        events, timed_out = _converse(session, chapter, seed, limits, sources)
        if not timed_out and not session.lost_by_timeout:
            try:  # a process that said goodbye, or died by itself, ends on its own: keep its exit status
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        stopped_by_grader = proc.poll() is None
        _kill(proc)
        returncode = None if timed_out else proc.returncode
        if stopped_by_grader and any(e.get("kind") == "lost" for e in events):
            returncode = 0  # the grader stopped it; the "lost" event says why
        err = (log / "stderr.txt").read_bytes()[-4000:].decode("utf-8", errors="replace")
    return _report(path, chapter, events, returncode, limits, err)


@contextmanager
def student_process(path: Path, chapter: str, limits: Limits, notebook: nbformat.NotebookNode | None = None):
    """Start the student side (:mod:`course.exercises.sandbox`) on a scratch copy of the notebook
    at ``path`` (written from ``notebook`` when given: the validated, UTF-8 text); yields ``(process, session, log folder)`` and, on leaving, kills the process with
    everything it started in its session and deletes the scratch and log folders."""
    # The working folder and the stderr log live in separate temporary folders, so that nothing
    # the notebook reaches through relative paths ("..") is the grader's.
    scratch, log = Path(tempfile.mkdtemp(prefix="course-sandbox-")), Path(tempfile.mkdtemp(prefix="course-log-"))
    to_child, from_child = os.pipe(), os.pipe()  # (read, write) pairs
    open_fds = {*to_child, *from_child}  # closed once each: another grading thread may reuse a number
    proc = None
    try:
        work = scratch / "work"
        work.mkdir()
        copy = work / "submission.ipynb"
        if notebook is None:
            shutil.copyfile(path, copy)
        else:
            copy.write_text(nbformat.writes(notebook), encoding="utf-8")
        child_read, child_write = to_child[0], from_child[1]
        cmd = wrap(resolve(limits.isolation),
                   [sys.executable, "-m", "course.exercises.sandbox", str(copy), chapter, str(child_read),
                    str(child_write), "--cell-timeout", str(limits.cell_timeout)],
                   scratch=scratch, hide=[Path(h) for h in limits.hide])
        with open(log / "stderr.txt", "wb") as stderr:
            proc = subprocess.Popen(cmd, cwd=work, env=_environment(work, limits), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                                    pass_fds=(child_read, child_write), preexec_fn=lambda: _limit_resources(limits))
        for fd in (child_read, child_write):
            os.close(fd)
            open_fds.discard(fd)
        yield proc, Session(from_child[0], to_child[1]), log
    finally:
        if proc is not None:
            _kill(proc)
        for fd in open_fds:
            os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(log, ignore_errors=True)


def _converse(session: Session, chapter: str, seed: int | None, limits: Limits,
              sources: list[str]) -> tuple[list[dict], bool]:
    """Follow the notebook's cells, then run every check of ``chapter`` here, calling the
    student's functions through ``session``. Returns the events (cells, check results, how it
    ended) and whether the whole notebook ran past its limit."""
    events: list[dict] = []
    end = time.monotonic() + limits.notebook_timeout
    try:
        while True:  # the cells
            message = decode(receive(session.read_fd, deadline=end))
            kind = message.get("kind") if isinstance(message, dict) else None
            if kind == "ready":
                events.append({"kind": "ready", "output_chars": int(message.get("output_chars", 0))})
                break
            if kind == "cell":
                events.append({"kind": "cell", "status": str(message.get("status", ""))[:20],
                               "detail": str(message.get("detail", ""))[:500]})
            elif kind == "internal error":
                events.append({"kind": "internal error", "detail": str(message.get("detail", ""))[-2000:]})
                return events, False
            elif kind != "start":
                events.append({"kind": "lost", "killed": True, "detail": "the notebook's process sent something "
                               "the grader could not read while its cells ran"})
                return events, False
    except TimeoutError:
        return events, True
    except EOFError:  # the process ended: its exit status says how
        return events, False
    except UNREADABLE:
        events.append({"kind": "lost", "killed": True,
                       "detail": "the notebook's process sent something the grader could not read"})
        return events, False
    register_session(session)
    try:
        session.deadline = min(time.monotonic() + limits.check_timeout, end)
        try:
            info = session.names().get("names", {})
        except SessionLost as lost:
            events.append({"kind": "lost", "killed": True, "detail": lost.reason})
            return events, False
        namespace = {name: RemoteFunction(session, name, str(facts.get("module", "")), str(facts.get("qualname", "")))
                     for name, facts in (info.items() if isinstance(info, dict) else ()) if isinstance(facts, dict)}
        for ex in CHAPTERS[chapter]:
            session.deadline = min(time.monotonic() + limits.check_timeout, end)
            try:
                result = run_checks(chapter, namespace, seed=seed, only=ex.id, sources=sources)[0]
            except CheckTimedOut:
                if time.monotonic() >= end:
                    return events, True
                result = CheckResult(ex.id, ex.title, "timed out",
                                     f"the check did not finish within {limits.check_timeout:g} s (an endless loop?)")
            except SessionLost as lost:
                if time.monotonic() >= end:
                    return events, True
                events.append({"kind": "lost", "killed": True, "detail": lost.reason,
                               "timed_out": session.lost_by_timeout})
                return events, False
            except Exception as exc:  # noqa: BLE001 - a check met something it did not expect
                result = CheckResult(ex.id, ex.title, "error", f"{', '.join(ex.names)} raised "
                                     f"{type(exc).__name__}: {exc} during the check"[:1000])
            events.append({"kind": "check", "result": result})
        session.deadline = time.monotonic() + 5
        try:
            send(session.write_fd, pickle.dumps({"op": "stop"}))
            message = decode(receive(session.read_fd, deadline=session.deadline))
            if isinstance(message, dict) and message.get("kind") == "done":
                events.append({"kind": "done", "output_chars": int(message.get("output_chars", 0))})
        except (TimeoutError, EOFError, *UNREADABLE):
            pass  # every check ran; a student side that does not say goodbye changes nothing
        if not any(e["kind"] == "done" for e in events):
            ready = next(e for e in events if e["kind"] == "ready")
            events.append({"kind": "done", "output_chars": ready["output_chars"]})
        return events, False
    finally:
        unregister_session(session)
