"""An operating-system sandbox around each student process, from tools that exist: bubblewrap or
util-linux's ``unshare``.

``--isolation`` of ``course grade`` and ``course check`` chooses one:

- ``bwrap`` (bubblewrap, Debian/Ubuntu/Fedora package ``bubblewrap``): the whole file system
  read-only (the course install and the Python environment included), ``/tmp``, the grader's home
  and the folders the grader names (the submissions, ``--out``) replaced by empty in-memory
  folders, the student's scratch folder the only writable place; its own PID namespace (it
  cannot see or signal the grader or classmates, and every process it starts dies with it), no
  network, its own IPC and host name, the grader's environment already scrubbed by the runner.
- ``unshare`` (util-linux, unprivileged user namespaces): its own PID, network, IPC and host-name
  namespaces, but the file system stays as the grader sees it (no read-only install, no hidden
  folders); a fallback where bubblewrap is missing.
- ``none``: a process of the grader's user like any other (macOS, Windows, containers that
  forbid namespaces); the grader says loudly that it is not isolated.
- ``auto`` (the default): the first of bwrap, unshare, none that works here (each is tried once
  with a trivial command).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ISOLATIONS", "resolve", "wrap", "describe", "works"]

ISOLATIONS = ("auto", "bwrap", "unshare", "none")

_BWRAP_BASE = ["--die-with-parent", "--unshare-all", "--dev", "/dev", "--proc", "/proc"]
_UNSHARE_BASE = ["--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--ipc",
                 "--uts"]


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
    probe = [exe, "--ro-bind", "/", "/", *_BWRAP_BASE, "true"] if kind == "bwrap" else [exe, *_UNSHARE_BASE, "true"]
    try:
        return subprocess.run(probe, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=20).returncode == 0
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
        "unshare": "unshare: own PID namespace, no network; the file system is NOT protected (install bubblewrap)",
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


def wrap(kind: str, cmd: list[str], *, scratch: Path, hide: Iterable[Path] = ()) -> list[str]:
    """``cmd`` run under isolation ``kind`` with ``scratch`` its only writable folder and the folders
    ``hide`` (with ``/tmp`` and the grader's home) replaced by empty ones."""
    if kind == "none":
        return list(cmd)
    if kind == "unshare":
        return [shutil.which("unshare") or "unshare", *_UNSHARE_BASE, "--", *cmd]
    if kind != "bwrap":
        raise ValueError(f"unknown isolation {kind!r}; expected bwrap, unshare or none")
    args = [shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", *_BWRAP_BASE]
    masked = [Path("/tmp"), *(Path(p) for p in hide)]
    home = os.environ.get("HOME")
    if home and Path(home).resolve() != Path("/"):
        masked.append(Path(home))
    masked = sorted({p.resolve() for p in masked if p.exists()}, key=lambda p: len(p.parts))
    for path in masked:
        args += ["--tmpfs", str(path)]
    scratch = scratch.resolve()
    for path in _exposed():  # the interpreter and the course, where a masked folder covered them
        if any(path.is_relative_to(m) for m in masked) and not path.is_relative_to(scratch):
            args += ["--ro-bind", str(path), str(path)]
    for path in sorted({Path(h).resolve() for h in hide if Path(h).exists()}):  # hidden even inside those
        args += ["--tmpfs", str(path)]
    args += ["--bind", str(scratch), str(scratch), "--chdir", str(scratch / "work"), "--"]
    return args + list(cmd)
