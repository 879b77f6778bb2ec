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

import io
import os
import select
import struct
import time
import warnings
from collections.abc import Callable

import cloudpickle
import torch
from torch import Tensor, nn

__all__ = ["MAX_MESSAGE", "Foreign", "foreign", "StudentException", "CheckTimedOut", "SessionLost", "RemoteFunction",
           "Session", "gradients", "send", "receive", "to_wire", "from_wire", "encode", "decode", "tensor_locators",
           "CallbackStub"]

MAX_MESSAGE = 512 << 20  # bytes; a student's outputs larger than this are refused
_HEADER = struct.Struct(">Q")
_GRACE = 5.0  # seconds the trusted side waits beyond a deadline for the student side's own interrupt


# ---- framing ---------------------------------------------------------------------------------------------
def send(fd: int, payload: bytes) -> None:
    data = _HEADER.pack(len(payload)) + payload
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exactly(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def receive(fd: int, *, deadline: float | None = None, limit: int = MAX_MESSAGE) -> bytes:
    """One framed payload; ``EOFError`` when the other side is gone, ``TimeoutError`` past
    ``deadline`` (``time.monotonic()``), ``ValueError`` above ``limit`` bytes."""
    (size,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size, deadline))
    if size > limit:
        raise ValueError(f"a message of {size:,} bytes, more than the {limit:,} allowed")
    return _read_exactly(fd, size, deadline)


def encode(obj) -> bytes:
    """Plain data (what the student side sends) as bytes that ``decode`` reads weights-only."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def decode(data: bytes):
    """What the student side sent; ``ValueError`` for anything that is not plain data."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the loader warns about protocols it is about to refuse
            return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a forged or truncated payload, whatever the loader says
        raise ValueError(f"not plain data ({type(exc).__name__})") from None


# ---- values on the wire ------------------------------------------------------------------------------------
class Foreign:
    """A returned object that is not plain data (a NumPy array, a generator, a custom class).
    :func:`foreign` makes an instance of a subclass named after the student's type, so that
    ``type(got).__name__`` in a check's message names what the student returned."""

    type_name = "object"


_FOREIGN: dict[str, type] = {}


def foreign(type_name: str) -> Foreign:
    name = "".join(ch for ch in type_name if ch.isalnum() or ch == "_")[:80] or "object"
    if name not in _FOREIGN:
        _FOREIGN[name] = type(name, (Foreign,), {"type_name": name, "__repr__": lambda self: f"<a {name}>"})
    return _FOREIGN[name]()


class StudentException(Exception):  # noqa: N818 - it is the student's exception, named as such
    """An exception raised by the student's code, as the student side described it."""

    def __init__(self, type_name: str, message: str, line: str = ""):
        super().__init__(message)
        self.type_name, self.message, self.line = type_name, message, line

    def __str__(self) -> str:
        return self.message


class CheckTimedOut(BaseException):  # noqa: N818 - BaseException: nothing in a check may swallow it
    """The student's function did not return before the check's deadline."""


class SessionLost(BaseException):  # noqa: N818
    """The student process ended or stopped answering; ``reason`` says how."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def to_wire(value, depth: int = 0):
    """The student side's return value as plain data (student side). Tensors become
    ``("tensor", data, requires_grad)``; containers keep their shape; anything else is named."""
    if depth > 8:
        return ("foreign", "nested_too_deep")
    if isinstance(value, Tensor):
        return ("tensor", value.detach().as_subclass(Tensor).cpu().clone().contiguous(), bool(value.requires_grad))
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("plain", value)
    if isinstance(value, (tuple, list)):
        return ("tuple" if isinstance(value, tuple) else "list", [to_wire(v, depth + 1) for v in value])
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return ("dict", {k: to_wire(v, depth + 1) for k, v in value.items()})
    return ("foreign", type(value).__name__)


def from_wire(wire, *, on_tensor: Callable[[Tensor, tuple], None] | None = None, path: tuple = ()):
    """Rebuild what :func:`to_wire` wrote (trusted side). A tensor that required grad on the student
    side becomes a leaf that requires grad; ``on_tensor(tensor, path)`` registers it."""
    if not isinstance(wire, (tuple, list)) or not wire or not isinstance(wire[0], str):
        return foreign("unreadable_value")
    kind = wire[0]
    if kind == "tensor" and len(wire) == 3 and isinstance(wire[1], Tensor):
        t = wire[1]
        if wire[2] and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
        if on_tensor is not None:
            on_tensor(t, path)
        return t
    if kind == "plain" and len(wire) == 2:
        return wire[1]
    if kind in ("tuple", "list") and len(wire) == 2 and isinstance(wire[1], list):
        items = [from_wire(w, on_tensor=on_tensor, path=(*path, i)) for i, w in enumerate(wire[1])]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict" and len(wire) == 2 and isinstance(wire[1], dict):
        return {k: from_wire(w, on_tensor=on_tensor, path=(*path, k)) for k, w in wire[1].items()}
    if kind == "foreign" and len(wire) == 2 and isinstance(wire[1], str):
        return foreign(wire[1])
    return foreign("unreadable_value")


def locate(value, path: tuple):
    for key in path:
        value = value[key]
    return value


def tensor_locators(args: tuple, kwargs: dict) -> dict[int, tuple]:
    """id(tensor) -> where it is among the call's inputs: a tensor argument (also inside tuples
    and lists) or a parameter of a module argument. The same walk on the student side's copy of
    the inputs finds the same tensors."""
    found: dict[int, tuple] = {}

    def walk(value, where: tuple, depth: int = 0) -> None:
        if isinstance(value, Tensor):
            found.setdefault(id(value), where)
        elif isinstance(value, nn.Module):
            for name, p in value.named_parameters():
                found.setdefault(id(p), (*where, "param", name))
        elif isinstance(value, (tuple, list)) and depth < 4:
            for i, v in enumerate(value):
                walk(v, (*where, i), depth + 1)

    for i, a in enumerate(args):
        walk(a, ("args", i))
    for k, v in kwargs.items():
        walk(v, ("kwargs", k))
    return found


def resolve(args: tuple, kwargs: dict, where: tuple):
    """The input at ``where`` (a locator of :func:`tensor_locators`), student side."""
    value = args if where[0] == "args" else kwargs
    rest = where[1:]
    while rest:
        if rest[0] == "param":
            return dict(value.named_parameters())[rest[1]]
        value, rest = value[rest[0]], rest[1:]
    return value


# ---- callbacks -------------------------------------------------------------------------------------------
class CallbackStub:
    """Stands in, in the student process, for a planted object that must stay on the trusted side."""

    channel = None  # set by the student side: an object with ``callback(handle, args, kwargs)``

    def __init__(self, handle: int):
        self.handle = handle

    def __call__(self, *args, **kwargs):
        if CallbackStub.channel is None:
            raise RuntimeError("this planted function only works while the grader is checking")
        return CallbackStub.channel.callback(self.handle, args, kwargs)


class _Pickler(cloudpickle.CloudPickler):
    def __init__(self, file, callbacks: dict[int, object]):
        super().__init__(file)
        self.callbacks = callbacks

    def reducer_override(self, obj):
        if getattr(type(obj), "_course_callback", False) is True:
            handle = len(self.callbacks)
            self.callbacks[handle] = obj
            return CallbackStub, (handle,)
        return super().reducer_override(obj)


def _dumps(obj, callbacks: dict[int, object]) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, callbacks).dump(obj)
    return buffer.getvalue()


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
        except (OSError, ValueError, RuntimeError, struct.error) as exc:  # a broken pipe, a forged message
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
