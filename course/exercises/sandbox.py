"""The student side of the notebook runner: ``python -m course.exercises.sandbox NOTEBOOK CHAPTER READ_FD WRITE_FD``.

:mod:`course.exercises.runner` starts this module in a fresh process of its own session, in a
scratch copy of the submission, with resource limits already in place. It executes the
notebook's code cells top to bottom in an in-process IPython shell (so magics work; no kernel
and no sockets), reporting each cell that raised or ran too long over the pipe ``WRITE_FD``.
Then it answers the grader's requests on ``READ_FD`` (:mod:`course.exercises.remote`): call one
of the functions the notebook defined on the inputs sent, give the gradient of a returned tensor,
and stop. The checks and their verdicts never run here.

Per-cell and per-request wall-clock limits are SIGALRM timers; a submission that swallows the
alarm is still stopped by the grader's own deadlines. What the notebook prints is counted and
discarded.
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import sys
import traceback

__all__ = ["main"]


class Timeout(BaseException):  # noqa: N818 - BaseException: `except Exception` in student code must not swallow it
    """Raised by the alarm when a cell or a request runs past its limit."""


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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit (sys.exit({'' if exc.code is None else repr(exc.code)}) was called)"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class Channel:
    """The pipe to the grader: plain data out (``remote.encode``), the grader's pickles in."""

    def __init__(self, read_fd: int, write_fd: int):
        from . import remote

        self.remote = remote
        self.read_fd, self.write_fd = read_fd, write_fd

    def send(self, **message) -> None:
        self.remote.send(self.write_fd, self.remote.encode(message))

    def receive(self) -> dict:
        return pickle.loads(self.remote.receive(self.read_fd, limit=1 << 62))

    def callback(self, handle: int, args: tuple, kwargs: dict):
        """Evaluate a planted object that lives on the grader's side (see ``CallbackStub``)."""
        w = self.remote.to_wire
        self.send(kind="callback", handle=handle, args=w(tuple(args)), kwargs=w(dict(kwargs)))
        answer = self.receive()
        if answer.get("kind") == "value":
            return answer["value"]
        import builtins

        kind = getattr(builtins, str(answer.get("type")), None)
        kind = kind if isinstance(kind, type) and issubclass(kind, Exception) else RuntimeError
        raise kind(answer.get("message", ""))


def _run_cells(cells, shell, channel: Channel, cell_timeout: float) -> None:
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
            channel.send(kind="cell", index=index, status="timed out",
                         detail=f"{cell} ran past {cell_timeout:g} s and was interrupted (an endless loop?)")
        elif error is not None and not isinstance(error, NotImplementedError):
            channel.send(kind="cell", index=index, status="error", detail=f"{cell} raised {_describe(error)}")


def _error_reply(exc: BaseException) -> dict:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    message = f"{exc}" if not isinstance(exc, SystemExit) else _describe(exc).split(" ", 1)[1]
    return {"kind": "error", "type": type(exc).__name__, "message": message[:2000],
            "line": (frame.line or "")[:300] if frame is not None else ""}


def _serve(namespace: dict, channel: Channel, names: tuple[str, ...]) -> None:
    remote = channel.remote
    calls: dict[int, tuple] = {}  # call id -> (args, kwargs, output): what a gradient request refers to
    while True:
        try:
            request = channel.receive()
        except EOFError:
            return
        op = request.get("op")
        if op == "stop":
            return
        if op == "names":
            info = {}
            for name in names:
                fn = namespace.get(name)
                if callable(fn):
                    info[name] = {"module": str(getattr(fn, "__module__", "") or ""),
                                  "qualname": str(getattr(fn, "__qualname__", "") or "")}
            channel.send(kind="names", names=info)
            continue
        signal.setitimer(signal.ITIMER_REAL, float(request.get("alarm", 0)))
        try:
            if op == "call":
                args, kwargs = request["args"], request["kwargs"]
                fn = namespace.get(request["name"])
                output = fn(*args, **kwargs)
                signal.setitimer(signal.ITIMER_REAL, 0)
                calls[request["call"]] = (args, kwargs, output)
                for old in [c for c in calls if c <= request["call"] - 16]:
                    del calls[old]
                reply = {"kind": "result", "value": remote.to_wire(output)}
            elif op == "vjp":
                import torch

                args, kwargs, output = calls[request["call"]]
                out = remote.locate(output, request["path"])
                inputs = [remote.resolve(args, kwargs, where) for where in request["inputs"]]
                grads = torch.autograd.grad(out, inputs, grad_outputs=request["grad_output"].to(out.dtype),
                                            allow_unused=True, retain_graph=True)
                signal.setitimer(signal.ITIMER_REAL, 0)
                reply = {"kind": "result", "value": remote.to_wire(list(grads))}
            else:
                reply = {"kind": "error", "type": "RuntimeError", "message": f"unknown request {op!r}"}
        except Timeout:
            reply = {"kind": "timeout"}
        except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt from student code
            reply = _error_reply(exc)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            channel.send(**reply)
        except Exception:  # noqa: BLE001 - e.g. a returned value torch.save cannot write
            channel.send(kind="result", value=("foreign", "unsendable_value"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("chapter")
    parser.add_argument("read_fd", type=int)
    parser.add_argument("write_fd", type=int)
    parser.add_argument("--cell-timeout", type=float, default=120)
    args = parser.parse_args(argv)
    channel = Channel(args.read_fd, args.write_fd)
    sink = CountingSink()
    try:
        import nbformat
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config

        from . import remote
        from .registry import CHAPTERS

        nb = nbformat.read(args.notebook, as_version=4)
        cells = [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        names = tuple(n for ex in CHAPTERS[args.chapter] for n in ex.names)
        config = Config()
        config.HistoryManager.enabled = False
        shell = InteractiveShell.instance(config=config)
        remote.CallbackStub.channel = channel
        channel.send(kind="start", cells=len(cells))
        signal.signal(signal.SIGALRM, _alarm)
        sys.stdout = sys.stderr = sink
        _run_cells(cells, shell, channel, args.cell_timeout)
        channel.send(kind="ready", output_chars=sink.written)
        _serve(shell.user_ns, channel, names)
        channel.send(kind="done", output_chars=sink.written)
    except BaseException:  # noqa: BLE001 - a failure of the student side itself, reported rather than raised
        try:
            channel.send(kind="internal error", detail=traceback.format_exc(limit=3)[-2000:])
        except BaseException:  # noqa: BLE001 - the pipe itself is gone
            pass
    # Skip interpreter shutdown: atexit hooks or threads left by the submission must not hang the exit.
    os._exit(0)


if __name__ == "__main__":
    main()
