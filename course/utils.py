"""Small utilities every module shares: seeding, devices, broadcasting, modes, validation.

Conventions (see README, "Conventions"): time ``t`` lies in [0, 1] with t = 0 data and
t = 1 noise; a batch of times has shape ``(B,)``; data has shape ``(B, ...)``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "seed_everything",
    "default_device",
    "expand_like",
    "fast_mode",
    "offline_mode",
    "pick",
    "as_time",
    "check_time_scalar",
    "check_positive_int",
    "check_positive",
    "check_batch",
    "display_path",
]

_TRUE = {"1", "true", "yes", "on"}


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (for notebooks); return a fresh ``torch.Generator``.

    Library code never relies on global state: pass the returned generator on as ``generator=``.
    """
    check_positive_int(seed, "seed", allow_zero=True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_device() -> torch.device:
    """The best available device: CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def display_path(path) -> str:
    """``path`` as messages and notebook outputs print it: the home folder written as ``~``, so a
    saved output does not carry the user's name or machine layout."""
    from pathlib import Path

    path = Path(path).expanduser()
    try:
        return str(Path("~") / path.absolute().relative_to(Path.home()))
    except (ValueError, RuntimeError):  # not under home, or no home
        return str(path)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def fast_mode() -> bool:
    """True when ``COURSE_FAST=1``: tests and CI shrink training steps and sample counts."""
    return _env_flag("COURSE_FAST")


def offline_mode() -> bool:
    """True when ``COURSE_OFFLINE=1``: never touch the network, use data shipped by packages."""
    return _env_flag("COURSE_OFFLINE")


def pick(full, fast):
    """Return ``fast`` in fast mode and ``full`` otherwise (sizes, step counts, sample counts)."""
    return fast if fast_mode() else full


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample quantity of shape ``(B,)`` to ``(B, 1, ..., 1)`` so it broadcasts
    against ``x`` of shape ``(B, ...)``; a 0-d tensor is returned unchanged.

    This is the one broadcasting helper of the course: the same code then runs on ``(B, 2)``
    points and ``(B, C, H, W)`` images.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"expand_like expects a tensor for t, got {type(t).__name__}")
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"expand_like expects t of shape ({x.shape[0]},) to match x of shape "
            f"{tuple(x.shape)}; got t of shape {tuple(t.shape)}"
        )
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def as_time(t, x: torch.Tensor, *, name: str = "t") -> torch.Tensor:
    """Validate ``t`` and return it as a ``(B,)`` tensor on ``x``'s device and dtype.

    Accepts a Python number, a 0-d tensor or a ``(B,)`` tensor. Raises ``ValueError`` when a
    value lies outside [0, 1] or the shape does not match the batch of ``x``.
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ValueError(f"expected x to be a tensor of shape (B, ...); got {_describe(x)}")
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected {name} of shape ({x.shape[0]},) or a scalar for x of shape "
            f"{tuple(x.shape)}; got shape {tuple(t.shape)}"
        )
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise ValueError(
            f"expected {name} in [0, 1] (t = 0 is data, t = 1 is noise); got values from "
            f"{t.min().item():.4g} to {t.max().item():.4g}"
        )
    return t


def check_time_scalar(t: float, name: str = "t") -> float:
    """Validate a single time in [0, 1] and return it as a float."""
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"expected {name} in [0, 1] (t = 0 is data, t = 1 is noise); got {t}")
    return t


def check_positive_int(n, name: str, *, allow_zero: bool = False) -> int:
    """Return ``n`` if it is a positive integer (or zero when allowed), else raise ``ValueError``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"expected {name} to be an integer; got {n!r} ({type(n).__name__})")
    low = 0 if allow_zero else 1
    if n < low:
        raise ValueError(f"expected {name} >= {low}; got {n}")
    return int(n)


def check_positive(value, name: str) -> float:
    """Return ``value`` as a float if it is finite and > 0, else raise ``ValueError``."""
    v = float(value)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"expected {name} > 0; got {value!r}")
    return v


def check_batch(x, *, ndim: int | None = None, trailing: Sequence[int] | None = None,
                name: str = "x") -> torch.Tensor:
    """Check that ``x`` is a floating tensor of shape ``(B, ...)`` (optionally a given rank or
    trailing shape) and return it; raise ``ValueError`` naming what was expected."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected {name} to be a torch.Tensor; got {_describe(x)}")
    if not x.is_floating_point():
        raise ValueError(f"expected {name} to be a floating-point tensor; got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"expected {name} of shape (B, ...); got a 0-d tensor")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"expected {name} with {ndim} dimensions; got shape {tuple(x.shape)}")
    if trailing is not None and tuple(x.shape[1:]) != tuple(trailing):
        raise ValueError(
            f"expected {name} of shape (B, {', '.join(map(str, trailing))}); got {tuple(x.shape)}"
        )
    return x


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"tensor of shape {tuple(obj.shape)}"
    return type(obj).__name__
