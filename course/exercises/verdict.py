"""Verdicts for exercise checks: compare a student's output with the reference and say, in one
line, what is wrong, where (which t, which shape) and by how much.

A check calls the student's function on fresh random inputs, compares with the reference via
:func:`compare`, and turns the first problem into a failed :class:`CheckResult`. Known
mistakes (a flipped sign, variance for std, a missing sqrt(dt)) are recognised by name.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .remote import gradients

__all__ = ["CheckResult", "Mismatch", "compare", "call_student", "run_check", "describe_where", "gradients",
           "check_gradient_path",
           "tolerances_for", "student_dtype", "matches"]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one exercise check."""

    exercise: str  # "1.2"
    title: str
    status: str  # "passed", "failed", "not attempted", "error"
    message: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __str__(self) -> str:
        mark = "\u2713" if self.passed else "\u2717"
        return f"{mark} Exercise {self.exercise} ({self.title}): {self.message}"

    __repr__ = __str__

    def _repr_pretty_(self, p, cycle):  # IPython display
        p.text(str(self))

    def to_dict(self) -> dict:
        return asdict(self)


class Mismatch(Exception):
    """Raised inside a check with the one-line, student-facing explanation."""


class _StudentError(Exception):
    def __init__(self, name: str, exc: BaseException, where: str):
        self.name, self.exc, self.where = name, exc, where


def describe_where(t=None, shape=None) -> str:
    """"at t=0.50 for input shape (16, 2)" (either part optional)."""
    parts = []
    if t is not None:
        parts.append(f"at t={t:.2f}" if isinstance(t, float) else f"at {t}")
    if shape is not None:
        parts.append(f"for input shape {tuple(shape)}")
    return " ".join(parts)


