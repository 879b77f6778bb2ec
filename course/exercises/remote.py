"""The trust boundary of grading: checks in the grader, the student's code in a process of its own.

``course grade`` and ``course check NOTEBOOK`` run a submission's cells in a child process (the
*student side*, :mod:`course.exercises.sandbox`) and its checks in the grader (the *trusted
side*). A check receives :class:`RemoteFunction` proxies instead of the student's functions;
calling one sends the inputs over a pipe, the student side calls the real function and sends
back what it returned. Whatever the notebook patches in its own process (``torch.allclose``,
the course's references, the verdict code) can therefore only change its own outputs; the
comparison, the reference values and the verdicts are computed where the student's code never runs.

The two directions are read differently:

- trusted -> student: the inputs, pickled with ``cloudpickle`` (planted score functions and
  small models travel by value and are rebuilt in the student process; the student side may
  read anything the grader sends);
- student -> trusted: plain data only, written with ``torch.save`` and read with
  ``torch.load(weights_only=True)``: tensors, numbers, strings, tuples, lists and dicts. Any
  other returned object arrives as a :class:`Foreign` that names its type; an exception arrives
  as a :class:`StudentException` with its type, message and line.

A planted object whose class sets ``_course_callback = True`` (e.g. a function that counts its
evaluations) is not copied: the student process gets a stub that calls back into the trusted
side, so the object's state stays where the check reads it.

Gradients: a returned tensor remembers which call produced it. :func:`gradients` asks the
student side for d(output)/d(inputs) (a vector-Jacobian product) of inputs the check sent: tensor
arguments and the parameters of module arguments, matched by identity.

Messages are framed as an 8-byte length and a payload; the trusted side refuses payloads above
``MAX_MESSAGE`` bytes and waits for no answer longer than the check's deadline allows.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from .wire import (  # noqa: F401 - the message layer, re-exported: callers use remote.send, remote.decode, ...
    MAX_MESSAGE,
    UNREADABLE,
    CallbackStub,
    CheckTimedOut,
    Foreign,
    SessionLost,
    StudentException,
    _dumps,
    decode,
    encode,
    foreign,
    from_wire,
    locate,
    receive,
    resolve,
    send,
    tensor_locators,
    to_wire,
)

__all__ = ["MAX_MESSAGE", "Foreign", "foreign", "StudentException", "CheckTimedOut", "SessionLost", "RemoteFunction",
           "Session", "gradients", "send", "receive", "to_wire", "from_wire", "encode", "decode", "tensor_locators",
           "CallbackStub"]

_GRACE = 5.0  # seconds the trusted side waits beyond a deadline for the student side's own interrupt


# ---- the trusted side -------------------------------------------------------------------------------------
class Session:
    """The trusted side's end of one student process: call its functions, ask for gradients.

    ``read_fd``/``write_fd`` are the pipe ends; ``deadline`` (``time.monotonic()``) bounds every
    wait and is set per check by the runner; past it the student side is told to interrupt
    itself, and ``_GRACE`` seconds later the session is declared lost."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd, self.write_fd = read_fd, write_fd
        self.deadline: float | None = None
        self._calls = 0
        self._outputs: dict[int, tuple[int, tuple]] = {}  # id(tensor) -> (call, path)
        self._alive: list[tuple[int, list[Tensor], dict[int, tuple]]] = []  # recent calls: keep ids valid
        self.lost: str | None = None
        self.lost_by_timeout = False

    def _request(self, message: dict, callbacks: dict[int, object] | None = None):
        if self.lost is not None:
            raise SessionLost(self.lost)
        if self.deadline is not None:
            message["alarm"] = max(0.05, self.deadline - time.monotonic())
        try:
            send(self.write_fd, _dumps(message, callbacks if callbacks is not None else {}))
            while True:
                wait = None if self.deadline is None else self.deadline + _GRACE
                reply = decode(receive(self.read_fd, deadline=wait))
                if not isinstance(reply, dict):
                    raise ValueError("a reply that is not a message")
                if reply.get("kind") == "callback":
                    self._serve_callback(reply, callbacks or {})
                    continue
                return reply
        except TimeoutError:
            self.lost_by_timeout = True
            self.lost = "the student's function ran past the check's limit and did not stop when interrupted"
        except EOFError:
            self.lost = "the notebook's process ended while it was being checked"
        except UNREADABLE as exc:  # a broken pipe, a forged message
            self.lost = f"the notebook's process sent something the grader could not read ({type(exc).__name__})"
        raise SessionLost(self.lost)

    def _serve_callback(self, reply: dict, callbacks: dict[int, object]) -> None:
        target = callbacks.get(reply.get("handle"))
        try:
            if target is None:
                raise RuntimeError("no such planted function")
            args = from_wire(reply.get("args"))
            kwargs = from_wire(reply.get("kwargs"))
            if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
                raise TypeError("unreadable arguments")
            answer = {"kind": "value", "value": target(*args, **kwargs)}
        except Exception as exc:  # noqa: BLE001 - the planted function rejects the student's inputs
            answer = {"kind": "error", "type": type(exc).__name__, "message": str(exc)}
        send(self.write_fd, _dumps(answer, {}))

    def names(self) -> dict:
        return self._request({"op": "names"})

    def call(self, name: str, args: tuple, kwargs: dict):
        self._calls += 1
        call_id = self._calls
        locators = tensor_locators(args, kwargs)
        reply = self._request({"op": "call", "call": call_id, "name": name, "args": args, "kwargs": kwargs}, {})
        kind = reply.get("kind")
        if kind == "timeout":
            raise CheckTimedOut
        if kind == "error":
            raise StudentException(str(reply.get("type", "Exception"))[:100], str(reply.get("message", ""))[:2000],
                                   str(reply.get("line", ""))[:300])
        if kind != "result":
            self.lost = "the notebook's process answered out of turn"
            raise SessionLost(self.lost)
        kept: list[Tensor] = []

        def register(t: Tensor, path: tuple) -> None:
            self._outputs[id(t)] = (call_id, path)
            kept.append(t)

        value = from_wire(reply.get("value"), on_tensor=register)
        self._alive.append((call_id, kept, locators))
        for _, old, _ in self._alive[:-16]:  # forget all but the last 16 calls
            for t in old:
                self._outputs.pop(id(t), None)
        del self._alive[:-16]
        return value

    def vjp(self, output: Tensor, inputs, grad_output: Tensor | None) -> tuple[Tensor | None, ...]:
        if id(output) not in self._outputs:
            raise ValueError("gradients of a tensor that is not a student function's output")
        call_id, path = self._outputs[id(output)]
        locators = next(loc for c, _, loc in self._alive if c == call_id)
        where = []
        for t in inputs:
            if id(t) not in locators:
                raise ValueError("gradients with respect to a tensor that was not among the call's inputs")
            where.append(locators[id(t)])
        go = torch.ones_like(output) if grad_output is None else grad_output.detach()
        reply = self._request({"op": "vjp", "call": call_id, "path": path, "inputs": where, "grad_output": go})
        if reply.get("kind") == "timeout":
            raise CheckTimedOut
        if reply.get("kind") == "error":
            raise StudentException(str(reply.get("type", "Exception"))[:100], str(reply.get("message", ""))[:2000])
        grads = from_wire(reply.get("value"))
        if not isinstance(grads, list) or len(grads) != len(where):
            return tuple(None for _ in where)
        return tuple(g if isinstance(g, Tensor) else None for g in grads)

    def is_output(self, t) -> bool:
        return isinstance(t, Tensor) and id(t) in self._outputs


