"""The child side of the notebook runner: ``python -m course.exercises.sandbox NOTEBOOK CHAPTER EVENTS``.

:mod:`course.exercises.runner` starts this module in a fresh process of its own session, in a
scratch copy of the submission, with resource limits already in place. It executes the
notebook's code cells top to bottom in an in-process IPython shell (so magics work; no kernel
and no sockets), then runs every exercise check of ``CHAPTER`` on the functions the notebook
defined. Every step is appended to ``EVENTS`` as one JSON line, written and flushed at once, so
that whatever happened before the process was killed (time limit, memory, ``os._exit``) can
still be reported.

Per-cell and per-check wall-clock limits are SIGALRM timers; a submission that swallows the
alarm is still stopped by the runner's limit on the whole notebook. What the notebook prints is
counted and discarded (the verdicts travel through ``EVENTS``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback

__all__ = ["main"]


class Timeout(BaseException):  # noqa: N818 - BaseException: `except Exception` in student code must not swallow it
    """Raised by the alarm when a cell or a check runs past its limit."""


def _alarm(signum, frame):
    raise Timeout


class CountingSink:
    """A text stream that counts the characters written to it and discards them."""

    def __init__(self):
        self.written = 0

    def write(self, text) -> int:
        n = len(str(text))
        self.written += n
        return n

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"

    def fileno(self) -> int:  # some libraries ask; the real descriptors lead to /dev/null
        return 1


class Events:
    """Append-only JSON-lines event log."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run

    def __call__(self, **event) -> None:
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit (sys.exit({'' if exc.code is None else repr(exc.code)}) was called)"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _run_cells(cells, shell, events, cell_timeout: float) -> None:
    for index, source in cells:  # index: position among all cells of the notebook
        signal.setitimer(signal.ITIMER_REAL, cell_timeout)
        try:
            result = shell.run_cell(source, store_history=False, silent=False)
        except Timeout:  # raised outside the cell's own code (rare: inside IPython's machinery)
            result = None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        error = None if result is None else (result.error_before_exec or result.error_in_exec)
        first = next((line.strip() for line in source.splitlines() if line.strip()), "")
        cell = f"cell {index + 1} (`{first[:60]}`)"
        if result is None or isinstance(error, Timeout):
            events(event="cell", index=index, status="timed out",
                   detail=f"{cell} ran past {cell_timeout:g} s and was interrupted (an endless loop?)")
        elif error is not None and not isinstance(error, NotImplementedError):
            events(event="cell", index=index, status="error", detail=f"{cell} raised {_describe(error)}")


def _run_checks(chapter: str, namespace: dict, events, check_timeout: float, seed: int | None) -> None:
    from .registry import CHAPTERS, run_checks

    for ex in CHAPTERS[chapter]:
        signal.setitimer(signal.ITIMER_REAL, check_timeout)
        try:
            result = run_checks(chapter, namespace, seed=seed, only=ex.id)[0].to_dict()
        except Timeout:
            result = {"exercise": ex.id, "title": ex.title, "status": "timed out",
                      "message": f"the check did not finish within {check_timeout:g} s (an endless loop?)"}
        except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt from student code
            result = {"exercise": ex.id, "title": ex.title, "status": "error",
                      "message": f"{', '.join(ex.names)} raised {_describe(exc)} during the check"}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        events(event="check", **result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("chapter")
    parser.add_argument("events")
    parser.add_argument("--cell-timeout", type=float, default=120)
    parser.add_argument("--check-timeout", type=float, default=60)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    events = Events(args.events)
    sink = CountingSink()
    try:
        import nbformat
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config

        nb = nbformat.read(args.notebook, as_version=4)
        cells = [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        config = Config()
        config.HistoryManager.enabled = False
        shell = InteractiveShell.instance(config=config)
        import course.exercises.registry  # noqa: F401 - imported before any student code runs

        events(event="start", cells=len(cells))
        signal.signal(signal.SIGALRM, _alarm)
        sys.stdout = sys.stderr = sink
        _run_cells(cells, shell, events, args.cell_timeout)
        _run_checks(args.chapter, shell.user_ns, events, args.check_timeout, args.seed)
    except BaseException:  # noqa: BLE001 - the grader's own failure, reported rather than raised
        events(event="internal error", detail=traceback.format_exc(limit=3)[-2000:])
    events(event="done", output_chars=sink.written)
    # Skip interpreter shutdown: atexit hooks or threads left by the submission must not hang the exit.
    os._exit(0)


if __name__ == "__main__":
    main()
