"""The file-system half of the ``unshare`` sandbox: run as the first program inside
``unshare --user --map-root-user --mount ...`` (see :mod:`course.exercises.isolation`), it makes
every mount read-only, covers ``/tmp``, the grader's home and the hidden folders with empty
in-memory folders, binds back read-only what the student process must read and the scratch folder
writable, gives up its capabilities by entering a nested user namespace, and only then executes
the student command.

The nested user namespace is what makes the masks hold. The mapped root that set them up could
unmount them or remount ``/`` writable; a process in a child user namespace has no capabilities
over the mounts of its parent's mount namespace, and a mount namespace it creates for itself
copies them locked (they cannot be unmounted to reveal what lies beneath, nor made writable).
After ``execve`` the student runs as the grader's uid with no capabilities at all, as the child of
this launcher, which stays behind as the namespace's init.

Usage (standard library only; started with ``python -I``)::

    python -I confine.py SPEC_JSON -- COMMAND...

``SPEC_JSON`` holds ``scratch`` (writable, the working folder is its ``work`` sub-folder),
``masked`` (replaced by empty folders), ``exposed`` (bound back read-only where a mask covered
them), ``hidden`` (masked again inside those), ``uid`` and ``gid`` (the grader's, restored inside).
Any failure stops here with a message on stderr and exit status 126: nothing runs unconfined.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
CLONE_NEWUSER = 0x10000000
O_PATH = getattr(os, "O_PATH", 0o10000000)
# statvfs flags that a remount inside a user namespace must keep (the kernel locks them)
_KEPT = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
         (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


class ConfineError(RuntimeError):
    pass


def _enc(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)) != 0:
        err = ctypes.get_errno()
        raise ConfineError(f"mount {source or ''} on {target} (flags {flags:#x}) failed: {os.strerror(err)}")


def _kept_flags(path: str) -> int:
    st = os.statvfs(path)
    return sum(ms for st_flag, ms in _KEPT if st.f_flag & st_flag)


def _remount(path: str, *, readonly: bool) -> None:
    _mount(None, path, None, MS_REMOUNT | MS_BIND | (MS_RDONLY if readonly else 0) | _kept_flags(path))


def _mount_points() -> list[str]:
    """Every mount point of this namespace, outermost first (``/proc/self/mountinfo``, field 5,
    with its octal escapes decoded)."""
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            raw = line.split()[4]
            points.append(os.fsdecode(raw.decode("unicode_escape").encode("latin-1")))
    return sorted(set(points), key=lambda p: (p.count("/"), p))


def _all_read_only() -> None:
    for point in _mount_points():
        if point == "/proc" or point.startswith("/proc/"):
            continue  # this namespace's own /proc (--mount-proc)
        try:
            _remount(point, readonly=True)
        except (ConfineError, OSError) as exc:
            if not os.path.exists(point):  # a mount point under another mount: out of reach anyway
                continue
            raise ConfineError(f"cannot make {point} read-only: {exc}") from exc


def _mask(path: str, mode: str = "0755") -> None:
    _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode}")


def _bind(fd: int, target: str, *, readonly: bool) -> None:
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "x").close()
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    _remount(target, readonly=readonly)


def _drop_capabilities(uid: int, gid: int) -> None:
    """Enter a nested user namespace mapped to the grader's uid and gid: no capabilities over
    these mounts, none at all after ``execve``."""
    if _libc.unshare(CLONE_NEWUSER) != 0:
        raise ConfineError(f"unshare(CLONE_NEWUSER) failed: {os.strerror(ctypes.get_errno())}")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} 0 1"), ("gid_map", f"{gid} 0 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def confine(spec: dict) -> None:
    scratch = os.path.realpath(spec["scratch"])
    masked = spec["masked"]
    exposed = sorted(spec["exposed"], key=lambda p: p.count("/"))
    # Handles on what the masks will cover, taken before they do
    handles = {path: os.open(path, O_PATH | os.O_CLOEXEC) for path in [*exposed, scratch]}
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates back to the grader
    _all_read_only()
    if os.path.isdir("/dev/shm"):
        _mask("/dev/shm", "1777")  # private shared memory, not the grader's
    for path in sorted(masked, key=lambda p: p.count("/")):
        if os.path.isdir(path):  # absent: inside a folder masked already
            _mask(path, "1777" if path == "/tmp" else "0755")
    for path in exposed:  # the interpreter and the course, where a mask covered them
        _bind(handles[path], path, readonly=True)
    for path in sorted(spec["hidden"], key=lambda p: p.count("/")):  # hidden even inside those
        if os.path.isdir(path):  # absent: under a mask and not bound back, so hidden already
            _mask(path)
    _bind(handles[scratch], scratch, readonly=False)
    for fd in handles.values():
        os.close(fd)
    _drop_capabilities(spec["uid"], spec["gid"])
    os.chdir(os.path.join(scratch, "work"))


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: confine.py SPEC_JSON -- COMMAND...\n")
        sys.exit(126)
    try:
        confine(json.loads(argv[0]))
    except (ConfineError, OSError, KeyError, ValueError) as exc:
        sys.stderr.write(f"course sandbox (unshare): {exc}; the student process was not started\n")
        sys.exit(126)
    _run_as_init(argv[2:])


def _run_as_init(cmd: list[str]) -> None:
    """Stay as the PID namespace's init (as bubblewrap's does) and run ``cmd`` as its child: the
    student then has a parent it cannot kill (the kernel drops signals sent to a namespace's init
    from inside it), and orphans are reaped. Exits with the child's status, 128 + the signal's
    number when a signal ended it (bubblewrap's convention); leaving kills the whole namespace."""
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(cmd[0], cmd)
        except OSError as exc:
            sys.stderr.write(f"course sandbox (unshare): cannot execute {cmd[0]}: {exc}\n")
            os._exit(126)
    while True:
        try:
            reaped, status = os.wait()
        except ChildProcessError:
            sys.exit(126)
        except InterruptedError:
            continue
        if reaped == pid:
            sys.exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


if __name__ == "__main__":
    main(sys.argv[1:])