class RemoteFunction:
    """A student's function, called through the session (what a check receives when grading)."""

    def __init__(self, session: Session, name: str, module: str = "", qualname: str = ""):
        self._session, self._name = session, name
        self.__name__, self.__qualname__, self.__module__ = name, qualname or name, module

    def __call__(self, *args, **kwargs):
        return self._session.call(self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<the student's {self._name}>"


_SESSIONS: list[Session] = []  # sessions whose outputs gradients() may meet (one per grading thread)


def register_session(session: Session) -> None:
    _SESSIONS.append(session)


def unregister_session(session: Session) -> None:
    if session in _SESSIONS:
        _SESSIONS.remove(session)


def gradients(output: Tensor, inputs, grad_output: Tensor | None = None) -> tuple[Tensor | None, ...]:
    """d(output)/d(inputs) contracted with ``grad_output`` (default ones: the gradient of the sum),
    None for an input the output does not depend on. Works on the student's outputs both when the
    check runs beside the student's code (``check(...)`` in a notebook) and across the trust
    boundary (grading), where the student side computes it on its copy of the inputs."""
    inputs = list(inputs)
    for session in list(_SESSIONS):
        if session.is_output(output):
            return session.vjp(output, inputs, grad_output)
    if grad_output is None:
        grad_output = torch.ones_like(output)
    return torch.autograd.grad(output, inputs, grad_outputs=grad_output, allow_unused=True)
