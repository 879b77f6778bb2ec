"""An operating-system sandbox around each student process, from tools that exist: bubblewrap or
util-linux's ``unshare``.

``--isolation`` of ``course grade`` and ``course check`` chooses one:

- ``bwrap`` (bubblewrap, Debian/Ubuntu/Fedora package ``bubblewrap``): the whole file system
  read-only (the course install and the Python environment included), ``/tmp``, the grader's home
  and the folders the grader names (the submissions, ``--out``) replaced by empty in-memory
  folders, the student's scratch folder the only writable place; its own PID namespace (it
  cannot see or signal the grader or classmates, and every process it starts dies with it), no
  network, its own IPC and host name, the grader's environment already scrubbed by the runner.
- ``unshare`` (util-linux, unprivileged user namespaces): the same confinement built by hand where
  bubblewrap is missing. ``unshare`` gives the PID, network, IPC, host-name and mount namespaces;
  :mod:`course.exercises.confine` then makes every mount read-only, masks ``/tmp``, the home and
  the hidden folders, binds back the interpreter, the course and the scratch folder, and drops its
  capabilities (a nested user namespace) before it executes the student command.
- ``none``: a process of the grader's user like any other (macOS, Windows, containers that
  forbid namespaces); the grader says loudly that it is not isolated.
- ``auto`` (the default): the first of bwrap, unshare, none that works here (each is tried once
  with a trivial command).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ISOLATIONS", "resolve", "wrap", "describe", "works"]

ISOLATIONS = ("auto", "bwrap", "unshare", "none")

_BWRAP_BASE = ["--die-with-parent", "--unshare-all", "--cap-drop", "ALL", "--dev", "/dev", "--proc", "/proc"]
_UNSHARE_BASE = ["--user", "--map-root-user", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--net",
                 "--ipc", "--uts"]


@functools.cache
def works(kind: str) -> bool:
    """Whether ``kind`` can start a process here (tried once per grader process)."""
    if kind == "none":
        return True
    if sys.platform != "linux":
        return False
    exe = shutil.which("bwrap" if kind == "bwrap" else "unshare")
    if exe is None:
        return False
    true = shutil.which("true") or "/bin/true"
    with tempfile.TemporaryDirectory(prefix="course-sandbox-probe-") as scratch:
        (Path(scratch) / "work").mkdir()
        try:
            return subprocess.run(wrap(kind, [true], scratch=Path(scratch)), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False


def resolve(requested: str) -> str:
    """The isolation to use for ``requested`` (one of ``ISOLATIONS``); ``ValueError`` for an unknown
    name, ``RuntimeError`` when an explicitly requested one cannot run here."""
    if requested not in ISOLATIONS:
        raise ValueError(f"unknown isolation {requested!r}; expected one of {', '.join(ISOLATIONS)}")
    if requested == "auto":
        return next(kind for kind in ("bwrap", "unshare", "none") if works(kind))
    if not works(requested):
        hint = {"bwrap": "install bubblewrap (apt install bubblewrap; dnf install bubblewrap)",
                "unshare": "util-linux's unshare needs unprivileged user namespaces (Linux)"}.get(requested, "")
        raise RuntimeError(f"isolation {requested!r} does not work on this machine: {hint}")
    return requested


def describe(kind: str) -> str:
    """One line for the terminal and the grading report."""
    return {
        "bwrap": "bwrap: read-only file system, only the scratch folder writable, submissions and output hidden, "
                 "own PID namespace, no network",
        "unshare": "unshare: read-only file system, only the scratch folder writable, submissions and output hidden, "
                   "own PID namespace, no network, no capabilities",
        "none": "none: NOT ISOLATED - student code runs with your rights and sees your files and processes; use "
                "bubblewrap or a container for untrusted submissions",
    }[kind]


def _exposed() -> list[Path]:
    """What the student process must read: the Python installation and environment, every folder on
    ``sys.path`` and the course's source tree."""
    source_root = Path(__file__).resolve().parents[2]  # the folder that holds the ``course`` package
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent, source_root}
    paths |= {Path(p) for p in sys.path if p and Path(p).is_dir()}
    return sorted(p.resolve() for p in paths if p.exists())


def _masked(hide: Iterable[Path]) -> list[Path]:
    """``/tmp``, the grader's home and ``hide``: the folders replaced by empty ones, outermost first."""
    masked = [Path("/tmp"), *(Path(p) for p in hide)]
    home = os.environ.get("HOME")
    if home and Path(home).resolve() != Path("/"):
        masked.append(Path(home))
    return sorted({p.resolve() for p in masked if p.exists()}, key=lambda p: len(p.parts))


def wrap(kind: str, cmd: list[str], *, scratch: Path, hide: Iterable[Path] = ()) -> list[str]:
    """``cmd`` run under isolation ``kind`` with ``scratch`` its only writable folder and the folders
    ``hide`` (with ``/tmp`` and the grader's home) replaced by empty ones."""
    if kind == "none":
        return list(cmd)
    if kind not in ("bwrap", "unshare"):
        raise ValueError(f"unknown isolation {kind!r}; expected bwrap, unshare or none")
    masked, scratch = _masked(hide), scratch.resolve()
    hidden = sorted({Path(h).resolve() for h in hide if Path(h).exists()})
    # bound back only strictly inside a mask: a grader started from /tmp or its home has that folder
    # on sys.path, and binding it back would undo the mask (classmates' scratch copies included)
    exposed = [p for p in _exposed() if any(p.is_relative_to(m) and p != m for m in masked)
               and not p.is_relative_to(scratch)]
    if kind == "unshare":
        spec = {"scratch": str(scratch), "masked": [str(p) for p in masked], "exposed": [str(p) for p in exposed],
                "hidden": [str(p) for p in hidden], "uid": os.getuid(), "gid": os.getgid()}
        return [shutil.which("unshare") or "unshare", *_UNSHARE_BASE, "--", sys.executable, "-I",
                str(Path(__file__).with_name("confine.py")), json.dumps(spec), "--", *cmd]
    args = [shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", *_BWRAP_BASE]
    for path in masked:
        args += ["--tmpfs", str(path)]
    for path in exposed:  # the interpreter and the course, where a masked folder covered them
        args += ["--ro-bind", str(path), str(path)]
    for path in hidden:  # hidden even inside those
        args += ["--tmpfs", str(path)]
    args += ["--bind", str(scratch), str(scratch), "--chdir", str(scratch / "work"), "--"]
    return args + list(cmd)
