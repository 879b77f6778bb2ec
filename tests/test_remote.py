"""The trust boundary of grading (course/exercises/remote.py): what crosses the pipe, and a real
student process answering calls, gradients, callbacks, errors and timeouts."""

import os
import pickle
import time

import nbformat
import numpy as np
import pytest
import torch
from torch import nn

from course.exercises import remote
from course.exercises.remote import (
    CheckTimedOut,
    RemoteFunction,
    SessionLost,
    StudentException,
    gradients,
)
from course.exercises.runner import Limits, student_process


def test_plain_data_round_trips_and_other_objects_are_named():
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    value = (x * 2, [torch.arange(3), 1.5, None], {"kl": torch.ones(2, dtype=torch.float32)}, "text", True)
    seen = []
    back = remote.from_wire(remote.decode(remote.encode(remote.to_wire(value))),
                            on_tensor=lambda t, path: seen.append(path))
    torch.testing.assert_close(back[0], 2 * x.detach(), rtol=0, atol=0)
    assert back[0].dtype == torch.float64 and back[0].requires_grad and back[0].is_leaf
    assert back[1][0].dtype == torch.int64 and not back[1][0].requires_grad and back[1][1:] == [1.5, None]
    assert back[2]["kl"].dtype == torch.float32 and back[3:] == ("text", True)
    assert seen == [(0,), (1, 0), (2, "kl")]
    odd = remote.from_wire(remote.to_wire(np.zeros(3)))
    assert isinstance(odd, remote.Foreign) and type(odd).__name__ == "ndarray"


def test_what_the_student_side_sends_is_read_as_plain_data_only(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with pytest.raises(ValueError, match="not plain data"):
        remote.decode(pickle.dumps({"kind": "result", "value": Payload()}))
    assert not marker.exists()
    with pytest.raises(ValueError, match="not plain data"):
        remote.decode(b"\x00garbage")


def test_framing_refuses_oversized_messages_and_honours_deadlines():
    r, w = os.pipe()
    try:
        remote.send(w, b"x" * 100)
        with pytest.raises(ValueError, match="100 bytes, more than the 10 allowed"):
            remote.receive(r, limit=10)
        os.read(r, 100)  # the refused payload (the grader drops the session at this point)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            remote.receive(r, deadline=time.monotonic() + 0.2)
        assert time.monotonic() - start < 2
        os.close(w)
        w = None
        with pytest.raises(EOFError):
            remote.receive(r)
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


class Counting:
    """A planted function that must stay on the trusted side (it counts its calls)."""

    _course_callback = True

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        if x.ndim != 2:
            raise ValueError(f"expected a batch of shape (B, D); got {tuple(x.shape)}")
        return 3 * x


STUDENT = '''
import torch, numpy as np
import course.exercises.verdict as verdict
verdict.compare = None  # patched in the student's process only

def square(x):
    return x ** 2, (x ** 2).sum()

def through(model, x):
    return model(x).pow(2).mean()

def twice(f, x):
    return f(f(x))

def raises(x):
    raise NotImplementedError("not yet")

def index_error(x):
    return x[100]

def loops(x):
    while True:
        pass

def swallows(x):
    while True:
        try:
            while True:
                pass
        except BaseException:
            pass

def numpy_out(x):
    return np.zeros(3)

def leaves(x):
    import os
    os._exit(7)
'''


@pytest.fixture
def session(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(STUDENT)]
    path = tmp_path / "08_latent_diffusion.ipynb"
    path.write_text(nbformat.writes(nb))
    with student_process(path, "08_latent_diffusion", Limits(cell_timeout=30)) as (proc, session, _):
        while remote.decode(remote.receive(session.read_fd, deadline=time.monotonic() + 60))["kind"] != "ready":
            pass
        remote.register_session(session)
        try:
            yield proc, session
        finally:
            remote.unregister_session(session)


def _fn(session, name):
    return RemoteFunction(session, name)


def test_calls_gradients_and_callbacks_cross_the_boundary(session):
    proc, s = session
    s.deadline = time.monotonic() + 30
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    sq, total = _fn(s, "square")(x)
    torch.testing.assert_close(sq, x.detach() ** 2, rtol=0, atol=0)
    assert sq.requires_grad and total.requires_grad
    w = torch.randn(4, 3, dtype=torch.float64)
    (g,) = gradients(sq, [x], w)  # d(x^2)/dx contracted with w, computed in the student process
    torch.testing.assert_close(g, 2 * x.detach() * w, rtol=1e-12, atol=0)
    (g,) = gradients(total, [x])
    torch.testing.assert_close(g, 2 * x.detach(), rtol=1e-12, atol=0)

    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    frozen = nn.Linear(3, 3).double().requires_grad_(False)
    loss = _fn(s, "through")(model, x.detach())
    ref = model(x.detach()).pow(2).mean()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
    grads = gradients(loss, list(model.parameters()))
    for got, want in zip(grads, torch.autograd.grad(ref, list(model.parameters())), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="not among the call's inputs"):
        gradients(loss, list(frozen.parameters()))

    f = Counting()
    out = _fn(s, "twice")(f, x.detach())
    torch.testing.assert_close(out, 3 * (3 * x.detach()), rtol=0, atol=0)
    assert f.calls == 2  # evaluated here, on the trusted side
    with pytest.raises(StudentException) as info:
        _fn(s, "twice")(f, x.detach()[0])
    assert info.value.type_name == "ValueError" and "expected a batch of shape (B, D)" in str(info.value)


def test_student_errors_foreign_values_and_timeouts(session):
    proc, s = session
    s.deadline = time.monotonic() + 30
    x = torch.zeros(2)
    with pytest.raises(StudentException) as info:
        _fn(s, "raises")(x)
    assert info.value.type_name == "NotImplementedError" and str(info.value) == "not yet"
    with pytest.raises(StudentException) as info:
        _fn(s, "index_error")(x)
    assert info.value.type_name == "IndexError" and info.value.line == "return x[100]"
    assert type(_fn(s, "numpy_out")(x)).__name__ == "ndarray"
    s.deadline = time.monotonic() + 1
    start = time.monotonic()
    with pytest.raises(CheckTimedOut):
        _fn(s, "loops")(x)  # interrupted by the student side's own alarm; the process goes on
    assert time.monotonic() - start < 4
    s.deadline = time.monotonic() + 30
    assert _fn(s, "square")(x)[1].item() == 0
    s.deadline = time.monotonic() + 0.5
    with pytest.raises(SessionLost, match="did not stop when interrupted"):
        _fn(s, "swallows")(x)
    assert s.lost_by_timeout
    with pytest.raises(SessionLost):
        _fn(s, "square")(x)  # a lost session stays lost


def test_a_student_process_that_exits_is_a_lost_session(session):
    proc, s = session
    s.deadline = time.monotonic() + 30
    with pytest.raises(SessionLost, match="ended while it was being checked"):
        _fn(s, "leaves")(torch.zeros(1))
    assert proc.wait(timeout=10) == 7