def call_student(fn: Callable, name: str, *args, where: str = "", **kwargs):
    """Call the student's ``fn``; an exception becomes a verdict instead of a traceback flood."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any student error becomes a verdict
        raise _StudentError(name, exc, where) from None


def _close(a: Tensor, b: Tensor, rtol: float, atol: float) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol))


# How many units of the student's floating-point precision a correct answer may be off by: a few
# dozen roundings of an O(1) computation, the error a float32 implementation of any exercise makes.
_ROUNDINGS = 64


def student_dtype(name: str, got: Tensor, where: str = "") -> torch.dtype:
    """The floating-point type the student computed in; half precision is refused with a message,
    because no tolerance both accepts its rounding and rejects a planted mistake."""
    if got.dtype in (torch.float64, torch.float32):
        return got.dtype
    if got.is_floating_point() or got.is_complex():
        raise Mismatch(f"{name} returned {str(got.dtype).replace('torch.', '')} values {where}; compute in "
                       f"float32 or float64 (the inputs are float64)")
    return torch.float64  # integer outputs are compared exactly after conversion


def tolerances_for(dtype: torch.dtype, expected: Tensor, rtol: float, atol: float) -> tuple[float, float]:
    """``(rtol, atol)`` widened to the precision of ``dtype`` when it is coarser than ``expected``'s:
    a correct float32 answer passes for every seed, whatever float64 tolerance the check asked for.
    The absolute part scales with the size of the values (at least 1: intermediate terms of an O(1)
    computation can cancel to a small result)."""
    eps, ref_eps = torch.finfo(dtype).eps, torch.finfo(expected.dtype).eps
    if eps <= ref_eps:
        return rtol, atol
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    return max(rtol, _ROUNDINGS * eps), max(atol, _ROUNDINGS * eps * scale)


def matches(got, expected: Tensor, *, rtol: float, atol: float, dtype: torch.dtype | None = None) -> bool:
    """Whether ``got`` (a tensor in float32 or float64, e.g. a gradient) equals ``expected`` to the
    tolerances, widened by :func:`tolerances_for` to the precision the student computed in: ``dtype``
    where given (a gradient with respect to a float64 input of a float32 computation is float64 but
    only float32-accurate: pass the dtype of the student's output), else ``got``'s; anything else is
    no match."""
    if not isinstance(got, Tensor) or got.dtype not in (torch.float32, torch.float64):
        return False
    worst = dtype if dtype in (torch.float32, torch.float64) else torch.float64
    rtol, atol = tolerances_for(min(got.dtype, worst, key=lambda d: torch.finfo(d).bits), expected, rtol, atol)
    return _close(got.detach().to(expected.dtype), expected, rtol, atol)


def compare(
    name: str,
    got,
    expected: Tensor,
    *,
    where: str,
    mistakes: Mapping[str, Tensor] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-6,
) -> None:
    """Raise :class:`Mismatch` with a specific message unless ``got`` matches ``expected``.

    ``mistakes`` maps a hint ("the drift has the wrong sign") to what that mistake would return;
    when ``got`` matches one, the hint is the verdict.
    """
    shape = tuple(expected.shape)
    if not isinstance(got, Tensor):
        raise Mismatch(f"{name} returned {type(got).__name__} {where}; expected a torch.Tensor "
                       f"of shape {shape}")
    if tuple(got.shape) != shape:
        raise Mismatch(f"{name} returned shape {tuple(got.shape)} {where}; expected {shape}")
    rtol, atol = tolerances_for(student_dtype(name, got, where), expected, rtol, atol)
    got = got.detach().to(expected.dtype)
    if not torch.isfinite(got).all():
        raise Mismatch(f"{name} returned NaN or inf values {where}")
    if _close(got, expected, rtol, atol):
        return
    err = (got - expected).abs()
    scalar = expected.numel() == 1
    size = (f"returned {got.item():.6g}, expected {expected.item():.6g}" if scalar else
            f"max |error| {err.max().item():.3g} (expected values up to {expected.abs().max().item():.3g})")
    for hint, wrong in (mistakes or {}).items():
        if _close(got, wrong.to(expected.dtype), rtol, atol):
            raise Mismatch(f"{name} {where}: {hint}; {size}")
    if _close(got, -expected, rtol, atol):
        raise Mismatch(f"{name} {where} has the wrong sign; {size}")
    if _close(got, expected**2, rtol, atol) and not _close(expected, expected**2, rtol, atol):
        raise Mismatch(f"{name} {where} looks squared (a variance where a standard deviation "
                       f"was meant?); {size}")
    mask = expected.abs() > 1e-8
    if mask.any() and not scalar:  # any two numbers differ by a factor: only a tensor's shared factor says something
        ratio = got[mask] / expected[mask]
        if abs(ratio.mean().item() - 1) > 1e-3 and torch.allclose(ratio, ratio.mean().expand_as(ratio),
                                                                  rtol=1e-3, atol=1e-6):
            raise Mismatch(f"{name} {where} is off by a constant factor {ratio.mean().item():.4g}; {size}")
    raise Mismatch(f"{name} {where}: {size}")


def check_gradient_path(name: str, got, expected: Tensor, params, *, where: str, rtol: float = 1e-4,
                        atol: float = 1e-8) -> None:
    """Raise :class:`Mismatch` unless the student's loss ``got`` (whose value already matched
    ``expected``) has a gradient path to ``params`` and its gradient equals ``expected``'s: a loss
    rebuilt from ``.item()``, computed under ``torch.no_grad()`` or from a detached output trains
    nothing, whatever its value."""
    params = list(params)
    if not isinstance(got, Tensor) or not got.requires_grad:
        raise Mismatch(f"{name} {where} has the right value but no gradient path to the model's parameters (was "
                       "it computed under torch.no_grad(), rebuilt from .item(), or detached?): it would train "
                       "nothing")
    found = gradients(got, params)  # the returned tensor itself: across the grading boundary it names the call
    wanted = torch.autograd.grad(expected, params, allow_unused=True)
    for i, (g, r) in enumerate(zip(found, wanted, strict=True)):
        if r is None:
            continue
        if g is None or not matches(g, r.detach(), rtol=rtol, atol=atol, dtype=got.dtype):
            raise Mismatch(f"{name} {where}: the value is right but its gradient with respect to the model's "
                           f"parameter {i} is not (part of the model's output detached?)")


def _exception_facts(exc: BaseException) -> tuple[str, str]:
    """The type name and the failing line of a student's exception, raised here or reported from
    the student's process (:class:`~course.exercises.remote.StudentException`)."""
    from .remote import StudentException

    if isinstance(exc, StudentException):
        return exc.type_name, exc.line
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    return type(exc).__name__, (frame.line or "") if frame is not None else ""


def run_check(exercise: str, title: str, body: Callable[[], str]) -> CheckResult:
    """Run ``body`` (which returns the pass message or raises) and turn it into a verdict."""
    try:
        message = body()
    except Mismatch as m:
        return CheckResult(exercise, title, "failed", str(m))
    except _StudentError as e:
        kind, line = _exception_facts(e.exc)
        if kind == "NotImplementedError":
            return CheckResult(exercise, title, "not attempted",
                               f"{e.name} still raises NotImplementedError: replace the "
                               f"`raise NotImplementedError(...)` line with your code")
        line = f" (line: `{line}`)" if line else ""
        hint = ""
        if kind == "RuntimeError" and "must match the size of tensor" in str(e.exc):
            hint = ("; a per-sample quantity of shape (B,) must be reshaped with "
                    "expand_like(value, x) before it multiplies x")
        return CheckResult(exercise, title, "error",
                           f"{e.name} raised {kind}: {e.exc} {e.where}{line}{hint}")
    return CheckResult(exercise, title, "passed", message)
