"""The message layer of grading's trust boundary (:mod:`course.exercises.remote`): framing, the two
encodings, the wire form of values and the callbacks.

- Framing: an 8-byte big-endian length and a payload; :func:`receive` refuses payloads above
  ``MAX_MESSAGE`` bytes and gives up at a deadline.
- trusted -> student: ``cloudpickle`` (:func:`_dumps`), with planted objects whose class sets
  ``_course_callback = True`` replaced by a :class:`CallbackStub` that calls back.
- student -> trusted: ``torch.save`` / ``torch.load(weights_only=True)`` of plain data
  (:func:`encode`, :func:`decode`); :func:`to_wire` turns anything else into a :class:`Foreign`
  naming its type, :func:`from_wire` reads it back and notes where each tensor came from.
"""

from __future__ import annotations

import io
import os
import pickle
import select
import struct
import time
import warnings
from collections.abc import Callable

import cloudpickle
import torch
from torch import Tensor, nn

__all__ = ["MAX_MESSAGE", "UNREADABLE", "Foreign", "foreign", "StudentException", "CheckTimedOut", "SessionLost", "send", "receive",
           "to_wire", "from_wire", "encode", "decode", "tensor_locators", "locate", "resolve", "CallbackStub"]

MAX_MESSAGE = 512 << 20  # bytes; a student's outputs larger than this are refused
_HEADER = struct.Struct(">Q")
# what reading a broken pipe or a forged or truncated message can raise (besides EOFError and TimeoutError)
UNREADABLE = (OSError, ValueError, RuntimeError, pickle.UnpicklingError, struct.error)


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
