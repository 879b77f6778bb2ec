"""The OS sandbox around a student process (course/exercises/isolation.py), probed from inside: a
notebook that tries to edit the installed course, read hidden folders and classmates' scratch
folders, signal the grader, reach the network, read the grader's environment and leave a detached
process behind. Skipped, with the reason, where the mechanism does not work on this machine."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nbformat
import pytest

from course.exercises import isolation, remote
from course.exercises.remote import RemoteFunction
from course.exercises.runner import SOURCE_ROOT, Limits, check_notebook, student_process

PROBE = '''
import ctypes, os, socket, subprocess, sys

libc = ctypes.CDLL(None, use_errno=True)

def syscall(f):
    return "ok" if f() == 0 else os.strerror(ctypes.get_errno())

def attempt(f):
    try:
        return "ok: " + repr(f())
    except BaseException as exc:
        return type(exc).__name__

def probe(installed, hidden, grader_pid, port, marker):
    out = {
        "write_install": attempt(lambda: open(installed, "a").write("patched")),
        "list_hidden": attempt(lambda: sorted(os.listdir(hidden))),
        "list_tmp": attempt(lambda: sorted(os.listdir("/tmp"))),
        "signal_grader": attempt(lambda: os.kill(grader_pid, 0)),
        "network": attempt(lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close()),
        "environment": os.environ.get("COURSE_TEST_SECRET", "absent"),
        "write_scratch": attempt(lambda: open("mine.txt", "w").write("x")),
        "uid": os.getuid(),
        # undo the sandbox: unmount the mask over the hidden folder, remount / writable
        "unmask": syscall(lambda: libc.umount2(hidden.encode(), 2)),
        "remount": syscall(lambda: libc.mount(None, b"/", None, 32 | 4096, None)),
        "list_hidden_after": attempt(lambda: sorted(os.listdir(hidden))),
        "write_install_after": attempt(lambda: open(installed, "a").write("patched")),
    }
    subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(300)  # {marker}"], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out
'''


def _skip_unless(kind):
    if not isolation.works(kind):
        pytest.skip(f"isolation {kind!r} does not work on this machine "
                    f"({'bubblewrap is not installed or namespaces are forbidden' if kind == 'bwrap' else 'no user namespaces'})")


def _alive(marker: str) -> bool:
    return subprocess.run(["pgrep", "-f", marker], stdout=subprocess.DEVNULL).returncode == 0


@pytest.fixture
def targets(monkeypatch):
    """An 'installed' file and a hidden folder inside the course's source tree (outside /tmp, like
    an install and a submissions folder), a classmate's scratch folder, a listening socket."""
    monkeypatch.setenv("COURSE_TEST_SECRET", "the grader's token")
    # a grader started from the temporary folder has it on sys.path: it must stay masked all the same
    monkeypatch.syspath_prepend(tempfile.gettempdir())
    tag = uuid.uuid4().hex[:8]
    installed = SOURCE_ROOT / f".isolation-probe-{tag}.py"
    installed.write_text("REFERENCE = 1\n")
    hidden = SOURCE_ROOT / f".isolation-hidden-{tag}"
    hidden.mkdir()
    (hidden / "classmate.ipynb").write_text("{}")
    classmate = Path(tempfile.mkdtemp(prefix="course-sandbox-classmate-"))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        yield installed, hidden, classmate, server.getsockname()[1]
    finally:
        server.close()
        installed.unlink()
        shutil.rmtree(hidden)
        shutil.rmtree(classmate)


def _probe(tmp_path, kind, targets):
    installed, hidden, classmate, port = targets
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(PROBE)]
    path = tmp_path / "01_forward_sdes.ipynb"
    path.write_text(nbformat.writes(nb))
    marker = f"course-isolation-{uuid.uuid4().hex}"
    limits = Limits(isolation=kind, hide=(str(hidden),))
    with student_process(path, "01_forward_sdes", limits) as (proc, session, _):
        while remote.decode(remote.receive(session.read_fd, deadline=time.monotonic() + 60))["kind"] != "ready":
            pass
        session.deadline = time.monotonic() + 30
        out = RemoteFunction(session, "probe")(str(installed), str(hidden), os.getpid(), port, marker)
    time.sleep(1.0)
    return out, marker, installed


@pytest.mark.skipif(sys.platform != "linux", reason="the OS sandboxes are Linux namespaces")
@pytest.mark.parametrize("kind", ["bwrap", "unshare"])
def test_sandbox_confines_the_student_process(tmp_path, targets, kind):
    _skip_unless(kind)
    out, marker, installed = _probe(tmp_path, kind, targets)
    assert out["write_install"] == "OSError", out  # read-only file system
    assert out["list_hidden"] == "ok: []", out
    tmp = eval(out["list_tmp"][4:])  # noqa: S307 - a list of names written by repr in the probe
    # its own scratch folder, and (when the course or Python lives under /tmp) their read-only mount points
    sandboxes = [name for name in tmp if name.startswith("course-sandbox-")]
    assert len(sandboxes) == 1 and "classmate" not in sandboxes[0], out
    exposed = {p.relative_to("/tmp").parts[0] for p in isolation._exposed() if p.is_relative_to("/tmp") and p != Path("/tmp")}
    assert set(tmp) - set(sandboxes) <= exposed, out
    assert out["signal_grader"] == "ProcessLookupError", out
    assert not out["network"].startswith("ok"), out
    assert out["environment"] == "absent"
    assert out["write_scratch"] == "ok: 1", out
    assert out["uid"] == os.getuid(), out  # the grader's uid, not a mapped root
    # no capabilities over the mounts: the masks and the read-only root cannot be undone
    assert out["unmask"] != "ok" and out["remount"] != "ok", {k: out[k] for k in ("unmask", "remount", "list_hidden_after", "write_install_after")}
    assert out["list_hidden_after"] == "ok: []" and out["write_install_after"] == "OSError", out
    assert installed.read_text() == "REFERENCE = 1\n"
    assert not _alive(marker), "a detached process outlived the sandbox"


def test_without_isolation_the_environment_is_still_scrubbed(tmp_path, targets):
    out, marker, installed = _probe(tmp_path, "none", targets)
    subprocess.run(["pkill", "-f", marker])  # no PID namespace: the detached process is ours to stop
    assert out["environment"] == "absent" and out["write_scratch"] == "ok: 1"
    assert installed.read_text() == "REFERENCE = 1\npatchedpatched"  # both writes: what the sandboxes prevent


def test_isolation_names_are_checked():
    with pytest.raises(ValueError, match="unknown isolation 'docker'"):
        Limits(isolation="docker")
    with pytest.raises(ValueError, match="unknown isolation"):
        isolation.resolve("docker")
    assert isolation.resolve("none") == "none"
    assert isolation.resolve("auto") in ("bwrap", "unshare", "none")
    assert "NOT ISOLATED" in isolation.describe("none")


@pytest.mark.parametrize("kind", ["bwrap", "unshare", "none"])
def test_a_signal_that_ends_the_notebook_is_named_in_every_mode(tmp_path, kind):
    """The sandboxes' init reports a signal as 128 + its number; the report names the signal, as
    it does without a sandbox."""
    if kind != "none":
        _skip_unless(kind)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)")]
    path = tmp_path / "01_forward_sdes.ipynb"
    path.write_text(nbformat.writes(nb))
    report = check_notebook(path, limits=Limits(isolation=kind))
    assert report.status == "crashed", report
    assert any("killed by SIGTERM" in note for note in report.notes), report.notes
