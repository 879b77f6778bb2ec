"""Progressive distillation: the target makes one student step land exactly where two teacher steps
land (on every path, 2-D and images, per-sample times), it is not the teacher's own x0 prediction,
the loss vanishes for a student that computes the target, and bad grids are refused."""

import pytest
import torch
from torch import nn

from course.conversions import as_prediction_fn
from course.distillation import (
    ddim_x0_step,
    progressive_distillation_loss,
    progressive_distillation_target,
    student_grid,
    truncated_snr_weight,
)
from course.fast_samplers import sampling_grid
from course.ode import sample_flow_euler
from course.paths import LinearPath
from course.sde import VPSDE, SubVPSDE
from tests.conftest import SHAPES

PATHS = [LinearPath(), VPSDE(), SubVPSDE()]


class Teacher(nn.Module):
    """A nonlinear stand-in velocity network (rank-agnostic)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.8))

    def forward(self, x, t, **cond):
        return torch.sin(self.a * x) - x * t.reshape(-1, *([1] * (x.ndim - 1)))


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
@pytest.mark.parametrize("shape", SHAPES)
def test_one_student_step_with_the_target_lands_where_two_teacher_steps_land(path, shape):
    gen = torch.Generator().manual_seed(0)
    teacher = as_prediction_fn(Teacher().double(), path, "velocity", "x0")
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    b = shape[0]
    t = 0.3 + 0.6 * torch.rand(b, generator=gen, dtype=torch.float64)  # per-sample times
    t_mid, t_next = t * 0.7, t * 0.35
    target = progressive_distillation_target(teacher, z, t, t_mid, t_next, path=path)
    one = ddim_x0_step(z, t, t_next, target, path)
    z_mid = ddim_x0_step(z, t, t_mid, teacher(z, t), path)
    two = ddim_x0_step(z_mid, t_mid, t_next, teacher(z_mid, t_mid), path)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-12)
    # the target is not the teacher's x0 prediction (the classic mistake), and swapping times is refused
    assert (target - teacher(z, t)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="t > t_mid > t_next"):
        progressive_distillation_target(teacher, z, t, t_next, t_mid, path=path)


def test_target_of_the_last_step_to_clean_data_is_the_teachers_endpoint():
    """On the linear path a step to t = 0 has sigma = 0: x_tilde is simply where the teacher lands."""
    path = LinearPath()
    teacher = as_prediction_fn(Teacher().double(), path, "velocity", "x0")
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t, t_mid, t_next = (torch.full((16,), v, dtype=torch.float64) for v in (0.5, 0.25, 0.0))
    target = progressive_distillation_target(teacher, z, t, t_mid, t_next, path=path)
    z_mid = ddim_x0_step(z, t, t_mid, teacher(z, t), path)
    torch.testing.assert_close(target, teacher(z_mid, t_mid))


def test_student_with_the_target_as_its_prediction_has_zero_loss_and_samples_like_the_teacher():
    """A one-step student (teacher grid [1, 0.5, 0]) that computes x_tilde itself has loss 0, and its
    one DDIM step equals the teacher's two Euler steps (Euler is DDIM on the linear path)."""
    path, grid = LinearPath(), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    net = Teacher().double()
    teacher = as_prediction_fn(net, path, "velocity", "x0")

    def student(z, t, **cond):
        b = z.shape[0]
        return progressive_distillation_target(teacher, z, t, torch.full((b,), 0.5, dtype=z.dtype),
                                               torch.zeros(b, dtype=z.dtype), path=path)

    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss = progressive_distillation_loss(student, teacher, x0, grid, path=path,
                                         generator=torch.Generator().manual_seed(3))
    assert loss.item() < 1e-20
    z1 = torch.randn(32, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    two_steps = sample_flow_euler(net, z1, grid)
    one_step = ddim_x0_step(z1, 1.0, 0.0, student(z1, torch.ones(32, dtype=torch.float64)), path)
    torch.testing.assert_close(one_step, two_steps)


def test_loss_has_a_gradient_path_to_the_student_only():
    path = LinearPath()
    student_net, teacher_net = Teacher(), Teacher()
    student = as_prediction_fn(student_net, path, "velocity", "x0")
    teacher = as_prediction_fn(teacher_net, path, "velocity", "x0")
    with torch.no_grad():
        student_net.a.add_(0.3)
    grid = sampling_grid(4, kind="uniform", t_min=0.0)
    loss = progressive_distillation_loss(student, teacher, torch.randn(8, 1, 6, 6), grid, path=path,
                                         generator=torch.Generator().manual_seed(5))
    loss.backward()
    assert student_net.a.grad is not None and student_net.a.grad.abs() > 0
    assert teacher_net.a.grad is None


def test_student_grid_and_bad_grids():
    g = sampling_grid(8, kind="power", power=2.5, t_min=0.0)
    assert torch.equal(student_grid(g), g[::2]) and len(student_grid(g)) == 5
    for bad in ([1.0, 0.0], [1.0, 0.5, 0.2, 0.0], [0.0, 0.5, 1.0], [1.0, 0.5, -0.1]):
        with pytest.raises(ValueError, match="2N \\+ 1"):
            student_grid(torch.tensor(bad))


def test_truncated_snr_weight():
    path = LinearPath()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(truncated_snr_weight(path, t), torch.tensor([81.0, 1.0, 1.0], dtype=torch.float64))


def test_sample_ddim_x0_takes_one_ddim_step_per_interval_and_checks_its_grid():
    from course.distillation import sample_ddim_x0

    path = LinearPath()
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    calls = []

    def x0_fn(z, t):
        calls.append(t)
        return torch.tanh(z) * (1 - t[:, None])

    grid = torch.tensor([1.0, 0.6, 0.25, 0.0], dtype=torch.float64)
    got = sample_ddim_x0(x0_fn, x, grid, path=path)
    expected = x
    for a, b in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
        expected = ddim_x0_step(expected, a, b, torch.tanh(expected) * (1 - a), path)
    torch.testing.assert_close(got, expected)
    assert len(calls) == 3 and all(c.shape == (8,) and c.dtype == torch.float64 for c in calls)
    for bad in ([1.0], [0.5, 0.7], [1.2, 0.0]):
        with pytest.raises(ValueError, match="strictly decreasing grid"):
            sample_ddim_x0(x0_fn, x, torch.tensor(bad), path=path)
